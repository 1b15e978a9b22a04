"""No card number, account number or CVV survives a request anywhere we keep things: not in a
stored idempotency fingerprint (an offline oracle for whoever holds the process secret), not in
the database (a `pg_dump` of all of it), not in a log line of the API or the vault."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from billfold.platform import idempotency
from tests.conftest import SignedIn
from tests.integration.payment_methods_support import (
    add,
    card_body,
    iban_body,
    new_pan,
    us_bank_body,
)
from tests.integration.transfer_support import sql

pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")


def _spaced(pan: str) -> str:
    return " ".join(pan[i : i + 4] for i in range(0, len(pan), 4))


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _candidates(body: dict[str, Any], member: str) -> list[bytes]:
    """Every way an attacker could write the body the fingerprint was taken of, with the right
    number (as sent, digits only; with and without the CVV): the brute force's winning guess."""
    inner_name = "card" if "card" in body else "bank_account"
    inner = body[inner_name]
    number = inner[member]
    out: list[bytes] = []
    for written in {number, "".join(ch for ch in number if ch.isalnum())}:
        for keep_cvv in (True, False):
            guess = {inner_name: {**inner, member: written}}
            if not keep_cvv:
                guess[inner_name].pop("cvv", None)
            out.append(_canonical(guess))
            out.append(json.dumps(guess).encode())
    return out


async def _stored_hash(app: Any, key: str) -> str:
    (row,) = await sql(
        app, "SELECT request_hash FROM platform.idempotency_keys WHERE key = :k", k=key
    )
    return str(row.request_hash)


@pytest.mark.parametrize(
    ("body", "member"),
    [
        (card_body(new_pan()), "pan"),
        (card_body(_spaced(new_pan())), "pan"),
        (us_bank_body(), "account_number"),
        (iban_body(), "iban"),
    ],
    ids=["card", "card-with-spaces", "us-account", "iban"],
)
async def test_the_stored_fingerprint_cannot_confirm_a_guessed_number(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, body: dict[str, Any], member: str
) -> None:
    """The review's brute force (bin + last4 + expiry are stored, ~10^5 Luhn-valid PANs remain)
    succeeds iff the fingerprint of a body with the right number equals the stored one: so no
    such body, however written, may reproduce it."""
    key = uuid.uuid4().hex
    r = await add(client, alice, body, key=key)
    assert r.status_code == 201, r.text
    stored = await _stored_hash(app, key)
    fp_key = idempotency.fingerprint_key(app.state.resources.settings.secret_key)
    for guess in _candidates(body, member):
        assert (
            idempotency.request_fingerprint("POST", "/v1/payment-methods", guess, fp_key) != stored
        ), "the stored fingerprint confirms the number: it can be brute-forced"
    # And the fingerprint still tells another number apart (a different card with the same key
    # is a mistake, not a replay).
    other = json.loads(json.dumps(body))
    inner = other["card" if "card" in other else "bank_account"]
    inner[member] = (
        new_pan()
        if member == "pan"
        else (us_bank_body() if member == "account_number" else iban_body())["bank_account"][member]
    )
    again = await add(client, alice, other, key=key)
    assert again.status_code == 422 and again.json()["code"] == "idempotency_key_reuse"
    same = await add(client, alice, body, key=key)
    assert same.headers.get("idempotent-replayed") == "true"
