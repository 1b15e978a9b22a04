"""Every money path at once: sends to users and contacts, reviews released or refused, cancels,
claims, money requests, reversals, top-ups, withdrawals, the sweepers and the consumers, all
racing over the same few wallets in two currencies.

Nothing may answer 5xx or raise a database error (a deadlock is one), no consumer may give up,
and the books must verify and balance afterwards. The mix is random but seeded (the seed is in
the failure message).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import text

from billfold import jobs, ledger, p2p
from billfold.ledger.verify import verify_ledger
from billfold.p2p import RiskDecision, TransferRisk
from billfold.platform.db import unit_of_work
from billfold.platform.errors import ProblemError
from tests.conftest import SignedIn, fund, set_kyc_tier, sign_up
from tests.integration.p2p_contact_support import assert_escrow_conserved, verify_contact
from tests.integration.payment_methods_support import add_bank, add_card
from tests.integration.transfer_support import make_admin, risk, sql

CURRENCIES = ("USD", "EUR")
WAVES = 6
OPS_PER_WAVE = 30


class ReviewSome:
    """Holds every transfer whose amount is a multiple of 5 for review; lets the rest through."""

    async def assess(self, conn: Any, transfer: TransferRisk) -> RiskDecision:
        return RiskDecision("review" if transfer.money.amount % 5 == 0 else "allow")


async def test_every_money_path_at_once_never_deadlocks_nor_answers_5xx(
    client: httpx.AsyncClient, app: Any, hsm: Any, network_simulator: Any
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    engine = app.state.resources.engine
    # Other tests of this worker's database park malformed events on purpose: only what this
    # test's traffic parks counts.
    dead_before = await _scalar(app, "SELECT coalesce(max(id), 0) FROM platform.dead_letters")
    people = [await sign_up(client, name=f"Racer {i}") for i in range(5)]
    admin = await make_admin(app, client)
    for who in people:
        await verify_contact(client, app, who, "email")
        await set_kyc_tier(app, who.user["id"], 1)
        for currency in CURRENCIES:
            await fund(app, who.user["id"], 200_000, currency)
    # Top-ups come from a verified card or bank account, withdrawals go to a bank account.
    cards = {p.user["id"]: (await add_card(client, p))["id"] for p in people}
    banks = {
        (p.user["id"], currency): (await add_bank(client, app, p, currency))["id"]
        for p in people
        for currency in CURRENCIES
    }
    ids = [p.user["id"] for p in people]
    answers: list[tuple[str, int, str]] = []
    asked: dict[str, SignedIn] = {}  # request id → who was asked to pay it
    failures: list[str] = []
    sink = jobs.event_sink(engine, app.state.p2p)
    last_seq = int(await _scalar(app, "SELECT coalesce(max(seq), 0) FROM platform.outbox"))

    async def call(label: str, method: str, path: str, who: SignedIn, **kw: Any) -> Any:
        headers = {**who.headers, "Idempotency-Key": uuid.uuid4().hex}
        r = await client.request(method, path, headers=headers, **kw)
        answers.append((label, r.status_code, r.text[:300]))
        return r

    def mine(kind: str) -> Callable[[], Awaitable[list[Any]]]:
        queries = {
            "pending_claim": "SELECT id, sender_id FROM p2p.transfers WHERE status = 'pending_claim' AND sender_id = ANY(:ids)",
            "pending": "SELECT id, sender_id FROM p2p.transfers WHERE status = 'pending' AND sender_id = ANY(:ids)",
            "completed": "SELECT id, sender_id FROM p2p.transfers WHERE status = 'completed' AND sender_id = ANY(:ids)",
            "requests": "SELECT id, requester_id, payer_id FROM p2p.transfer_requests WHERE status = 'pending' AND requester_id = ANY(:ids)",
        }

        async def rows() -> list[Any]:
            return await sql(app, queries[kind], ids=ids)

        return rows

    def person(user_id: str) -> SignedIn:
        return next(p for p in people if p.user["id"] == user_id)

    async def send_to_user() -> None:
        a, b = rng.sample(people, 2)
        body = {
            "recipient": {"user_id": b.user["id"]},
            "amount": rng.randint(1, 3_000),
            "currency": rng.choice(CURRENCIES),
        }
        await call("send", "POST", "/v1/transfers", a, json=body)

    async def send_to_contact() -> None:
        a, b = rng.sample(people, 2)
        email = b.email if rng.random() < 0.7 else f"nobody-{uuid.uuid4().hex[:8]}@example.com"
        body = {
            "recipient": {"email": email},
            "amount": rng.randint(1, 3_000),
            "currency": rng.choice(CURRENCIES),
        }
        await call("send-contact", "POST", "/v1/transfers", a, json=body)

    async def cancel() -> None:
        rows = await mine(rng.choice(["pending_claim", "pending"]))()
        if rows:
            row = rng.choice(rows)
            await call("cancel", "POST", f"/v1/transfers/{row.id}/cancel", person(row.sender_id))

    async def claim() -> None:
        await call("claim", "POST", "/v1/transfers/claims", rng.choice(people))

    async def ask() -> None:
        a, b = rng.sample(people, 2)
        payer = {"user_id": b.user["id"]} if rng.random() < 0.5 else {"email": b.email}
        body = {"payer": payer, "amount": rng.randint(1, 3_000), "currency": rng.choice(CURRENCIES)}
        r = await call("ask", "POST", "/v1/transfer-requests", a, json=body)
        if r.status_code == 201:
            asked[r.json()["id"]] = b

    async def answer() -> None:
        rows = await mine("requests")()
        if rows:
            row = rng.choice(rows)
            payer = asked[row.id]
            verb = rng.choice(["accept", "accept", "decline"])
            await call(verb, "POST", f"/v1/transfer-requests/{row.id}/{verb}", payer)

    async def withdraw_request() -> None:
        rows = await mine("requests")()
        if rows:
            row = rng.choice(rows)
            await call(
                "cancel-request",
                "POST",
                f"/v1/transfer-requests/{row.id}/cancel",
                person(row.requester_id),
            )

    async def reverse() -> None:
        rows = await mine("completed")()
        if rows:
            row = rng.choice(rows)
            path = f"/v1/admin/transfers/{row.id}/reverse"
            await call("reverse", "POST", path, admin, json={"reason": "chargeback"})

    async def top_up_or_withdraw() -> None:
        path = rng.choice(["/v1/wallet/topups", "/v1/wallet/withdrawals"])
        who, currency = rng.choice(people), rng.choice(CURRENCIES)
        bank = banks[(who.user["id"], currency)]
        method = rng.choice([cards[who.user["id"]], bank]) if path.endswith("topups") else bank
        body = {"payment_method_id": method, "amount": rng.randint(1, 5_000), "currency": currency}
        await call(path.rsplit("/", 1)[1], "POST", path, who, json=body)

    async def review_outcome() -> None:
        rows = await mine("pending")()
        if not rows:
            return
        row = rng.choice(rows)
        try:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                if rng.random() < 0.5:
                    await p2p.release_pending(conn, app.state.p2p, row.id)
                else:
                    await p2p.fail_pending(conn, row.id, "reviewer says no")
        except ProblemError:
            pass  # released, refused or cancelled meanwhile: a clean refusal

    async def sweep() -> None:
        job = rng.choice([ledger.expire_holds, p2p.expire_claims, p2p.expire_requests])
        await job(engine)

    ops = [
        send_to_user,
        send_to_user,
        send_to_contact,
        cancel,
        claim,
        ask,
        answer,
        withdraw_request,
        reverse,
        top_up_or_withdraw,
        review_outcome,
        sweep,
    ]

    async def consume(events: list[dict[str, Any]]) -> None:
        for event in events:
            await sink(event)

    async def guarded(op: Callable[[], Awaitable[None]]) -> None:
        try:
            await op()
        except Exception as exc:  # a database error (deadlock, lock timeout) or a bug
            failures.append(f"{getattr(op, '__name__', op)}: {type(exc).__name__}: {exc}")

    with risk(app, ReviewSome()):
        for _ in range(WAVES):
            # What the last wave published goes to the consumers during this one.
            fresh = await _outbox_since(app, last_seq)
            if fresh:
                last_seq = max(e["seq"] for e in fresh)
            consumers = [consume(fresh[i::3]) for i in range(3)]
            await asyncio.gather(
                *(guarded(rng.choice(ops)) for _ in range(OPS_PER_WAVE)),
                *(guarded(lambda c=c: c) for c in consumers),
            )
            # Between waves (never during: a test's own UPDATE would take locks out of order),
            # let some holds, claims and requests run out so the sweepers have work.
            await _expire_some(app, ids, rng)

    context = f"seed {seed}"
    assert not failures, (context, failures)
    server_errors = [a for a in answers if a[1] >= 500]
    assert not server_errors, (context, server_errors)
    assert {a[1] for a in answers} & {200, 201}, (context, "nothing succeeded")
    # A verified card or bank account in the right currency always funds the wallet.
    refused_topups = [a for a in answers if a[0] == "topups" and a[1] != 201]
    assert not refused_topups, (context, refused_topups)
    dead = await sql(
        app, "SELECT consumer, error FROM platform.dead_letters WHERE id > :id", id=dead_before
    )
    assert not dead, (context, dead)
    report = await verify_ledger(engine)
    assert report.ok, (context, report.problems)
    await assert_escrow_conserved(app)
    for currency in CURRENCIES:
        total = await _scalar(
            app,
            "SELECT coalesce(sum(posted), 0) FROM ledger.accounts WHERE currency = :c",
            c=currency,
        )
        assert total == 0, (context, currency, total)


async def _scalar(app: Any, query: str, **params: Any) -> Any:
    async with app.state.resources.engine.connect() as conn:
        return await conn.scalar(text(query), params)


async def _outbox_since(app: Any, seq: int) -> list[dict[str, Any]]:
    rows = await sql(
        app,
        "SELECT seq, id, type, source, subject, time, data FROM platform.outbox "
        "WHERE seq > :s ORDER BY seq",
        s=seq,
    )
    return [
        {
            "seq": r.seq,
            "specversion": "1.0",
            "id": r.id,
            "type": r.type,
            "source": r.source,
            "subject": r.subject,
            "time": r.time.isoformat(),
            "datacontenttype": "application/json",
            "data": r.data,
        }
        for r in rows
    ]


async def _expire_some(app: Any, ids: list[str], rng: random.Random) -> None:
    past = "now() - interval '1 second'"
    await sql(
        app,
        f"UPDATE ledger.holds SET expires_at = {past} WHERE status = 'active' AND id IN "
        "(SELECT h.id FROM ledger.holds h JOIN ledger.accounts a ON a.id = h.account_id "
        " WHERE h.status = 'active' AND a.owner_id = ANY(:ids) AND random() < :p)",
        ids=ids,
        p=rng.random() / 2,
    )
    await sql(
        app,
        f"UPDATE p2p.transfers SET claim_expires_at = {past} "
        "WHERE status = 'pending_claim' AND sender_id = ANY(:ids) AND random() < :p",
        ids=ids,
        p=rng.random() / 2,
    )
    await sql(
        app,
        f"UPDATE p2p.transfer_requests SET expires_at = {past} "
        "WHERE status = 'pending' AND requester_id = ANY(:ids) AND random() < :p",
        ids=ids,
        p=rng.random() / 3,
    )
