"""Card payments at the edges the issue-6 review found: a merchant whose name is not ASCII,
a request that cannot be put on the wire, a payment resumed after a long step-up while the
recovery sweeper runs, and a crash after the issuer approved (its hold is reversed by the RRN
the payment wrote before asking the network)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import httpx
import pytest

from billfold.network import (
    NO_ANSWER,
    Authorization,
    Iso8583Network,
    NetworkClientConfig,
    new_rrn,
    wire,
)
from billfold.transactions import recover_stuck_payments
from tests.conftest import SignedIn, free_port, fund, sign_up
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
            swept = await recover_stuck_payments(app.state.resources.engine, app.state.transactions)
            r = await resume
        finally:
            network_simulator.config.latency_ms = 0
    assert swept == 0
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "authorized", r.json()
    assert network_simulator.held(card_id) == 1_300


async def _is(app: Any, txn_id: str, status: str) -> bool:
    return await _status(app, txn_id) == status


async def _held(simulator: Any, card_id: str, amount: int) -> bool:
    return bool(simulator.held(card_id) == amount)


async def test_a_crash_after_the_issuer_approved_is_reversed(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    """The issuer holds the money, the answer is lost and the process dies while waiting: the
    payment's RRN was committed before the network was asked, so the recovery sweeper's
    reversal names the hold and releases it."""
    method, card_id = await card(client, app, alice)
    amount, key = 4_321, uuid.uuid4().hex
    network_simulator.config.amount_rules[amount] = NO_ANSWER
    try:
        request = asyncio.create_task(
            pay(client, alice, payment_body("card", method, amount=amount), key=key)
        )
        await eventually(lambda: _held(network_simulator, card_id, amount))
        request.cancel()  # before the client's own timeout (and its 0420): a crash
        with pytest.raises(asyncio.CancelledError):
            await request
    finally:
        del network_simulator.config.amount_rules[amount]
    (row,) = await sql(
        app,
        "SELECT id, status, rrn FROM transactions.transactions "
        "WHERE user_id = :u AND idempotency_key = :k",
        u=alice.user["id"],
        k=key,
    )
    assert row.status == "authorizing" and row.rrn
    (auth,) = authorizations(network_simulator, row.id)
    assert auth.rrn == row.rrn  # what was stored is what the issuer holds under
    assert network_simulator.messages("0420") == [] or all(
        m.original_rrn != row.rrn for m in network_simulator.messages("0420")
    )
    await sql_exec(
        app,
        "UPDATE transactions.transactions SET updated_at = now() - interval '1 hour' WHERE id = :t",
        t=row.id,
    )
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) >= 1
    assert await _status(app, row.id) == "failed"
    await eventually(lambda: _held(network_simulator, card_id, 0))
    assert [m.original_rrn for m in network_simulator.messages("0420")].count(row.rrn) == 1


async def test_a_crash_during_an_increment_is_reversed(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    """The same for an incremental authorization: the increment's own RRN is stored first and
    the sweeper's reversal releases only what the increment added."""
    method, card_id = await card(client, app, alice)
    p = (await pay(client, alice, payment_body("card", method, amount=2_000))).json()
    assert p["status"] == "authorized"
    amount = 777
    network_simulator.config.amount_rules[amount] = NO_ANSWER
    try:
        request = asyncio.create_task(act(client, alice, p["id"], "increment", {"amount": amount}))
        await eventually(lambda: _held(network_simulator, card_id, 2_000 + amount))
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    finally:
        del network_simulator.config.amount_rules[amount]
    (inc,) = await sql(
        app,
        "SELECT id, status, rrn FROM transactions.increments WHERE transaction_id = :t",
        t=p["id"],
    )
    assert inc.status == "pending" and inc.rrn
    await sql_exec(
        app,
        "UPDATE transactions.increments SET created_at = now() - interval '1 hour' WHERE id = :i",
        i=inc.id,
    )
    assert await recover_stuck_payments(app.state.resources.engine, app.state.transactions) >= 1
    r = await app_get(client, alice, p["id"])
    assert r["authorized_amount"] == 2_000
    assert [(i["status"], i["decline_code"]) for i in r["increments"]] == [
        ("failed", "interrupted")
    ]
    await eventually(lambda: _held(network_simulator, card_id, 2_000))


