"""The edge, as one ASGI middleware so each request pays for one pass:

request id → security headers → body limit → bearer authentication → rate limits →
unit of work + idempotency → the route → commit (only then is a success sent) → metrics.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billfold.config import Settings
from billfold.gateway.auth import TokenVerifier
from billfold.gateway.errors import transient_problem
from billfold.platform import idempotency
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import PROBLEM_CONTENT_TYPE, ProblemError, ServiceUnavailable
from billfold.platform.ids import new_id
from billfold.platform.keys import SealedBox
from billfold.platform.observability import Metrics, get_logger, request_id_var
from billfold.platform.ratelimit import Quota, RateLimiter

log = get_logger("billfold.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_UNMETERED = frozenset({"/healthz", "/readyz", "/metrics"})
_DOCS = ("/docs", "/redoc", "/openapi.json", "/static-offline-docs/")
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Credential exchanges are never stored or replayed: a replay would hand out the live rotated
# refresh token again and bypass refresh-token reuse detection. `Idempotency-Key` is ignored.
# Password changes and resets neither: their bodies hold passwords, and a fast (if keyed) hash
# of one has no business being kept for a day.
_NOT_IDEMPOTENT = frozenset(
    {"/v1/auth/token", "/v1/me/password", "/v1/auth/password-reset/confirm"}
)
# Payments and wallet top-ups keep their own idempotency (docs/architecture.md, Transaction
# Service, Payment Methods): the edge's claims the key on the request's database connection and
# holds it until the response, and a card payment or top-up waits ~1.2 s for the network; those
# routes must hold no connection then (and a top-up's retry must find the charge it made).
_OWN_IDEMPOTENCY = ("/v1/payments", "/v1/wallet/topups")


def _edge_idempotency(path: str) -> bool:
    if path in _NOT_IDEMPOTENT:
        return False
    return not any(path == p or path.startswith(p + "/") for p in _OWN_IDEMPOTENCY)


# Body members a stored idempotency fingerprint must not be a function of, wherever they appear
# in a JSON body (by name, after parsing, so an escaped name is caught too). A CVV may not be kept
# in any form once the request is done (PCI DSS 3.3.1), not even inside a keyed hash: it is left
# out, and a retry with another CVV replays the first answer. A card or account number is
# replaced by its last four characters and its length: a keyed hash of it would be an offline
# oracle for whoever holds the process secret (bin, last4 and expiry are stored in clear, which
# leaves ~10^5 Luhn-valid candidates for a PAN). The marker tells apart what is stored anyway,
# so another card with the same key is still `idempotency_key_reuse` unless it shares the last
# four digits, the length and every other member.
_NOT_FINGERPRINTED = frozenset({"cvv"})
_MASKED_IN_FINGERPRINT = frozenset({"pan", "account_number", "iban"})

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"cache-control", b"no-store"),
]
_API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOCS_CSP = (
    b"content-security-policy",
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'",
)


class _BodyTooLarge(StarletteHTTPException):
    """Raised by the limited `receive`; an HTTPException so FastAPI's body parsing re-raises it
    (any other exception there becomes a 400) and the problem handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds {limit} bytes")


def route_class(method: str, path: str) -> str:
    """Rate-limit class: credential endpoints are the tightest, then writes, then reads."""
    if path.startswith("/v1/auth/") or (method == "POST" and path == "/v1/users"):
        return "auth"
    return "write" if method in _MUTATING else "read"


