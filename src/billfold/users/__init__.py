"""The User Service: registration, KYC, authentication, devices, sessions, profile.

Public face for other services and the app: `build_runtime`, `router`, and the read-only
`get_user_summary` that other services may call.
"""

from billfold.users.mfa import StepUpClaims, step_up_required, verify_step_up
from billfold.users.runtime import UsersRuntime
from billfold.users.tokens import AccessTokens, KeyRing

__all__ = [
    "AccessTokens",
    "KeyRing",
    "StepUpClaims",
    "UsersRuntime",
    "step_up_required",
    "verify_step_up",
]
