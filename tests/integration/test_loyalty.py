"""Loyalty end to end on real PostgreSQL: payments made over HTTP (wallet and card through the
network simulator), their outbox events run through the loyalty consumer, points in the ledger
(PTS), proportional reversal on refunds, redemption into the wallet (atomic, idempotent, safe
under concurrency), FIFO expiry and tiers on a clock the test moves, hostile input."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from billfold import loyalty
from billfold.ledger.verify import verify_ledger
from billfold.platform.bus.consumers import ConsumerSink
from billfold.platform.clock import rfc3339, utcnow
from billfold.transactions import recover_stuck_payments
from tests.conftest import SignedIn, fund, sign_up
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import act, balance, pay, payment_body, sql
from tests.integration.transfer_support import outbox_envelopes, send

pytestmark = pytest.mark.usefixtures("network_simulator")

# An electronics shop (MCC 5732, category `shopping`): no seeded bonus rule matches it, so a
# capture earns the base rate only (1 point per dollar, floored).
SHOP = {
    "id": "mch_loyalty_shop",
    "name": "Gadget Shop",
    "mcc": "5732",
    "country": "US",
    "city": "Oakland",
    "latitude": 37.8044,
    "longitude": -122.2712,
}
EARNED = "billfold.loyalty.points.earned"
REVERSED = "billfold.loyalty.points.reversed"
REDEEMED = "billfold.loyalty.points.redeemed"
EXPIRED = "billfold.loyalty.points.expired"
TIER_CHANGED = "billfold.loyalty.tier.changed"


class Clock:
    """A clock the test sets; unset, it is the real one."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or utcnow()


class Points:
    """The loyalty consumer on the test app's outbox, with a clock the test controls."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.clock = Clock()
        self.rt = loyalty.LoyaltyRuntime(app.state.p2p.settings, clock=self.clock)
        self.engine = app.state.resources.engine
        self.sink = ConsumerSink(self.engine, loyalty.consumers(self.rt), backoff_seconds=0)

    async def deliver(self, *subjects: str, times: int = 1) -> None:
        """Run the consumer on every outbox event about `subjects` (`times` over)."""
        found = await outbox_envelopes(self.app, list(subjects))
        for _ in range(times):
            for event in found:
                await self.sink(event)
        dead = await sql(
            self.app,
            "SELECT error FROM platform.dead_letters WHERE consumer = 'loyalty' "
            "AND event_id = ANY(:ids)",
            ids=[e["id"] for e in found],
        )
        assert dead == [], dead

    async def expire(self) -> int:
        return await loyalty.expire_points(self.engine, self.rt)

    async def reevaluate(self) -> int:
        return await loyalty.reevaluate_tiers(self.engine, self.rt)


def envelope(id_: str, type_: str, subject: str, time: datetime, data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id_,
        "type": type_,
        "source": "/billfold/transactions",
        "subject": subject,
        "time": rfc3339(time),
        "datacontenttype": "application/json",
        "data": data,
    }


@pytest.fixture
def points(app: Any) -> Points:
    return Points(app)


@pytest.fixture
async def api_clock(app: Any) -> AsyncIterator[Clock]:
    """The API's loyalty clock, set by the test and put back after it."""
    clock = Clock()
    rt = app.state.loyalty
    saved, rt.clock = rt.clock, clock
    try:
        yield clock
    finally:
        rt.clock = saved


def shop(**overrides: Any) -> dict[str, Any]:
    return {**SHOP, **overrides}


async def captured_wallet_payment(
    client: httpx.AsyncClient, who: SignedIn, amount: int, merchant: dict[str, Any] | None = None
) -> str:
    """A wallet payment of `amount` USD, authorized and captured in full: its id."""
    r = await pay(client, who, payment_body(amount=amount, merchant=merchant or shop()))
    assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
    payment_id: str = r.json()["id"]
    r = await act(client, who, payment_id, "capture")
    assert r.status_code == 201, r.text
    return payment_id


async def loyalty_account(client: httpx.AsyncClient, who: SignedIn) -> dict[str, Any]:
    r = await client.get("/v1/loyalty", headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def redeem(
    client: httpx.AsyncClient,
    who: SignedIn,
    body: Any,
    key: str | None = None,
    **headers: str,
) -> httpx.Response:
    return await client.post(
        "/v1/loyalty/redemptions",
        json=body,
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex, **headers},
    )


async def loyalty_events(app: Any, type_: str, who: SignedIn) -> list[dict[str, Any]]:
    rows = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE type = :t AND subject = :s ORDER BY seq",
        t=type_,
        s=who.user["id"],
    )
    return [dict(r.data) for r in rows]


async def lots_of(app: Any, who: SignedIn) -> list[Any]:
    return await sql(
        app,
        "SELECT transaction_id, points, remaining, expires_at FROM loyalty.lots "
        "WHERE user_id = :u ORDER BY id",
        u=who.user["id"],
    )


async def assert_lots_match_balance(app: Any, who: SignedIn) -> None:
    """The invariant: the lots hold exactly the (non-negative) points balance."""
    (row,) = await sql(
        app,
        "SELECT (SELECT coalesce(sum(remaining), 0) FROM loyalty.lots WHERE user_id = :u) AS l, "
        "(SELECT coalesce(sum(posted), 0) FROM ledger.accounts WHERE owner_id = :u "
        "AND kind = 'points') AS b",
        u=who.user["id"],
    )
    assert row.l == max(row.b, 0), (row.l, row.b)


