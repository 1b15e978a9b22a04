"""Top-ups from a verified card (charged through the network) or bank account (simulated ACH),
withdrawals to a verified bank account: the ledger posting, the completed funding row and the
events commit together; a decline or a refusal posts nothing; a card is charged once per
Idempotency-Key whatever fails between the charge and the credit (retries, concurrent requests,
a crash left to the recovery job)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from billfold import ledger, payment_methods
from billfold.app import create_app
from billfold.config import Settings
from billfold.network import NO_ANSWER
from billfold.payment_methods.funding import _request_hash
from billfold.payment_methods.models import Funding
from tests.conftest import SignedIn, fund, make_settings, sign_up
from tests.integration.payment_methods_support import (
    CVV,
    add,
    add_bank,
    add_card,
    card_body,
    new_pan,
    topup,
    us_bank_body,
    withdraw,
)
from tests.integration.transfer_support import balance, sql

pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")


async def state(app: Any, who: SignedIn) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    uid = who.user["id"]
    return {
        "usd": (await balance(app, uid, "USD")).posted,
        "funding": (await balance(app, ledger.SYSTEM, "USD", kind="funding")).posted,
        "postings": len(
            await sql(
                app,
                "SELECT DISTINCT e.posting_id FROM ledger.entries e JOIN ledger.accounts a "
                "ON a.id = e.account_id WHERE a.owner_id = :u",
                u=uid,
            )
        ),
        "fundings": len(
            await sql(app, "SELECT id FROM payment_methods.fundings WHERE user_id = :u", u=uid)
        ),
        "outbox": (await sql(app, "SELECT count(*) AS n FROM platform.outbox"))[0].n,
    }


async def test_a_card_top_up_is_charged_then_posted_with_its_row_and_events(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    pan = new_pan()
    card = await add_card(client, alice, pan=pan)
    r = await topup(client, alice, card["id"], 2_500)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("top_") and body["posting_id"].startswith("pst_")
    assert (body["type"], body["rail"], body["status"]) == ("topup", "card", "completed")
    assert len(body["authorization_code"]) == 6
    assert body["balance"] == {"currency": "USD", "available": 2_500, "posted": 2_500, "held": 0}
    (row,) = await sql(app, "SELECT * FROM payment_methods.fundings WHERE id = :i", i=body["id"])
    assert (row.payment_method_id, row.posting_id, row.response_code) == (
        card["id"],
        body["posting_id"],
        "00",
    )
    (posting,) = await sql(app, "SELECT * FROM ledger.postings WHERE id = :i", i=body["posting_id"])
    assert (posting.kind, posting.reference) == ("wallet_topup", body["id"])
    assert posting.memo == f"Top-up from Visa ••{pan[-4:]}"
    # The PAN came back from the vault for the charge, and the vault wrote that down.
    (audit,) = await sql(
        app,
        "SELECT requester, purpose FROM vault.detokenizations d JOIN payment_methods.methods m "
        "ON m.vault_card_id = d.card_id WHERE m.id = :i AND purpose = 'authorization'",
        i=card["id"],
    )
    assert audit.requester == f"payment_methods:{alice.user['id']}"
    # Cards take any currency.
    assert (await topup(client, alice, card["id"], 700, "EUR")).status_code == 201


async def test_a_declined_card_top_up_is_402_with_the_network_code_and_posts_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    card = await add_card(client, alice, pan=new_pan(suffix="9995"))  # verifies, charges 51
    assert card["status"] == "verified"
    before = await state(app, alice)
    r = await topup(client, alice, card["id"], 2_500)
    assert r.status_code == 402, r.text
    problem = r.json()
    assert (problem["code"], problem["decline_code"]) == ("payment_declined", "51")
    assert problem["decline_reason"] == "Insufficient funds"
    assert await state(app, alice) == before


async def test_a_bank_top_up_and_a_withdrawal_move_money_by_simulated_ach(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    bank = await add_bank(client, app, alice, "USD")
    r = await topup(client, alice, bank["id"], 10_000)
    assert r.status_code == 201, r.text
    assert (r.json()["rail"], r.json()["authorization_code"]) == ("ach", None)
    r = await withdraw(client, alice, bank["id"], 4_000)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("wdl_") and body["type"] == "withdrawal"
    assert body["balance"]["available"] == 6_000
    (posting,) = await sql(
        app, "SELECT kind, reference FROM ledger.postings WHERE id = :i", i=body["posting_id"]
    )
    assert (posting.kind, posting.reference) == ("wallet_withdrawal", body["id"])
    before = await state(app, alice)
    for r in (
        await topup(client, alice, bank["id"], 100, "EUR"),
        await withdraw(client, alice, bank["id"], 100, "EUR"),
    ):
        assert r.status_code == 422 and r.json()["code"] == "currency_mismatch", r.text
    assert await state(app, alice) == before


async def test_withdrawals_go_only_to_a_bank_account_and_only_what_is_available(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    card = await add_card(client, alice)
    bank = await add_bank(client, app, alice, "USD")
    before = await state(app, alice)
    r = await withdraw(client, alice, card["id"], 100)
    assert r.status_code == 422 and r.json()["code"] == "bank_account_required", r.text
    r = await withdraw(client, alice, bank["id"], 1_001)
    assert r.status_code == 422 and r.json()["code"] == "insufficient_funds", r.text
    assert await state(app, alice) == before
    assert (await withdraw(client, alice, bank["id"], 1_000)).status_code == 201


async def test_unverified_failed_and_removed_methods_move_no_money(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    pending = (await add(client, alice, us_bank_body())).json()
    failed = (await add(client, alice, card_body(cvv="000"))).json()
    assert failed["status"] == "failed"
    removed = await add_card(client, alice)
    assert (
        await client.delete(f"/v1/payment-methods/{removed['id']}", headers=alice.headers)
    ).status_code == 204
    before = await state(app, alice)
    for method_id, code in (
        (pending["id"], "payment_method_not_verified"),
        (failed["id"], "payment_method_not_verified"),
        (removed["id"], "payment_method_not_found"),
        ("pm_01" + "0" * 24, "payment_method_not_found"),
    ):
        for call in (topup, withdraw):
            r = await call(client, alice, method_id, 100)
            assert r.json()["code"] == code, (method_id, r.text)
    assert await state(app, alice) == before


async def test_a_top_up_retry_charges_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    card = await add_card(client, alice)
    first = await topup(client, alice, card["id"], 900, key="same-key-1")
    again = await topup(client, alice, card["id"], 900, key="same-key-1")
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    rows = await sql(
        app, "SELECT id FROM payment_methods.fundings WHERE user_id = :u", u=alice.user["id"]
    )
    assert len(rows) == 1
    assert (await balance(app, alice.user["id"], "USD")).posted == 900
    assert CVV not in first.text


# --- a card is charged once per Idempotency-Key -----------------------------------------------


def charges(simulator: Any, funding_id: str) -> int:
    """Card charges (0200 purchases) the network received for this top-up (its reference)."""
    return sum(
        1
        for m in simulator.messages("0200")
        if m.private.get("TX") == funding_id and m.response_code == "00"
    )


async def funding_rows(app: Any, who: SignedIn) -> list[Any]:
    return await sql(
        app,
        "SELECT * FROM payment_methods.fundings WHERE user_id = :u ORDER BY id",
        u=who.user["id"],
    )


@pytest.fixture
async def impatient(settings: Settings, data_dir: Path) -> AsyncIterator[Any]:
    """The API with a 300 ms lock timeout (the default is 10 s), on the test database and the
    test's network simulator."""
    quick = make_settings(
        settings.database_url,
        settings.redis_url,
        data_dir,
        secret_key=settings.secret_key,
        network_address=settings.network_address,
        db_lock_timeout_ms=300,
    )
    application = create_app(quick)
    async with LifespanManager(application):
        yield application


