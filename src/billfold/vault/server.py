"""The vault process (`billfold vault`): its own ASGI app, database pool and the one HSM session.

Nothing but `HttpVault` talks to it. `VaultEdge` answers every request before any route runs:
request id, body limit, the service token (401 problem otherwise, before the body is read), one
log line per request without body or card data, and a problem+json 500 for the unexpected.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billfold.config import Settings
from billfold.gateway import install_error_handlers
from billfold.platform.db import create_engine
from billfold.platform.errors import PROBLEM_CONTENT_TYPE, Forbidden, ProblemError
from billfold.platform.ids import new_id
from billfold.platform.observability import Metrics, get_logger, request_id_var
from billfold.vault.api import PREFIX, router
from billfold.vault.client import VaultClient
from billfold.vault.service_auth import ServiceTokenRejected, ServiceTokenVerifier, may_call

log = get_logger("billfold.vault")

# The largest body a vault call has (a cryptogram verification) is well under 2 KiB.
MAX_BODY_BYTES = 64 * 1024
_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

OpenVault = Callable[[Settings, AsyncEngine], AbstractAsyncContextManager[VaultClient]]


@asynccontextmanager
async def open_local_vault(settings: Settings, engine: AsyncEngine) -> AsyncIterator[VaultClient]:
    """The in-process vault on this process's key store (the HSM session), closed at exit."""
    from billfold.vault.service import LocalVault

    local = await LocalVault.open(settings, engine)
    try:
        yield local
    finally:
        await local.aclose()


def create_vault_app(settings: Settings, *, open_vault: OpenVault = open_local_vault) -> FastAPI:
    """The vault's ASGI app. Its lifespan opens the database pool and the key store; every
    `/internal/v1/*` route needs a service token signed with `BILLFOLD_VAULT_SERVICE_KEY`."""
    if not settings.database_url:
        raise RuntimeError("the vault needs BILLFOLD_DATABASE_URL")
    redis = None
    if settings.redis_url:
        from redis.asyncio import Redis

        # Service token ids, shared by every replica so a token replayed to another is caught.
        redis = Redis.from_url(settings.redis_url)
    verifier = ServiceTokenVerifier.from_settings(settings, redis=redis)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=10, max_overflow=10)
        app.state.engine = engine
        try:
            async with open_vault(settings, engine) as vault:
                app.state.vault = vault
                log.info("vault ready", keystore=settings.vault_keystore)
                yield
        finally:
            await engine.dispose()
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="billfold vault (internal)",
        version="0.1.0",
        redirect_slashes=False,
        lifespan=lifespan,
        # Internal only: no interactive docs on the process that holds the HSM session.
        docs_url=None,
        redoc_url=None,
        openapi_url=None if settings.environment == "production" else "/openapi.json",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    _ops_routes(app)
    # Route templates for log lines, including requests refused before routing.
    routes = [r for r in (*router.routes, *app.router.routes) if hasattr(r, "path")]
    app.add_middleware(VaultEdge, verifier=verifier, metrics=metrics, routes=routes)
    return app


def vault_app_from_env() -> FastAPI:
    """uvicorn factory: configuration from BILLFOLD_* variables."""
    from billfold.platform.observability import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_vault_app(settings)


def _ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}

        async def database() -> None:
            async with request.app.state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        async def keystore() -> None:
            ping = getattr(request.app.state.vault, "ping", None)
            if ping is not None:
                await ping()

        for name, check in (("database", database), ("keystore", keystore)):
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

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template for logs and metrics, never the raw path (ids are unbounded)."""
    route = scope.get("route")
    if route is None:  # answered before routing (a 401): match it here
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it (anything else there becomes a
    400) and the problem handler answers 413 `payload_too_large`."""

    def __init__(self) -> None:
        super().__init__(413, f"The request body exceeds {MAX_BODY_BYTES} bytes")


class VaultEdge:
    """Pure ASGI: request id → service token → body limit → route → one log line, metrics."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: ServiceTokenVerifier,
        metrics: Metrics,
        routes: list[BaseRoute],
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid_in = _header(scope, b"x-request-id")
        rid = rid_in if rid_in and _REQUEST_ID.match(rid_in) else new_id("req")
        token = request_id_var.set(rid)
        state = scope["state"] = dict(scope.get("state") or {})
        path: str = scope["path"]
        method: str = scope["method"]
        status = [500]
        sent = [False]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent[0] = True
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-request-id", rid.encode()), (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        try:
            if path not in _OPEN:
                authz = _header(scope, b"authorization") or ""
                kind, _, credential = authz.partition(" ")
                try:
                    if kind.lower() != "bearer" or not credential.strip():
                        raise ServiceTokenRejected(
                            "A service token is required",
                            headers={"WWW-Authenticate": 'Bearer realm="billfold-vault"'},
                        )
                    # `htu` is the path as sent (percent-encoded ids stay encoded).
                    sent_path = (scope.get("raw_path") or path.encode()).decode("latin-1")
                    verified = await self.verifier.verify(
                        credential.strip(), method=method, path=sent_path
                    )
                    state["service_caller"] = verified
                    template = _route_template(scope, self.routes)
                    if template.startswith(PREFIX + "/") and not may_call(
                        verified.service, method, template.removeprefix(PREFIX)
                    ):
                        raise Forbidden(f"The service {verified.service!r} may not call this route")
                except ProblemError as exc:
                    await _problem(send_logged, exc, path, rid)
                    return
                declared = _header(scope, b"content-length")
                if declared is not None and (
                    not declared.isascii()
                    or not declared.isdigit()
                    or int(declared) > MAX_BODY_BYTES
                ):
                    await _problem(send_logged, _too_large(), path, rid)
                    return
            await self.app(scope, _limited(receive), send_logged)
        except _BodyTooLarge:
            if not sent[0]:
                await _problem(send_logged, _too_large(), path, rid)
        except Exception:
            log.exception(
                "unhandled error", method=method, route=_route_template(scope, self.routes)
            )
            if not sent[0]:
                await _problem(
                    send_logged,
                    ProblemError(
                        "Something went wrong in the vault; it has been logged",
                        status=500,
                        code="internal_error",
                        title="Internal server error",
                    ),
                    path,
                    rid,
                )
        finally:
            template = _route_template(scope, self.routes)
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            if path not in _OPEN:
                caller = state.get("service_caller")
                # Never the body, the query or the raw path: the route template and who asked.
                log.info(
                    "vault request",
                    method=method,
                    route=template,
                    status=status[0],
                    duration_ms=round(elapsed * 1000, 2),
                    caller=getattr(caller, "service", None),
                )
            request_id_var.reset(token)


async def _problem(send: Send, error: ProblemError, path: str, rid: str) -> None:
    body = json.dumps(error.to_problem(instance=path, request_id=rid)).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large() -> ProblemError:
    return ProblemError(
        f"The request body exceeds {MAX_BODY_BYTES} bytes",
        status=413,
        code="payload_too_large",
        title="Payload too large",
    )


def _limited(receive: Receive) -> Receive:
    size = 0

    async def wrapped() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                raise _BodyTooLarge()
        return message

    return wrapped
