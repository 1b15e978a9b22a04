"""One suite for both `VaultClient`s: the in-process `LocalVault`, and `HttpVault` calling the
vault process (`billfold vault`, a real subprocess on a loopback port with its own HSM session on
the same SoftHSM2 token and database). Every method, the same errors as the same exception
classes, service tokens refused with nothing changed, the requester audited from the token, no
card number in the vault process's log, and `billfold vault rotate-kek` while requests run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from billfold.config import Settings
from billfold.migrations import upgrade
from billfold.platform.db import async_url
from billfold.platform.errors import ProblemError, Unprocessable
from billfold.platform.observability import luhn_valid, request_id_var
from billfold.vault import (
    CardInput,
    CardNotFound,
    CardNumberTaken,
    InvalidTokenTransition,
    LocalVault,
    TokenDomain,
    TokenDomainViolation,
    TokenNotActive,
    TokenNotFound,
    VaultClient,
)
from billfold.vault.connect import vault_client
from billfold.vault.http import HttpVault, VaultUnavailable
from billfold.vault.service_auth import (
    AUDIENCE,
    ISSUER,
    ServiceTokenSigner,
)
from tests.integration.vault_support import (
    VaultProcess,
    _AsItsServices,
    http_vault,
    issue_tls,
    new_owner,
    purchase,
    run_vault_process,
    sql,
)
from tests.integration.vault_support import new_pan as _new_pan

# Every card number this module hands to a vault: none may appear in the vault process's log.
USED_PANS: set[str] = set()


def new_pan(prefix: str = "4", length: int = 16) -> str:
    pan = _new_pan(prefix, length)
    USED_PANS.add(pan)
    return pan


def card(pan: str | None = None, **overrides: Any) -> CardInput:
    values: dict[str, Any] = {
        "pan": pan or new_pan(),
        "expiry_month": 12,
        "expiry_year": 2031,
        "cardholder_name": "Ada Lovelace",
    }
    values.update(overrides)
    return CardInput(**values)


# --- every method -------------------------------------------------------------------------------


async def test_cards_vault_get_update_delete(vault: VaultClient) -> None:
    owner, pan = new_owner(), new_pan()
    vaulted = await vault.vault_card(card(pan), owner_id=owner)
    assert (vaulted.owner_id, vaulted.bin, vaulted.last4) == (owner, pan[:6], pan[-4:])
    assert (vaulted.expiry_month, vaulted.expiry_year) == (12, 2031)
    assert re.fullmatch(r"[0-9a-f]{64}", vaulted.fingerprint)
    assert await vault.get_card(vaulted.card_id) == vaulted
    # The same card again for the same owner is the same card; for another, the same fingerprint.
    assert await vault.vault_card(card(pan), owner_id=owner) == vaulted
    other = await vault.vault_card(card(pan), owner_id=new_owner())
    assert other.card_id != vaulted.card_id and other.fingerprint == vaulted.fingerprint

    token = await vault.issue_token(vaulted.card_id, domain=TokenDomain())
    reissued_pan = new_pan()
    updated = await vault.update_card(
        vaulted.card_id, pan=reissued_pan, expiry_month=3, expiry_year=2033
    )
    assert (updated.card_id, updated.last4) == (vaulted.card_id, reissued_pan[-4:])
    assert (updated.expiry_month, updated.expiry_year) == (3, 2033)
    assert updated.fingerprint != vaulted.fingerprint
    assert await vault.list_tokens(vaulted.card_id) == [token]  # the token keeps working
    secret = await vault.detokenize(
        card_id=vaulted.card_id, requester="payment_methods", purpose="account_verification"
    )
    assert (secret.pan, secret.expiry_month, secret.cardholder_name) == (
        reissued_pan,
        3,
        "Ada Lovelace",
    )

    await vault.delete_card(vaulted.card_id, reason="removed by the owner")
    with pytest.raises(CardNotFound):
        await vault.get_card(vaulted.card_id)
    (gone,) = await vault.list_tokens(vaulted.card_id)
    assert gone.status == "deleted"
    with pytest.raises(CardNotFound):
        await vault.delete_card(vaulted.card_id, reason="twice")


async def test_token_lifecycle(vault: VaultClient) -> None:
    vaulted = await vault.vault_card(card(), owner_id=new_owner())
    domain = TokenDomain(device_id="dev_phone", channels=("contactless", "in_app"))
    token = await vault.issue_token(vaulted.card_id, domain=domain)
    assert (token.card_id, token.owner_id, token.status) == (
        vaulted.card_id,
        vaulted.owner_id,
        "active",
    )
    assert token.domain == domain
    assert re.fullmatch(r"[0-9]{4}", token.dpan_last4) and token.dpan_last4 != vaulted.last4
    assert await vault.get_token(token.token_id) == token
    assert await vault.list_tokens(vaulted.card_id) == [token]

    suspended = await vault.suspend_token(token.token_id, reason="phone lost")
    assert suspended.status == "suspended" and suspended.updated_at >= token.updated_at
    with pytest.raises(InvalidTokenTransition) as refused:
        await vault.suspend_token(token.token_id, reason="again")
    assert (refused.value.status, refused.value.code) == (409, "invalid_token_transition")
    assert (await vault.resume_token(token.token_id, reason="phone found")).status == "active"
    deleted = await vault.delete_token(token.token_id, reason="replaced")
    assert deleted.status == "deleted"
    with pytest.raises(InvalidTokenTransition):
        await vault.resume_token(token.token_id, reason="too late")
    assert await vault.get_token(token.token_id) == deleted


async def test_cryptograms_verify_once_and_respect_the_domain(vault: VaultClient) -> None:
    vaulted = await vault.vault_card(card(), owner_id=new_owner())
    token = await vault.issue_token(
        vaulted.card_id, domain=TokenDomain(device_id="dev_a", channels=("in_app",))
    )
    request = purchase(token.token_id, channel="in_app", device_id="dev_a")
    first = await vault.cryptogram(request)
    assert (first.token_id, first.token_reference_id) == (token.token_id, token.token_reference_id)
    assert first.dpan.endswith(token.dpan_last4) and luhn_valid(first.dpan)
    assert re.fullmatch(r"[0-9A-F]{16}", first.arqc) and re.fullmatch(
        r"[0-9]{3}", first.dynamic_cvv
    )
    second = await vault.cryptogram(request)
    assert second.atc == first.atc + 1 and second.arqc != first.arqc

    assert await vault.verify_cryptogram(second, request) is True
    assert await vault.verify_cryptogram(second, request) is False  # a replay
    # An older ATC never used still counts once (cryptograms may arrive out of order)…
    assert await vault.verify_cryptogram(first, request) is True
    assert await vault.verify_cryptogram(first, request) is False  # …and only once
    third = await vault.cryptogram(request)
    assert await vault.verify_cryptogram(third, replace(request, amount=1)) is False  # tampered

    with pytest.raises(TokenDomainViolation) as other_device:
        await vault.cryptogram(replace(request, device_id="dev_b"))
    assert (other_device.value.status, other_device.value.code) == (403, "token_domain_violation")
    with pytest.raises(TokenDomainViolation):
        await vault.cryptogram(replace(request, channel="contactless"))
    await vault.suspend_token(token.token_id, reason="fraud check")
    with pytest.raises(TokenNotActive) as inactive:
        await vault.cryptogram(request)
    assert (inactive.value.status, inactive.value.code) == (409, "token_not_active")


async def test_token_by_dpan_finds_the_token_for_the_issuer_side(vault: VaultClient) -> None:
    vaulted = await vault.vault_card(card(), owner_id=new_owner())
    token = await vault.issue_token(vaulted.card_id, domain=TokenDomain())
    dpan = (await vault.cryptogram(purchase(token.token_id))).dpan
    found = await vault.token_by_dpan(dpan)
    assert found is not None and found.token.token_id == token.token_id
    assert found.token.card_id == vaulted.card_id and found.token_bin == dpan[:6]
    assert await vault.token_by_dpan(new_pan(prefix=dpan[:6])) is None  # never issued
    assert await vault.token_by_dpan("not a dpan") is None
    await vault.suspend_token(token.token_id, reason="lost phone")
    suspended = await vault.token_by_dpan(dpan)
    assert suspended is not None and suspended.token.status == "suspended"


async def test_detokenize_by_card_or_token_is_audited(
    vault: VaultClient, local_vault: LocalVault
) -> None:
    pan = new_pan()
    vaulted = await vault.vault_card(card(pan), owner_id=new_owner())
    token = await vault.issue_token(vaulted.card_id, domain=TokenDomain())
    by_card = await vault.detokenize(
        card_id=vaulted.card_id, requester="payment_methods", purpose="account_verification"
    )
    by_token = await vault.detokenize(
        token_id=token.token_id, requester="network", purpose="authorization"
    )
    assert by_card == by_token
    assert (by_card.card_id, by_card.pan, by_card.expiry_year) == (vaulted.card_id, pan, 2031)
    assert pan not in repr(by_card)
    rows = await sql(
        local_vault,
        "SELECT requester, purpose, token_id FROM vault.detokenizations"
        " WHERE card_id = :c ORDER BY seq",
        c=vaulted.card_id,
    )
    assert rows == [
        {"requester": "payment_methods", "purpose": "account_verification", "token_id": None},
        {"requester": "network", "purpose": "authorization", "token_id": token.token_id},
    ]


async def test_unknown_ids_are_not_found(vault: VaultClient) -> None:
    for junk in ("card_01zzzzzzzzzzzzzzzzzzzzzzzz", "nope", "", "..", "a/b", "%2F", "card_ü"):
        with pytest.raises(CardNotFound) as missing:
            await vault.get_card(junk)
        assert (missing.value.status, missing.value.code) == (404, "card_not_found")
        with pytest.raises(TokenNotFound):
            await vault.get_token(junk.replace("card", "tok"))
        with pytest.raises(TokenNotFound):
            await vault.suspend_token(junk, reason="x")
        with pytest.raises(CardNotFound):
            await vault.issue_token(junk, domain=TokenDomain())
        assert await vault.list_tokens(junk) == []


# --- the two implementations cannot be told apart -----------------------------------------------


def _outcome(result: Any) -> Any:
    if isinstance(result, ProblemError):
        return (type(result), result.status, result.code, result.detail, result.errors)
    return result


async def test_the_same_input_gets_the_same_answer_from_both(
    local_vault: LocalVault, vault_process: VaultProcess
) -> None:
    owner = new_owner()
    a, b = new_pan(), new_pan()
    card_a = await local_vault.vault_card(card(a), owner_id=owner)
    await local_vault.vault_card(card(b), owner_id=owner)
    bound = await local_vault.issue_token(
        card_a.card_id, domain=TokenDomain(device_id="dev_a", merchant_id="mer_1")
    )
    suspended = await local_vault.issue_token(card_a.card_id, domain=TokenDomain())
    await local_vault.suspend_token(suspended.token_id, reason="held")
    cryptogram = await local_vault.cryptogram(
        purchase(bound.token_id, device_id="dev_a", merchant_id="mer_1")
    )
    unknown_card, unknown_token = (
        "card_01zzzzzzzzzzzzzzzzzzzzzzzz",
        "tok_01zzzzzzzzzzzzzzzzzzzzzzzz",
    )
    bad_luhn = a[:-1] + str((int(a[-1]) + 1) % 10)

    Case = Callable[[VaultClient], Awaitable[Any]]
    cases: dict[str, Case] = {
        "not luhn": lambda v: v.vault_card(card(bad_luhn), owner_id=owner),
        "too short": lambda v: v.vault_card(card("4242"), owner_id=owner),
        "letters": lambda v: v.vault_card(card("4242abcd42424242"), owner_id=owner),
        "month 13": lambda v: v.vault_card(card(new_pan(), expiry_month=13), owner_id=owner),
        "no owner": lambda v: v.vault_card(card(new_pan()), owner_id=""),
        "long owner": lambda v: v.vault_card(card(new_pan()), owner_id="u" * 65),
        "taken": lambda v: v.update_card(card_a.card_id, pan=b),
        "update unknown": lambda v: v.update_card(unknown_card, expiry_month=1),
        "update bad pan": lambda v: v.update_card(card_a.card_id, pan=bad_luhn),
        "update month 0": lambda v: v.update_card(card_a.card_id, expiry_month=0),
        "delete unknown": lambda v: v.delete_card(unknown_card, reason="x"),
        "delete no reason": lambda v: v.delete_card(card_a.card_id, reason=" "),
        "no channels": lambda v: v.issue_token(card_a.card_id, domain=TokenDomain(channels=())),
        "long device": lambda v: v.issue_token(
            card_a.card_id, domain=TokenDomain(device_id="d" * 65)
        ),
        "issue unknown": lambda v: v.issue_token(unknown_card, domain=TokenDomain()),
        "get token unknown": lambda v: v.get_token(unknown_token),
        "resume active": lambda v: v.resume_token(bound.token_id, reason="x"),
        "suspend no reason": lambda v: v.suspend_token(bound.token_id, reason=""),
        "long reason": lambda v: v.suspend_token(bound.token_id, reason="r" * 201),
        "cryptogram suspended": lambda v: v.cryptogram(purchase(suspended.token_id)),
        "other merchant": lambda v: v.cryptogram(
            purchase(bound.token_id, device_id="dev_a", merchant_id="mer_2")
        ),
        "no device": lambda v: v.cryptogram(purchase(bound.token_id, merchant_id="mer_1")),
        "negative amount": lambda v: v.cryptogram(
            purchase(bound.token_id, device_id="dev_a", merchant_id="mer_1", amount=-1)
        ),
        "cryptogram unknown": lambda v: v.cryptogram(purchase(unknown_token)),
        "verify other token": lambda v: v.verify_cryptogram(
            cryptogram, purchase(suspended.token_id)
        ),
        "verify suspended": lambda v: v.verify_cryptogram(
            replace(cryptogram, token_id=suspended.token_id), purchase(suspended.token_id)
        ),
        "both ids": lambda v: v.detokenize(
            card_id=card_a.card_id,
            token_id=bound.token_id,
            requester="network",
            purpose="authorization",
        ),
        "no id": lambda v: v.detokenize(requester="network", purpose="refund"),
        "no requester": lambda v: v.detokenize(
            card_id=card_a.card_id, requester=" ", purpose="refund"
        ),
        "suspended token": lambda v: v.detokenize(
            token_id=suspended.token_id, requester="network", purpose="authorization"
        ),
        "detokenize unknown card": lambda v: v.detokenize(
            card_id=unknown_card, requester="network", purpose="refund"
        ),
        "detokenize unknown token": lambda v: v.detokenize(
            token_id=unknown_token, requester="network", purpose="refund"
        ),
    }
    api, network = http_vault(vault_process), http_vault(vault_process, "billfold-network")
    http = _AsItsServices(api, network)
    try:
        for name, case in cases.items():
            answers = []
            for implementation in (local_vault, http):
                try:
                    answers.append(_outcome(await case(implementation)))
                except ProblemError as exc:
                    answers.append(_outcome(exc))
            assert answers[0] == answers[1], name
            assert isinstance(answers[0], tuple) or answers[0] is False, (name, answers[0])
    finally:
        await api.aclose()
        await network.aclose()
    # None of those changed anything.
    assert [t.status for t in await local_vault.list_tokens(card_a.card_id)] == [
        "active",
        "suspended",
    ]
    assert (await local_vault.get_card(card_a.card_id)).last4 == a[-4:]


async def test_each_problem_maps_to_the_vault_exception_class(vault_process: VaultProcess) -> None:
    http = http_vault(vault_process)
    try:
        with pytest.raises(CardNumberTaken):
            owner = new_owner()
            first = await http.vault_card(card(), owner_id=owner)
            second_pan = new_pan()
            await http.vault_card(card(second_pan), owner_id=owner)
            await http.update_card(first.card_id, pan=second_pan)
        with pytest.raises(Unprocessable) as invalid:
            await http.vault_card(card("4111111111111112"), owner_id=owner)
        assert invalid.value.code == "validation_failed"
    finally:
        await http.aclose()


# --- service tokens -----------------------------------------------------------------------------


async def _vault_rows(local_vault: LocalVault) -> dict[str, int]:
    counts = {}
    for table in ("data_keys", "cards", "tokens", "issuer_keys", "detokenizations"):
        (row,) = await sql(local_vault, f"SELECT count(*) AS n FROM vault.{table}")
        counts[table] = row["n"]
    (row,) = await sql(local_vault, "SELECT count(*) AS n FROM platform.outbox")
    counts["outbox"] = row["n"]
    return counts


PFX = "/internal/v1"


def _token(key: bytes, method: str = "GET", path: str = "/", **overrides: Any) -> str:
    """A service token for `method` `path` (the full path the vault sees)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "billfold-api",
        "htm": method,
        "htu": path,
        "iat": now,
        "exp": now + 30,
        "jti": secrets.token_urlsafe(16),
    }
    algorithm = overrides.pop("algorithm", "HS256")
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def _bad_credentials(key: bytes, method: str, path: str) -> dict[str, str | None]:
    """Credentials the vault must refuse for `method` `path`; each wrong in one way only."""
    now = int(time.time())

    def _token(key: Any, **overrides: Any) -> str:
        return _outer_token(key, method, path, **overrides)

    es256 = ec.generate_private_key(ec.SECP256R1())
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 30, "jti": "a" * 16},
        None,
        algorithm="none",
    )
    return {
        "missing": None,
        "not bearer": "Basic YmlsbGZvbGQ6dmF1bHQ=",
        "empty bearer": "Bearer",
        "garbage": "Bearer not-a-jwt",
        "wrong key": f"Bearer {_token(secrets.token_bytes(32))}",
        "expired": f"Bearer {_token(key, iat=now - 120, exp=now - 60)}",
        "wrong audience": f"Bearer {_token(key, aud='billfold-api')}",
        "wrong issuer": f"Bearer {_token(key, iss='someone-else')}",
        "lives too long": f"Bearer {_token(key, exp=now + 3600)}",
        "issued in the future": f"Bearer {_token(key, iat=now + 600, exp=now + 630)}",
        "no subject": f"Bearer {_token(key, sub=None)}",
        "no id": f"Bearer {_token(key, jti=None)}",
        "no expiry": f"Bearer {_token(key, exp=None)}",
        "alg none": f"Bearer {unsigned}",
        "es256 (a user's kind)": f"Bearer {_token(es256, algorithm='ES256')}",
        "another method": f"Bearer {_token(key, htm='DELETE' if method != 'DELETE' else 'GET')}",
        "another path": f"Bearer {_token(key, htu=path + '/x')}",
        "no method": f"Bearer {_token(key, htm=None)}",
        "no path": f"Bearer {_token(key, htu=None)}",
    }