@pytest.fixture
async def bonus_rule(app: Any) -> AsyncIterator[Callable[..., Any]]:
    """Add earn rules for the test (for a merchant of its own, so no other test matches them)."""
    added: list[str] = []

    async def add(**values: Any) -> str:
        rule_id = f"test-{uuid.uuid4().hex[:12]}"
        row = {
            "id": rule_id,
            "name": "test bonus",
            "kind": "bonus",
            "mcc": None,
            "category": None,
            "merchant_id": None,
            "channel": None,
            "multiplier": 2,
            "cap_per_transaction": None,
            "cap_per_month": None,
            "priority": 1000,
            **values,
        }
        async with app.state.resources.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO loyalty.earn_rules (id, name, kind, mcc, category, merchant_id, "
                    "channel, multiplier, cap_per_transaction, cap_per_month, priority) VALUES "
                    "(:id, :name, :kind, :mcc, :category, :merchant_id, :channel, :multiplier, "
                    ":cap_per_transaction, :cap_per_month, :priority)"
                ),
                row,
            )
        added.append(rule_id)
        return rule_id

    yield add
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text("DELETE FROM loyalty.earn_rules WHERE id = ANY(:ids)"), {"ids": added}
        )


# --- earning ------------------------------------------------------------------------------------


async def test_each_capture_of_a_wallet_payment_earns_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 100_000)
    r = await pay(client, alice, payment_body(amount=12_345, merchant=shop()))
    assert r.status_code == 201, r.text
    payment_id = r.json()["id"]
    await points.deliver(payment_id)  # authorized: nothing is earned yet
    assert (await loyalty_account(client, alice))["balance"] == 0

    r = await act(client, alice, payment_id, "capture", {"amount": 10_000})
    assert r.status_code == 201, r.text
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 100
    r = await act(client, alice, payment_id, "capture")  # the other 2_345: 23.45 → 23
    assert r.status_code == 201, r.text
    # Delivered three times over (a redelivery), and the capture once more under a new event
    # id (a replay from another source): one effect per capture.
    await points.deliver(payment_id, times=3)
    (capture_event,) = await sql(
        app,
        "SELECT id, type, subject, time, data FROM platform.outbox WHERE subject = :s "
        "AND type = 'billfold.transactions.payment.captured' ORDER BY seq DESC LIMIT 1",
        s=payment_id,
    )
    await points.sink(
        envelope(
            f"evt_{uuid.uuid4().hex[:26]}",
            capture_event.type,
            capture_event.subject,
            capture_event.time,
            capture_event.data,
        )
    )

    account = await loyalty_account(client, alice)
    assert account["balance"] == 123
    assert account["tier"] == "green" and account["multiplier"] == 1.0
    assert account["progress"] == {
        "next_tier": "gold",
        "currency": "USD",
        "spend": 12_345,
        "needed": 100_000 - 12_345,
    }
    assert account["expiring_soon"]["points"] == 0
    earned = await loyalty_events(app, EARNED, alice)
    assert [e["points"] for e in earned] == [100, 23]
    assert earned[0]["transaction_id"] == payment_id and earned[0]["rule_ids"] == ["base-usd"]
    rows = await sql(
        app,
        "SELECT points, spend_amount FROM loyalty.earnings WHERE transaction_id = :t ORDER BY id",
        t=payment_id,
    )
    assert [(r.points, r.spend_amount) for r in rows] == [(100, 10_000), (23, 2_345)]
    (ledger_row,) = await sql(
        app,
        "SELECT posted, currency FROM ledger.accounts WHERE owner_id = :u AND kind = 'points'",
        u=alice.user["id"],
    )
    assert (ledger_row.posted, ledger_row.currency) == (123, "PTS")
    r = await client.get("/v1/loyalty/activity", headers=alice.headers)
    assert r.status_code == 200, r.text
    assert [(a["type"], a["points"]) for a in r.json()["data"]] == [
        ("earned", 23),
        ("earned", 100),
    ]
    # Points are not money of the wallet.
    r = await client.get("/v1/wallet", headers=alice.headers)
    assert "PTS" not in {b["currency"] for b in r.json()["balances"]}
    await assert_lots_match_balance(app, alice)


async def test_card_captures_earn_with_a_capped_bonus_and_nothing_else_earns(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    points: Points,
    network_simulator: Any,
    bonus_rule: Callable[..., Any],
) -> None:
    # The monthly cap counts by calendar month of the consumer's clock: one instant for all
    # captures, so a run across a month's end cannot split them.
    points.clock.at = utcnow()
    merchant_id = f"mch_{uuid.uuid4().hex[:12]}"
    rule_id = await bonus_rule(
        merchant_id=merchant_id, multiplier=4, cap_per_transaction=100, cap_per_month=150
    )
    method = await add_card(client, alice)
    assert method["status"] == "verified", method
    subjects = []
    for _ in range(2):
        body = payment_body("card", method["id"], amount=5_000, merchant=shop(id=merchant_id))
        r = await pay(client, alice, body)
        assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
        subjects.append(r.json()["id"])
        r = await act(client, alice, r.json()["id"], "capture")
        assert r.status_code == 201, r.text
    # A voided payment and a declined one earn nothing.
    r = await pay(client, alice, payment_body("card", method["id"], amount=5_000))
    subjects.append(r.json()["id"])
    r = await act(client, alice, r.json()["id"], "void")
    assert r.status_code in (200, 201), r.text
    network_simulator.config.amount_rules[7_777] = "05"
    try:
        r = await pay(client, alice, payment_body("card", method["id"], amount=7_777))
        assert r.json()["status"] == "declined", r.text
        subjects.append(r.json()["id"])
    finally:
        network_simulator.config.amount_rules.pop(7_777, None)
    await points.deliver(*subjects, times=2)

    # 50 base points each; the 4x bonus adds 150, capped at 100 a payment and 150 a month.
    rows = await sql(
        app,
        "SELECT transaction_id, base_points, bonus_points, rule_ids FROM loyalty.earnings "
        "WHERE user_id = :u ORDER BY id",
        u=alice.user["id"],
    )
    assert [(r.transaction_id, r.base_points, r.bonus_points) for r in rows] == [
        (subjects[0], 50, 100),
        (subjects[1], 50, 50),
    ]
    assert list(rows[0].rule_ids) == ["base-usd", rule_id]
    assert (await loyalty_account(client, alice))["balance"] == 250
    # The month's bonus is used up: a third payment there earns the base rate only.
    await fund(app, alice.user["id"], 10_000)
    third = await captured_wallet_payment(client, alice, 5_000, shop(id=merchant_id))
    await points.deliver(third)
    (row,) = await sql(
        app,
        "SELECT points, rule_ids FROM loyalty.earnings WHERE transaction_id = :t",
        t=third,
    )
    assert (row.points, list(row.rule_ids)) == (50, ["base-usd"])
    await assert_lots_match_balance(app, alice)


