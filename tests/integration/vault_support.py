"""Helpers shared by the vault tests: fresh card numbers, rows and outbox events read by SQL, and
the vault process (`billfold vault` in a subprocess, with or without mTLS)."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text

from billfold.config import Settings
from billfold.vault import CryptogramRequest, LocalVault, VaultClient
from billfold.vault.connect import InProcessVault
from billfold.vault.emv import luhn_check_digit
from billfold.vault.http import HttpVault
from billfold.vault.service_auth import ServiceTokenSigner, generate_service_key


def new_pan(prefix: str = "4", length: int = 16) -> str:
    """A random Luhn-valid card number (outside the token BIN range)."""
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)


def new_owner() -> str:
    from billfold.platform.ids import new_id

    return new_id("usr")


def purchase(token_id: str, **overrides: Any) -> CryptogramRequest:
    values: dict[str, Any] = {
        "token_id": token_id,
        "amount": 1234,
        "currency_numeric": "840",
        "country_numeric": "840",
        "transaction_date": date.today(),
        "unpredictable_number": secrets.token_hex(4).upper(),
        "channel": "ecommerce",
    }
    values.update(overrides)
    return CryptogramRequest(**values)


async def sql(vault: LocalVault, query: str, **params: Any) -> list[dict[str, Any]]:
    async with vault.engine.connect() as conn:
        result = await conn.execute(text(query), params)
        return [dict(r._mapping) for r in result]


async def sql_exec(vault: LocalVault, query: str, **params: Any) -> None:
    async with vault.engine.begin() as conn:
        await conn.execute(text(query), params)


async def events_of(vault: LocalVault, card_id: str) -> list[dict[str, Any]]:
    """The card's vault events in the order they were written."""
    return await sql(
        vault,
        "SELECT type, subject, source, data FROM platform.outbox"
        " WHERE aggregate_id = :card_id ORDER BY seq",
        card_id=card_id,
    )


# --- the vault process --------------------------------------------------------------------------


@dataclass
class VaultProcess:
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    service_key: bytes


@dataclass
class Tls:
    """A test CA, the vault's server certificate (for 127.0.0.1) and an API client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def issue_tls(directory: Path) -> Tls:
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        cn: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey, **ext: Any
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name("billfold test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
        )
        for extension, critical in ext.values():
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("billfold test CA", ca_key, ca_key, basic=(x509.BasicConstraints(True, None), True))
    write(directory / "ca", ca_key, ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = issue(
        "billfold-vault",
        server_key,
        ca_key,
        san=(san, False),
        eku=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    )
    write(directory / "server", server_key, server)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue(
        "billfold-api",
        client_key,
        ca_key,
        eku=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    )
    write(directory / "client", client_key, client)
    return Tls(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_vault_process(
    database_url: str,
    data_dir: Path,
    secret_key: str,
    log: Path,
    tls: Tls | None = None,
) -> Iterator[VaultProcess]:
    """`billfold vault` in a subprocess on a free loopback port, ready, stopped at exit (with
    `tls`: HTTPS that requires a client certificate from the test CA)."""
    service_key = generate_service_key()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLFOLD_", "SOFTHSM2_"))}
    env.update(
        {
            "BILLFOLD_DATABASE_URL": database_url,
            "BILLFOLD_DATA_DIR": str(data_dir),
            "BILLFOLD_SECRET_KEY": secret_key,
            "BILLFOLD_VAULT_SERVICE_KEY": service_key,
            "BILLFOLD_ENVIRONMENT": "test",
            "BILLFOLD_LOG_JSON": "true",
            # Everything the process would ever log, not only what production logs.
            "BILLFOLD_LOG_LEVEL": "DEBUG",
        }
    )
    command = [sys.executable, "-m", "billfold.cli", "vault", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    if tls is not None:
        command += ["--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key)]
        command += ["--ssl-ca-certs", str(tls.ca)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = tls.client_context() if tls is not None else True
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the vault exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1, verify=verify).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"vault not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield VaultProcess(url, log, process, base64.b64decode(service_key))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def vault_process(
    settings: Settings, data_dir: Path, hsm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VaultProcess]:
    """The vault process on this worker's database and SoftHSM2 token (`hsm` made its keys)."""
    log = tmp_path_factory.mktemp("vault-process") / "vault.log"
    with run_vault_process(settings.database_url, data_dir, settings.secret_key, log) as vp:
        yield vp


def http_vault(vp: VaultProcess, subject: str = "billfold-api", **kwargs: Any) -> HttpVault:
    return HttpVault(vp.url, ServiceTokenSigner(vp.service_key, subject=subject), **kwargs)


@pytest.fixture(params=["local", "inprocess", "http"])
async def vault(
    request: pytest.FixtureRequest,
    local_vault: LocalVault,
    settings: Settings,
    vault_process: VaultProcess,
) -> AsyncIterator[VaultClient]:
    """A test taking `vault` runs once on each `VaultClient`: `LocalVault`, `InProcessVault`
    (what the API uses without BILLFOLD_VAULT_URL: opened on first use, its own pool and HSM
    session) and `HttpVault` on the vault process. Import it with `vault_process` into a module."""
    if request.param == "local":
        yield local_vault
        return
    if request.param == "inprocess":
        in_process = InProcessVault(settings)
        try:
            yield in_process
        finally:
            await in_process.aclose()
        return
    api, network = http_vault(vault_process), http_vault(vault_process, "billfold-network")
    try:
        yield _AsItsServices(api, network)  # type: ignore[misc]
    finally:
        await api.aclose()
        await network.aclose()


class _AsItsServices:
    """Both services' `HttpVault`s as one client, each method called as the service allowed to
    call it (`service_auth.SERVICE_ROUTES`): the issuer side's as `billfold-network`, the rest
    as `billfold-api`."""

    _ISSUER_SIDE = frozenset({"token_by_dpan", "verify_cryptogram"})

    def __init__(self, api: HttpVault, network: HttpVault) -> None:
        self._api, self._network = api, network

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network if name in self._ISSUER_SIDE else self._api, name)


async def atc_acceptance_waits_on_a_lock(vault: LocalVault) -> bool:
    """Whether a verification's ATC update (`store.accept_atc`) is waiting on a row lock: how a
    test knows a verification is parked behind the lock it holds."""
    rows = await sql(
        vault,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' "
        "AND query LIKE '%last_verified_atc = greatest%'",
    )
    return bool(rows[0]["n"])
