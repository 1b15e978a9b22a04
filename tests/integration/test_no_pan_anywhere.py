"""No card number, account number or CVV survives a request anywhere we keep things: not in a
stored idempotency fingerprint (an offline oracle for whoever holds the process secret), not in
the database (a `pg_dump` of all of it), not in a log line of the API or the vault."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url

from billfold.app import create_app
from billfold.config import Settings
from billfold.platform import idempotency
from billfold.vault import TokenDomain
from billfold.vault.http import HttpVault
from billfold.vault.service_auth import ServiceTokenSigner
from tests.conftest import SignedIn, make_settings, sign_up
from tests.integration.payment_methods_support import (
    add,
    card_body,
    iban_body,
    new_pan,
    topup,
    us_bank_body,
)
from tests.integration.payments_support import pay, payment_body
from tests.integration.transfer_support import sql
from tests.integration.vault_support import VaultProcess, purchase, run_vault_process

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


# --- ~50 cards through the API and the vault process, then pg_dump and the logs ----------------


def _pg_dump_binary(server_version_num: int) -> str | None:
    """A pg_dump at least as new as the server (an older one refuses to dump it): the system's,
    or the one the embedded PostgreSQL (pgserver) ships."""
    candidates = [shutil.which("pg_dump"), "/usr/bin/pg_dump"]
    with contextlib.suppress(ImportError):
        import pgserver  # type: ignore[import-untyped]

        candidates.append(str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"))
    for candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
        match = re.search(r"(\d+)\.(\d+)", out.stdout)
        if match and int(match.group(1)) >= server_version_num // 10000:
            return candidate
    return None


def _pg_dump(database_url: str, server_version_num: int) -> str:
    binary = _pg_dump_binary(server_version_num)
    if binary is None:  # pgserver ships pg_dump 18, so `make install` always provides one
        pytest.fail("pg_dump (at least as new as the server) is required: run `make install`")
    url = make_url(database_url).set(drivername="postgresql")
    done = subprocess.run(
        [binary, "--data-only", "--no-owner", "--dbname", url.render_as_string(False)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"COPY vault.cards" in done.stdout and b"COPY platform.idempotency_keys" in done.stdout
    return done.stdout.decode(errors="replace")


def _forms(number: str) -> list[str]:
    """The ways a number could be written down: digits, in groups of four with spaces or
    dashes, and the hex of its ASCII (a bytea column in a dump, a repr of bytes)."""
    groups = [number[i : i + 4] for i in range(0, len(number), 4)]
    hexed = number.encode().hex()
    return [number, " ".join(groups), "-".join(groups), hexed, hexed.upper()]


def _leaks(where: str, text_: str, numbers: set[str], cvvs: set[str]) -> list[str]:
    found = [
        f"{where}: ****{n[-4:]} as {form[:6]}…"
        for n in numbers
        for form in _forms(n)
        if form in text_
    ]
    for match in re.finditer(r"cvv\W{0,8}(\d{3,4})(?!\d)", text_, re.IGNORECASE):
        if match.group(1) in cvvs:
            found.append(f"{where}: a CVV next to 'cvv' at {match.start()}")
    return found


@pytest.fixture(scope="module")
def vault_process_for_api(
    settings: Settings, data_dir: Path, hsm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VaultProcess]:
    log = tmp_path_factory.mktemp("vault-process-no-pan") / "vault.log"
    with run_vault_process(settings.database_url, data_dir, settings.secret_key, log) as vp:
        yield vp


@pytest.fixture(scope="module")
async def api_on_vault_process(
    settings: Settings, data_dir: Path, vault_process_for_api: VaultProcess
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The API as production runs it: its vault is the vault process, over HTTP."""
    api_settings = make_settings(
        settings.database_url,
        settings.redis_url,
        data_dir,
        network_address=settings.network_address,
        secret_key=settings.secret_key,
        vault_url=vault_process_for_api.url,
        vault_service_key=base64.b64encode(vault_process_for_api.service_key).decode(),
    )
    application = create_app(api_settings)
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield application, c


def _cvv(length: int = 3) -> str:
    while True:
        cvv = "".join(str(secrets.randbelow(10)) for _ in range(length))
        if cvv.strip("0"):  # "000" is the simulator's CVV mismatch
            return cvv