async def app_get(client: httpx.AsyncClient, who: SignedIn, txn_id: str) -> Any:
    r = await client.get(f"/v1/payments/{txn_id}", headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()


# --- the network down ---------------------------------------------------------------------------


async def test_advices_do_not_wait_out_an_outage() -> None:
    """A reversal or a completion returns after its first attempt (at once while the breaker
    is open, or when it queues behind an advice still being repeated): a void or a capture
    never waits out the outage; the repeats carry on in the background."""
    config = NetworkClientConfig(
        port=free_port(), timeout=2.0, breaker_failures=1, breaker_reset=30.0
    )
    client = Iso8583Network(config)
    first = Authorization("00", "A1B2C3", "000001", new_rrn(), 500, "USD")
    other = dataclasses.replace(first, rrn=new_rrn())
    try:
        started = time.monotonic()
        await client.reverse(first, amount=500, reason="void")  # refused: the breaker opens
        assert client.breaker.state == "open"
        await client.complete(first, amount=100, final=True)  # behind the repeated reversal
        await client.reverse(other, amount=500, reason="expiry")  # the breaker is open
        assert time.monotonic() - started < 1.5  # each used to wait 1.5 timeouts (3 s)
        assert client.pending_advices == 3
    finally:
        await client.aclose()


async def test_stand_in_and_an_open_breaker_over_http(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    network_simulator: Any,
    network_port: int,
) -> None:
    """The network goes down: a small card payment is approved in stand-in (its 0120 advice
    reaches the network when it is back), a larger one is declined 91, and with the breaker
    open a payment, a void and a capture answer at once, not after the client's timeouts."""
    method, card_id = await card(client, app, alice)
    before = (await pay(client, alice, payment_body("card", method, amount=900))).json()
    other = (await pay(client, alice, payment_body("card", method, amount=300))).json()
    assert before["status"] == other["status"] == "authorized"
    net = app.state.transactions.network
    saved, saved_reset = net.config, net.breaker.reset
    net.config = dataclasses.replace(saved, stand_in_floor_limit=2_000, advice_retry_max=0.3)
    await network_simulator.stop()
    try:
        small = await pay(client, alice, payment_body("card", method, amount=1_500))
        assert small.status_code == 201, small.text
        assert small.json()["status"] == "authorized"
        assert small.json()["auth_code"].startswith("S")
        (row,) = await sql(
            app,
            "SELECT stand_in FROM transactions.transaction_details WHERE transaction_id = :t",
            t=small.json()["id"],
        )
        assert row.stand_in is True
        over = await pay(client, alice, payment_body("card", method, amount=800))
        assert (over.json()["status"], over.json()["decline_code"]) == (
            "declined",
            "issuer_unavailable",
        )
        await eventually(lambda: _breaker_open(net))
        started = time.monotonic()
        r = await act(client, alice, before["id"], "void")
        assert r.status_code == 200 and r.json()["status"] == "voided", r.text
        r = await act(client, alice, other["id"], "capture", {"amount": 300})
        assert r.status_code == 201, r.text
        r = await pay(client, alice, payment_body("card", method, amount=100))
        assert r.json()["status"] == "authorized"  # stand-in: 1,600 of 2,000 used
        assert time.monotonic() - started < 3.0  # the void and the capture used to wait 7.5 s each
    finally:
        net.breaker.reset = 0.2
        await network_simulator.start("127.0.0.1", network_port)
    try:
        assert await net.flush(20)
    finally:
        net.config, net.breaker.reset = saved, saved_reset
    assert net.breaker.state == "closed"
    advices = [m for m in network_simulator.messages() if m.mti in ("0120", "0121")]
    assert small.json()["id"] in {m.private.get("TX") for m in advices}
    # Held: the two stand-in approvals; the void released 900 and the capture posted 300.
    await eventually(lambda: _held(network_simulator, card_id, 1_600))
    assert network_simulator.posted(card_id) == 300


async def _breaker_open(net: Any) -> bool:
    return bool(net.breaker.state == "open")


# --- what is refused before the network -----------------------------------------------------


async def test_a_card_amount_the_network_cannot_carry_is_422(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    """Fields 4 and 9F02 hold 12 digits: 10^12 minor units or more is refused up front (not
    `failed` with "try again later"), for a payment and for an increment."""
    method, _ = await card(client, app, alice)
    for amount in (10**12, 2**53 - 1):
        r = await pay(client, alice, payment_body("card", method, amount=amount))
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_amount"
        assert r.json()["errors"][0]["pointer"] == "#/amount"
    p = (await pay(client, alice, payment_body("card", method, amount=10**12 - 1))).json()
    assert p["status"] in ("authorized", "declined"), p  # it reaches the network
    ok = (await pay(client, alice, payment_body("card", method, amount=100))).json()
    r = await act(client, alice, ok["id"], "increment", {"amount": 10**12})
    assert r.status_code == 422 and r.json()["code"] == "invalid_amount", r.text
    rows = await sql(
        app,
        "SELECT count(*) AS n FROM transactions.increments WHERE transaction_id = :t",
        t=ok["id"],
    )
    assert rows[0].n == 0


async def test_a_wallet_increment_decline_speaks_of_the_wallet(
    client: httpx.AsyncClient, app: Any
) -> None:
    """A wallet's `insufficient_funds` speaks of the wallet balance, in the increment's answer
    and in the payment's list of increments, never of "the card"."""
    bob = await sign_up(client)
    await fund(app, bob.user["id"], 5_000)
    p = (await pay(client, bob, payment_body("wallet", amount=1_000))).json()
    assert p["status"] == "authorized", p
    r = await act(client, bob, p["id"], "increment", {"amount": 2**53 - 1})
    assert r.status_code == 201, r.text
    assert r.json()["decline_code"] == "insufficient_funds"
    assert r.json()["decline_reason"] == "Your wallet balance is too low for this payment."
    got = await app_get(client, bob, p["id"])
    assert got["increments"][0]["decline_reason"] == r.json()["decline_reason"]


async def test_control_characters_are_refused_in_free_text(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    """U+0001-U+001F and U+007F in a description, a note, a merchant's name or city, or a
    refund's reason are a 422 naming the field; they would reach the CSV and the PDF."""
    await fund(app, alice.user["id"], 1_000)
    bad = ["Flat\x01white", "tab\there", "bell\x07", "del\x7f", "two\nlines"]
    for text_ in bad:
        for field, body in (
            ("/description", payment_body(description=text_)),
            ("/note", payment_body(note=text_)),
            ("/merchant/name", payment_body(merchant={**COFFEE, "name": text_})),
            ("/merchant/city", payment_body(merchant={**COFFEE, "city": text_})),
        ):
            r = await pay(client, alice, body)
            assert r.status_code == 422, (field, text_, r.text)
            assert r.json()["code"] == "validation_failed"
            assert [e["pointer"] for e in r.json()["errors"]] == [f"#{field}"], r.json()
    p = (await pay(client, alice, payment_body(description="  Café Zoë ☕  "))).json()
    assert p["status"] == "authorized" and p["description"] == "Café Zoë ☕"
    await act(client, alice, p["id"], "capture")
    r = await act(client, alice, p["id"], "refunds", {"reason": "bad\x1bmilk"})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "#/reason", r.text
