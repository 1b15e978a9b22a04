"""Card payments end to end: HTTP → the vault's cryptogram (SoftHSM2) → the ISO 8583 client →
the network simulator over real TCP (its issuer verifies the cryptogram with the vault).

Approval, every decline code with its user-facing reason, a timeout that ends in a reversal (no
money held), duplicates with one Idempotency-Key (one network authorization), partial captures
with completion advices, refunds, void, incremental authorization, expiry, a payment a crash
left `authorizing`, challenge → step-up → resume, and a block that never reaches the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from billfold.network import NO_ANSWER
from billfold.transactions import expire_authorizations, recover_stuck_payments
from billfold.transactions.admission import AdmissionGate
from tests.conftest import SignedIn, sign_up
from tests.integration.payment_methods_support import add_card, new_pan
from tests.integration.payments_support import (
    Always,
    act,
    authorizations,
    events,
    eventually,
    pay,
    payment_body,
    risk,
    sql,
    vault_card_id,
)

pytestmark = pytest.mark.usefixtures("network_simulator")


async def card(client: httpx.AsyncClient, app: Any, who: SignedIn, **kw: Any) -> tuple[str, str]:
    """(payment method id, vault card id) of a newly added, verified card."""
    method = await add_card(client, who, **kw)
    assert method["status"] == "verified", method
    return method["id"], await vault_card_id(app, method["id"])


async def test_approve_capture_refund(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    r = await pay(client, alice, payment_body("card", method, amount=1_234))
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["status"] == "authorized" and p["auth_code"]
    assert p["card"]["brand"] == "visa" and len(p["card"]["last4"]) == 4
    assert network_simulator.held(card_id) == 1_234
    (auth,) = authorizations(network_simulator, p["id"])
    assert auth.response_code == "00"
    # No card number, DPAN or cryptogram in the answer or the events.
    (event,) = await events(app, "billfold.transactions.payment.authorized", p["id"])
    (row,) = await sql(
        app,
        "SELECT timings FROM transactions.transaction_details WHERE transaction_id = :t",
        t=p["id"],
    )
    assert {"auth", "token", "fraud", "network", "db", "notify_enqueue"} <= set(row.timings)
    assert "dpan" not in str(event).lower() and "arqc" not in str(event).lower()

    r = await act(client, alice, p["id"], "capture", {"amount": 1_000})
    assert r.status_code == 201, r.text
    assert r.json()["payment"]["status"] == "partially_captured"
    r = await act(client, alice, p["id"], "capture", {"amount": 234})
    assert r.json()["payment"]["status"] == "captured"
    await eventually(lambda: _settled(network_simulator, card_id, 1_234))
    advised = await sql(
        app,
        "SELECT count(*) AS n FROM transactions.captures WHERE transaction_id = :t "
        "AND advised_at IS NOT NULL",
        t=p["id"],
    )
    assert advised[0].n == 2

    r = await act(client, alice, p["id"], "refunds", {"amount": 234})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "succeeded"
    assert r.json()["payment"]["status"] == "partially_refunded"
    assert network_simulator.posted(card_id) == 1_000
    r = await act(client, alice, p["id"], "refunds", {"amount": 1_001})
    assert r.status_code == 422 and r.json()["code"] == "refund_exceeds_captured"

    metrics = (await client.get("/metrics")).text
    assert 'billfold_payment_step_duration_seconds_count{step="network"}' in metrics
    assert 'billfold_payments_total{source="card",status="authorized"}' in metrics


async def _settled(simulator: Any, card_id: str, amount: int) -> bool:
    return simulator.posted(card_id) == amount and simulator.held(card_id) == 0


DECLINES = [
    ("05", "do_not_honour"),
    ("14", "invalid_card"),
    ("41", "card_lost"),
    ("43", "card_stolen"),
    ("51", "insufficient_funds"),
    ("54", "card_expired"),
    ("57", "not_permitted"),
    ("61", "limit_exceeded"),
    ("62", "restricted_card"),
    ("91", "issuer_unavailable"),
    ("96", "issuer_unavailable"),
]


async def test_each_decline_code_has_a_reason(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    rules = {7_000 + i: iso for i, (iso, _) in enumerate(DECLINES)}
    network_simulator.config.amount_rules.update(rules)
    try:
        for amount, (iso, code) in zip(rules, DECLINES, strict=True):
            r = await pay(client, alice, payment_body("card", method, amount=amount))
            assert r.status_code == 201, r.text
            p = r.json()
            assert (p["status"], p["decline_code"]) == ("declined", code), (iso, p)
            assert p["decline_reason"] and iso not in p["decline_reason"]
            (event,) = await events(app, "billfold.transactions.payment.declined", p["id"])
            assert event["decline_code"] == code
    finally:
        for amount in rules:
            network_simulator.config.amount_rules.pop(amount, None)
    assert network_simulator.held(card_id) == 0
    # The funding card's own answer (a processor test card that authorizes nothing).
    method, _ = await card(client, app, alice, pan=new_pan(suffix="9995"))
    r = await pay(client, alice, payment_body("card", method, amount=100))
    assert r.json()["decline_code"] == "insufficient_funds"
    assert "card" in r.json()["decline_reason"]


async def test_timeout_reverses_and_holds_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    network = app.state.transactions.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=0.5)
    network_simulator.config.amount_rules[4_321] = NO_ANSWER
    try:
        r = await pay(client, alice, payment_body("card", method, amount=4_321))
    finally:
        network.config = config
        network_simulator.config.amount_rules.pop(4_321, None)
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["status"], p["decline_code"]) == ("failed", "network_timeout")
    assert "Nothing was charged" in p["decline_reason"]
    # The issuer did hold the money (its answer was lost); the client's 0420 releases it.
    await eventually(lambda: _held(network_simulator, card_id, 0))
    assert any(m.private.get("OR") for m in network_simulator.messages("0420")), (
        "a reversal naming the original"
    )


async def _held(simulator: Any, card_id: str, amount: int) -> bool:
    return simulator.held(card_id) == amount


async def test_duplicates_are_one_authorization(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    key = uuid.uuid4().hex
    body = payment_body("card", method, amount=500)
    first = await pay(client, alice, body, key=key)
    again = await pay(client, alice, body, key=key)
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(authorizations(network_simulator, first.json()["id"])) == 1

    # Concurrent, while the network takes its time: the first authorizes, the others are told
    # it is in progress or get it replayed; one payment, one network authorization.
    network_simulator.config.latency_ms = 300
    key = uuid.uuid4().hex
    try:
        answers = await asyncio.gather(*(pay(client, alice, body, key=key) for _ in range(6)))
    finally:
        network_simulator.config.latency_ms = 0
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}
    assert all(a.json()["code"] == "payment_in_progress" for a in answers if a.status_code == 409)
    ids = {a.json()["id"] for a in answers if a.status_code == 201}
    assert len(ids) == 1
    rows = await sql(
        app,
        "SELECT id FROM transactions.transactions WHERE user_id = :u AND idempotency_key = :k",
        u=alice.user["id"],
        k=key,
    )
    assert len(rows) == 1
    assert len(authorizations(network_simulator, rows[0].id)) == 1
    assert network_simulator.held(card_id) == 1_000


async def test_void_and_increment_and_expiry(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    p = (await pay(client, alice, payment_body("card", method, amount=2_000))).json()
    r = await act(client, alice, p["id"], "increment", {"amount": 300})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "approved"
    assert r.json()["payment"]["authorized_amount"] == 2_300
    assert network_simulator.held(card_id) == 2_300
    r = await act(client, alice, p["id"], "void")
    assert r.status_code == 200 and r.json()["status"] == "voided"
    await eventually(lambda: _held(network_simulator, card_id, 0))

    p = (await pay(client, alice, payment_body("card", method, amount=1_500))).json()
    await act(client, alice, p["id"], "capture", {"amount": 500})
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE transactions.transactions SET expires_at = now() - interval '1 second' "
                "WHERE id = :id"
            ),
            {"id": p["id"]},
        )
    assert await expire_authorizations(app.state.resources.engine, app.state.transactions) == 1
    r = await client.get(f"/v1/payments/{p['id']}", headers=alice.headers)
    assert r.json()["status"] == "captured" and r.json()["captured_amount"] == 500
    await eventually(lambda: _settled(network_simulator, card_id, 500))


async def test_crash_between_the_two_transactions_is_recovered(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, _ = await card(client, app, alice)
    key = uuid.uuid4().hex
    body = payment_body("card", method, amount=800)
    network_simulator.paused = True  # receives, never answers: the request hangs on the network
    try:
        request = asyncio.create_task(pay(client, alice, body, key=key))
        await eventually(lambda: _authorizing(app, alice, key))
        request.cancel()  # the process dies with the payment `authorizing`
        with pytest.raises(asyncio.CancelledError):
            await request
    finally:
        network_simulator.paused = False
    r = await pay(client, alice, body, key=key)
    assert r.status_code == 409 and r.json()["code"] == "payment_in_progress"
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) == 0
    await sql_exec(
        app,
        "UPDATE transactions.transactions SET updated_at = now() - interval '1 hour' "
        "WHERE user_id = :u AND idempotency_key = :k",
        u=alice.user["id"],
        k=key,
    )
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) == 1
    r = await pay(client, alice, body, key=key)
    assert r.status_code == 201 and r.json()["status"] == "failed"
    assert r.json()["decline_code"] == "interrupted"
    (event,) = await events(app, "billfold.transactions.payment.failed", r.json()["id"])
    assert event["status"] == "failed"


async def _authorizing(app: Any, who: SignedIn, key: str) -> bool:
    rows = await sql(
        app,
        "SELECT status FROM transactions.transactions WHERE user_id = :u AND idempotency_key = :k",
        u=who.user["id"],
        k=key,
    )
    return bool(rows) and rows[0].status == "authorizing"


async def sql_exec(app: Any, query: str, **params: Any) -> None:
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(text(query), params)


async def test_block_never_reaches_the_network(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    before = len(network_simulator.messages())
    with risk(app, Always("block")):
        r = await pay(client, alice, payment_body("card", method, amount=900))
    assert r.status_code == 201 and r.json()["status"] == "declined"
    assert r.json()["decline_code"] == "blocked"
    assert len(network_simulator.messages()) == before
    assert authorizations(network_simulator, r.json()["id"]) == []
    # Review: authorized at the network, held for a reviewer before it may be captured.
    with risk(app, Always("review")):
        r = await pay(client, alice, payment_body("card", method, amount=900))
    assert r.status_code == 202 and r.json()["status"] == "review"
    assert network_simulator.held(card_id) == 900
    r = await act(client, alice, r.json()["id"], "capture")
    assert r.status_code == 409 and r.json()["code"] == "payment_not_capturable"


async def test_challenge_step_up_resume(
    client: httpx.AsyncClient, app: Any, network_simulator: Any
) -> None:
    from tests.integration.test_mfa import verify_contact
    from tests.integration.test_transfers import _step_up_token

    carol = await sign_up(client, name="Carol Careful")
    await verify_contact(app, client, carol, "email")
    method, card_id = await card(client, app, carol)
    key = uuid.uuid4().hex
    body = payment_body("card", method, amount=1_100)
    with risk(app, Always("challenge")) as check:
        r = await pay(client, carol, body, key=key)
        assert r.status_code == 202, r.text
        p = r.json()
        assert p["status"] == "challenge_required" and p["step_up"]["purpose"] == "payment"
        assert p["step_up"]["reference"] == p["id"]
        assert p["step_up"]["resume_url"] == f"/v1/payments/{p['id']}/resume"
        assert network_simulator.held(card_id) == 0
        assert authorizations(network_simulator, p["id"]) == []

        resume = f"/v1/payments/{p['id']}/resume"
        for bad in ("junk", carol.tokens["access_token"]):
            r = await client.post(
                resume, headers={**carol.headers, "X-Step-Up-Token": bad, "Idempotency-Key": "x"}
            )
            assert r.status_code == 403 and r.json()["code"] == "invalid_step_up_token"
        other = await _step_up_token(app, client, carol, purpose="payment", reference="txn_x")
        r = await client.post(
            resume, headers={**carol.headers, "X-Step-Up-Token": other, "Idempotency-Key": "x"}
        )
        assert r.status_code == 403

        token = await _step_up_token(app, client, carol, purpose="payment", reference=p["id"])
        # Resubmitting the payment with its key and the step-up token resumes it.
        r = await pay(client, carol, body, key=key, **{"X-Step-Up-Token": token})
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "authorized" and r.json()["id"] == p["id"]
        assert check.seen[-1].stepped_up
    assert network_simulator.held(card_id) == 1_100
    r = await client.post(
        resume, headers={**carol.headers, "X-Step-Up-Token": token, "Idempotency-Key": "x"}
    )
    assert r.status_code == 409 and r.json()["code"] == "payment_not_resumable"
    types = [
        e
        for e in (
            "challenge_required",
            "authorizing",
            "authorized",
        )
        if await events(app, f"billfold.transactions.payment.{e}", p["id"])
    ]
    assert types == ["challenge_required", "authorizing", "authorized"]


async def test_other_users_card_is_not_found(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    method, _ = await card(client, app, alice)
    r = await pay(client, bob, payment_body("card", method, amount=100))
    assert r.status_code == 404 and r.json()["code"] == "payment_method_not_found"
    rows = await sql(
        app, "SELECT id FROM transactions.transactions WHERE user_id = :u", u=bob.user["id"]
    )
    assert rows == []


async def test_a_suspended_token_is_declined_without_the_network(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, _ = await card(client, app, alice)
    (row,) = await sql(
        app, "SELECT vault_token_id FROM payment_methods.methods WHERE id = :m", m=method
    )
    await app.state.vault.suspend_token(row.vault_token_id, reason="lost phone")
    try:
        r = await pay(client, alice, payment_body("card", method, amount=300))
    finally:
        await app.state.vault.resume_token(row.vault_token_id, reason="found it")
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["decline_code"]) == ("declined", "card_inactive")
    assert authorizations(network_simulator, r.json()["id"]) == []
    r = await pay(client, alice, payment_body("card", method, amount=300))
    assert r.json()["status"] == "authorized"


async def test_the_worker_runs_the_payment_sweepers(app: Any, settings: Any) -> None:
    from billfold.jobs import scheduled_jobs

    names = [
        j.name for j in scheduled_jobs(app.state.resources.engine, settings, app.state.transactions)
    ]
    assert "expire-authorizations" in names and "recover-stuck-payments" in names


async def test_no_connection_is_held_while_the_network_answers(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    network_simulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """60 payments wait on the network at once: more than the pool has connections, and none
    of them holds one meanwhile. (The network never answers here, so the count is taken while
    every one of them waits, however slow the machine; they end as timeouts.)"""
    # A gate that no earlier test's timeouts have taught to send less to the network.
    settings = app.state.transactions.settings
    monkeypatch.setattr(
        app.state.transactions,
        "_admission",
        AdmissionGate(settings.payment_admission_limit, settings.payment_admission_queue),
    )
    method, card_id = await card(client, app, alice)
    engine = app.state.resources.engine
    in_flight = 60
    assert in_flight > engine.pool.size() + engine.pool._max_overflow
    before = len(network_simulator.messages("0100"))
    network = app.state.transactions.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=3.0)
    network_simulator.paused = True
    try:
        tasks = [
            asyncio.create_task(pay(client, alice, payment_body("card", method, amount=10)))
            for _ in range(in_flight)
        ]

        async def all_waiting() -> bool:
            return len(network_simulator.messages("0100")) - before >= in_flight

        await eventually(all_waiting, within=30)
        await asyncio.sleep(0.1)  # the last commits' relay wake-ups
        assert engine.pool.checkedout() <= 1, engine.pool.checkedout()
        network_simulator.paused = False  # the reversals of the timeouts are acknowledged
        answers = await asyncio.gather(*tasks)
    finally:
        network_simulator.paused = False
        network.config = config
    assert [a.status_code for a in answers] == [201] * in_flight
    outcomes = {(a.json()["status"], a.json()["decline_code"]) for a in answers}
    assert outcomes == {("failed", "network_timeout")}
    await eventually(lambda: _held(network_simulator, card_id, 0), within=30)


async def test_a_captured_card_payment_gets_its_receipt_through_the_worker(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    """The flow's own events feed the receipts consumer (the history's): the PDF names the
    merchant, the amount and the card's last 4 digits, never more of the card."""
    import io

    from pypdf import PdfReader

    from billfold import jobs
    from tests.integration.transfer_support import outbox_events

    method, _ = await card(client, app, alice)
    p = (await pay(client, alice, payment_body("card", method, amount=4_250))).json()
    r = await act(client, alice, p["id"], "capture")
    assert r.status_code == 201, r.text
    (captured,) = await outbox_events(app, "billfold.transactions.payment.captured", p["id"])
    sink = jobs.event_sink(app.state.resources.engine, app.state.p2p)
    await sink(captured)
    r = await client.get(f"/v1/transactions/{p['id']}/receipt", headers=alice.headers)
    assert r.status_code == 200, r.text
    pdf = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(r.content)).pages)
    assert "Blue Bottle Coffee" in pdf and "42.50" in pdf and p["card"]["last4"] in pdf