async def hold_wallet(engine: Any, conn: Any, user_id: str) -> None:
    """Someone else holds the user's USD wallet row: a posting to it waits, then times out."""
    await conn.execute(
        text(
            "SELECT 1 FROM ledger.accounts WHERE owner_id = :u AND kind = 'wallet' "
            "AND currency = 'USD' FOR UPDATE"
        ),
        {"u": user_id},
    )


async def test_a_top_up_whose_credit_fails_after_the_charge_is_credited_by_its_retry_once(
    impatient: Any, network_simulator: Any
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        alice = await sign_up(client, name="Alice Tops Up")
        card = await add_card(client, alice)
        assert (await topup(client, alice, card["id"], 100)).status_code == 201  # opens the wallet
        key = uuid.uuid4().hex
        engine = impatient.state.resources.engine
        async with engine.connect() as blocker:
            await hold_wallet(engine, blocker, alice.user["id"])
            r = await topup(client, alice, card["id"], 2_500, key=key)
            assert r.status_code == 503 and r.json()["code"] == "database_busy", r.text
            await blocker.rollback()
        assert (await balance(impatient, alice.user["id"], "USD")).posted == 100
        (_, pending) = await funding_rows(impatient, alice)
        assert (pending.status, pending.response_code) == ("pending", "00")
        assert charges(network_simulator, pending.id) == 1

        again = await topup(client, alice, card["id"], 2_500, key=key)
        assert again.status_code == 201, again.text
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json()["id"] == pending.id
        assert again.json()["balance"]["posted"] == 2_600
        third = await topup(client, alice, card["id"], 2_500, key=key)
        assert third.json() == again.json()
        assert charges(network_simulator, pending.id) == 1
        assert (await balance(impatient, alice.user["id"], "USD")).posted == 2_600
        completed = await sql(
            impatient,
            "SELECT count(*) AS n FROM platform.outbox WHERE subject = :s "
            "AND type = 'billfold.payment_methods.topup.completed'",
            s=pending.id,
        )
        assert completed[0].n == 1
        # Another request with the same key is a mistake, never a second charge.
        other = await topup(client, alice, card["id"], 2_600, key=key)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reuse"


async def test_concurrent_top_ups_with_one_key_charge_the_card_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    card = await add_card(client, alice)
    key = uuid.uuid4().hex
    answers = await asyncio.gather(
        *(topup(client, alice, card["id"], 1_200, key=key) for _ in range(4))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes.count(201) >= 1 and set(codes) <= {201, 409}, [r.text for r in answers]
    for r in answers:
        if r.status_code == 409:
            assert r.json()["code"] == "idempotency_request_in_progress"
    (row,) = await funding_rows(app, alice)
    assert row.status == "completed"
    assert charges(network_simulator, row.id) == 1
    assert (await balance(app, alice.user["id"], "USD")).posted == 1_200
    again = await topup(client, alice, card["id"], 1_200, key=key)
    assert again.status_code == 201 and again.json()["id"] == row.id
    assert charges(network_simulator, row.id) == 1


async def test_the_recovery_job_credits_an_approved_top_up_left_pending(
    impatient: Any, network_simulator: Any
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        alice = await sign_up(client, name="Alice Crashes")
        card = await add_card(client, alice)
        assert (await topup(client, alice, card["id"], 100)).status_code == 201
        key = uuid.uuid4().hex
        engine = impatient.state.resources.engine
        async with engine.connect() as blocker:
            await hold_wallet(engine, blocker, alice.user["id"])
            r = await topup(client, alice, card["id"], 700, key=key)
            assert r.status_code == 503, r.text
            await blocker.rollback()
        (_, pending) = await funding_rows(impatient, alice)
        settings = impatient.state.resources.settings
        # Not yet past the deadline: the job leaves it to the request's own retry.
        assert await payment_methods.recover_fundings(engine, settings) == 0
        await sql(
            impatient,
            "UPDATE payment_methods.fundings SET updated_at = now() - interval '1 hour' "
            "WHERE id = :i",
            i=pending.id,
        )
        assert await payment_methods.recover_fundings(engine, settings) == 1
        assert await payment_methods.recover_fundings(engine, settings) == 0
        (_, done) = await funding_rows(impatient, alice)
        assert (done.status, done.posting_id is not None) == ("completed", True)
        assert (await balance(impatient, alice.user["id"], "USD")).posted == 800
        # The user's retry now answers the credited top-up; the card is not charged again.
        again = await topup(client, alice, card["id"], 700, key=key)
        assert again.status_code == 201 and again.json()["id"] == pending.id
        assert charges(network_simulator, pending.id) == 1
        assert (await balance(impatient, alice.user["id"], "USD")).posted == 800


async def test_the_recovery_job_fails_a_top_up_whose_network_answer_never_came(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    card = await add_card(client, alice)
    key = uuid.uuid4().hex
    body = Funding(payment_method_id=card["id"], amount=900, currency="USD")
    # What a process that died at the network leaves: tx1 committed, no answer written.
    await sql(
        app,
        "INSERT INTO payment_methods.fundings (id, user_id, payment_method_id, type, rail, "
        "status, amount, currency, idempotency_key, request_hash, updated_at) VALUES "
        "(:i, :u, :m, 'topup', 'card', 'pending', 900, 'USD', :k, :h, now() - interval '1 hour')",
        i="top_" + uuid.uuid4().hex[:26],
        u=alice.user["id"],
        m=card["id"],
        k=key,
        h=_request_hash(app.state.payment_methods, body),
    )
    r = await topup(client, alice, card["id"], 900, key=key)
    assert r.status_code == 409 and r.json()["code"] == "idempotency_request_in_progress"
    engine, settings = app.state.resources.engine, app.state.resources.settings
    assert await payment_methods.recover_fundings(engine, settings) == 1
    (row,) = await funding_rows(app, alice)
    assert (row.status, row.failure_code, row.posting_id) == ("failed", "topup_interrupted", None)
    r = await topup(client, alice, card["id"], 900, key=key)
    assert r.status_code == 409 and r.json()["code"] == "topup_interrupted", r.text
    assert charges(network_simulator, row.id) == 0
    assert (await balance(app, alice.user["id"], "USD")).posted == 0


async def test_a_top_up_the_network_did_not_answer_is_charged_by_its_retry(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    card = await add_card(client, alice)
    key = uuid.uuid4().hex
    network = app.state.payment_methods.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=0.5)
    network_simulator.config.amount_rules[4_433] = NO_ANSWER  # charged, answer lost
    try:
        r = await topup(client, alice, card["id"], 4_433, key=key)
        assert r.status_code == 503 and r.json()["code"] == "network_timeout", r.text
    finally:
        network.config = config
        network_simulator.config.amount_rules.pop(4_433, None)
    # Nothing is kept (the client reversed the lost charge with a 0420), so the key is free.
    assert await funding_rows(app, alice) == []
    r = await topup(client, alice, card["id"], 4_433, key=key)
    assert r.status_code == 201, r.text
    assert charges(network_simulator, r.json()["id"]) == 1
    assert (await balance(app, alice.user["id"], "USD")).posted == 4_433


async def test_a_card_whose_token_is_suspended_or_deleted_or_that_expired_tops_up_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    card = await add_card(client, alice)
    vault = app.state.payment_methods.vault
    token_id = card["card"]["token_id"]
    before = await state(app, alice)
    sent = len(network_simulator.messages("0200"))

    await vault.suspend_token(token_id, reason="lost_phone")
    r = await topup(client, alice, card["id"], 500)
    assert r.status_code == 409 and r.json()["code"] == "card_token_inactive", r.text
    assert r.json()["errors"][0]["pointer"] == "#/payment_method_id"
    await vault.resume_token(token_id, reason="found_phone")
    ok = await topup(client, alice, card["id"], 500)
    assert ok.status_code == 201, ok.text

    await vault.delete_token(token_id, reason="closed")
    after_ok = await state(app, alice)
    r = await topup(client, alice, card["id"], 500)
    assert r.status_code == 409 and r.json()["code"] == "card_token_inactive", r.text
    assert await state(app, alice) == after_ok

    expired = await add_card(client, alice)
    await sql(
        app,
        "UPDATE payment_methods.methods SET expiry_month = 1, expiry_year = 2024 WHERE id = :i",
        i=expired["id"],
    )
    after_add = await state(app, alice)
    r = await topup(client, alice, expired["id"], 500)
    assert r.status_code == 422 and r.json()["code"] == "card_expired", r.text
    assert await state(app, alice) == after_add
    # One charge in all: the one top-up that was allowed.
    assert len(network_simulator.messages("0200")) == sent + 1
    assert before["usd"] + 500 == after_ok["usd"]


async def test_one_top_up_the_recovery_job_cannot_credit_does_not_hold_up_the_others(
    impatient: Any, network_simulator: Any
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    engine = impatient.state.resources.engine
    settings = impatient.state.resources.settings
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        people = [await sign_up(client, name=f"Stuck {n}") for n in range(2)]
        left: list[str] = []
        for who in people:  # each leaves an approved top-up uncredited
            card = await add_card(client, who)
            assert (await topup(client, who, card["id"], 100)).status_code == 201
            async with engine.connect() as blocker:
                await hold_wallet(engine, blocker, who.user["id"])
                r = await topup(client, who, card["id"], 300)
                assert r.status_code == 503, r.text
                await blocker.rollback()
            (_, pending) = await funding_rows(impatient, who)
            left.append(pending.id)
        await sql(
            impatient,
            "UPDATE payment_methods.fundings SET updated_at = now() - interval '1 hour' "
            "WHERE id = ANY(:ids)",
            ids=left,
        )
        first, second = people
        async with engine.connect() as blocker:
            await hold_wallet(engine, blocker, first.user["id"])
            assert await payment_methods.recover_fundings(engine, settings) == 1
            await blocker.rollback()
        assert (await balance(impatient, first.user["id"], "USD")).posted == 100
        assert (await balance(impatient, second.user["id"], "USD")).posted == 400
        assert await payment_methods.recover_fundings(engine, settings) == 1
        assert (await balance(impatient, first.user["id"], "USD")).posted == 400
