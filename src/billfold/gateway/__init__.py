"""The edge: authentication, rate limits, request ids, problem+json, the unit of work per request.

Services' routes use `current_principal`, `require_scopes`, `require_admin`, `get_uow`, and
`IdempotencyRequired` on routes that move money.
"""

from billfold.gateway.auth import (
    IdempotencyRequired,
    Principal,
    TokenVerifier,
    Uow,
    client_ip,
    current_principal,
    get_uow,
    require_admin,
    require_idempotency_key,
    require_scopes,
    user_agent,
)

__all__ = [
    "IdempotencyRequired",
    "Principal",
    "TokenVerifier",
    "Uow",
    "client_ip",
    "current_principal",
    "get_uow",
    "require_admin",
    "require_idempotency_key",
    "require_scopes",
    "user_agent",
]
