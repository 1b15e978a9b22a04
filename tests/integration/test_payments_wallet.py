"""Wallet-balance payments over HTTP: a ledger hold at authorization, captures committed to the
settlement account (partial, several, never past what is authorized), void, refunds back to the
wallet (partial, several, each idempotent), incremental authorization, expiry, risk outcomes,
and many concurrent captures and refunds on one payment; the ledger verifies afterwards."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from billfold.ledger.verify import verify_ledger
from billfold.transactions import expire_authorizations
from tests.conftest import SignedIn, fund, sign_up
from tests.integration.payments_support import (
    Always,
    Balance,
    act,
    balance,
    events,
    pay,
    payment_body,
    risk,
    sql,
)


async def test_authorize_capture_in_parts_refund_in_parts(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    r = await pay(client, alice, payment_body(amount=2_500))
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["status"] == "authorized" and p["source"] == "wallet"
    assert p["authorized_amount"] == 2_500 and p["capturable_amount"] == 2_500
    assert p["merchant"]["category"] == "restaurants" and p["expires_at"]
    assert await balance(client, alice) == Balance(7_500, 2_500)
    (event,) = await events(app, "billfold.transactions.payment.authorized", p["id"])
    assert event["amount"] == 2_500 and event["merchant"]["mcc"] == "5814"

    r = await act(client, alice, p["id"], "capture", {"amount": 1_000})
    assert r.status_code == 201, r.text
    assert r.json()["final"] is False
    assert r.json()["payment"]["status"] == "partially_captured"
    assert r.json()["payment"]["capturable_amount"] == 1_500
    assert await balance(client, alice) == Balance(7_500, 1_500)

    r = await act(client, alice, p["id"], "capture", {"amount": 1_501})
    assert r.status_code == 422 and r.json()["code"] == "capture_exceeds_authorized"
    assert r.json()["capturable_amount"] == 1_500

    r = await act(client, alice, p["id"], "capture")  # the rest
    assert r.status_code == 201, r.text
    assert r.json()["amount"] == 1_500 and r.json()["final"] is True
    p = r.json()["payment"]
    assert p["status"] == "captured" and p["captured_amount"] == 2_500
    assert p["capturable_amount"] == 0 and p["expires_at"] is None
    assert await balance(client, alice) == Balance(7_500, 0)
    (settlement,) = await sql(
        app, "SELECT posted FROM ledger.accounts WHERE owner_id = 'system' AND kind = 'settlement'"
    )
    assert settlement.posted >= 2_500
    r = await act(client, alice, p["id"], "capture", {"amount": 1})
    assert r.status_code == 409 and r.json()["code"] == "payment_not_capturable"

    key = uuid.uuid4().hex
    r = await act(client, alice, p["id"], "refunds", {"amount": 500, "reason": "cold"}, key=key)
    assert r.status_code == 201, r.text
    refund = r.json()
    assert refund["status"] == "succeeded" and refund["payment"]["status"] == "partially_refunded"
    assert await balance(client, alice) == Balance(8_000, 0)
    # The same key again: the same refund, no second credit.
    again = await act(client, alice, p["id"], "refunds", {"amount": 500, "reason": "cold"}, key=key)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == refund["id"]
    assert await balance(client, alice) == Balance(8_000, 0)
    r = await act(client, alice, p["id"], "refunds", {"amount": 600}, key=key)
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reuse"

    r = await act(client, alice, p["id"], "refunds", {"amount": 2_001})
    assert r.status_code == 422 and r.json()["code"] == "refund_exceeds_captured"
    assert r.json()["refundable_amount"] == 2_000
    r = await act(client, alice, p["id"], "refunds")  # the rest
    assert r.status_code == 201, r.text
    assert r.json()["amount"] == 2_000 and r.json()["payment"]["status"] == "refunded"
    assert await balance(client, alice) == Balance(10_000, 0)
    r = await act(client, alice, p["id"], "refunds")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_refundable"

    r = await client.get(f"/v1/payments/{p['id']}", headers=alice.headers)
    assert r.status_code == 200
    assert [c["amount"] for c in r.json()["captures"]] == [1_000, 1_500]
    assert [x["amount"] for x in r.json()["refunds"]] == [500, 2_000]
    assert len(await events(app, "billfold.transactions.payment.captured", p["id"])) == 2
    assert len(await events(app, "billfold.transactions.payment.refunded", p["id"])) == 2
    assert (await verify_ledger(app.state.resources.engine)).ok


async def test_insufficient_balance_is_a_decline_that_holds_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 999)
    r = await pay(client, alice, payment_body(amount=1_000))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "declined"
    assert r.json()["decline_code"] == "insufficient_funds"
    assert "wallet balance" in r.json()["decline_reason"]
    assert await balance(client, alice) == Balance(999, 0)
    (event,) = await events(app, "billfold.transactions.payment.declined", r.json()["id"])
    assert event["decline_code"] == "insufficient_funds"
    r = await act(client, alice, r.json()["id"], "capture")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_capturable"


async def test_same_key_is_the_same_payment(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    key = uuid.uuid4().hex
    first = await pay(client, alice, payment_body(amount=700), key=key)
    second = await pay(client, alice, payment_body(amount=700), key=key)
    assert first.status_code == second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    assert await balance(client, alice) == Balance(9_300, 700)
    r = await pay(client, alice, payment_body(amount=701), key=key)
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reuse"

    # Concurrent first requests with one key: one payment, one hold.
    key = uuid.uuid4().hex
    answers = await asyncio.gather(
        *(pay(client, alice, payment_body(amount=100), key=key) for _ in range(8))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7
    assert await balance(client, alice) == Balance(9_200, 800)
    # Another user's key is their own.
    bob = await sign_up(client, name="Bob Other")
    r = await pay(client, bob, payment_body(amount=100), key=key)
    assert r.json()["id"] != answers[0].json()["id"]


async def test_void_and_increment(client: httpx.AsyncClient, app: Any, alice: SignedIn) -> None:
    await fund(app, alice.user["id"], 5_000)
    p = (await pay(client, alice, payment_body(amount=1_000))).json()
    r = await act(client, alice, p["id"], "increment", {"amount": 250})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "approved"
    assert r.json()["payment"]["authorized_amount"] == 1_250
    assert await balance(client, alice) == Balance(3_750, 1_250)
    r = await act(client, alice, p["id"], "increment", {"amount": 3_751})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "declined" and r.json()["decline_code"] == "insufficient_funds"
    assert r.json()["payment"]["authorized_amount"] == 1_250
    assert await balance(client, alice) == Balance(3_750, 1_250)
    r = await act(client, alice, p["id"], "increment", {"amount": 0})
    assert r.status_code == 422 and r.json()["code"] == "invalid_amount"

    r = await act(client, alice, p["id"], "void")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "voided"
    assert await balance(client, alice) == Balance(5_000, 0)
    assert (await act(client, alice, p["id"], "void")).json()["status"] == "voided"
    r = await act(client, alice, p["id"], "capture")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_capturable"
    r = await act(client, alice, p["id"], "increment", {"amount": 1})
    assert r.status_code == 409 and r.json()["code"] == "payment_not_incrementable"

    # Once something is captured, only a final capture releases the rest.
    p = (await pay(client, alice, payment_body(amount=1_000))).json()
    await act(client, alice, p["id"], "capture", {"amount": 400})
    r = await act(client, alice, p["id"], "void")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_voidable"
    r = await act(client, alice, p["id"], "capture", {"amount": 100, "final": True})
    assert r.json()["payment"]["status"] == "captured"
    assert r.json()["payment"]["captured_amount"] == 500
    assert await balance(client, alice) == Balance(4_500, 0)
    assert (await verify_ledger(app.state.resources.engine)).ok


async def test_expiry_releases_what_is_not_captured(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    whole = (await pay(client, alice, payment_body(amount=1_000))).json()
    part = (await pay(client, alice, payment_body(amount=2_000))).json()
    await act(client, alice, part["id"], "capture", {"amount": 500})
    assert await balance(client, alice) == Balance(2_000, 2_500)
    async with app.state.resources.engine.begin() as conn:
        from sqlalchemy import text

        await conn.execute(
            text(
                "UPDATE transactions.transactions SET expires_at = now() - interval '1 second' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": [whole["id"], part["id"]]},
        )
    assert await expire_authorizations(app.state.resources.engine, app.state.transactions) >= 2
    r = await client.get(f"/v1/payments/{whole['id']}", headers=alice.headers)
    assert r.json()["status"] == "expired" and r.json()["capturable_amount"] == 0
    r = await client.get(f"/v1/payments/{part['id']}", headers=alice.headers)
    assert r.json()["status"] == "captured" and r.json()["captured_amount"] == 500
    assert await balance(client, alice) == Balance(4_500, 0)

    # Partly captured and partly refunded, with more still capturable: it lapses too.
    p = (await pay(client, alice, payment_body(amount=1_000))).json()
    await act(client, alice, p["id"], "capture", {"amount": 400})
    r = await act(client, alice, p["id"], "refunds", {"amount": 100})
    assert r.json()["payment"]["status"] == "partially_refunded"
    assert r.json()["payment"]["capturable_amount"] == 600
    await _lapse(app, p["id"])
    assert await expire_authorizations(app.state.resources.engine, app.state.transactions) == 1
    r = await client.get(f"/v1/payments/{p['id']}", headers=alice.headers)
    assert r.json()["status"] == "partially_refunded" and r.json()["capturable_amount"] == 0
    assert await balance(client, alice) == Balance(4_200, 0)
    (event,) = await events(app, "billfold.transactions.payment.expired", whole["id"])
    assert event["status"] == "expired"
    (event,) = await events(app, "billfold.transactions.payment.expired", part["id"])
    assert event["released"] == 1_500
    r = await act(client, alice, part["id"], "capture", {"amount": 1})
    assert r.status_code == 409
    # Nothing left for the sweeper.
    assert await expire_authorizations(app.state.resources.engine, app.state.transactions) == 0
    assert (await verify_ledger(app.state.resources.engine)).ok


async def _lapse(app: Any, txn_id: str) -> None:
    from sqlalchemy import text

    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE transactions.transactions SET expires_at = now() - interval '1 second' "
                "WHERE id = :id"
            ),
            {"id": txn_id},
        )


@pytest.mark.parametrize("action", ["block", "review"])
async def test_block_declines_review_holds(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, action: str
) -> None:
    await fund(app, alice.user["id"], 5_000)
    with risk(app, Always(action)) as check:
        r = await pay(client, alice, payment_body(amount=1_000))
    assert check.seen[0].merchant_name == "Blue Bottle Coffee" and not check.seen[0].stepped_up
    p = r.json()
    if action == "block":
        assert r.status_code == 201 and p["status"] == "declined"
        assert p["decline_code"] == "blocked" and "test" not in p["decline_reason"]
        assert await balance(client, alice) == Balance(5_000, 0)
        return
    assert r.status_code == 202 and p["status"] == "review"
    assert await balance(client, alice) == Balance(4_000, 1_000)
    r = await act(client, alice, p["id"], "capture")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_capturable"
    from billfold.transactions import approve_review

    await approve_review(app.state.resources.engine, p["id"])
    r = await act(client, alice, p["id"], "capture")
    assert r.status_code == 201, r.text
    assert await balance(client, alice) == Balance(4_000, 0)


async def test_someone_elses_payment_is_not_found(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    p = (await pay(client, alice, payment_body(amount=1_000))).json()
    r = await client.get(f"/v1/payments/{p['id']}", headers=bob.headers)
    assert r.status_code == 404 and r.json()["code"] == "payment_not_found"
    for verb, body in [
        ("capture", {}),
        ("void", {}),
        ("refunds", {}),
        ("increment", {"amount": 1}),
    ]:
        r = await act(client, bob, p["id"], verb, body)
        assert r.status_code == 404 and r.json()["code"] == "payment_not_found", (verb, r.text)
    assert await balance(client, alice) == Balance(4_000, 1_000)


async def test_concurrent_captures_and_refunds_stay_within_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    p = (await pay(client, alice, payment_body(amount=5_000))).json()
    captures = await asyncio.gather(
        *(
            act(client, alice, p["id"], "capture", {"amount": 700, "final": False})
            for _ in range(12)
        )
    )
    ok = [c for c in captures if c.status_code == 201]
    assert len(ok) == 7  # 7 * 700 = 4900 <= 5000 < 8 * 700
    assert all(c.json()["code"] == "capture_exceeds_authorized" for c in captures if c not in ok)
    r = await client.get(f"/v1/payments/{p['id']}", headers=alice.headers)
    assert r.json()["captured_amount"] == 4_900 and r.json()["capturable_amount"] == 100

    refunds = await asyncio.gather(
        *(act(client, alice, p["id"], "refunds", {"amount": 1_000}) for _ in range(8))
    )
    assert sum(x.status_code == 201 for x in refunds) == 4
    assert all(
        x.json()["code"] == "refund_exceeds_captured" for x in refunds if x.status_code != 201
    )
    r = await client.get(f"/v1/payments/{p['id']}", headers=alice.headers)
    assert r.json()["refunded_amount"] == 4_000 and r.json()["refundable_amount"] == 900
    assert await balance(client, alice) == Balance(10_000 - 4_900 + 4_000 - 100, 100)
    assert (await verify_ledger(app.state.resources.engine)).ok
