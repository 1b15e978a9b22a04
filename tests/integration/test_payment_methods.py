"""Payment methods over HTTP on real PostgreSQL, Redis and the SoftHSM2-backed vault: cards
(vaulted, verified by the network with the CVV, tokenised), bank accounts (micro-deposits),
defaults, list/get/patch/delete, owner checks, idempotency, and that no card number, CVV or
account number ever shows up in an answer, an event, an idempotency record or our own tables."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from billfold import jobs, payment_methods
from billfold.app import create_app
from billfold.vault import CardNotFound
from tests.conftest import SignedIn, device_key, make_settings, sign_up
from tests.integration.payment_methods_support import (
    ADDRESS,
    CVV,
    add,
    add_bank,
    add_card,
    card_body,
    deposits,
    iban_body,
    new_account_number,
    new_pan,
    us_bank_body,
    verify,
)
from tests.integration.transfer_support import outbox_events, sql

pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")

UNKNOWN = "pm_01" + "0" * 24


async def method_row(app: Any, method_id: str) -> Any:
    (row,) = await sql(app, "SELECT * FROM payment_methods.methods WHERE id = :id", id=method_id)
    return row


async def events_of(app: Any, method_id: str) -> list[Any]:
    return await sql(
        app,
        "SELECT type, data FROM platform.outbox WHERE subject = :s ORDER BY seq",
        s=method_id,
    )


async def secrets_in_database(app: Any, *needles: str) -> list[str]:
    """Every place one of `needles` appears in our tables, the outbox or idempotency records
    (response bodies opened with the process key: they are sealed at rest)."""
    found: list[str] = []
    dumps = {
        "methods": "SELECT m::text AS t FROM payment_methods.methods m",
        "micro_deposits": "SELECT d::text AS t FROM payment_methods.micro_deposits d",
        "fundings": "SELECT f::text AS t FROM payment_methods.fundings f",
        "outbox": "SELECT o::text AS t FROM platform.outbox o",
        "idempotency": "SELECT i::text AS t FROM platform.idempotency_keys i",
        "postings": "SELECT p::text AS t FROM ledger.postings p",
    }
    for name, query in dumps.items():
        for row in await sql(app, query):
            found += [f"{name}: {n}" for n in needles if n in row[0]]
    sealed = app.state.users.sealed
    for row in await sql(app, "SELECT scope, key, response_body FROM platform.idempotency_keys"):
        aad = f"idempotency\0{row.scope}\0{row.key}".encode()
        body = sealed.open(bytes(row.response_body), aad).decode()
        found += [f"idempotency body: {n}" for n in needles if n in body]
    return found


# --- cards ------------------------------------------------------------------------------------


async def test_adding_a_card_vaults_it_verifies_it_and_issues_a_token(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    pan = new_pan("55", 16)  # a Mastercard
    r = await add(client, alice, {**card_body(pan), "nickname": "Groceries"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("pm_")
    assert (body["type"], body["status"], body["nickname"]) == ("card", "verified", "Groceries")
    assert body["is_default"] is True  # the first verified method
    card = body["card"]
    assert (card["brand"], card["last4"]) == ("mastercard", pan[-4:])
    assert (card["expiry_month"], card["expiry_year"]) == (12, 2031)
    assert card["billing_address"]["postal_code"] == "95014"
    assert card["token_id"].startswith("tok_") and len(card["token_last4"]) == 4
    assert body["failure_code"] is None and body["verified_at"]
    assert pan not in r.text and CVV not in json.dumps(card)

    row = await method_row(app, body["id"])
    assert row.vault_card_id.startswith("card_")
    assert pan not in str(tuple(row))
    secret = await app.state.vault.detokenize(
        card_id=row.vault_card_id, requester="test", purpose="account_verification"
    )
    assert secret.pan == pan  # the vault, and only the vault, has the number
    token = await app.state.vault.get_token(card["token_id"])
    assert token.status == "active" and token.card_id == row.vault_card_id
    assert token.domain.device_id is None  # a password session without a device

    kinds = [e.type for e in await events_of(app, body["id"])]
    assert kinds == [
        "billfold.payment_methods.added",
        "billfold.payment_methods.verified",
        "billfold.payment_methods.default_changed",
    ]
    assert not await secrets_in_database(app, pan)
    assert await secrets_in_database(app, body["id"])  # the search does find what is there


async def test_a_card_added_from_a_device_session_gets_a_token_bound_to_that_device(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    _, pem = device_key()
    r = await client.post(
        "/v1/devices",
        json={"name": "Phone", "platform": "ios", "public_key": pem},
        headers=alice.headers,
    )
    assert r.status_code == 201, r.text
    device_id = r.json()["id"]
    t = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": alice.email,
            "password": alice.password,
            "device_id": device_id,
        },
    )
    assert t.status_code == 200, t.text
    on_phone = SignedIn(alice.user, t.json(), alice.email, alice.password)
    method = await add_card(client, on_phone)
    token = await app.state.vault.get_token(method["card"]["token_id"])
    assert token.domain.device_id == device_id


BAD_CARDS: list[tuple[str, dict[str, Any], str, str]] = [
    ("luhn", {"pan": "4242424242424241"}, "invalid_card_number", "#/card/pan"),
    ("letters", {"pan": "4242-4242-abcd-4242"}, "invalid_card_number", "#/card/pan"),
    ("short", {"pan": "42424242"}, "invalid_card_number", "#/card/pan"),
    ("too_long", {"pan": "4" * 20}, "invalid_card_number", "#/card/pan"),
    ("unknown_brand", {"pan": new_pan("9", 16)}, "unsupported_card_brand", "#/card/pan"),
    ("visa_wrong_length", {"pan": new_pan("4", 15)}, "unsupported_card_brand", "#/card/pan"),
    ("expired", {"expiry_month": 1, "expiry_year": 2020}, "card_expired", "#/card/expiry_year"),
    ("month_13", {"expiry_month": 13}, "invalid_expiry", "#/card/expiry_month"),
    ("month_0", {"expiry_month": 0}, "invalid_expiry", "#/card/expiry_month"),
    ("year_9999", {"expiry_year": 9999}, "invalid_expiry", "#/card/expiry_year"),
    ("cvv_short", {"cvv": "12"}, "invalid_cvv", "#/card/cvv"),
    ("cvv_letters", {"cvv": "12a"}, "invalid_cvv", "#/card/cvv"),
    ("cvv_four_on_visa", {"cvv": "1234"}, "invalid_cvv", "#/card/cvv"),
    ("amex_cvv_three", {"pan": "378282246310005", "cvv": "123"}, "invalid_cvv", "#/card/cvv"),
]


@pytest.mark.parametrize(
    ("label", "card", "code", "pointer"), BAD_CARDS, ids=[c[0] for c in BAD_CARDS]
)
async def test_invalid_cards_are_422_with_a_clear_code_and_no_echo(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    label: str,
    card: dict[str, Any],
    code: str,
    pointer: str,
) -> None:
    body = card_body(**card)
    r = await add(client, alice, body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == code, problem
    assert problem["errors"][0]["pointer"] == pointer
    for secret in (body["card"]["pan"], body["card"]["cvv"]):
        assert secret not in r.text
    assert (
        await sql(
            app, "SELECT id FROM payment_methods.methods WHERE user_id = :u", u=alice.user["id"]
        )
        == []
    )


async def test_schema_errors_never_echo_the_card_number_or_cvv(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    pan = new_pan()
    for card in (
        {"pan": int(pan)},  # a number, not a string
        {"cvv": 123},
        {"pan": pan + "9" * 40},  # too long for the field
        {"expiry_month": "12"},
        {"surprise": pan},
    ):
        r = await add(client, alice, card_body(**{"pan": pan, **card}))
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "validation_failed"
        assert (
            pan not in r.text
            and pan[:12] not in r.text
            and "123" not in json.dumps(r.json().get("errors"))
        )


async def test_both_or_neither_kind_is_refused(client: httpx.AsyncClient, alice: SignedIn) -> None:
    for body in ({}, {**card_body(), **us_bank_body()}):
        r = await add(client, alice, body)
        assert r.status_code == 422 and r.json()["code"] == "validation_failed", r.text


@pytest.mark.parametrize(
    ("suffix", "cvv", "code"),
    [("4242", "000", "N7"), ("0002", CVV, "05"), ("9987", CVV, "41"), ("0069", CVV, "54")],
)
async def test_a_card_the_network_declines_is_failed_with_its_reason_and_its_number_deleted(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, suffix: str, cvv: str, code: str
) -> None:
    pan = new_pan(suffix=suffix)
    r = await add(client, alice, card_body(pan, cvv=cvv))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["failure_code"]) == ("failed", code)
    assert body["failure_reason"] and body["is_default"] is False
    assert body["card"]["token_id"] is None
    row = await method_row(app, body["id"])
    with pytest.raises(CardNotFound):
        await app.state.vault.get_card(row.vault_card_id)
    kinds = [e.type for e in await events_of(app, body["id"])]
    assert kinds == [
        "billfold.payment_methods.added",
        "billfold.payment_methods.verification_failed",
    ]
    (failed,) = [e for e in await events_of(app, body["id"]) if e.type.endswith("failed")]
    assert failed.data["failure_code"] == code
    if code == "N7":
        # A failed card does not block the right CVV.
        again = await add(client, alice, card_body(pan))
        assert again.status_code == 201 and again.json()["status"] == "verified", again.text


async def test_a_card_that_keeps_failing_is_refused_for_a_day(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    pan = new_pan()
    for _ in range(3):
        r = await add(client, alice, card_body(pan, cvv="000"))
        assert r.json()["status"] == "failed"
    r = await add(client, alice, card_body(pan))
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts", r.text
    assert "retry-after" in r.headers


async def test_a_card_tested_across_many_accounts_is_refused_to_everyone_for_a_day(
    client: httpx.AsyncClient, app: Any
) -> None:
    pan = new_pan()
    testers = [await sign_up(client) for _ in range(3)]
    # 2 + 2 + 1 guesses: under each account's own cap of 3, five for the card.
    for who, guesses in zip(testers, (2, 2, 1), strict=True):
        for _ in range(guesses):
            r = await add(client, who, card_body(pan, cvv="000"))
            assert r.json()["status"] == "failed", r.text
    newcomer = await sign_up(client)
    r = await add(client, newcomer, card_body(pan))
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts", r.text
    assert await live_vault_cards(app, newcomer.user["id"]) == 0
    r = await add(client, testers[2], card_body(pan))
    assert r.status_code == 429, r.text
    # Another card is not affected.
    assert (await add(client, newcomer, card_body(new_pan()))).json()["status"] == "verified"


async def test_the_same_card_twice_is_409_until_it_is_removed(
    client: httpx.AsyncClient, alice: SignedIn, bob: SignedIn
) -> None:
    pan = new_pan()
    first = await add_card(client, alice, pan=pan)
    r = await add(client, alice, card_body(pan, cvv="999"))
    assert r.status_code == 409 and r.json()["code"] == "payment_method_exists", r.text
    # Written with spaces it is still the same card.
    spaced = " ".join(pan[i : i + 4] for i in range(0, 16, 4))
    assert (await add(client, alice, card_body(spaced))).status_code == 409
    # Bob may add the same card (same fingerprint, other owner).
    bobs = await add_card(client, bob, pan=pan)
    assert bobs["card"]["fingerprint"] == first["card"]["fingerprint"]
    r = await client.delete(f"/v1/payment-methods/{first['id']}", headers=alice.headers)
    assert r.status_code == 204
    assert (await add(client, alice, card_body(pan))).status_code == 201


async def test_adding_a_card_is_idempotent_and_the_cvv_is_not_in_the_fingerprint(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    pan, key = new_pan(), uuid.uuid4().hex
    first = await add(client, alice, card_body(pan), key=key)
    assert first.status_code == 201
    again = await add(client, alice, card_body(pan), key=key)
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    # Another CVV with the same key is the same request (the CVV is never kept, not even hashed).
    other_cvv = await add(client, alice, card_body(pan, cvv="987"), key=key)
    assert other_cvv.headers.get("idempotent-replayed") == "true"
    # Another card with the same key is a mistake.
    other = await add(client, alice, card_body(new_pan()), key=key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reuse"
    rows = await sql(
        app, "SELECT id FROM payment_methods.methods WHERE user_id = :u", u=alice.user["id"]
    )
    assert len(rows) == 1
    # The stored fingerprint is that of the body without its CVV and with the PAN masked (last
    # four digits and length: a keyed hash of the PAN could be brute-forced).
    from billfold.platform import idempotency

    (stored,) = await sql(
        app, "SELECT request_hash FROM platform.idempotency_keys WHERE key = :k", k=key
    )
    fp_key = idempotency.fingerprint_key(app.state.resources.settings.secret_key)
    body = card_body(pan)
    del body["card"]["cvv"]
    body["card"]["pan"] = f"masked:{pan[-4:]}:{len(pan)}"
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert stored.request_hash == idempotency.request_fingerprint(
        "POST", "/v1/payment-methods", canonical, fp_key
    )


async def test_adding_needs_an_idempotency_key(client: httpx.AsyncClient, alice: SignedIn) -> None:
    r = await client.post("/v1/payment-methods", json=card_body(), headers=alice.headers)
    assert r.status_code == 428 and r.json()["code"] == "idempotency_key_required"


# --- bank accounts and micro-deposits ---------------------------------------------------------


async def test_a_us_bank_account_is_sealed_and_waits_for_its_micro_deposits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    number = new_account_number()
    r = await add(client, alice, us_bank_body(account_number=number, account_type="savings"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["type"], body["status"], body["is_default"]) == (
        "bank_account",
        "pending_verification",
        False,
    )
    bank = body["bank_account"]
    assert bank == {
        "country": "US",
        "last4": number[-4:],
        "routing_number": "021000021",
        "account_type": "savings",
        "bic": None,
        "bank_name": None,
        "currency": "USD",
        "fingerprint": bank["fingerprint"],
    }
    assert body["micro_deposits"]["status"] == "pending"
    assert body["micro_deposits"]["attempts_left"] == 3
    assert number not in r.text
    row = await method_row(app, body["id"])
    assert app.state.payment_methods.open_account(body["id"], bytes(row.account_sealed)) == number
    a, b = await deposits(app, alice, body["id"])
    assert 1 <= a <= 99 and 1 <= b <= 99
    kinds = [e.type for e in await events_of(app, body["id"])]
    assert kinds == [
        "billfold.payment_methods.added",
        "billfold.payment_methods.micro_deposits_sent",
    ]
    done = await verify(client, alice, body["id"], [b, a])  # any order
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "verified" and done.json()["is_default"] is True
    assert done.json()["micro_deposits"]["status"] == "confirmed"
    assert not await secrets_in_database(app, number)
    # The same account again is the same method.
    r = await add(client, alice, us_bank_body(account_number=number))
    assert r.status_code == 409 and r.json()["code"] == "payment_method_exists"


async def test_an_iban_account_takes_its_country_currency_and_bank(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    body = iban_body("DE")
    iban = body["bank_account"]["iban"]
    r = await add(client, alice, body)
    assert r.status_code == 201, r.text
    bank = r.json()["bank_account"]
    assert (bank["country"], bank["currency"], bank["bic"], bank["last4"]) == (
        "DE",
        "EUR",
        "COBADEFFXXX",
        iban[-4:],
    )
    assert iban not in r.text
    gb = await add(client, alice, iban_body("GB", bic="NWBKGB2L"))
    assert gb.status_code == 201, gb.text
    assert gb.json()["bank_account"]["currency"] == "GBP"
    assert not await secrets_in_database(app, iban)


BAD_BANKS: list[tuple[str, dict[str, Any], str]] = [
    ("routing_checksum", us_bank_body(routing_number="021000022"), "invalid_routing_number"),
    ("routing_prefix", us_bank_body(routing_number="991000021"), "invalid_routing_number"),
    ("routing_letters", us_bank_body(routing_number="02100002a"), "invalid_routing_number"),
    ("account_short", us_bank_body(account_number="123"), "invalid_account_number"),
    ("account_letters", us_bank_body(account_number="12345x"), "invalid_account_number"),
    ("account_zeros", us_bank_body(account_number="0000000"), "invalid_account_number"),
    ("iban_checksum", {"bank_account": {"iban": "DE89370400440532013001"}}, "invalid_iban"),
    ("iban_country", {"bank_account": {"iban": "XX89370400440532013000"}}, "invalid_iban"),
    ("iban_short", {"bank_account": {"iban": "DE89"}}, "invalid_iban"),
    ("bic_junk", iban_body(bic="NOTABIC!"), "invalid_bic"),
    ("bic_other_country", iban_body(bic="NWBKGB2L"), "invalid_bic"),
    ("routing_only", {"bank_account": {"routing_number": "021000021"}}, "validation_failed"),
    ("iban_and_routing", iban_body(routing_number="021000021"), "validation_failed"),
    ("bic_without_iban", us_bank_body(bic="COBADEFFXXX"), "validation_failed"),
    ("type", us_bank_body(account_type="brokerage"), "validation_failed"),
]


@pytest.mark.parametrize(("label", "body", "code"), BAD_BANKS, ids=[c[0] for c in BAD_BANKS])
async def test_invalid_bank_accounts_are_422_with_a_clear_code_and_no_echo(
    client: httpx.AsyncClient, alice: SignedIn, label: str, body: dict[str, Any], code: str
) -> None:
    r = await add(client, alice, body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code
    account = body["bank_account"]
    for secret in (account.get("account_number"), account.get("iban")):
        if secret and len(secret) > 6:
            assert secret not in r.text


async def test_wrong_amounts_count_attempts_and_the_last_one_fails_the_account(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    r = await add(client, alice, us_bank_body())
    method_id = r.json()["id"]
    a, b = await deposits(app, alice, method_id)
    wrong = [a % 99 + 1, b]
    for left in (2, 1):
        r = await verify(client, alice, method_id, wrong)
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_micro_deposit_amounts"
        assert r.json()["attempts_left"] == left
    r = await verify(client, alice, method_id, wrong)
    assert r.status_code == 422 and r.json()["attempts_left"] == 0
    got = (await client.get(f"/v1/payment-methods/{method_id}", headers=alice.headers)).json()
    assert (got["status"], got["failure_code"]) == ("failed", "micro_deposits_failed")
    assert got["micro_deposits"]["status"] == "failed"
    # Even the right amounts are too late now.
    r = await verify(client, alice, method_id, [a, b])
    assert r.status_code == 409 and r.json()["code"] == "payment_method_not_pending"
    kinds = [e.type for e in await events_of(app, method_id)]
    assert kinds[-1] == "billfold.payment_methods.verification_failed"


async def test_parallel_guesses_each_spend_an_attempt(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    r = await add(client, alice, us_bank_body())
    method_id = r.json()["id"]
    a, b = await deposits(app, alice, method_id)
    answers = await asyncio.gather(
        *(verify(client, alice, method_id, [a % 99 + 1, b % 99 + 1]) for _ in range(8))
    )
    codes = sorted(r.json()["code"] for r in answers)
    assert codes.count("invalid_micro_deposit_amounts") == 3, codes
    assert codes.count("payment_method_not_pending") == 5, codes
    (row,) = await sql(
        app,
        "SELECT attempts, status FROM payment_methods.micro_deposits WHERE payment_method_id = :i",
        i=method_id,
    )
    assert (row.attempts, row.status) == (3, "failed")


async def test_micro_deposits_past_their_deadline_fail_the_account(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    r = await add(client, alice, us_bank_body())
    method_id = r.json()["id"]
    a, b = await deposits(app, alice, method_id)
    await sql(
        app,
        "UPDATE payment_methods.micro_deposits SET expires_at = now() - interval '1 second' "
        "WHERE payment_method_id = :i",
        i=method_id,
    )
    r = await verify(client, alice, method_id, [a, b])
    assert r.status_code == 409 and r.json()["code"] == "micro_deposits_expired", r.text
    got = (await client.get(f"/v1/payment-methods/{method_id}", headers=alice.headers)).json()
    assert (got["status"], got["failure_code"]) == ("failed", "micro_deposits_expired")


async def test_the_worker_fails_bank_accounts_whose_deposits_ran_out_of_time(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    late = (await add(client, alice, us_bank_body())).json()
    on_time = (await add(client, alice, us_bank_body())).json()
    await sql(
        app,
        "UPDATE payment_methods.micro_deposits SET expires_at = now() - interval '1 second' "
        "WHERE payment_method_id = :i",
        i=late["id"],
    )
    engine = app.state.resources.engine
    assert await payment_methods.expire_micro_deposits(engine) >= 1
    assert await payment_methods.expire_micro_deposits(engine) == 0  # once only
    got = (await client.get(f"/v1/payment-methods/{late['id']}", headers=alice.headers)).json()
    assert (got["status"], got["failure_code"]) == ("failed", "micro_deposits_expired")
    assert got["micro_deposits"]["status"] == "expired"
    kinds = [e.type for e in await events_of(app, late["id"])]
    assert kinds[-1] == "billfold.payment_methods.verification_failed"
    still = await client.get(f"/v1/payment-methods/{on_time['id']}", headers=alice.headers)
    assert still.json()["status"] == "pending_verification"


async def test_cards_are_not_verified_by_micro_deposits(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    card = await add_card(client, alice)
    r = await verify(client, alice, card["id"], [1, 2])
    assert r.status_code == 409 and r.json()["code"] == "payment_method_not_pending"
    for amounts in ([1], [1, 2, 3], [0, 5], [100, 5], [1.5, 2], ["1", "2"]):
        r = await verify(client, alice, card["id"], amounts)  # type: ignore[arg-type]
        assert r.status_code == 422 and r.json()["code"] == "validation_failed", amounts


# --- defaults ---------------------------------------------------------------------------------


async def test_exactly_one_default_even_under_concurrent_changes(
    client: httpx.AsyncClient, app: Any
) -> None:
    carol = await sign_up(client, name="Carol Default")
    methods = [await add_card(client, carol) for _ in range(5)]
    answers = await asyncio.gather(
        *(
            client.post(f"/v1/payment-methods/{m['id']}/default", headers=carol.headers)
            for m in methods * 4
        )
    )
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    defaults = await sql(
        app,
        "SELECT id FROM payment_methods.methods WHERE user_id = :u AND is_default",
        u=carol.user["id"],
    )
    assert len(defaults) == 1
    listed = (await client.get("/v1/payment-methods", headers=carol.headers)).json()["data"]
    assert [m["id"] for m in listed if m["is_default"]] == [defaults[0].id]

    # The database itself refuses a second default, whatever the code does.
    other = next(m["id"] for m in methods if m["id"] != defaults[0].id)
    with pytest.raises(IntegrityError, match="methods_one_default"):
        async with app.state.resources.engine.begin() as conn:
            await conn.execute(
                text("UPDATE payment_methods.methods SET is_default = true WHERE id = :i"),
                {"i": other},
            )
    # Nor may an unverified method be one.
    pending = (await add(client, carol, us_bank_body())).json()
    with pytest.raises(IntegrityError, match="methods_default_verified"):
        async with app.state.resources.engine.begin() as conn:
            await conn.execute(
                text("UPDATE payment_methods.methods SET is_default = false WHERE user_id = :u"),
                {"u": carol.user["id"]},
            )
            await conn.execute(
                text("UPDATE payment_methods.methods SET is_default = true WHERE id = :i"),
                {"i": pending["id"]},
            )
    r = await client.post(f"/v1/payment-methods/{pending['id']}/default", headers=carol.headers)
    assert r.status_code == 409 and r.json()["code"] == "payment_method_not_verified"


async def test_setting_the_default_moves_it_and_says_so(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    first = await add_card(client, alice)
    second = await add_bank(client, app, alice)
    assert second["is_default"] is False
    r = await client.post(f"/v1/payment-methods/{second['id']}/default", headers=alice.headers)
    assert r.status_code == 200 and r.json()["is_default"] is True
    got = (await client.get(f"/v1/payment-methods/{first['id']}", headers=alice.headers)).json()
    assert got["is_default"] is False
    (event,) = [e for e in await events_of(app, second["id"]) if e.type.endswith("default_changed")]
    assert event.data["previous_payment_method_id"] == first["id"]
    # Setting it again changes nothing and publishes nothing.
    await client.post(f"/v1/payment-methods/{second['id']}/default", headers=alice.headers)
    assert len([e for e in await events_of(app, second["id"]) if "default" in e.type]) == 1


# --- list, get, patch, delete -----------------------------------------------------------------


async def test_list_get_patch_and_delete(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    card = await add_card(client, alice)
    bank = await add_bank(client, app, alice)
    pending = (await add(client, alice, us_bank_body())).json()

    page = (await client.get("/v1/payment-methods", headers=alice.headers)).json()
    assert [m["id"] for m in page["data"]] == [pending["id"], bank["id"], card["id"]]
    first = (
        await client.get("/v1/payment-methods", params={"limit": 2}, headers=alice.headers)
    ).json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    rest = (
        await client.get(
            "/v1/payment-methods",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=alice.headers,
        )
    ).json()
    assert [m["id"] for m in rest["data"]] == [card["id"]] and rest["next_cursor"] is None
    only_cards = (
        await client.get("/v1/payment-methods", params={"type": "card"}, headers=alice.headers)
    ).json()
    assert [m["id"] for m in only_cards["data"]] == [card["id"]]
    verified = (
        await client.get(
            "/v1/payment-methods", params={"status": "verified"}, headers=alice.headers
        )
    ).json()
    assert {m["id"] for m in verified["data"]} == {card["id"], bank["id"]}

    new_address = {**ADDRESS, "line1": "2 Main St", "postal_code": "10001"}
    r = await client.patch(
        f"/v1/payment-methods/{card['id']}",
        json={"nickname": "Travel", "billing_address": new_address},
        headers=alice.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["nickname"] == "Travel"
    assert r.json()["card"]["billing_address"]["line1"] == "2 Main St"
    r = await client.patch(
        f"/v1/payment-methods/{card['id']}", json={"nickname": None}, headers=alice.headers
    )
    assert (
        r.json()["nickname"] is None and r.json()["card"]["billing_address"]["line1"] == "2 Main St"
    )
    for bad in (
        {"billing_address": new_address, "_": 1},
        {"nickname": "x" * 41},
        {"billing_address": None},
        {"last4": "0000"},
    ):
        r = await client.patch(f"/v1/payment-methods/{card['id']}", json=bad, headers=alice.headers)
        assert r.status_code == 422, (bad, r.text)
    r = await client.patch(
        f"/v1/payment-methods/{bank['id']}",
        json={"billing_address": new_address},
        headers=alice.headers,
    )
    assert r.status_code == 422

    # Removing the default card: its tokens go, and the default moves to the bank account.
    token_id = card["card"]["token_id"]
    row = await method_row(app, card["id"])
    r = await client.delete(f"/v1/payment-methods/{card['id']}", headers=alice.headers)
    assert r.status_code == 204
    assert (await app.state.vault.get_token(token_id)).status == "deleted"
    with pytest.raises(CardNotFound):
        await app.state.vault.get_card(row.vault_card_id)
    r = await client.get(f"/v1/payment-methods/{card['id']}", headers=alice.headers)
    assert r.status_code == 404 and r.json()["code"] == "payment_method_not_found"
    got = (await client.get(f"/v1/payment-methods/{bank['id']}", headers=alice.headers)).json()
    assert got["is_default"] is True
    # Removing the last verified one leaves no default; a bank account's number is dropped.
    assert (
        await client.delete(f"/v1/payment-methods/{bank['id']}", headers=alice.headers)
    ).status_code == 204
    assert (await method_row(app, bank["id"])).account_sealed is None
    assert (
        await sql(
            app,
            "SELECT id FROM payment_methods.methods WHERE user_id = :u AND is_default",
            u=alice.user["id"],
        )
        == []
    )
    kinds = [e.type for e in await events_of(app, card["id"])]
    assert "billfold.payment_methods.removed" in kinds
    assert (
        await client.delete(f"/v1/payment-methods/{bank['id']}", headers=alice.headers)
    ).status_code == 404


async def test_someone_elses_methods_are_404_everywhere(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    card = await add_card(client, bob)
    bank = (await add(client, bob, us_bank_body())).json()
    for method_id in (card["id"], bank["id"], UNKNOWN, "pm_junk", "pm_%00"):
        for method, path, body in (
            ("GET", "", None),
            ("PATCH", "", {"nickname": "mine"}),
            ("DELETE", "", None),
            ("POST", "/default", None),
            ("POST", "/verify", {"amounts": [1, 2]}),
        ):
            r = await client.request(
                method,
                f"/v1/payment-methods/{method_id}{path}",
                json=body,
                headers=alice.headers,
            )
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["code"] == "payment_method_not_found"
    for path in ("/v1/wallet/topups", "/v1/wallet/withdrawals"):
        r = await client.post(
            path,
            json={"payment_method_id": bank["id"], "amount": 100, "currency": "USD"},
            headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code == 404 and r.json()["code"] == "payment_method_not_found"
    assert (await client.get("/v1/payment-methods", headers=alice.headers)).json()["data"] == []
    got = (await client.get(f"/v1/payment-methods/{card['id']}", headers=bob.headers)).json()
    assert got["status"] == "verified" and got["nickname"] is None
    (deposit,) = await sql(
        app,
        "SELECT attempts FROM payment_methods.micro_deposits WHERE payment_method_id = :i",
        i=bank["id"],
    )
    assert deposit.attempts == 0


async def test_payment_methods_need_the_wallet_scope(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    r = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": alice.email,
            "password": alice.password,
            "scope": "pay",
        },
    )
    watch = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = await client.get("/v1/payment-methods", headers=watch)
    assert r.status_code == 403 and r.json()["code"] == "insufficient_scope"
    r = await client.post(
        "/v1/payment-methods",
        json=card_body(),
        headers={**watch, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 403
    assert (await client.get("/v1/payment-methods")).status_code == 401


async def test_the_same_card_added_twice_at_once_is_one_method(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    pan = new_pan()
    answers = await asyncio.gather(*(add(client, alice, card_body(pan)) for _ in range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201, 409, 409, 409, 409, 409], [r.text for r in answers]
    rows = await sql(
        app, "SELECT id FROM payment_methods.methods WHERE user_id = :u", u=alice.user["id"]
    )
    assert len(rows) == 1


async def test_no_card_number_or_account_number_reaches_the_logs(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, capsys: pytest.CaptureFixture[str]
) -> None:
    pan, number = new_pan(), new_account_number()
    capsys.readouterr()
    card = await add_card(client, alice, pan=pan)
    await add(client, alice, card_body(pan))  # 409
    await add(client, alice, card_body(pan[:-1] + str((int(pan[-1]) + 1) % 10)))  # Luhn 422
    await add(client, alice, card_body(pan, cvv="000", expiry_year=2020))  # expired 422
    bank = (await add(client, alice, us_bank_body(account_number=number))).json()
    await verify(client, alice, bank["id"], [1, 1])
    await client.post(
        "/v1/wallet/topups",
        json={"payment_method_id": card["id"], "amount": 100, "currency": "USD"},
        headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    logged = capsys.readouterr()
    text_out = logged.out + logged.err
    assert "/v1/payment-methods" in text_out  # the requests were logged…
    assert pan not in text_out and number not in text_out  # …without the numbers


# --- nothing left in the vault by a request that failed ---------------------------------------


async def live_vault_cards(app: Any, owner_id: str) -> int:
    (row,) = await sql(
        app,
        "SELECT count(*) AS n FROM vault.cards WHERE owner_id = :o AND deleted_at IS NULL",
        o=owner_id,
    )
    return int(row.n)


async def test_a_card_whose_verification_gets_no_answer_leaves_no_number_in_the_vault(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    network = app.state.payment_methods.network
    config = network.config
    network.config = dataclasses.replace(config, timeout=0.3)
    network_simulator.config.timeout_rate = 1.0  # processed, never answered
    try:
        r = await add(client, alice, card_body())
    finally:
        network.config = config
        network_simulator.config.timeout_rate = 0.0
    assert r.status_code == 503 and r.json()["code"] == "network_timeout", r.text
    assert await live_vault_cards(app, alice.user["id"]) == 0
    rows = await sql(
        app, "SELECT id FROM payment_methods.methods WHERE user_id = :u", u=alice.user["id"]
    )
    assert rows == []


@pytest.fixture
async def impatient(settings: Any, data_dir: Any) -> AsyncIterator[Any]:
    """The API with a 300 ms lock timeout, on the test database and network simulator."""
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


async def test_a_removal_that_does_not_commit_keeps_the_card_in_the_vault(
    impatient: Any, network_simulator: Any
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        alice = await sign_up(client, name="Alice Removes")
        card = await add_card(client, alice)
        vault_card_id = (await method_row(impatient, card["id"])).vault_card_id
        # An expired idempotency record of this key, held by someone else: the edge's save of
        # the DELETE's answer waits for it, times out, and the request's transaction rolls back.
        key = uuid.uuid4().hex
        scope = f"user:{alice.user['id']}"
        await sql(
            impatient,
            "INSERT INTO platform.idempotency_keys (scope, key, method, path, request_hash, "
            "status_code, response_headers, response_body, created_at, expires_at) VALUES "
            "(:s, :k, 'DELETE', '/x', 'h', 204, '[]', '\\x00', now() - interval '2 days', "
            "now() - interval '1 day')",
            s=scope,
            k=key,
        )
        engine = impatient.state.resources.engine
        path = f"/v1/payment-methods/{card['id']}"
        async with engine.connect() as blocker:
            await blocker.execute(
                text(
                    "SELECT 1 FROM platform.idempotency_keys WHERE scope = :s AND key = :k "
                    "FOR UPDATE"
                ),
                {"s": scope, "k": key},
            )
            r = await client.delete(path, headers={**alice.headers, "Idempotency-Key": key})
            assert r.status_code == 503, r.text
            await blocker.rollback()
        # Rolled back: still verified, and its card still in the vault (it can still pay).
        assert (await client.get(path, headers=alice.headers)).json()["status"] == "verified"
        assert (await impatient.state.vault.get_card(vault_card_id)).card_id == vault_card_id
        r = await client.delete(path, headers={**alice.headers, "Idempotency-Key": key})
        assert r.status_code == 204, r.text
        with pytest.raises(CardNotFound):
            await impatient.state.vault.get_card(vault_card_id)


async def test_a_card_the_vault_reissues_shows_its_new_last4_and_expiry(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    card = await add_card(client, alice)
    row = await method_row(app, card["id"])
    new_number = new_pan()
    await app.state.vault.update_card(
        row.vault_card_id, pan=new_number, expiry_month=3, expiry_year=2034
    )
    found = await outbox_events(app, "billfold.vault.card.updated", row.vault_card_id)
    assert len(found) == 1
    sink = jobs.event_sink(app.state.resources.engine, app.state.p2p)
    for _ in range(2):  # redelivered: one effect
        await sink(found[0])
    seen = (await client.get(f"/v1/payment-methods/{card['id']}", headers=alice.headers)).json()
    assert (seen["card"]["last4"], seen["card"]["expiry_month"], seen["card"]["expiry_year"]) == (
        new_number[-4:],
        3,
        2034,
    )
    assert seen["card"]["token_id"] == card["card"]["token_id"]  # the token stays as it was
    updates = [e for e in await events_of(app, card["id"]) if e.type.endswith(".updated")]
    assert len(updates) == 1
    assert updates[0].data["changed"] == ["expiry_month", "expiry_year", "last4"]
    assert new_number not in json.dumps(updates[0].data)
    async with app.state.resources.engine.connect() as conn:
        token = await payment_methods.card_token_for(conn, alice.user["id"], card["id"])
    assert (token.last4, token.expiry_month, token.expiry_year) == (new_number[-4:], 3, 2034)
