"""The case queue's money paths over HTTP with real payments and transfers: a released card
payment completes and is captured, a confirmed-fraud card payment is voided, a confirmed-fraud
transfer returns to its sender, two reviewers deciding at once (one wins, one 409, the money
moves once), a crash between a payment's review decision and the case (the retry finishes with
one effect), and a case whose review hold expired (not releasable: 409 `case_expired`)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from billfold import ledger, p2p, transactions
from billfold.fraud import cases
from billfold.fraud.cases import expiry_consumer
from billfold.platform.bus.consumers import ConsumerSink
from tests.conftest import SignedIn, fund, idem, make_admin, sign_up
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import Balance, act, balance, pay, payment_body, sql
from tests.integration.test_fraud_flows import rule

pytestmark = pytest.mark.usefixtures("network_simulator")


@pytest.fixture
async def alice(client: httpx.AsyncClient) -> SignedIn:
    return await sign_up(client, name="Alice Example", country="US")


@pytest.fixture
async def bob(client: httpx.AsyncClient) -> SignedIn:
    return await sign_up(client, name="Bob Example", country="US")


async def decide(
    client: httpx.AsyncClient, admin: SignedIn, case_id: str, body: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        f"/v1/admin/fraud/cases/{case_id}/decision", json=body, headers=idem(**admin.headers)
    )


async def case_of(
    client: httpx.AsyncClient, admin: SignedIn, user_id: str, subject_id: str
) -> dict[str, Any]:
    r = await client.get(
        "/v1/admin/fraud/cases", params={"user_id": user_id}, headers=admin.headers
    )
    assert r.status_code == 200, r.text
    (case,) = [c for c in r.json()["data"] if c["subject_id"] == subject_id]
    return case  # type: ignore[no-any-return]


async def held_payment(
    client: httpx.AsyncClient, admin: SignedIn, who: SignedIn, body: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """A payment the fraud check sends to review (a rule on its exact amount), and its case."""
    amount = body["amount"]
    async with rule(client, admin, f"amount == {amount} && is_payment", action="review"):
        r = await pay(client, who, body)
    assert r.status_code == 202 and r.json()["status"] == "review", r.text
    return r.json()["id"], await case_of(client, admin, who.user["id"], r.json()["id"])


async def held_transfer(
    client: httpx.AsyncClient, admin: SignedIn, sender: SignedIn, recipient: SignedIn, amount: int
) -> tuple[str, dict[str, Any]]:
    async with rule(client, admin, f"amount == {amount} && !is_payment", action="review"):
        r = await client.post(
            "/v1/transfers",
            json={
                "recipient": {"user_id": recipient.user["id"]},
                "amount": amount,
                "currency": "USD",
            },
            headers=idem(**sender.headers),
        )
    assert r.status_code == 201 and r.json()["status"] == "pending", r.text
    return r.json()["id"], await case_of(client, admin, sender.user["id"], r.json()["id"])


async def payment_events(app: Any, payment_id: str) -> list[str]:
    rows = await sql(
        app,
        "SELECT type FROM platform.outbox WHERE type LIKE 'billfold.transactions.payment.%' "
        "AND data->>'transaction_id' = :p ORDER BY seq",
        p=payment_id,
    )
    return [r.type.rsplit(".", 1)[1] for r in rows]


async def deliver_expiries(app: Any, subject_id: str) -> int:
    """The worker's `fraud.case-expiry` consumer (with its inbox) on the subject's events, twice
    (a redelivery changes nothing)."""
    rows = await sql(
        app,
        "SELECT id, type, data FROM platform.outbox WHERE type IN "
        "('billfold.transactions.payment.expired', 'billfold.p2p.transfer.failed') "
        "AND coalesce(data->>'transaction_id', data->>'transfer_id') = :s",
        s=subject_id,
    )
    consumer = expiry_consumer()
    sink = ConsumerSink(app.state.resources.engine, [consumer])
    for row in rows * 2:
        assert await sink.deliver(consumer, {"id": row.id, "type": row.type, "data": row.data})
    return len(rows)


async def test_a_released_card_payment_completes_and_is_captured(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    method = await add_card(client, alice)
    payment_id, case = await held_payment(
        client, admin, alice, payment_body("card", method["id"], amount=8_801)
    )
    assert case["subject_kind"] == "payment" and case["subject_id"] == payment_id
    r = await act(client, alice, payment_id, "capture")
    assert r.status_code == 409, r.text  # held: not capturable before the review

    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 200, r.text
    assert r.json()["subject_status"] == "authorized" and r.json()["decision"]["label"] == "legit"
    r = await act(client, alice, payment_id, "capture")
    assert r.status_code == 201, r.text
    assert r.json()["payment"]["status"] == "captured"
    assert r.json()["payment"]["captured_amount"] == 8_801
    assert (await payment_events(app, payment_id)).count("review_approved") == 1


async def test_confirmed_fraud_voids_a_held_card_payment(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    method = await add_card(client, alice)
    payment_id, case = await held_payment(
        client, admin, alice, payment_body("card", method["id"], amount=8_802)
    )
    r = await decide(client, admin, case["id"], {"decision": "confirm_fraud", "note": "stolen"})
    assert r.status_code == 200, r.text
    assert r.json()["subject_status"] == "voided" and r.json()["decision"]["label"] == "fraud"
    got = await client.get(f"/v1/payments/{payment_id}", headers=alice.headers)
    assert got.json()["status"] == "voided"
    r = await act(client, alice, payment_id, "capture")
    assert r.status_code == 409
    (row,) = await sql(app, "SELECT label FROM fraud.decisions WHERE subject_id = :s", s=payment_id)
    assert row.label == "fraud"


async def test_confirmed_fraud_returns_a_held_transfer_to_its_sender(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 20_000)
    transfer_id, case = await held_transfer(client, admin, alice, bob, 4_551)
    assert await balance(client, alice) == Balance(15_449, 4_551)
    r = await decide(client, admin, case["id"], {"decision": "confirm_fraud"})
    assert r.status_code == 200, r.text
    assert r.json()["subject_status"] == "failed" and r.json()["decision"]["label"] == "fraud"
    got = await client.get(f"/v1/transfers/{transfer_id}", headers=alice.headers)
    assert got.json()["status"] == "failed"
    assert await balance(client, alice) == Balance(20_000, 0)
    assert await balance(client, bob) == Balance(0, 0)
    (row,) = await sql(
        app, "SELECT label FROM fraud.decisions WHERE subject_id = :s", s=transfer_id
    )
    assert row.label == "fraud"


@pytest.mark.parametrize("outcomes", [("release", "confirm_fraud"), ("release", "release")])
async def test_two_reviewers_deciding_at_once_one_wins(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    bob: SignedIn,
    admin: SignedIn,
    outcomes: tuple[str, str],
) -> None:
    other = await make_admin(app, client)
    await fund(app, alice.user["id"], 40_000)
    transfer_id, transfer_case = await held_transfer(client, admin, alice, bob, 4_661)
    payment_id, payment_case = await held_payment(client, admin, alice, payment_body(amount=6_602))
    for case in (transfer_case, payment_case):
        for _ in range(3):  # each round, both at the same moment
            answers = await asyncio.gather(
                decide(client, admin, case["id"], {"decision": outcomes[0]}),
                decide(client, other, case["id"], {"decision": outcomes[1]}),
            )
            codes = sorted(a.status_code for a in answers)
            if codes != [409, 409]:
                break
        assert codes == [200, 409], [a.text for a in answers]
        loser = next(a for a in answers if a.status_code == 409)
        assert loser.json()["code"] == "case_decided"
        winner = next(a for a in answers if a.status_code == 200).json()
        assert winner["status"] == "decided"
        final = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
        assert final.json()["outcome"] == winner["outcome"]
        assert [a["action"] for a in final.json()["audit"]].count("decided") == 1

    # The money moved once: the transfer completed or failed once, the payment once.
    transfer_events = await sql(
        app,
        "SELECT type FROM platform.outbox WHERE subject = :t AND type IN "
        "('billfold.p2p.transfer.completed', 'billfold.p2p.transfer.failed')",
        t=transfer_id,
    )
    assert len(transfer_events) == 1
    got = await client.get(f"/v1/transfers/{transfer_id}", headers=alice.headers)
    moved = 4_661 if got.json()["status"] == "completed" else 0
    assert await balance(client, bob) == Balance(moved, 0)
    settled = await payment_events(app, payment_id)
    assert settled.count("review_approved") + settled.count("voided") == 1
    paid = 6_602 if "review_approved" in settled else 0
    assert await balance(client, alice) == Balance(40_000 - moved - paid, paid)


async def test_a_crash_between_the_payment_and_the_case_is_finished_by_the_retry(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    """What a process that died after the payment's review decision committed, and before the
    case did, leaves behind: the claimed outcome and an approved payment, an undecided case."""
    engine = app.state.resources.engine
    await fund(app, alice.user["id"], 20_000)
    payment_id, case = await held_payment(client, admin, alice, payment_body(amount=7_701))
    await cases._claim(engine, case["id"], "release")
    await transactions.approve_review(engine, payment_id)
    # -- the crash --
    got = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
    assert got.json()["status"] == "open" and got.json()["subject_status"] == "releasing"
    # The other outcome can no longer be applied: the money went one way.
    other = await make_admin(app, client)
    r = await decide(client, other, case["id"], {"decision": "confirm_fraud"})
    assert r.status_code == 409 and r.json()["code"] == "case_decided", r.text
    assert r.json()["outcome"] == "release"
    # The retry finishes the case; the payment was approved once.
    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "decided" and r.json()["subject_status"] == "authorized"
    assert (await payment_events(app, payment_id)).count("review_approved") == 1
    assert await balance(client, alice) == Balance(20_000 - 7_701, 7_701)
    r = await act(client, alice, payment_id, "capture")
    assert r.status_code == 201 and r.json()["payment"]["status"] == "captured", r.text
    assert await balance(client, alice) == Balance(20_000 - 7_701, 0)


async def test_a_payment_case_whose_review_expired_cannot_be_released(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    engine = app.state.resources.engine
    await fund(app, alice.user["id"], 20_000)
    payment_id, case = await held_payment(client, admin, alice, payment_body(amount=7_702))
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "UPDATE transactions.transactions SET expires_at = now() - interval '1 second' "
            f"WHERE id = '{payment_id}'"
        )
    assert await transactions.expire_authorizations(engine, app.state.transactions) >= 1
    assert await balance(client, alice) == Balance(20_000, 0)  # the sweeper gave the money back
    assert await deliver_expiries(app, payment_id) == 1
    got = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert got["status"] == "open" and got["subject_status"] == "expired"

    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 409 and r.json()["code"] == "case_expired", r.text
    got = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert got["status"] == "open" and got["subject_status"] == "expired"
    assert got["decision"]["label"] is None
    assert [a["action"] for a in got["audit"]] == ["opened", "expired"]
    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 409 and r.json()["code"] == "case_expired"
    pay_row = await client.get(f"/v1/payments/{payment_id}", headers=alice.headers)
    assert pay_row.json()["status"] == "expired"
    assert "review_approved" not in await payment_events(app, payment_id)
    assert await balance(client, alice) == Balance(20_000, 0)
    # It may still be labelled fraud (no money to move).
    r = await decide(client, admin, case["id"], {"decision": "confirm_fraud"})
    assert r.status_code == 200, r.text
    assert r.json()["subject_status"] == "expired" and r.json()["decision"]["label"] == "fraud"
    assert await balance(client, alice) == Balance(20_000, 0)


async def test_a_transfer_case_whose_review_hold_expired_cannot_be_released(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    engine = app.state.resources.engine
    await fund(app, alice.user["id"], 20_000)
    transfer_id, case = await held_transfer(client, admin, alice, bob, 4_552)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "UPDATE ledger.holds SET expires_at = now() - interval '1 second' "
            f"WHERE reference = '{transfer_id}'"
        )
    assert await ledger.expire_holds(engine) >= 1
    # The worker's consumer fails the transfer whose review hold expired.
    expire = [c for c in p2p.consumers(app.state.p2p) if c.name == "p2p.expire-reviews"]
    sink = ConsumerSink(engine, expire)
    rows = await sql(
        app,
        "SELECT id, type, data FROM platform.outbox WHERE type = 'billfold.ledger.hold.expired' "
        "AND data->>'reference' = :t",
        t=transfer_id,
    )
    for row in rows:
        await sink({"id": row.id, "type": row.type, "data": row.data})
    got = await client.get(f"/v1/transfers/{transfer_id}", headers=alice.headers)
    assert got.json()["status"] == "failed"
    assert await balance(client, alice) == Balance(20_000, 0)
    # Here the release comes before the case-expiry consumer: the release finds it out itself.
    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 409 and r.json()["code"] == "case_expired", r.text
    assert await deliver_expiries(app, transfer_id) == 1  # then changes nothing more
    detail = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert [a["action"] for a in detail["audit"]] == ["opened", "expired"]

    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert r.status_code == 409 and r.json()["code"] == "case_expired", r.text
    detail = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert detail["subject_status"] == "expired" and detail["status"] == "open"
    assert await balance(client, bob) == Balance(0, 0)
    assert await balance(client, alice) == Balance(20_000, 0)


async def test_decisions_are_refused_on_bad_input_without_a_change(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 20_000)
    payment_id, case = await held_payment(client, admin, alice, payment_body(amount=7_703))
    for body in (
        {"decision": "confirm_fraud", "unlock_account": True},
        {"decision": "release", "unlock_account": "yes please"},
        {"decision": "release", "note": "x" * 2001},
    ):
        r = await decide(client, admin, case["id"], body)
        assert r.status_code == 422, (body, r.text)
    got = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert got["status"] == "open" and got["subject_status"] is None
    assert (await client.get(f"/v1/payments/{payment_id}", headers=alice.headers)).json()[
        "status"
    ] == "review"


@pytest.mark.parametrize("swept", [False, True])
async def test_releasing_a_transfer_whose_hold_is_gone_is_case_expired_and_fraud_can_be_confirmed(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    bob: SignedIn,
    admin: SignedIn,
    swept: bool,
) -> None:
    """The review hold lapsed (and, `swept`, the ledger's sweeper released it) before the
    transfers' own expiry ran: the ledger answers a release 409 `hold_expired` /
    `hold_not_active`. The reviewer is told `case_expired`, and the case is not left claimed
    for a release that never happened: `confirm_fraud` still labels it."""
    engine = app.state.resources.engine
    await fund(app, alice.user["id"], 20_000)
    transfer_id, case = await held_transfer(client, admin, alice, bob, 4_553 + swept)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "UPDATE ledger.holds SET expires_at = now() - interval '1 second' "
            f"WHERE reference = '{transfer_id}'"
        )
    if swept:
        await ledger.expire_holds(engine)
    r = await decide(client, admin, case["id"], {"decision": "release"})
    assert (r.status_code, r.json()["code"]) == (409, "case_expired"), r.text
    r = await decide(client, admin, case["id"], {"decision": "confirm_fraud"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "decided" and r.json()["outcome"] == "confirm_fraud"
    (transfer,) = await sql(app, "SELECT status FROM p2p.transfers WHERE id = :t", t=transfer_id)
    assert transfer.status in ("pending", "failed")  # never completed