_outer_token = _token


async def test_calls_without_a_valid_service_token_are_refused_and_change_nothing(
    vault_process: VaultProcess, local_vault: LocalVault
) -> None:
    owner = new_owner()
    existing = await local_vault.vault_card(card(), owner_id=owner)
    token = await local_vault.issue_token(existing.card_id, domain=TokenDomain())
    before = await _vault_rows(local_vault)
    pan = new_pan()
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/cards", {"owner_id": owner, "pan": pan, "expiry_month": 1, "expiry_year": 2030}),
        ("GET", f"/cards/{existing.card_id}", None),
        ("POST", f"/tokens/{token.token_id}/suspend", {"reason": "x"}),
        ("POST", "/detokenize", {"card_id": existing.card_id, "purpose": "refund"}),
    ]
    async with httpx.AsyncClient(base_url=f"{vault_process.url}/internal/v1") as raw:
        for method, path, body in calls:
            bad = _bad_credentials(vault_process.service_key, method, f"/internal/v1{path}")
            for name, authorization in bad.items():
                headers = {"authorization": authorization} if authorization is not None else {}
                r = await raw.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (name, path, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["code"] == "invalid_service_token", name
                assert "billfold-vault" in r.headers["www-authenticate"]
                assert pan not in r.text and existing.last4 not in r.text
        # A token is good once: the same one again is a replay.
        path = f"/cards/{existing.card_id}"
        once = {"authorization": f"Bearer {_token(vault_process.service_key, 'GET', PFX + path)}"}
        assert (await raw.get(path, headers=once)).status_code == 200
        replayed = await raw.get(path, headers=once)
        assert replayed.status_code == 401 and "already used" in replayed.json()["detail"]

    assert await _vault_rows(local_vault) == before
    assert (await local_vault.get_token(token.token_id)).status == "active"

    # HttpVault with the wrong key: the vault refuses it, the caller sees the vault unavailable.
    wrong = HttpVault(vault_process.url, ServiceTokenSigner(secrets.token_bytes(32), subject="api"))
    try:
        with pytest.raises(VaultUnavailable) as unavailable:
            await wrong.vault_card(card(pan), owner_id=owner)
        assert (unavailable.value.status, unavailable.value.code) == (503, "vault_unavailable")
        with pytest.raises(VaultUnavailable):
            await wrong.detokenize(
                card_id=existing.card_id, requester="network", purpose="authorization"
            )
    finally:
        await wrong.aclose()
    assert await _vault_rows(local_vault) == before


async def test_the_requester_is_a_token_claim_not_a_body_field(
    vault_process: VaultProcess, local_vault: LocalVault
) -> None:
    vaulted = await local_vault.vault_card(card(), owner_id=new_owner())
    key = vault_process.service_key

    def signed(**claims: Any) -> dict[str, str]:
        token = _token(key, "POST", f"{PFX}/detokenize", sub="billfold-network", **claims)
        return {"authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(base_url=f"{vault_process.url}/internal/v1") as raw:
        claimed = await raw.post(
            "/detokenize",
            json={
                "card_id": vaulted.card_id,
                "purpose": "authorization",
                "requester": "someone-else",
            },
            headers=signed(requester="issuer"),
        )
        assert claimed.status_code == 422, claimed.text
        assert claimed.json()["code"] == "validation_failed"
        ok = await raw.post(
            "/detokenize",
            json={"card_id": vaulted.card_id, "purpose": "authorization"},
            headers=signed(requester="issuer"),
        )
        assert ok.status_code == 200, ok.text
    rows = await sql(
        local_vault,
        "SELECT requester, purpose FROM vault.detokenizations WHERE card_id = :c",
        c=vaulted.card_id,
    )
    assert rows == [{"requester": "issuer", "purpose": "authorization"}]


async def test_the_edge_answers_ops_without_a_token_and_refuses_big_bodies(
    vault_process: VaultProcess,
) -> None:
    async with httpx.AsyncClient(base_url=vault_process.url) as raw:
        ready = await raw.get("/readyz")
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "keystore": "ok"}}
        assert (await raw.get("/healthz")).status_code == 200
        token = _token(vault_process.service_key, "POST", f"{PFX}/cards")
        headers = {"authorization": f"Bearer {token}"}
        big = await raw.post(
            "/internal/v1/cards", content=b"{" + b" " * 70_000 + b"}", headers=headers
        )
        assert big.status_code == 413 and big.json()["code"] == "payload_too_large"
        token = _token(vault_process.service_key, "GET", f"{PFX}/nowhere")
        headers = {"authorization": f"Bearer {token}"}
        nowhere = await raw.get("/internal/v1/nowhere", headers=headers)
        assert nowhere.status_code == 404 and nowhere.json()["code"] == "not_found"


