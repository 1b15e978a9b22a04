"""Builds the ASGI app: platform resources, the gateway edge, and the enabled services."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold import (
    fraud,
    loyalty,
    network,
    notifications,
    p2p,
    payment_methods,
    transactions,
    users,
    vault,
)
from billfold.config import Settings
from billfold.fraud.api import cases_router as fraud_cases_router
from billfold.fraud.api import rules_router as fraud_rules_router
from billfold.gateway.errors import install_error_handlers
from billfold.gateway.middleware import Edge, EdgeConfig
from billfold.ledger.api import router as wallet_router
from billfold.p2p.api import router as p2p_router
from billfold.platform.blobs import build_blob_store
from billfold.platform.db import create_engine
from billfold.platform.errors import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    ProblemError,
    problem_responses,
)
from billfold.platform.keys import SealedBox
from billfold.platform.observability import Metrics
from billfold.platform.ratelimit import RateLimiter
from billfold.transactions.api_history import history_router
from billfold.users.api import router as users_router
from billfold.vault.connect import vault_client

API_DESCRIPTION = """
billfold: a digital wallet API.

* Money is always `amount` (integer minor units) + `currency` (ISO 4217).
* Every error is RFC 9457 `application/problem+json` with a stable `code`.
* Send `Idempotency-Key` on POST requests: a retry replays the first answer.
* Authenticate with `Authorization: Bearer <access token>` from `POST /v1/auth/token`.
"""


def resolve_secret_key(settings: Settings) -> str:
    """The key that seals secrets at rest: configured, or (development only) kept in data_dir."""
    if settings.secret_key:
        return settings.secret_key
    if settings.environment == "production":
        raise RuntimeError("BILLFOLD_SECRET_KEY must be set in production")
    path = Path(settings.data_dir) / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SealedBox.generate_b64())
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class Resources:
    """Process-wide connections, opened in the lifespan and closed on shutdown."""

    settings: Settings
    engine: AsyncEngine
    redis: Redis
    metrics: Metrics
    keys_engine: AsyncEngine  # the signing key ring's own pool (see users.KeyRing)


@dataclass
class Runtimes:
    """What the services need per process, built one way for the API and the worker (the
    worker's consumers hash contacts with the same key as the API, or claims would not match)."""

    settings: Settings  # with the secret key resolved
    sealed: SealedBox
    keyring: users.KeyRing
    users: users.UsersRuntime
    p2p: p2p.P2PRuntime
    # The Token Vault: `HttpVault` on BILLFOLD_VAULT_URL (the vault process), otherwise the
    # in-process vault, opened on first use. Whoever builds the runtimes closes it.
    vault: vault.VaultClient
    payment_methods: payment_methods.PaymentMethodsRuntime
    # The payment network's ISO 8583 client (connects on first use); closed with the vault.
    network: network.Iso8583Network
    # Payments: the vault (cryptograms), the network (authorizations) and the risk hook.
    transactions: transactions.TransactionsRuntime


def network_client(settings: Settings) -> network.Iso8583Network:
    """The ISO 8583 client on `settings.network_address` (connects on first use)."""
    host, port = network.NetworkClientConfig.parse_address(settings.network_address)
    return network.Iso8583Network(
        network.NetworkClientConfig(
            host=host,
            port=port,
            pool_size=settings.network_pool_size,
            timeout=settings.network_timeout_ms / 1000,
            breaker_failures=settings.network_breaker_failures,
            breaker_reset=settings.network_breaker_reset_seconds,
            stand_in_floor_limit=settings.network_stand_in_floor_limit,
        )
    )


class VaultTokenService:
    """The network simulator's `TokenService` on a `VaultClient`: a DPAN is found by the vault's
    index, the funding card is an audited detokenisation (requester `billfold-network`, the
    issuer side), and the cryptogram is verified by the vault itself (`verify_cryptogram`, which
    also refuses a replayed ATC), so the network package never holds an issuer key nor imports
    the vault's EMV code."""

    REQUESTER = "billfold-network"

    def __init__(self, client: vault.VaultClient) -> None:
        self.client = client

    async def card_for_dpan(self, dpan: str) -> network.IssuerCard | None:
        found = await self.client.token_by_dpan(dpan)
        if found is None:
            return None
        token = found.token
        card = network.IssuerCard(
            token_id=token.token_id,
            token_reference_id=token.token_reference_id,
            card_id=token.card_id,
            token_status=token.status,
            token_expiry_month=token.expiry_month,
            token_expiry_year=token.expiry_year,
        )
        if token.status != "active":
            return card
        try:
            secret = await self.client.detokenize(
                token_id=token.token_id, requester=self.REQUESTER, purpose="authorization"
            )
        except (vault.TokenNotActive, vault.TokenNotFound, vault.CardNotFound):
            return dataclasses.replace(card, token_status="deleted")
        return dataclasses.replace(
            card, pan=secret.pan, expiry_month=secret.expiry_month, expiry_year=secret.expiry_year
        )

    async def verify_cryptogram(
        self, card: network.IssuerCard, check: network.CryptogramCheck
    ) -> bool:
        cryptogram = vault.Cryptogram(
            token_id=card.token_id,
            token_reference_id=card.token_reference_id,
            dpan=check.dpan,
            expiry_month=card.token_expiry_month,
            expiry_year=card.token_expiry_year,
            atc=check.atc,
            arqc=check.arqc,
            cryptogram_version=check.cryptogram_version,
            issuer_application_data=check.issuer_application_data,
            dynamic_cvv=check.dynamic_cvv,
            application_interchange_profile=check.aip,
        )
        request = vault.CryptogramRequest(
            token_id=card.token_id,
            amount=check.amount,
            currency_numeric=check.currency_numeric,
            country_numeric=check.country_numeric,
            transaction_date=check.transaction_date,
            unpredictable_number=check.unpredictable_number,
            channel=check.channel,
            device_id=check.device_id,
            merchant_id=check.merchant_id,
            other_amount=check.other_amount,
            transaction_type=check.transaction_type,
            tvr=check.tvr,
        )
        try:
            return await self.client.verify_cryptogram(cryptogram, request)
        except (vault.TokenNotFound, ProblemError):
            return False


def build_runtimes(settings: Settings, redis: Redis, keys_engine: AsyncEngine) -> Runtimes:
    """The services' runtimes; connects to nothing (the key ring loads when started)."""
    secret = resolve_secret_key(settings)
    settings = settings.model_copy(update={"secret_key": secret})
    sealed = SealedBox.from_b64(secret)
    keyring = users.KeyRing(keys_engine, sealed, settings)
    tokens = users.AccessTokens(keyring, redis, settings)
    users_rt = users.UsersRuntime(
        settings=settings,
        redis=redis,
        tokens=tokens,
        sealed=sealed,
        blobs=build_blob_store(settings),
    )
    vault_rt = vault_client(settings)
    network_rt = network_client(settings)
    return Runtimes(
        settings,
        sealed,
        keyring,
        users_rt,
        p2p.P2PRuntime(settings, users_rt),
        vault_rt,
        payment_methods.PaymentMethodsRuntime(settings, vault_rt, network_rt, sealed),
        network_rt,
        transactions.TransactionsRuntime(settings, users_rt, vault_rt, network_rt),
    )


def create_app(settings: Settings) -> FastAPI:
    """The API with every service of this issue mounted; URLs must already be resolved."""
    if not settings.database_url or not settings.redis_url:
        raise RuntimeError("create_app needs database_url and redis_url (billfold up sets them)")
    # A burst of requests waits (up to 5 s) for one of the pool's connections instead of failing:
    # redis-py's default pool raises "Too many connections" past 100 in use, and 500 payments in
    # flight (each checking the token denylist and the rate limit) reach that at once.
    redis = Redis.from_pool(
        BlockingConnectionPool.from_url(settings.redis_url, max_connections=200, timeout=5)
    )
    # Its own tiny pool: a key reload must never wait for a connection that the request which
    # triggered it is holding.
    keys_engine = create_engine(settings.database_url, pool_size=1, max_overflow=1)
    # Live notification streams hold a Redis connection each: a bounded pool of their own.
    streams = notifications.StreamGate(settings.redis_url, settings.notifications_stream_limit)
    runtimes = build_runtimes(settings, redis, keys_engine)
    settings, sealed, keyring = runtimes.settings, runtimes.sealed, runtimes.keyring
    users_rt = runtimes.users
    tokens, blobs = users_rt.tokens, users_rt.blobs
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        lock_timeout_ms=settings.db_lock_timeout_ms,
    )
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await keyring.start()
        # Reloads and scheduled rotation run here, never on a request's path.
        refresher = asyncio.create_task(keyring.run(), name="billfold-keyring")
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await blobs.aclose()
            await runtimes.network.aclose()
            await runtimes.vault.aclose()
            await redis.aclose()
            await streams.aclose()
            await engine.dispose()
            await keys_engine.dispose()

    # Swagger UI and ReDoc from assets shipped in the wheel: the docs work offline.
    app = FastAPIOffline(
        title="billfold",
        redirect_slashes=False,  # `/v1/me/` is a 404 problem, not a redirect
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "users", "description": "Registration, profile, verification"},
            {"name": "auth", "description": "Tokens, device sign-in, sessions"},
            {"name": "devices", "description": "Enrolled phones, watches and browsers"},
            {"name": "two-factor", "description": "TOTP and step-up challenges"},
            {"name": "passkeys", "description": "WebAuthn passkeys for the web portal"},
            {"name": "kyc", "description": "Identity verification and the review queue"},
            {"name": "wallet", "description": "Balances, statement, top-ups and withdrawals"},
            {"name": "payment-methods", "description": "Cards and bank accounts"},
            {"name": "transfers", "description": "Money between people, claims and limits"},
            {"name": "transfer-requests", "description": "Asking someone for money"},
            {"name": "payments", "description": "Pay merchants: authorize, capture, refund"},
            {"name": "transactions", "description": "History, search, export, summary, receipts"},
            {"name": "fraud", "description": "The fraud review queue (administrators)"},
            {"name": "fraud rules", "description": "Fraud rules, backtests, block/allow lists"},
            {"name": "notifications", "description": "Inbox, live stream, preferences"},
            {"name": "loyalty", "description": "Points, tiers, activity and redemptions"},
            {"name": "ops", "description": "Health and metrics"},
        ],
    )
    app.state.resources = Resources(settings, engine, redis, metrics, keys_engine)
    app.state.notification_streams = streams
    app.state.users = users_rt
    app.state.p2p = runtimes.p2p
    app.state.vault = runtimes.vault
    app.state.payment_methods = runtimes.payment_methods
    app.state.blobs = blobs  # the process's one BlobStore (avatars, receipts)
    app.state.network = runtimes.network
    app.state.transactions = runtimes.transactions
    # Per-step payment latency histograms on this app's `/metrics`.
    runtimes.transactions.metrics = transactions.PaymentMetrics(metrics.registry)
    # The Fraud Service checks every payment and transfer (unless disabled) and decides the
    # reviews it opens through the same two runtimes.
    fraud_rt = fraud.build_runtime(
        settings,
        redis,
        p2p_runtime=runtimes.p2p,
        transactions_runtime=runtimes.transactions,
        registry=metrics.registry,
    )
    if settings.fraud_enabled:
        check = fraud.FraudRiskCheck(fraud_rt)
        runtimes.p2p.risk = check.transfers
        runtimes.transactions.risk = check.payments
    app.state.fraud = fraud_rt
    app.state.loyalty = loyalty.LoyaltyRuntime(settings)
    install_error_handlers(app)
    app.include_router(users_router)
    app.include_router(wallet_router)
    app.include_router(payment_methods.router)
    app.include_router(payment_methods.wallet_router)
    app.include_router(p2p_router)
    app.include_router(transactions.router)
    app.include_router(history_router)
    app.include_router(notifications.router)
    app.include_router(loyalty.router)
    app.include_router(loyalty.admin_router)
    app.include_router(fraud_cases_router)
    app.include_router(fraud_rules_router)
    _ops_routes(app)
    _document_problems(app)
    limiter = RateLimiter(redis, settings.redis_prefix) if settings.rate_limits_enabled else None
    app.add_middleware(Edge, config=EdgeConfig(settings, engine, tokens, limiter, metrics, sealed))
    return app


