"""Top-ups from a verified card (charged through the network) or bank account (simulated ACH),
withdrawals to a verified bank account: the funding row, the ledger posting and the events
commit together; a decline or a refusal posts nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from billfold import ledger
from tests.conftest import SignedIn, fund
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
