"""P2P money under real concurrency, over HTTP on real PostgreSQL: every transfer takes effect
exactly once, money is conserved, limits hold, and nothing deadlocks.

The `client` fixture is an ASGI transport in one event loop, but each request runs in its own
connection and transaction, so `asyncio.gather` is real concurrency at the database (more
requests than the pool's 20 connections, so pool waits are exercised too). Each run draws its
own random plan; the seed is in every assertion message so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import secrets
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from argon2 import PasswordHasher

from billfold import ledger
from billfold.ledger.verify import verify_ledger
from billfold.platform.db import unit_of_work
from billfold.users import service as users_service
from billfold.users.models import RegisterUser, User
from tests.conftest import SignedIn, fund, idem, registration, set_kyc_tier
from tests.integration.transfer_support import balance, sql

CURRENCY = "USD"
RICH_FUNDS = 500_000  # 5,000.00: random transfers never drain a rich user
BROKE_FUNDS = 1_000  # nobody sends to the broke users, so they run dry for certain
LIMITED_DAILY = 5_000  # a per-user daily override far below what the limited users attempt


def midday_timezone(now: datetime | None = None) -> str:
    """A fixed-offset zone where it is about noon now, so no test user's local day (or month)
    can roll over while a test runs and reset the usage being asserted."""
    hour = (now or datetime.now(UTC)).hour
    offset = 12 - hour  # -11 … +12 hours from UTC
    if offset == 0:
        return "Etc/GMT"
    # POSIX sign convention: Etc/GMT-3 is three hours *ahead* of UTC.
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


# Sign-up's argon2id (64 MiB, t=3) costs ~0.3 s per hash and again per sign-in on CI's two
# cores, and these tests need dozens of users: they are registered through the User Service
# with a cheap argon2id instead (the parameters travel in the hash, so the real sign-in over
# HTTP verifies it just as cheaply). Nothing else about them differs from a signed-up user.
_CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


async def register(app: Any, name: str, role: str = "user") -> tuple[User, dict[str, Any]]:
    """A user registered through the User Service (living at about noon, see
    `midday_timezone`), and the registration body (e-mail, password…)."""
    body = registration(name=name, timezone=midday_timezone())
    rt = dataclasses.replace(app.state.users, hasher=_CHEAP_HASHER)
    async with unit_of_work(app.state.resources.engine) as uow:
        user = await users_service.register_user(uow, rt, RegisterUser(**body), role=role)
    return user, body


async def registered_user(
    client: httpx.AsyncClient, app: Any, name: str, role: str = "user"
) -> SignedIn:
    """A registered user signed in over HTTP."""
    user, body = await register(app, name, role)
    t = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": body["email"], "password": body["password"]},
    )
    assert t.status_code == 200, t.text
    return SignedIn(user.model_dump(mode="json"), t.json(), body["email"], body["password"])


async def wallet_user(client: httpx.AsyncClient, app: Any, funds: int, name: str) -> SignedIn:
    """A KYC tier 2 user with `funds` in their wallet."""
    who = await registered_user(client, app, name)
    await set_kyc_tier(app, who.user["id"], 2)
    if funds:
        await fund(app, who.user["id"], funds, CURRENCY)
    return who


async def wallet_balance(app: Any, user_id: str) -> ledger.AccountBalance:
    async with app.state.resources.engine.connect() as conn:
        for b in await ledger.balances(conn, user_id):
            if b.currency == CURRENCY:
                return b
    raise AssertionError(f"{user_id} has no {CURRENCY} wallet")


async def funding_posted(app: Any) -> int:
    return (await balance(app, ledger.SYSTEM, CURRENCY, kind="funding")).posted


async def assert_ledger_sound(app: Any, user_ids: list[str], context: str) -> None:
    """Invariants that hold whatever ran before: every currency sums to zero over all accounts,
    each of these users' entries carries the running balance, and `billfold ledger verify`
    finds nothing."""
    unbalanced = await sql(
        app,
        "SELECT currency, sum(posted) AS total FROM ledger.accounts "
        "GROUP BY currency HAVING sum(posted) <> 0",
    )
    assert unbalanced == [], f"{context}: money was made or lost: {unbalanced}"
    broken_chain = await sql(
        app,
        """
        SELECT account_id, seq, balance_after, running FROM (
            SELECT e.account_id, e.seq, e.balance_after,
                   sum(e.amount) OVER (PARTITION BY e.account_id ORDER BY e.seq) AS running
            FROM ledger.entries e JOIN ledger.accounts a ON a.id = e.account_id
            WHERE a.owner_id = ANY(:owners)
        ) x WHERE balance_after <> running
        """,
        owners=user_ids,
    )
    assert broken_chain == [], f"{context}: entries out of step with balances: {broken_chain}"
    report = await verify_ledger(app.state.resources.engine)
    assert report.ok, f"{context}: ledger verify: {report.problems}"


@dataclass(frozen=True)
class Attempt:
    sender: int
    recipient: int
    amount: int
    response: httpx.Response


async def test_concurrent_random_transfers_conserve_money_and_respect_limits(
    client: httpx.AsyncClient, app: Any
) -> None:
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    ctx = f"seed={seed}"

    # 16 rich users trade among themselves, 4 broke ones only send, 4 have a low daily limit.
    funding_before = await funding_posted(app)
    specs = [(RICH_FUNDS, f"Rich {i}") for i in range(16)]
    specs += [(BROKE_FUNDS, f"Broke {i}") for i in range(4)]
    specs += [(RICH_FUNDS, f"Limited {i}") for i in range(4)]
    people = list(
        await asyncio.gather(*(wallet_user(client, app, funds, name) for funds, name in specs))
    )
    initial = [funds for funds, _ in specs]
    rich, broke, limited = list(range(16)), list(range(16, 20)), list(range(20, 24))
    admin = await registered_user(client, app, "Limits Admin", role="admin")
    assert "admin" in admin.tokens["scope"].split()
    for i in limited:
        r = await client.put(
            f"/v1/admin/users/{people[i].user['id']}/transfer-limits/{CURRENCY}",
            json={"daily": LIMITED_DAILY},
            headers=admin.headers,
        )
        assert r.status_code == 200, r.text
    receivers = rich + limited  # never the broke users: their balance only goes down

    attempts: list[Attempt] = []

    async def send(sender: int, recipient: int, amount: int) -> None:
        r = await client.post(
            "/v1/transfers",
            json={
                "recipient": {"user_id": people[recipient].user["id"]},
                "amount": amount,
                "currency": CURRENCY,
            },
            headers=idem(**people[sender].headers),
        )
        attempts.append(Attempt(sender, recipient, amount, r))

    async def client_session(plan: list[tuple[int, int, int]]) -> None:
        for sender, recipient, amount in plan:
            await send(sender, recipient, amount)

    plans: list[list[tuple[int, int, int]]] = []
    # 10 pairs sending to each other at the same time: A→B and B→A, the deadlock-prone pattern.
    shuffled = rng.sample(rich, len(rich))
    for a, b in zip(shuffled[0::2], shuffled[1::2], strict=False):
        plans.append([(a, b, rng.randint(1, 20_000)) for _ in range(4)])
        plans.append([(b, a, rng.randint(1, 20_000)) for _ in range(4)])
    plans.append([(shuffled[0], shuffled[-1], rng.randint(1, 20_000)) for _ in range(4)])
    plans.append([(shuffled[-1], shuffled[0], rng.randint(1, 20_000)) for _ in range(4)])
    # Each broke user tries 3 x 600 with 1,000: at least two must fail for insufficient funds.
    plans += [[(i, rng.choice(receivers), 600)] * 3 for i in broke]
    # Each limited user tries 4 x 2,000 against a 5,000 daily limit: at least two must fail.
    plans += [
        [(i, rng.choice([r for r in receivers if r != i]), 2_000) for _ in range(4)]
        for i in limited
    ]
    # And 40 clients sending anything from anyone to anyone else.
    for _ in range(40):
        plan = []
        for _ in range(4):
            sender = rng.randrange(len(people))
            recipient = rng.choice([r for r in receivers if r != sender])
            plan.append((sender, recipient, rng.randint(1, 20_000)))
        plans.append(plan)
    assert len(plans) >= 50

    await asyncio.gather(*(client_session(plan) for plan in plans))

    # Every answer is a completed transfer or a clean, expected refusal: no 5xx (a deadlock or
    # a lock timeout would be one), no other error.
    outcomes = Counter((a.response.status_code, a.response.json().get("code")) for a in attempts)
    unexpected = {
        k: v
        for k, v in outcomes.items()
        if k not in {(201, None), (422, "insufficient_funds"), (422, "limit_exceeded")}
    }
    assert not unexpected, (
        f"{ctx}: unexpected answers {unexpected}: "
        + "; ".join(
            a.response.text
            for a in attempts
            if (a.response.status_code, a.response.json().get("code")) in unexpected
        )[:2000]
    )
    done = [a for a in attempts if a.response.status_code == 201]
    for a in done:
        body = a.response.json()
        assert body["status"] == "completed", (ctx, body)
        assert body["amount"] == a.amount and body["currency"] == CURRENCY, (ctx, body)
        assert body["sender"]["user_id"] == people[a.sender].user["id"], (ctx, body)
        assert body["recipient"]["user_id"] == people[a.recipient].user["id"], (ctx, body)
    refused = defaultdict(Counter)
    for a in attempts:
        if a.response.status_code == 422:
            refused[a.response.json()["code"]][a.sender] += 1
    for i in broke:
        assert refused["insufficient_funds"][i] >= 2, (ctx, i, refused)
    for i in limited:
        assert refused["limit_exceeded"][i] >= 2, (ctx, i, refused)

    # Each wallet is exactly its funding plus what it received minus what it sent.
    expected = list(initial)
    sent_today = [0] * len(people)
    for a in done:
        expected[a.sender] -= a.amount
        expected[a.recipient] += a.amount
        sent_today[a.sender] += a.amount
    for i, who in enumerate(people):
        b = await wallet_balance(app, who.user["id"])
        assert (b.posted, b.held) == (expected[i], 0), (ctx, specs[i][1], b, expected[i])
        assert b.available >= 0, (ctx, b)
    assert sum(expected) == sum(initial), ctx  # closed system: moved, never made
    assert funding_before - await funding_posted(app) == sum(initial), ctx

    # One transfer row and one balanced two-leg posting per 201, and none for any refusal.
    user_ids = [p.user["id"] for p in people]
    rows = await sql(
        app,
        "SELECT id, sender_id, recipient_id, amount, status, posting_id FROM p2p.transfers "
        "WHERE sender_id = ANY(:ids)",
        ids=user_ids,
    )
    assert sorted(r.id for r in rows) == sorted(a.response.json()["id"] for a in done), ctx
    assert {r.status for r in rows} == {"completed"}, ctx
    legs = await sql(
        app,
        """
        SELECT p.reference, a.owner_id, e.amount FROM ledger.postings p
        JOIN ledger.entries e ON e.posting_id = p.id
        JOIN ledger.accounts a ON a.id = e.account_id
        WHERE p.reference = ANY(:refs)
        """,
        refs=[r.id for r in rows],
    )
    by_transfer: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for leg in legs:
        by_transfer[leg.reference].add((leg.owner_id, leg.amount))
    assert len(legs) == 2 * len(rows), ctx
    for r in rows:
        assert by_transfer[r.id] == {(r.sender_id, -r.amount), (r.recipient_id, r.amount)}, ctx

    # Limit usage is exactly what was sent today, and never above the limit.
    for i, who in enumerate(people):
        r = await client.get("/v1/transfers/limits", headers=who.headers)
        assert r.status_code == 200, r.text
        (usd,) = [d for d in r.json()["data"] if d["currency"] == CURRENCY]
        assert usd["daily"]["used"] == sent_today[i], (ctx, specs[i][1], usd, sent_today[i])
        assert usd["monthly"]["used"] == sent_today[i], (ctx, specs[i][1], usd)
        assert usd["daily"]["used"] <= usd["daily"]["limit"], (ctx, specs[i][1], usd)
        if i in limited:
            assert usd["daily"]["limit"] == LIMITED_DAILY, (ctx, usd)

    await assert_ledger_sound(app, user_ids, ctx)


async def test_concurrent_duplicates_take_effect_exactly_once(
    client: httpx.AsyncClient, app: Any
) -> None:
    copies = 10
    people = list(
        await asyncio.gather(*(wallet_user(client, app, 100_000, f"Dup {i}") for i in range(8)))
    )
    # (sender, recipient, amount): one sender with two different keys, and a pair of users
    # paying each other at the same time.
    transfers = [(0, 1, 1_111), (0, 2, 2_222), (1, 0, 3_333), (3, 4, 4_444), (5, 6, 5_555)]
    transfers += [(6, 5, 6_666), (7, 3, 7_777)]
    keys = [uuid.uuid4().hex for _ in transfers]

    def request(k: int) -> Any:
        sender, recipient, amount = transfers[k]
        return client.post(
            "/v1/transfers",
            json={
                "recipient": {"user_id": people[recipient].user["id"]},
                "amount": amount,
                "currency": CURRENCY,
                "note": f"key {k}",
            },
            headers={"Idempotency-Key": keys[k], **people[sender].headers},
        )

    fired = [k for k in range(len(transfers)) for _ in range(copies)]
    random.shuffle(fired)
    responses = await asyncio.gather(*(request(k) for k in fired))

    first: dict[int, list[httpx.Response]] = defaultdict(list)
    replays: dict[int, list[httpx.Response]] = defaultdict(list)
    in_progress: list[int] = []
    for k, r in zip(fired, responses, strict=True):
        if r.status_code == 201:
            (replays if r.headers.get("idempotent-replayed") == "true" else first)[k].append(r)
        else:
            # The only other answer a concurrent duplicate may get: "still in progress".
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "idempotency_request_in_progress", r.text
            assert r.headers["retry-after"] == "1"
            in_progress.append(k)

    ids: dict[int, str] = {}
    for k in range(len(transfers)):
        assert len(first[k]) == 1, f"key {k} took effect {len(first[k])} times"
        original = first[k][0].json()
        assert original["status"] == "completed"
        ids[k] = original["id"]
        for replay in replays[k]:
            assert replay.json() == original  # the stored answer, not a second transfer

    # Both races happened: copies that overlapped the first (409) and copies that came after
    # its commit (replays; more requests than pool connections makes some wait that long).
    assert in_progress and any(replays.values()), (len(in_progress), replays)

    # Now that every first request has committed, each refused duplicate replays it (one at a
    # time: retries fired together would be concurrent duplicates of each other again).
    for k in in_progress:
        r = await request(k)
        assert r.status_code == 201, r.text
        assert r.headers.get("idempotent-replayed") == "true"
        assert r.json()["id"] == ids[k]

    # The money moved once per key: balances, transfer rows and postings agree.
    expected = [100_000] * len(people)
    for sender, recipient, amount in transfers:
        expected[sender] -= amount
        expected[recipient] += amount
    for i, who in enumerate(people):
        b = await wallet_balance(app, who.user["id"])
        assert (b.posted, b.held) == (expected[i], 0), (i, b, expected[i])
    user_ids = [p.user["id"] for p in people]
    rows = await sql(app, "SELECT id FROM p2p.transfers WHERE sender_id = ANY(:ids)", ids=user_ids)
    assert sorted(r.id for r in rows) == sorted(ids.values())
    postings = await sql(
        app,
        "SELECT reference, count(*) AS n FROM ledger.postings WHERE reference = ANY(:refs) "
        "GROUP BY reference",
        refs=list(ids.values()),
    )
    assert {(p.reference, p.n) for p in postings} == {(i, 1) for i in ids.values()}
    for i, who in enumerate(people):
        r = await client.get("/v1/transfers/limits", headers=who.headers)
        (usd,) = [d for d in r.json()["data"] if d["currency"] == CURRENCY]
        sent = sum(amount for sender, _, amount in transfers if sender == i)
        assert usd["daily"]["used"] == sent, (i, usd)  # counted once, not once per copy

    await assert_ledger_sound(app, user_ids, "duplicates")