def _document_problems(app: FastAPI) -> None:
    """Every 4xx is served as `application/problem+json`; the OpenAPI document says so, also for
    FastAPI's automatic 422 (which would otherwise describe FastAPI's own error shape)."""
    build = app.openapi
    ref = "#/components/schemas/Problem"
    validation = problem_responses(422)[422]["description"]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            if "Problem" not in schemas:
                problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(problem.pop("$defs", {}))
                schemas["Problem"] = problem
            for operations in spec.get("paths", {}).values():
                for op in operations.values():
                    for code, response in op.get("responses", {}).items():
                        if code.startswith("4"):
                            response["content"] = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": ref}}}
                            if response.get("description") == "Validation Error":
                                response["description"] = validation
            text_spec = json.dumps(spec)
            for name in ("HTTPValidationError", "ValidationError"):
                if f'"#/components/schemas/{name}"' not in text_spec:
                    schemas.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Readiness: PostgreSQL and Redis answer",
        responses={503: {"description": "A dependency is down"}},
    )
    async def readyz(request: Request) -> Response:
        res: Resources = request.app.state.resources
        checks: dict[str, Any] = {}

        async def db() -> None:
            async with res.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        async def cache() -> None:
            await res.redis.ping()

        for name, check in (("database", db), ("redis", cache)):
            try:
                await asyncio.wait_for(check(), 2.0)
                checks[name] = "ok"
            except Exception:
                checks[name] = "unavailable"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        res: Resources = request.app.state.resources
        return Response(generate_latest(res.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def app_from_env() -> FastAPI:
    """uvicorn factory for `billfold serve`: configuration from BILLFOLD_* variables."""
    from billfold.platform.observability import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