async def test_no_card_number_or_cvv_in_a_pg_dump_or_a_log(
    api_on_vault_process: tuple[Any, httpx.AsyncClient],
    vault_process_for_api: VaultProcess,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app, client = api_on_vault_process
    assert app.state.resources.settings.vault_url  # the API holds no HSM session of its own
    users = [await sign_up(client) for _ in range(3)]
    numbers: set[str] = set()
    cvvs: set[str] = set()

    async def add_one(who: SignedIn, pan: str, cvv: str, *, written: str | None = None) -> Any:
        numbers.add(pan)
        cvvs.add(cvv)
        return await add(client, who, card_body(written or pan, cvv=cvv))

    verified: list[tuple[SignedIn, str, str]] = []  # (user, method id, pan)
    for i in range(40):
        who = users[i % len(users)]
        amex = i % 9 == 0
        pan = new_pan("37", 15) if amex else new_pan("51" if i % 2 else "4")
        written = {0: None, 1: _spaced(pan), 2: "-".join(pan[j : j + 4] for j in range(0, 16, 4))}
        r = await add_one(
            who, pan, _cvv(4 if amex else 3), written=written[i % 3] if not amex else None
        )
        assert r.status_code == 201 and r.json()["status"] == "verified", r.text
        verified.append((who, r.json()["id"], pan))
    # Declines by the issuer (simulator test cards) and a CVV mismatch.
    for suffix in ("0002", "9987", "9979", "0069"):
        r = await add_one(users[0], new_pan(suffix=suffix), _cvv())
        assert r.status_code == 201 and r.json()["status"] == "failed", r.text
    r = await add_one(users[1], new_pan(), "000")
    assert r.status_code == 201 and r.json()["failure_code"] == "N7", r.text
    # Refused before the network: a number that fails Luhn, an expired card.
    bad = new_pan()
    bad = bad[:-1] + str((int(bad[-1]) + 1) % 10)
    assert (await add_one(users[2], bad, _cvv())).status_code == 422
    expired = new_pan()
    numbers.add(expired)
    assert (await add(client, users[2], card_body(expired, expiry_year=2020))).status_code == 422
    # The same card again (409), a replay, and another card with the same key (422).
    who, _, pan = verified[1]
    assert (await add_one(who, pan, _cvv())).status_code == 409
    key, pan2 = uuid.uuid4().hex, new_pan()
    numbers.add(pan2)
    assert (await add(client, who, card_body(pan2), key=key)).status_code == 201
    assert (await add(client, who, card_body(pan2), key=key)).headers["idempotent-replayed"]
    pan3 = new_pan()
    numbers.add(pan3)
    assert (await add(client, who, card_body(pan3), key=key)).status_code == 422
    # Bank accounts: their numbers are secrets too.
    for body in (us_bank_body(), us_bank_body(), iban_body(), iban_body("GB")):
        inner = body["bank_account"]
        numbers.add(inner.get("account_number") or inner["iban"].replace(" ", ""))
        assert (await add(client, users[0], body)).status_code == 201
    # Top-ups and card payments (cryptograms through the vault process, the ISO 8583 network).
    for who, method_id, _ in verified[:4]:
        r = await topup(client, who, method_id, 2_500)
        assert r.status_code in (200, 201), r.text
    for who, method_id, _ in verified[4:6]:
        r = await pay(client, who, payment_body("card", method_id, amount=1_234))
        assert r.status_code in (200, 201), r.text
    # Token lifecycle and cryptograms straight on the vault process.
    vault, issuer = (
        HttpVault(
            vault_process_for_api.url,
            ServiceTokenSigner(vault_process_for_api.service_key, subject=service),
        )
        for service in ("billfold-api", "billfold-network")
    )
    try:
        for _, method_id, _ in verified[6:9]:
            (row,) = await sql(
                app, "SELECT vault_card_id FROM payment_methods.methods WHERE id = :i", i=method_id
            )
            token = await vault.issue_token(row.vault_card_id, domain=TokenDomain())
            await vault.suspend_token(token.token_id, reason="phone lost")
            await vault.resume_token(token.token_id, reason="phone found")
            cryptogram = await vault.cryptogram(purchase(token.token_id))
            assert await issuer.verify_cryptogram(cryptogram, purchase(token.token_id)) in (
                True,
                False,
            )
            assert await issuer.token_by_dpan(cryptogram.dpan) is not None
            await vault.delete_token(token.token_id, reason="replaced")
    finally:
        await vault.aclose()
        await issuer.aclose()
    # Removals.
    for who, method_id, _ in verified[-5:]:
        r = await client.delete(f"/v1/payment-methods/{method_id}", headers=who.headers)
        assert r.status_code == 204, r.text
    assert len(numbers) >= 50

    (version,) = await sql(app, "SELECT current_setting('server_version_num')::int AS v")
    dump = _pg_dump(app.state.resources.settings.database_url, version.v)
    captured = capsys.readouterr()
    api_logs = captured.out + captured.err + caplog.text
    vault_log = vault_process_for_api.log.read_text(errors="replace")
    assert (
        "vault" in vault_log
    )  # the process did log (requests), so the check below means something
    # The checks can fail: the dump holds the cards (by their last four digits), the API's log
    # its requests, and the detector finds each form of a number and a CVV next to "cvv".
    assert all(pan[-4:] in dump for _, _, pan in verified)
    assert "/v1/payment-methods" in api_logs
    sample, sample_cvv = new_pan(), _cvv()
    for form in _forms(sample):
        assert _leaks(
            "self-check", f'{{"x": "{form}", "cvv": "{sample_cvv}"}}', {sample}, {sample_cvv}
        )
    assert len(_leaks("self-check", f"cvv={sample_cvv}", set(), {sample_cvv})) == 1
    leaks = (
        _leaks("pg_dump", dump, numbers, cvvs)
        + _leaks("API log", api_logs, numbers, cvvs)
        + _leaks("vault log", vault_log, numbers, cvvs)
    )
    assert not leaks, leaks