# --- no card number in the vault process's log --------------------------------------------------

_DIGIT_RUN = re.compile(r"(?<!\d)\d{13,19}(?!\d)")


async def test_no_card_number_in_the_vault_process_log(
    vault_process: VaultProcess, local_vault: LocalVault
) -> None:
    """Runs last in this module: the log holds every call above, plus these, made to put a
    card number in front of every logger (validation errors, refusals, wrong fields)."""
    pan = new_pan()
    headers = {
        "authorization": f"Bearer {_token(vault_process.service_key, 'POST', PFX + '/cards')}"
    }
    http = http_vault(vault_process)
    try:
        vaulted = await http.vault_card(card(pan), owner_id=new_owner())
        token = await http.issue_token(vaulted.card_id, domain=TokenDomain())
        crypto = await http.cryptogram(purchase(token.token_id))
        USED_PANS.add(crypto.dpan)
        await http.detokenize(token_id=token.token_id, requester="network", purpose="authorization")
        # The caller's request id travels along: one id in both processes' logs.
        trace = request_id_var.set("req_trace_from_the_api")
        try:
            await http.get_card(vaulted.card_id)
        finally:
            request_id_var.reset(trace)
        async with httpx.AsyncClient(base_url=f"{vault_process.url}/internal/v1") as raw:
            for body in (
                {"owner_id": "u", "pan": pan, "expiry_month": "soon", "expiry_year": 2030},
                {"owner_id": "u", "pan": int(pan), "expiry_month": 1, "expiry_year": 2030},
                {"owner_id": "u", "pan": pan, "expiry_month": 1, "expiry_year": 2030, "cvv": 1},
            ):
                r = await raw.post("/cards", json=body, headers=dict(headers))
                assert r.status_code == 422 and pan not in r.text, r.text
                token = _token(vault_process.service_key, "POST", f"{PFX}/cards")
                headers = {"authorization": f"Bearer {token}"}
            token = _token(vault_process.service_key, "GET", f"{PFX}/cards/{pan}")
            headers = {"authorization": f"Bearer {token}"}
            r = await raw.get(f"/cards/{pan}", headers=headers)
            assert r.status_code == 404 and pan not in r.text
            r = await raw.post("/cards", json={"pan": pan})  # no token at all
            assert r.status_code == 401 and pan not in r.text
    finally:
        await http.aclose()
    await asyncio.sleep(0.3)  # the last lines reach the file

    log = vault_process.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "vault request" for line in lines)
    assert any(line.get("caller") == "billfold-api" for line in lines)
    assert any(
        line.get("request_id") == "req_trace_from_the_api"
        and line.get("route") == "/internal/v1/cards/{card_id}"
        for line in lines
    )
    assert len(USED_PANS) > 20
    leaked = [p for p in USED_PANS if p in log]
    assert leaked == [], f"card numbers in the vault log: {len(leaked)}"
    runs = [m for m in _DIGIT_RUN.findall(log) if luhn_valid(m)]
    assert runs == [], "Luhn-valid digit runs in the vault log"