async def test_a_refund_the_network_did_not_answer_is_asked_again_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    p = (await pay(client, alice, payment_body("card", method, amount=2_000))).json()
    await act(client, alice, p["id"], "capture")
    await eventually(lambda: _settled(network_simulator, card_id, 2_000))
    network = app.state.transactions.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=0.5)
    network_simulator.paused = True  # the issuer applies the refund; its answer is lost
    key = uuid.uuid4().hex
    try:
        r = await act(client, alice, p["id"], "refunds", {"amount": 700}, key=key)
    finally:
        network_simulator.paused = False
        network.config = config
    assert r.status_code == 202, r.text
    refund = r.json()
    assert refund["status"] == "pending" and refund["payment"]["refunded_amount"] == 700
    r = await act(client, alice, p["id"], "refunds", {"amount": 700}, key=key)
    assert r.status_code == 409 and r.json()["code"] == "refund_in_progress"
    # Reserved: a second refund cannot take the same money.
    r = await act(client, alice, p["id"], "refunds", {"amount": 1_301})
    assert r.status_code == 422 and r.json()["code"] == "refund_exceeds_captured"

    await sql_exec(
        app,
        "UPDATE transactions.refunds SET created_at = now() - interval '1 hour' WHERE id = :r",
        r=refund["id"],
    )
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) >= 1
    r = await act(client, alice, p["id"], "refunds", {"amount": 700}, key=key)
    assert r.status_code == 201 and r.json()["status"] == "succeeded"
    assert r.json()["payment"]["status"] == "partially_refunded"
    assert network_simulator.posted(card_id) == 1_300  # refunded once, not twice
    (event,) = await events(app, "billfold.transactions.payment.refunded", p["id"])
    assert event["refund"]["id"] == refund["id"]


async def test_an_approval_after_the_deadline_is_reversed(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    """The recovery sweeper fails a payment whose answer is late; when the approval does
    arrive, it is reversed at once, never left holding the card's money."""
    method, card_id = await card(client, app, alice)
    key = uuid.uuid4().hex
    network_simulator.config.latency_ms = 1_500
    try:
        request = asyncio.create_task(
            pay(client, alice, payment_body("card", method, amount=650), key=key)
        )
        await eventually(lambda: _authorizing(app, alice, key))
        await sql_exec(
            app,
            "UPDATE transactions.transactions SET updated_at = now() - interval '1 hour' "
            "WHERE user_id = :u AND idempotency_key = :k",
            u=alice.user["id"],
            k=key,
        )
        assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) == 1
        r = await request
    finally:
        network_simulator.config.latency_ms = 0
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["decline_code"]) == ("failed", "interrupted")
    await eventually(lambda: _held(network_simulator, card_id, 0))
    assert len(network_simulator.messages("0100")) >= 1
