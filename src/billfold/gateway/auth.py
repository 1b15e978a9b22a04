"""Who is calling: bearer tokens verified once at the edge, then required per route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Forbidden, ProblemError, Unauthorized


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    user_id: str
    session_id: str
    scopes: frozenset[str]
    role: str = "user"
    device_id: str | None = None
    auth_method: str = "pwd"
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" and "admin" in self.scopes


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal:
        """Return the principal of a valid access token or raise `Unauthorized`."""
        ...


# Documents the scheme in OpenAPI; the edge middleware has already done the verification.
_bearer = HTTPBearer(auto_error=False, description="ES256 JWT access token from /v1/auth/token")


def _state(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {})


# The dependencies below are `async def` although they do no I/O: FastAPI runs a plain `def`
# dependency in the thread pool, a thread hop per request (bench/auth.py, docs/performance.md).
async def current_principal(
    request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    state = _state(request)
    principal = state.get("principal")
    if principal is not None:
        return principal  # type: ignore[no-any-return]
    error = state.get("auth_error")
    if isinstance(error, ProblemError):
        raise error
    raise Unauthorized(
        "A bearer access token is required",
        code="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="billfold"'},
    )


def require_scopes(*scopes: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency: the caller must hold every scope (wearables, for one, hold only `pay`)."""

    async def dependency(principal: Principal = Depends(current_principal)) -> Principal:
        missing = [s for s in scopes if s not in principal.scopes]
        if missing:
            raise Forbidden(
                f"This token lacks the scope(s): {', '.join(missing)}",
                code="insufficient_scope",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'
                },
            )
        return principal

    return dependency


async def require_admin(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This endpoint needs an administrator", code="admin_required")
    return principal


async def get_uow(request: Request) -> UnitOfWork:
    """The request's unit of work; the edge commits it when the response is a success."""
    uow = _state(request).get("uow")
    if uow is None:
        raise RuntimeError("gateway middleware is not installed")
    return uow  # type: ignore[no-any-return]


# The request's unit of work as a route parameter type: `uow: Uow`.
Uow = Annotated[UnitOfWork, Depends(get_uow)]


def client_ip(request: Request) -> str | None:
    return _state(request).get("client_ip")


def user_agent(request: Request) -> str | None:
    ua = request.headers.get("user-agent")
    return ua[:512] if ua else None


async def require_idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Required: a retry with the same key replays the first answer",
        ),
    ] = None,
) -> str:
    """Dependency for routes that move money: a retry must never move it twice."""
    if idempotency_key is None:
        raise ProblemError(
            "Send an Idempotency-Key header (e.g. a UUID) with every request that moves money",
            status=428,
            code="idempotency_key_required",
            title="Idempotency key required",
        )
    return idempotency_key


# Routes that move money: `dependencies=[IdempotencyRequired]`.
IdempotencyRequired = Depends(require_idempotency_key)