# --- mTLS (production) ----------------------------------------------------------------------------


async def test_mtls_the_api_settings_reach_a_vault_that_requires_client_certificates(
    settings: Settings, data_dir: Path, hsm: Any, tmp_path: Path
) -> None:
    """`billfold vault --ssl-certfile/--ssl-keyfile/--ssl-ca-certs` and the API's
    BILLFOLD_VAULT_CA_FILE / _CLIENT_CERT_FILE / _CLIENT_KEY_FILE, as documented."""
    tls = issue_tls(tmp_path)
    with run_vault_process(
        settings.database_url, data_dir, settings.secret_key, tmp_path / "tls.log", tls
    ) as vp:
        api_settings = settings.model_copy(
            update={
                "vault_url": vp.url,
                "vault_service_key": base64.b64encode(vp.service_key).decode(),
                "vault_ca_file": str(tls.ca),
                "vault_client_cert_file": str(tls.client_cert),
                "vault_client_key_file": str(tls.client_key),
            }
        )
        client = vault_client(api_settings)
        try:
            assert isinstance(client, HttpVault)
            vaulted = await client.vault_card(card(), owner_id=new_owner())
            assert (await client.get_card(vaulted.card_id)) == vaulted
        finally:
            await client.aclose()
        # Without a client certificate, or without trusting the vault's CA: no vault.
        no_cert = vault_client(
            api_settings.model_copy(
                update={"vault_client_cert_file": "", "vault_client_key_file": ""}
            )
        )
        no_ca = vault_client(api_settings.model_copy(update={"vault_ca_file": ""}))
        for refused in (no_cert, no_ca):
            try:
                with pytest.raises(VaultUnavailable):
                    await refused.get_card(vaulted.card_id)
            finally:
                await refused.aclose()
        # Plain HTTP is not served at all.
        async with httpx.AsyncClient(timeout=2) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(vp.url.replace("https", "http") + "/healthz")


