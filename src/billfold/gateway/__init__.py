"""The edge: authentication, rate limits, request ids, problem+json, the unit of work per request.

Services' routes use `current_principal`, `require_scopes`, `require_admin`, `get_uow`, and
`IdempotencyRequired` on routes that move money; a separate app (the vault process) answers
problem+json the same way with `install_error_handlers`.
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
from billfold.gateway.errors import install_error_handlers

__all__ = [
    "IdempotencyRequired",
    "Principal",
    "TokenVerifier",
    "Uow",
    "client_ip",
    "current_principal",
    "get_uow",
    "install_error_handlers",
    "require_admin",
    "require_idempotency_key",
    "require_scopes",
    "user_agent",
]