async def test_a_pending_or_failed_refund_takes_nothing_back(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 10_000)
    payment_id = await captured_wallet_payment(client, alice, 5_000)
    await points.deliver(payment_id)
    (captured,) = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE subject = :s "
        "AND type = 'billfold.transactions.payment.captured'",
        s=payment_id,
    )
    for status in ("pending", "failed"):
        data = {
            **captured.data,
            "refund": {"id": f"ref_{status}", "amount": 5_000, "status": status},
        }
        await points.sink(
            envelope(
                f"evt_{uuid.uuid4().hex[:26]}",
                "billfold.transactions.payment.refunded",
                payment_id,
                utcnow(),
                data,
            )
        )
    assert (await loyalty_account(client, alice))["balance"] == 50


@pytest.mark.parametrize("amount", ["5000", 50.0, -5_000, None, True])
async def test_an_event_with_a_malformed_amount_is_parked_not_silently_dropped(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points, amount: Any
) -> None:
    await fund(app, alice.user["id"], 10_000)
    payment_id = await captured_wallet_payment(client, alice, 5_000)
    (captured,) = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE subject = :s "
        "AND type = 'billfold.transactions.payment.captured'",
        s=payment_id,
    )
    bad = {**captured.data, "capture": {**captured.data["capture"], "amount": amount}}
    event_id = f"evt_{uuid.uuid4().hex[:26]}"
    await points.sink(
        envelope(event_id, "billfold.transactions.payment.captured", payment_id, utcnow(), bad)
    )
    (dead,) = await sql(
        app,
        "SELECT error FROM platform.dead_letters WHERE consumer = 'loyalty' AND event_id = :e",
        e=event_id,
    )
    assert "capture.amount" in dead.error
    assert (await loyalty_account(client, alice))["balance"] == 0
    # The good event still earns (the capture was not marked handled).
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 50


# --- refunds ------------------------------------------------------------------------------------


async def test_refunds_take_back_points_in_proportion_and_all_of_them_in_the_end(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 20_000)
    payment_id = await captured_wallet_payment(client, alice, 10_001)  # 100 points
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 100

    balances = []
    for amount in (3_333, 3_333, 3_335):
        r = await act(client, alice, payment_id, "refunds", {"amount": amount})
        assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
        await points.deliver(payment_id, times=2)
        balances.append((await loyalty_account(client, alice))["balance"])
    # floor(100 x refunded / captured) in all after each: 33, 66, then exactly 100.
    assert balances == [67, 34, 0]
    reversed_ = await loyalty_events(app, REVERSED, alice)
    assert [e["points"] for e in reversed_] == [33, 33, 34]
    assert (await lots_of(app, alice))[0].remaining == 0
    r = await client.get("/v1/loyalty/activity", headers=alice.headers)
    assert [a["type"] for a in r.json()["data"]] == ["reversed"] * 3 + ["earned"]
    assert (await verify_ledger(app.state.resources.engine)).ok


async def test_a_card_refund_takes_points_back_once_the_network_answers(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points, network_simulator: Any
) -> None:
    """A card payment's refund: one the network approves at once, and one whose answer is lost
    (pending) until recovery asks again; only the succeeded refund takes points back."""
    method = await add_card(client, alice)
    assert method["status"] == "verified", method
    r = await pay(client, alice, payment_body("card", method["id"], amount=5_000, merchant=shop()))
    assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
    payment_id = r.json()["id"]
    r = await act(client, alice, payment_id, "capture")
    assert r.status_code == 201, r.text
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 50

    r = await act(client, alice, payment_id, "refunds", {"amount": 2_000})
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 30  # floor(50 x 2/5) back

    network = app.state.transactions.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=0.5)
    network_simulator.paused = True  # the issuer applies the refund; its answer is lost
    try:
        r = await act(client, alice, payment_id, "refunds", {"amount": 3_000})
    finally:
        network_simulator.paused = False
        network.config = config
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    refund_id = r.json()["id"]
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 30  # pending: nothing yet

    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE transactions.refunds SET created_at = now() - interval '1 hour' "
                "WHERE id = :r"
            ),
            {"r": refund_id},
        )
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) >= 1
    await points.deliver(payment_id, times=2)
    assert (await loyalty_account(client, alice))["balance"] == 0
    reversed_ = await loyalty_events(app, REVERSED, alice)
    assert [(e["refund_id"], e["points"]) for e in reversed_][1:] == [(refund_id, 30)]
    assert len(reversed_) == 2
    await assert_lots_match_balance(app, alice)