# --- billfold vault rotate-kek, against a running vault process --------------------------------


@pytest.fixture(scope="module")
def own_database(settings: Settings) -> Iterator[str]:
    """A database of its own, so the rotation touches no other test's data keys."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"billfold_test_{worker}_rotation_{uuid.uuid4().hex[:8]}"

    async def admin(statement: str) -> None:
        engine = create_async_engine(async_url(settings.database_url), isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(text(statement))
        await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(settings.database_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def test_rotate_kek_command_rewraps_online_while_the_vault_serves(
    own_database: str, settings: Settings, tmp_path: Path
) -> None:
    """`billfold vault rotate-kek` in its own process while the vault process serves cards (a
    SoftHSM2 token and database of their own: the rest of the session keeps its KEKs)."""
    data_dir = tmp_path / "rotation"
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLFOLD_", "SOFTHSM2_"))}
    env.update(
        BILLFOLD_DATABASE_URL=own_database,
        BILLFOLD_DATA_DIR=str(data_dir),
        BILLFOLD_SECRET_KEY=settings.secret_key,
        BILLFOLD_LOG_JSON="true",
        PYTHONFAULTHANDLER="1",  # a hang below ends with the command's stack in the message
    )

    async def rotate() -> str:
        done = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "billfold.cli", "vault", "rotate-kek", "--batch-size", "1"],
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(done.communicate(), 120)
        except TimeoutError:
            done.send_signal(signal.SIGABRT)
            out, _ = await done.communicate()
            pytest.fail(f"rotate-kek hung:\n{out.decode()[-6000:]}")
        assert done.returncode == 0, out.decode()
        return out.decode()

    with run_vault_process(own_database, data_dir, settings.secret_key, tmp_path / "v.log") as vp:
        client = http_vault(vp)
        try:
            pans = [new_pan() for _ in range(3)]
            cards = [await client.vault_card(card(p), owner_id=new_owner()) for p in pans]
            stop, served, errors = asyncio.Event(), [0], []

            async def traffic() -> None:
                # Paced: on two shared cores, a flood would only slow the command down.
                while not stop.is_set():
                    try:
                        pan = new_pan()
                        c = await client.vault_card(card(pan), owner_id=new_owner())
                        secret = await client.detokenize(
                            card_id=c.card_id, requester="payment_methods", purpose="refund"
                        )
                        assert secret.pan == pan
                        served[0] += 1
                    except Exception as exc:
                        errors.append(repr(exc))
                    await asyncio.sleep(0.05)

            running = asyncio.create_task(traffic())
            report = await rotate()
            stop.set()
            await running
            assert errors == [] and served[0] > 0
            assert "new KEK version 2" in report
            rewrapped = re.search(r"re-wrapped (\d+) data key", report)
            assert rewrapped is not None and int(rewrapped.group(1)) >= 1
            assert re.search(r"KEK v2: \d+ data key", report) and "KEK v1:" not in report
            for c, pan in zip(cards, pans, strict=True):
                secret = await client.detokenize(
                    card_id=c.card_id, requester="payment_methods", purpose="refund"
                )
                assert secret.pan == pan
            engine = create_async_engine(async_url(own_database))
            try:
                async with engine.connect() as conn:
                    versions = (
                        await conn.execute(text("SELECT DISTINCT kek_version FROM vault.data_keys"))
                    ).scalars()
                    assert list(versions) == [2]
            finally:
                await engine.dispose()
        finally:
            await client.aclose()
    assert [p for p in USED_PANS if p in (tmp_path / "v.log").read_text()] == []


@pytest.mark.parametrize("bad", ["\x00", "\x07", "\n", "\u2028"])
async def test_control_characters_are_refused_not_a_500(vault: VaultClient, bad: str) -> None:
    """A NUL (PostgreSQL text refuses it) or any control character in a reason, a domain, an
    owner, a requester or an id is a 422 (an id: not found), on both clients, never a 500/503."""
    owner = new_owner()
    vaulted = await vault.vault_card(card(), owner_id=owner)
    token = await vault.issue_token(vaulted.card_id, domain=TokenDomain())
    refused: list[Callable[[], Awaitable[Any]]] = [
        lambda: vault.vault_card(card(), owner_id=f"usr{bad}x"),
        lambda: vault.issue_token(vaulted.card_id, domain=TokenDomain(device_id=f"d{bad}x")),
        lambda: vault.issue_token(vaulted.card_id, domain=TokenDomain(merchant_id=f"m{bad}x")),
        lambda: vault.suspend_token(token.token_id, reason=f"lo{bad}st"),
        lambda: vault.delete_card(vaulted.card_id, reason=f"go{bad}ne"),
        lambda: vault.detokenize(
            card_id=vaulted.card_id, requester=f"pm{bad}x", purpose="account_verification"
        ),
        lambda: vault.vault_card(card(cardholder_name=f"Ada{bad}L"), owner_id=owner),
    ]
    for call in refused:
        with pytest.raises(Unprocessable):
            await call()
    for lookup in (
        lambda: vault.get_card(f"{vaulted.card_id}{bad}"),
        lambda: vault.get_token(f"{token.token_id}{bad}"),
    ):
        with pytest.raises((CardNotFound, TokenNotFound)):
            await lookup()
    assert await vault.list_tokens(f"{vaulted.card_id}{bad}") == []
    # Nothing changed.
    assert (await vault.get_token(token.token_id)).status == "active"
    assert await vault.get_card(vaulted.card_id) == vaulted


# --- who may call what; replays across replicas ----------------------------------------------


async def test_each_service_may_call_only_its_own_routes_and_purposes(
    vault_process: VaultProcess, local_vault: LocalVault
) -> None:
    vaulted = await local_vault.vault_card(card(), owner_id=new_owner())
    token = await local_vault.issue_token(vaulted.card_id, domain=TokenDomain())
    key = vault_process.service_key
    async with httpx.AsyncClient(base_url=f"{vault_process.url}/internal/v1") as raw:

        async def call(
            sub: str, method: str, path: str, body: dict[str, Any] | None = None
        ) -> httpx.Response:
            signed = _token(key, method, PFX + path, sub=sub)
            return await raw.request(
                method, path, json=body, headers={"authorization": f"Bearer {signed}"}
            )

        card_body = {"owner_id": new_owner(), "pan": new_pan(), "expiry_month": 1}
        refused = [
            ("billfold-network", "POST", "/cards", {**card_body, "expiry_year": 2030}),
            ("billfold-network", "POST", f"/tokens/{token.token_id}/suspend", {"reason": "x"}),
            (
                "billfold-network",
                "POST",
                "/detokenize",
                {"card_id": vaulted.card_id, "purpose": "account_verification"},
            ),
            ("billfold-api", "POST", "/tokens/by-dpan", {"dpan": new_pan()}),
            (
                "billfold-api",
                "POST",
                "/detokenize",
                {"card_id": vaulted.card_id, "purpose": "network_token_update"},
            ),
            ("someone-else", "GET", f"/cards/{vaulted.card_id}", None),
        ]
        for sub, method, path, body in refused:
            r = await call(sub, method, path, body)
            assert r.status_code == 403 and r.json()["code"] == "forbidden", (sub, path, r.text)
        assert (
            await call("billfold-network", "POST", "/tokens/by-dpan", {"dpan": new_pan()})
        ).json()["token"] is None
        assert (await call("billfold-api", "GET", f"/cards/{vaulted.card_id}")).status_code == 200
    assert (await local_vault.get_token(token.token_id)).status == "active"
    audited = await sql(
        local_vault, "SELECT 1 FROM vault.detokenizations WHERE card_id = :c", c=vaulted.card_id
    )
    assert audited == []


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
async def test_a_token_replayed_to_another_replica_is_refused_when_they_share_redis(
    settings: Settings, local_vault: LocalVault, shared: bool
) -> None:
    import contextlib

    from asgi_lifespan import LifespanManager

    from billfold.vault.server import create_vault_app
    from billfold.vault.service_auth import resolve_service_key

    @contextlib.asynccontextmanager
    async def the_test_vault(_: Settings, __: Any) -> AsyncIterator[VaultClient]:
        yield local_vault

    replica_settings = settings if shared else settings.model_copy(update={"redis_url": ""})
    replicas = [create_vault_app(replica_settings, open_vault=the_test_vault) for _ in range(2)]
    vaulted = await local_vault.vault_card(card(), owner_id=new_owner())
    signer = ServiceTokenSigner(resolve_service_key(settings), subject="billfold-api")
    path = f"{PFX}/cards/{vaulted.card_id}"
    headers = {"authorization": f"Bearer {signer.token('GET', path)}"}
    async with LifespanManager(replicas[0]), LifespanManager(replicas[1]):
        first, second = (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vault")
            for app in replicas
        )
        async with first, second:
            assert (await first.get(path, headers=headers)).status_code == 200
            assert (await first.get(path, headers=headers)).status_code == 401
            replayed = await second.get(path, headers=headers)
    if shared:
        assert replayed.status_code == 401 and "already used" in replayed.json()["detail"]
    else:  # documented: without Redis each replica only knows its own tokens
        assert replayed.status_code == 200
