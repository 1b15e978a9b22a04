"""The edge: authentication, rate limits, request ids, problem+json, the unit of work per request.

Services' routes use `current_principal`, `require_scopes`, `require_admin` and `get_uow`.
"""

from billfold.gateway.auth import (
    Principal,
    TokenVerifier,
    Uow,
    client_ip,
    current_principal,
    get_uow,
    require_admin,
    require_scopes,
    user_agent,
)

__all__ = [
    "Principal",
    "TokenVerifier",
    "Uow",
    "client_ip",
    "current_principal",
    "get_uow",
    "require_admin",
    "require_scopes",
    "user_agent",
]