async def test_a_refund_after_redeeming_claws_back_below_zero_and_later_points_pay_it_off(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 100_000)
    first = await captured_wallet_payment(client, alice, 20_000)  # 200 points
    await points.deliver(first)
    r = await redeem(client, alice, {"points": 200, "currency": "USD"})
    assert r.status_code == 201, r.text
    r = await act(client, alice, first, "refunds", {})
    assert r.status_code == 201, r.text
    await points.deliver(first)
    assert (await loyalty_account(client, alice))["balance"] == -200
    r = await redeem(client, alice, {"points": 100, "currency": "USD"})
    assert r.status_code == 422 and r.json()["code"] == "insufficient_points", r.text

    second = await captured_wallet_payment(client, alice, 30_000)  # 300 points
    await points.deliver(second)
    assert (await loyalty_account(client, alice))["balance"] == 100
    await assert_lots_match_balance(app, alice)
    r = await redeem(client, alice, {"points": 200, "currency": "USD"})
    assert r.status_code == 422 and r.json()["code"] == "insufficient_points", r.text
    r = await redeem(client, alice, {"points": 100, "currency": "USD"})
    assert r.status_code == 201, r.text
    assert (await loyalty_account(client, alice))["balance"] == 0
    await assert_lots_match_balance(app, alice)


async def test_a_refund_of_a_payment_whose_points_expired_takes_nothing_twice(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    """Points that expired went back to the system already: a refund of their payment takes
    back only what of them the user still had (or spent), never another payment's points."""
    await fund(app, alice.user["id"], 100_000)
    old = await captured_wallet_payment(client, alice, 10_000)  # 100 points, a year ago
    points.clock.at = utcnow() - timedelta(days=366)
    await points.deliver(old)
    points.clock.at = None
    partly = await captured_wallet_payment(client, alice, 10_000)  # 100 points, half expire
    points.clock.at = utcnow() - timedelta(days=366)
    await points.deliver(partly)
    points.clock.at = None
    r = await act(client, alice, partly, "refunds", {"amount": 5_000})  # 50 taken back
    assert r.status_code == 201, r.text
    await points.deliver(partly)
    newer = await captured_wallet_payment(client, alice, 10_000)  # 100 points, now
    await points.deliver(newer)
    assert (await loyalty_account(client, alice))["balance"] == 250
    assert await points.expire() >= 150
    assert (await loyalty_account(client, alice))["balance"] == 100

    for payment_id in (old, partly):
        r = await act(client, alice, payment_id, "refunds", {})
        assert r.status_code == 201, r.text
        await points.deliver(payment_id)
    # Nothing of either was left to take back: the newer payment keeps its 100 points.
    assert (await loyalty_account(client, alice))["balance"] == 100
    assert [e["points"] for e in await loyalty_events(app, REVERSED, alice)] == [50]
    assert [(lot.transaction_id, lot.remaining) for lot in await lots_of(app, alice)] == [
        (old, 0),
        (partly, 0),
        (newer, 100),
    ]
    await assert_lots_match_balance(app, alice)
    assert (await verify_ledger(app.state.resources.engine)).ok


# --- redemption ---------------------------------------------------------------------------------


async def test_a_redemption_moves_points_and_money_together_once_per_key(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 60_000)
    payment_id = await captured_wallet_payment(client, alice, 50_000)  # 500 points
    await points.deliver(payment_id)
    wallet_before = await balance(client, alice)

    key = uuid.uuid4().hex
    r = await redeem(client, alice, {"points": 300, "currency": "USD"}, key)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["points"] == 300 and first["amount"] == 300 and first["balance"] == 200
    assert first["id"].startswith("rdm_")
    again = await redeem(client, alice, {"points": 300, "currency": "USD"}, key)
    assert again.status_code == 201 and again.json() == first
    assert again.headers.get("idempotent-replayed") == "true"
    other = await redeem(client, alice, {"points": 100, "currency": "USD"}, key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reuse"
    # After the edge's stored answer expired, the service's own record of the key still tells
    # a retry (the first redemption, once) from another request under the same key.
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE platform.idempotency_keys SET expires_at = now() - interval '1 second' "
                "WHERE key = :k"
            ),
            {"k": key},
        )
    other = await redeem(client, alice, {"points": 100, "currency": "USD"}, key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reuse", other.text
    late = await redeem(client, alice, {"points": 300, "currency": "USD"}, key)
    assert late.status_code == 201, late.text
    assert {k: late.json()[k] for k in ("id", "points", "amount")} == {
        k: first[k] for k in ("id", "points", "amount")
    }

    assert (await loyalty_account(client, alice))["balance"] == 200
    wallet = await balance(client, alice)
    assert wallet.available == wallet_before.available + 300
    rows = await sql(
        app,
        "SELECT r.points, r.amount, p.kind FROM loyalty.redemptions r "
        "JOIN ledger.postings p ON p.id IN (r.points_posting_id, r.money_posting_id) "
        "WHERE r.user_id = :u ORDER BY p.currency",
        u=alice.user["id"],
    )
    assert len(rows) == 2 and {r.kind for r in rows} == {"loyalty_redemption"}
    (event,) = await loyalty_events(app, REDEEMED, alice)
    assert event["points"] == 300 and event["amount"] == 300 and event["currency"] == "USD"
    assert (await verify_ledger(app.state.resources.engine)).ok
    await assert_lots_match_balance(app, alice)


async def test_a_redemption_that_fails_after_its_points_posting_leaves_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    """Atomicity where it matters: the last write (the redemption row, after both postings)
    fails, and nothing of the redemption stays: points, lots, wallet, postings, outbox,
    activity and the idempotency record."""
    await fund(app, alice.user["id"], 20_000)
    await points.deliver(await captured_wallet_payment(client, alice, 10_000))  # 100 points
    user = alice.user["id"]

    async def state() -> list[Any]:
        return [
            (await loyalty_account(client, alice))["balance"],
            [lot.remaining for lot in await lots_of(app, alice)],
            await balance(client, alice),
            await sql(
                app,
                "SELECT count(*) AS n FROM ledger.postings WHERE kind = 'loyalty_redemption'",
            ),
            await sql(
                app,
                "SELECT count(*) AS n FROM platform.outbox WHERE subject = :u",
                u=user,
            ),
            await sql(app, "SELECT id FROM loyalty.activity WHERE user_id = :u", u=user),
        ]

    before = await state()
    engine = app.state.resources.engine
    # A fault injected into the redemption row only: every earlier step of the transaction ran.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "ALTER TABLE loyalty.redemptions ADD CONSTRAINT test_refuse_this_user "
                f"CHECK (user_id <> '{user}') NOT VALID"
            )
        )
    key = uuid.uuid4().hex
    try:
        r = await redeem(client, alice, {"points": 100, "currency": "USD"}, key)
    finally:
        async with engine.begin() as conn:
            await conn.execute(
                text("ALTER TABLE loyalty.redemptions DROP CONSTRAINT test_refuse_this_user")
            )
    assert r.status_code >= 500 and "Traceback" not in r.text, r.text
    assert await state() == before
    assert await sql(app, "SELECT 1 FROM platform.idempotency_keys WHERE key = :k", k=key) == []
    # The key was not used up: the same request succeeds now, once.
    r = await redeem(client, alice, {"points": 100, "currency": "USD"}, key)
    assert r.status_code == 201, r.text
    assert (await loyalty_account(client, alice))["balance"] == 0
    assert (await verify_ledger(engine)).ok