@dataclass
class EdgeConfig:
    settings: Settings
    engine: AsyncEngine
    verifier: TokenVerifier
    limiter: RateLimiter | None
    metrics: Metrics
    sealed: SealedBox

    _quotas: dict[str, tuple[Quota, Quota]] = field(default_factory=dict, init=False, repr=False)

    def quotas(self, klass: str) -> tuple[Quota, Quota]:
        """The (per IP, per user) quotas of a route class, parsed on first use."""
        cached = self._quotas.get(klass)
        if cached is None:
            s = self.settings
            cached = self._quotas[klass] = (
                Quota.parse(getattr(s, f"rate_limit_{klass}_ip")),
                Quota.parse(getattr(s, f"rate_limit_{klass}_user")),
            )
        return cached


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _problem_message(error: ProblemError, path: str, rid: str) -> tuple[Message, Message]:
    body = json.dumps(error.to_problem(instance=path, request_id=rid)).encode()
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    return (
        {"type": "http.response.start", "status": error.status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


def _route_template(scope: Scope) -> str:
    """The matched route's template for metrics and logs; requests the edge answered before
    routing are matched here. Never the raw path: ids in labels would be unbounded series."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        for candidate in getattr(router, "routes", ()):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"


class Edge:
    def __init__(self, app: ASGIApp, config: EdgeConfig) -> None:
        self.app = app
        self.cfg = config
        self._fingerprint_key = idempotency.fingerprint_key(config.settings.secret_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid_in = _header(scope, b"x-request-id")
        rid = rid_in if rid_in and _REQUEST_ID.match(rid_in) else new_id("req")
        token = request_id_var.set(rid)
        method: str = scope["method"]
        path: str = scope["path"]
        # A per-request copy: servers may hand every request the same lifespan state dict.
        state = scope["state"] = dict(scope.get("state") or {})
        state["request_id"] = rid
        state["client_ip"] = self._client_ip(scope)
        status_holder = [500]
        extra_headers: list[tuple[bytes, bytes]] = [(b"x-request-id", rid.encode())]
        extra_headers += SECURITY_HEADERS
        extra_headers.append(_DOCS_CSP if path.startswith(_DOCS) else _API_CSP)

        response_started = [False]

        async def send_edge(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_started[0] = True
                status_holder[0] = message["status"]
                present = {k.lower() for k, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                headers += [(k, v) for k, v in extra_headers if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._handle(scope, receive, send_edge, state, extra_headers)
        except Exception:
            # The edge's own dependencies failed (Redis down for the token denylist or the
            # rate limiter): a problem+json 503, never a bare 500 from the server.
            log.exception("edge failure", method=method, path=path)
            if not response_started[0]:
                start, body = _problem_message(
                    ServiceUnavailable(
                        "A service billfold depends on is unavailable; retry shortly",
                        headers={"Retry-After": "5"},
                    ),
                    path,
                    rid,
                )
                await send_edge(start)
                await send_edge(body)
        finally:
            template = _route_template(scope)
            elapsed = time.perf_counter() - started
            self.cfg.metrics.requests.labels(method, template, str(status_holder[0])).inc()
            self.cfg.metrics.latency.labels(method, template).observe(elapsed)
            if path not in _UNMETERED:
                log.info(
                    "request",
                    method=method,
                    route=template,
                    status=status_holder[0],
                    duration_ms=round(elapsed * 1000, 2),
                    client_ip=state.get("client_ip"),
                    user_id=getattr(state.get("principal"), "user_id", None),
                )
            request_id_var.reset(token)

    def _client_ip(self, scope: Scope) -> str | None:
        if self.cfg.settings.trust_forwarded_for:
            fwd = _header(scope, b"x-forwarded-for")
            if fwd:
                return fwd.split(",")[0].strip()[:64]
        client = scope.get("client")
        return client[0] if client else None

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        state: dict[str, Any],
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        rid: str = state["request_id"]
        limit = self.cfg.settings.max_body_bytes

        async def fail(error: ProblemError) -> None:
            start, body = _problem_message(error, path, rid)
            await send(start)
            await send(body)

        declared = _header(scope, b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() is True
                await fail(ProblemError("Content-Length is not a number", code="bad_request"))
                return
            if int(declared) > limit:
                await fail(_too_large(limit))
                return

        # Bearer authentication (failures surface only on routes that need a principal).
        authz = _header(scope, b"authorization")
        if authz:
            kind, _, credential = authz.partition(" ")
            if kind.lower() == "bearer" and credential.strip():
                verify_started = time.perf_counter()
                try:
                    state["principal"] = await self.cfg.verifier.verify(credential.strip())
                except ProblemError as exc:
                    state["auth_error"] = exc
                # The "auth" step of a payment's latency budget (see transactions).
                state["auth_ms"] = (time.perf_counter() - verify_started) * 1000

        if self.cfg.limiter is not None and path not in _UNMETERED and not path.startswith(_DOCS):
            klass = route_class(method, path)
            ip_quota, user_quota = self.cfg.quotas(klass)
            buckets = [(f"{klass}:ip:{state['client_ip']}", ip_quota)]
            principal = state.get("principal")
            if principal is not None:
                buckets.append((f"{klass}:user:{principal.user_id}", user_quota))
            decision = await self.cfg.limiter.hit(buckets)
            extra_headers += [(k.lower().encode(), v.encode()) for k, v in decision.headers()]
            if not decision.allowed:
                self.cfg.metrics.rate_limited.labels(klass).inc()
                await fail(
                    ProblemError(
                        "Too many requests; slow down and retry after the indicated time",
                        status=429,
                        code="rate_limited",
                        title="Too many requests",
                    )
                )
                return

        # Read the body now when the request must be fingerprinted for idempotency.
        idem_key = (
            _header(scope, b"idempotency-key")
            if method in _MUTATING and _edge_idempotency(path)
            else None
        )
        body_chunks: list[bytes] = []
        if idem_key is not None:
            try:
                body = await _read_body(receive, limit)
            except _BodyTooLarge:
                await fail(_too_large(limit))
                return
            body_chunks = [body]
            replayed = False

            async def receive_buffered() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            app_receive: Receive = receive_buffered
        else:
            app_receive = _limited(receive, limit)

        uow = UnitOfWork(self.cfg.engine)
        state["uow"] = uow
        principal = state.get("principal")
        scope_key = f"user:{principal.user_id}" if principal is not None else "anonymous"
        fingerprint = ""
        try:
            if idem_key is not None:
                idempotency.check_key(idem_key)
                fingerprint = idempotency.request_fingerprint(
                    method, path, _fingerprinted(b"".join(body_chunks)), self._fingerprint_key
                )
                conn = await uow.connection()
                stored = await idempotency.claim(
                    conn, scope_key, idem_key, fingerprint, self.cfg.sealed
                )
                if stored is not None:
                    await uow.rollback()
                    headers = [(k.encode(), v.encode()) for k, v in stored.headers]
                    headers.append((b"idempotent-replayed", b"true"))
                    await send(
                        {
                            "type": "http.response.start",
                            "status": stored.status_code,
                            "headers": headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": stored.body})
                    return
        except ProblemError as exc:
            await uow.rollback()
            await fail(exc)
            return

        buffered_start: Message | None = None
        buffered_body: list[bytes] = []
        sent_start = False

        async def send_app(message: Message) -> None:
            nonlocal buffered_start, sent_start
            if message["type"] == "http.response.start":
                if uow.active:
                    buffered_start = message  # hold until the transaction commits
                    return
                sent_start = True
                await send(message)
                return
            if message["type"] == "http.response.body" and buffered_start is not None:
                buffered_body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await self._finish(
                    uow,
                    buffered_start,
                    b"".join(buffered_body),
                    send,
                    scope_key,
                    idem_key,
                    method,
                    path,
                    fingerprint,
                    rid,
                )
                sent_start = True
                return
            await send(message)

        try:
            await self.app(scope, app_receive, send_app)
        except _BodyTooLarge:
            await uow.rollback()
            if not sent_start:
                await fail(_too_large(limit))
        except Exception as exc:
            await uow.rollback()
            busy = transient_problem(exc)
            if busy is not None:
                log.warning("database busy", method=method, path=path, reason=busy.extra["reason"])
                if not sent_start:
                    await fail(busy)
                return
            log.exception("unhandled error", method=method, path=path)
            if not sent_start:
                await fail(
                    ProblemError(
                        "Something went wrong on our side; it has been logged",
                        status=500,
                        code="internal_error",
                        title="Internal server error",
                    )
                )
        else:
            if uow.active:  # a route that opened a transaction but sent nothing
                await uow.rollback()

    async def _finish(
        self,
        uow: UnitOfWork,
        start: Message,
        body: bytes,
        send: Send,
        scope_key: str,
        idem_key: str | None,
        method: str,
        path: str,
        fingerprint: str,
        rid: str,
    ) -> None:
        status = int(start["status"])
        if status >= 400:
            await uow.rollback()  # an error changes nothing
        else:
            try:
                if idem_key is not None:
                    kept = [
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in start.get("headers", [])
                        if k.lower() not in (b"x-request-id", b"set-cookie")
                    ]
                    await idempotency.save(
                        await uow.connection(),
                        scope=scope_key,
                        key=idem_key,
                        method=method,
                        path=path,
                        fingerprint=fingerprint,
                        response=idempotency.StoredResponse(status, kept, body),
                        ttl_seconds=self.cfg.settings.idempotency_ttl_seconds,
                        sealed=self.cfg.sealed,
                    )
                await uow.commit()
            except Exception:
                await uow.rollback()
                log.exception("commit failed", path=path)
                err_start, err_body = _problem_message(
                    ServiceUnavailable(
                        "The change could not be saved; nothing was changed. Retry the request.",
                        code="commit_failed",
                        headers={"Retry-After": "1"},
                    ),
                    path,
                    rid,
                )
                await send(err_start)
                await send(err_body)
                return
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _fingerprinted(body: bytes) -> bytes:
    """The body as its idempotency fingerprint sees it: without a CVV and with card or account
    numbers masked. A body holding none of them is left as it is (so is one that does not parse
    as JSON: the route refuses it, and a refused request is not stored)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not _mask_secrets(data):
        return body
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _mask_secrets(data: Any) -> bool:
    """Drop or mask the secret members of `data` in place; whether anything was."""
    changed = False
    if isinstance(data, dict):
        for name in list(data):
            if name in _NOT_FINGERPRINTED:
                del data[name]
                changed = True
            elif name in _MASKED_IN_FINGERPRINT:
                data[name] = _number_marker(data[name])
                changed = True
            else:
                changed = _mask_secrets(data[name]) or changed
    elif isinstance(data, list):
        for item in data:
            changed = _mask_secrets(item) or changed
    return changed


def _number_marker(value: Any) -> str:
    """The last four characters and the length of a card or account number, its separators
    ignored: what the payment method keeps in clear anyway. A short value (never a valid
    number) is marked by its length alone."""
    chars = "".join(ch for ch in str(value) if ch.isalnum()).upper() if value is not None else ""
    last4 = chars[-4:] if len(chars) >= 8 else ""
    return f"masked:{last4}:{len(chars)}"


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        f"The request body exceeds {limit} bytes",
        status=413,
        code="payload_too_large",
        title="Payload too large",
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _limited(receive: Receive, limit: int) -> Receive:
    size = 0

    async def wrapped() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge(limit)
        return message

    return wrapped