async def test_twenty_concurrent_redemptions_against_points_for_five(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 60_000)
    payment_id = await captured_wallet_payment(client, alice, 50_000)  # 500 points
    await points.deliver(payment_id)
    wallet_before = await balance(client, alice)

    answers = await asyncio.gather(
        *(redeem(client, alice, {"points": 100, "currency": "USD"}) for _ in range(20))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 5 + [422] * 15, [r.text for r in answers if r.status_code >= 500]
    assert {r.json()["code"] for r in answers if r.status_code == 422} == {"insufficient_points"}
    assert (await loyalty_account(client, alice))["balance"] == 0
    assert (await balance(client, alice)).available == wallet_before.available + 500
    (row,) = await sql(
        app,
        "SELECT count(*) AS n, min(e.balance_after) AS lowest FROM ledger.entries e "
        "JOIN ledger.accounts a ON a.id = e.account_id "
        "WHERE a.owner_id = :u AND a.kind = 'points'",
        u=alice.user["id"],
    )
    assert row.n == 6 and row.lowest == 0  # never below zero
    assert (await verify_ledger(app.state.resources.engine)).ok
    await assert_lots_match_balance(app, alice)


async def test_earnings_refunds_redemptions_and_jobs_on_one_member_at_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    """Two captures and two refunds through three consumers (as two Kafka partitions would
    run them), eight redemptions, two expiry runs and the tier job, all on one member at the
    same time: no 5xx, and the books add up to the point."""
    await fund(app, alice.user["id"], 500_000)
    wallet_start = (await balance(client, alice)).available
    old = await captured_wallet_payment(client, alice, 30_000)  # 300 points, past expiry
    points.clock.at = utcnow() - timedelta(days=366)
    await points.deliver(old)
    points.clock.at = None
    pays = [await captured_wallet_payment(client, alice, 20_000) for _ in range(4)]  # 200 each
    await points.deliver(*pays[:2])
    for payment_id in pays[:2]:  # half refunded: 100 points back each, once delivered
        r = await act(client, alice, payment_id, "refunds", {"amount": 10_000})
        assert r.status_code == 201, r.text
    wallet_before = (await balance(client, alice)).available
    assert (await loyalty_account(client, alice))["balance"] == 700

    consumers = [Points(app) for _ in range(3)]
    results = await asyncio.gather(
        *(redeem(client, alice, {"points": 100, "currency": "USD"}) for _ in range(8)),
        consumers[0].deliver(pays[2]),
        consumers[1].deliver(pays[3]),
        consumers[2].deliver(*pays[:2]),
        points.expire(),
        points.expire(),
        points.reevaluate(),
    )
    answers = results[:8]
    assert {r.status_code for r in answers} <= {201, 422}, [r.text for r in answers]
    assert all(r.json()["code"] == "insufficient_points" for r in answers if r.status_code == 422)
    redeemed = 100 * sum(r.status_code == 201 for r in answers)
    assert redeemed >= 100  # 400 points were never in doubt

    # Every point is accounted for: earned 300 + 4 x 200, 2 x 100 reversed, the old lot's
    # points gone (expired, or taken by a refund before they could expire), the rest redeemed.
    earned = await sql(
        app, "SELECT sum(points) AS n FROM loyalty.earnings WHERE user_id = :u", u=alice.user["id"]
    )
    reversed_ = await sql(
        app, "SELECT sum(points) AS n FROM loyalty.reversals WHERE user_id = :u", u=alice.user["id"]
    )
    expired = sum(e["points"] for e in await loyalty_events(app, EXPIRED, alice))
    assert (earned[0].n, reversed_[0].n) == (1_100, 200)
    (old_lot,) = [lot for lot in await lots_of(app, alice) if lot.transaction_id == old]
    assert old_lot.remaining == 0
    final = (await loyalty_account(client, alice))["balance"]
    assert final == 1_100 - 200 - expired - redeemed
    assert final >= 0 or redeemed > 0  # below zero only by clawing back redeemed points
    assert (await balance(client, alice)).available == wallet_before + redeemed
    assert wallet_before < wallet_start
    (row,) = await sql(
        app,
        "SELECT count(*) AS n FROM loyalty.redemptions WHERE user_id = :u",
        u=alice.user["id"],
    )
    assert row.n * 100 == redeemed
    await assert_lots_match_balance(app, alice)
    assert (await verify_ledger(app.state.resources.engine)).ok


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"points": 100, "currency": "JPY"}, 422, "currency_not_supported"),
        ({"points": 100, "currency": "PTS"}, 422, "currency_not_supported"),
        ({"points": 150, "currency": "USD"}, 422, "invalid_points"),
        ({"points": 0, "currency": "USD"}, 422, "validation_failed"),
        ({"points": -100, "currency": "USD"}, 422, "validation_failed"),
        ({"points": "100", "currency": "USD"}, 422, "validation_failed"),
        ({"points": 100.0, "currency": "USD"}, 422, "validation_failed"),
        ({"points": 2**63, "currency": "USD"}, 422, "validation_failed"),
        ({"points": 100, "currency": "USD", "rate": 1000}, 422, "validation_failed"),
        ({"points": 100, "currency": "US\u0000"}, 422, "validation_failed"),
        ({"points": 100}, 422, "validation_failed"),
        ([], 422, "validation_failed"),
        ({"points": 10_000, "currency": "USD"}, 422, "insufficient_points"),
    ],
)
async def test_hostile_redemptions_are_problems_that_change_nothing(
    client: httpx.AsyncClient,
    app: Any,
    points: Points,
    body: Any,
    status: int,
    code: str,
) -> None:
    who = await sign_up(client)
    await fund(app, who.user["id"], 20_000)
    payment_id = await captured_wallet_payment(client, who, 10_000)  # 100 points
    await points.deliver(payment_id)
    wallet_before = await balance(client, who)

    r = await redeem(client, who, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code
    assert "Traceback" not in r.text
    assert (await loyalty_account(client, who))["balance"] == 100
    assert await balance(client, who) == wallet_before
    assert (
        await sql(app, "SELECT 1 FROM loyalty.redemptions WHERE user_id = :u", u=who.user["id"])
        == []
    )


async def test_redemption_needs_a_key_and_a_user_and_points_are_not_sent_to_people(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    r = await client.post(
        "/v1/loyalty/redemptions", json={"points": 100, "currency": "USD"}, headers=alice.headers
    )
    assert r.status_code == 428 and r.json()["code"] == "idempotency_key_required"
    r = await client.post(
        "/v1/loyalty/redemptions",
        json={"points": 100, "currency": "USD"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 401
    assert (await client.get("/v1/loyalty")).status_code == 401
    # Nobody without points redeems any.
    r = await redeem(client, bob, {"points": 100, "currency": "USD"})
    assert r.status_code == 422 and r.json()["code"] == "insufficient_points"
    # P2P transfers, money requests and payments refuse the points unit.
    r = await send(client, alice, 100, "PTS", user_id=bob.user["id"])
    assert r.status_code == 422 and r.json()["code"] == "currency_not_supported", r.text
    r = await client.post(
        "/v1/transfer-requests",
        json={"payer": {"user_id": bob.user["id"]}, "amount": 100, "currency": "PTS"},
        headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 422 and r.json()["code"] == "currency_not_supported", r.text
    r = await pay(client, alice, payment_body(amount=100, currency="PTS"))
    assert r.status_code == 422, r.text


# --- activity -----------------------------------------------------------------------------------


async def test_activity_pages_and_each_user_sees_only_their_own(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 100_000)
    for amount in (1_000, 2_000, 3_000):
        await points.deliver(await captured_wallet_payment(client, alice, amount))

    r = await client.get("/v1/loyalty/activity?limit=2", headers=alice.headers)
    assert r.status_code == 200, r.text
    page = r.json()
    assert [a["points"] for a in page["data"]] == [30, 20] and page["next_cursor"]
    r = await client.get(
        f"/v1/loyalty/activity?limit=2&cursor={page['next_cursor']}", headers=alice.headers
    )
    assert [a["points"] for a in r.json()["data"]] == [10] and r.json()["next_cursor"] is None

    r = await client.get("/v1/loyalty/activity", headers=bob.headers)
    assert r.status_code == 200 and r.json() == {"data": [], "next_cursor": None}
    assert (await loyalty_account(client, bob))["balance"] == 0
    # Alice's cursor shows Bob nothing of hers.
    r = await client.get(f"/v1/loyalty/activity?cursor={page['next_cursor']}", headers=bob.headers)
    assert r.json()["data"] == []

    # `wrI` is base64 of "²" and `77yR` of a fullwidth one: digits to isdigit(), not to int().
    hostile = ("limit=0", "limit=101", "limit=x", "cursor=%00", "cursor=bm90LWFuLWlk")
    digits = ("cursor=wrI", "cursor=77yR", "cursor=MDAx", "cursor=OTk5OTk5OTk5OTk5OTk5OTk5OTk")
    for query in (*hostile, *digits):
        r = await client.get(f"/v1/loyalty/activity?{query}", headers=alice.headers)
        assert r.status_code == 422, (query, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


# --- expiry -------------------------------------------------------------------------------------


async def test_points_expire_first_in_first_out_by_the_job(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points, api_clock: Clock
) -> None:
    now = utcnow()
    await fund(app, alice.user["id"], 100_000)
    earned_at = [now - timedelta(days=420), now - timedelta(days=380), now - timedelta(days=340)]
    payments = []
    for at, amount in zip(earned_at, (10_000, 20_000, 5_000), strict=True):
        payment_id = await captured_wallet_payment(client, alice, amount)
        points.clock.at = at
        await points.deliver(payment_id)
        payments.append(payment_id)
    # Spent 370 days ago: the oldest lot pays first.
    api_clock.at = now - timedelta(days=370)
    r = await redeem(client, alice, {"points": 100, "currency": "USD"})
    assert r.status_code == 201, r.text
    assert [lot.remaining for lot in await lots_of(app, alice)] == [0, 200, 50]

    api_clock.at = None
    points.clock.at = now
    assert await points.expire() >= 200
    assert await points.expire() == 0  # nothing is due twice
    assert [lot.remaining for lot in await lots_of(app, alice)] == [0, 0, 50]
    (event,) = await loyalty_events(app, EXPIRED, alice)
    assert event["points"] == 200 and [lot["transaction_id"] for lot in event["lots"]] == [
        payments[1]
    ]
    account = await loyalty_account(client, alice)
    assert account["balance"] == 50
    # The last lot expires 340 + 365 days after it was earned: within the 30-day window.
    assert account["expiring_soon"]["points"] == 50
    assert account["expiring_soon"]["window_days"] == 30
    r = await client.get("/v1/loyalty/activity", headers=alice.headers)
    assert [a["type"] for a in r.json()["data"]] == [
        "expired",
        "redeemed",
        "earned",
        "earned",
        "earned",
    ]
    await assert_lots_match_balance(app, alice)
    assert (await verify_ledger(app.state.resources.engine)).ok


async def test_the_expiry_job_works_through_batches_until_nothing_is_due(
    client: httpx.AsyncClient, app: Any, points: Points
) -> None:
    members = [await sign_up(client) for _ in range(3)]
    for days, who in zip((1_002, 1_001, 1_000), members, strict=True):
        await fund(app, who.user["id"], 10_000)
        payment_id = await captured_wallet_payment(client, who, 5_000)  # 50 points
        points.clock.at = utcnow() - timedelta(days=days)  # older than any other test's lots
        await points.deliver(payment_id)
    points.clock.at = None

    async def balances() -> list[int]:
        return [(await loyalty_account(client, who))["balance"] for who in members]

    # Out of time after the first batch (one lot's member): the next run goes on from there.
    await loyalty.expire_points(points.engine, points.rt, batch=1, budget_seconds=0)
    assert await balances() == [0, 50, 50]
    # One run, batch after batch, until nothing is due.
    assert await loyalty.expire_points(points.engine, points.rt, batch=1) >= 100
    assert await balances() == [0, 0, 0]
    assert await loyalty.expire_points(points.engine, points.rt, batch=1) == 0
    for who in members:
        assert [e["points"] for e in await loyalty_events(app, EXPIRED, who)] == [50]


async def test_a_redemption_never_spends_points_past_their_expiry(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 100_000)
    payment_id = await captured_wallet_payment(client, alice, 20_000)
    points.clock.at = utcnow() - timedelta(days=366)  # expired, the job has not run yet
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 200
    r = await redeem(client, alice, {"points": 100, "currency": "USD"})
    assert r.status_code == 422 and r.json()["code"] == "insufficient_points", r.text
    # The refused redemption changed nothing: the job still finds the lot due.
    assert (await loyalty_account(client, alice))["balance"] == 200


# --- tiers --------------------------------------------------------------------------------------


async def test_tiers_follow_rolling_net_spend_up_and_down(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    await fund(app, alice.user["id"], 300_000)
    big = await captured_wallet_payment(client, alice, 100_000)
    await points.deliver(big)
    account = await loyalty_account(client, alice)
    assert account["tier"] == "gold" and account["multiplier"] == 1.25
    assert account["progress"] == {
        "next_tier": "platinum",
        "currency": "USD",
        "spend": 100_000,
        "needed": 400_000,
    }
    # Earned at the tier held when the capture came: green, 1000 points.
    assert account["balance"] == 1_000
    small = await captured_wallet_payment(client, alice, 1_000)
    await points.deliver(small)
    assert (await loyalty_account(client, alice))["balance"] == 1_012  # 10 x 1.25, floored

    # A full refund of the big payment takes the spend under the threshold: back to green.
    r = await act(client, alice, big, "refunds", {})
    assert r.status_code == 201, r.text
    await points.deliver(big)
    assert (await loyalty_account(client, alice))["tier"] == "green"

    again = await captured_wallet_payment(client, alice, 150_000)
    await points.deliver(again)
    assert (await loyalty_account(client, alice))["tier"] == "gold"
    # A year and a day later the spend has rolled out of the window: the job downgrades.
    points.clock.at = utcnow() + timedelta(days=366)
    assert await points.reevaluate() >= 1
    assert (await loyalty_account(client, alice))["tier"] == "green"
    changes = [
        (e["from_tier"], e["to_tier"], e["multiplier"])
        for e in await loyalty_events(app, TIER_CHANGED, alice)
    ]
    assert changes == [
        ("green", "gold", 1.25),
        ("gold", "green", 1.0),
        ("green", "gold", 1.25),
        ("gold", "green", 1.0),
    ]


async def test_a_refund_of_spend_outside_the_window_does_not_lower_the_tier(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    """Only spend inside the rolling window counts, and a refund takes off at most its
    payment's spend inside the window: a year-old payment's refund downgrades nobody."""
    await fund(app, alice.user["id"], 300_000)
    old = await captured_wallet_payment(client, alice, 100_000)
    points.clock.at = utcnow() - timedelta(days=366)
    await points.deliver(old)
    points.clock.at = None
    recent = await captured_wallet_payment(client, alice, 120_000)
    await points.deliver(recent)
    assert (await loyalty_account(client, alice))["tier"] == "gold"

    r = await act(client, alice, old, "refunds", {})
    assert r.status_code == 201, r.text
    await points.deliver(old)
    account = await loyalty_account(client, alice)
    assert account["tier"] == "gold"
    assert account["progress"]["spend"] == 120_000
    # A refund of spend inside the window still counts: half of the recent payment back.
    r = await act(client, alice, recent, "refunds", {"amount": 60_000})
    assert r.status_code == 201, r.text
    await points.deliver(recent)
    account = await loyalty_account(client, alice)
    assert account["tier"] == "green" and account["progress"]["spend"] == 60_000
    assert [
        (e["from_tier"], e["to_tier"]) for e in await loyalty_events(app, TIER_CHANGED, alice)
    ] == [
        ("green", "gold"),
        ("gold", "green"),
    ]


# --- the worker's wiring ------------------------------------------------------------------------


async def test_the_worker_runs_the_loyalty_consumer_and_jobs(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, settings: Any
) -> None:
    from billfold import jobs
    from billfold.platform.bus.consumers import select_consumers

    sink = jobs.event_sink(app.state.resources.engine, app.state.p2p)
    (chosen,) = select_consumers(sink.consumers, ["loyalty"])  # worker --consumers loyalty
    assert chosen.name == "loyalty"
    names = {j.name for j in jobs.scheduled_jobs(app.state.resources.engine, settings)}
    assert {"expire-loyalty-points", "reevaluate-loyalty-tiers"} <= names

    await fund(app, alice.user["id"], 10_000)
    payment_id = await captured_wallet_payment(client, alice, 4_200)
    rows = await sql(
        app,
        "SELECT id, type, subject, time, data FROM platform.outbox WHERE subject = :s ORDER BY seq",
        s=payment_id,
    )
    for r in rows:
        await sink(envelope(r.id, r.type, r.subject, r.time, r.data))
    assert (await loyalty_account(client, alice))["balance"] == 42


async def test_the_worker_earns_and_reverses_points_on_its_own(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, settings: Any
) -> None:
    """`billfold worker` (its relay, sink and consumers, as `billfold up` runs them): a capture
    becomes points and a refund takes them back with nobody delivering events by hand."""
    from billfold.jobs import run_background
    from billfold.platform.db import create_engine

    await fund(app, alice.user["id"], 10_000)
    payment_id = await captured_wallet_payment(client, alice, 7_700)
    engine = create_engine(settings.database_url, pool_size=3)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_background(engine, settings, stop))

    async def balance_becomes(expected: int) -> None:
        for _ in range(300):
            if (await loyalty_account(client, alice))["balance"] == expected:
                return
            assert not runner.done(), runner
            await asyncio.sleep(0.05)
        raise AssertionError(f"the balance never became {expected}")

    try:
        await balance_becomes(77)
        r = await act(client, alice, payment_id, "refunds", {"amount": 3_850})
        assert r.status_code == 201, r.text
        await balance_becomes(39)  # floor(77 x 1/2) = 38 taken back
    finally:
        stop.set()
        await asyncio.wait_for(runner, 20)
        await engine.dispose()


async def test_a_capture_handled_after_its_refund_gives_the_refunded_share_back(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, points: Points
) -> None:
    """The capture's event was parked (dead letter) and replayed after the refund's: the points
    end where in-order handling leaves them."""
    await fund(app, alice.user["id"], 20_000)
    payment_id = await captured_wallet_payment(client, alice, 10_000)  # 100 points
    r = await act(client, alice, payment_id, "refunds", {"amount": 2_500})
    assert r.status_code == 201, r.text
    rows = await sql(
        app,
        "SELECT id, type, subject, time, data FROM platform.outbox WHERE subject = :s "
        "ORDER BY seq DESC",
        s=payment_id,
    )
    for row in rows:  # newest first: the refund before the capture
        await points.sink(envelope(row.id, row.type, row.subject, row.time, row.data))
    assert (await loyalty_account(client, alice))["balance"] == 75
    (late,) = await loyalty_events(app, REVERSED, alice)
    assert late["points"] == 25 and late["refund_id"] is None and late["capture_id"]
    # The rest refunded in order: exactly what was earned is gone.
    r = await act(client, alice, payment_id, "refunds", {})
    assert r.status_code == 201, r.text
    await points.deliver(payment_id)
    assert (await loyalty_account(client, alice))["balance"] == 0
    await assert_lots_match_balance(app, alice)
