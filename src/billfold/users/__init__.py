"""The User Service: registration, KYC, authentication, devices, sessions, profile.

Public face: the app builds `KeyRing`, `AccessTokens` (the gateway's token verifier) and
`UsersRuntime`; other services ask for step-up with `step_up_required` and check the answer with
`verify_step_up` (a single-use `StepUpClaims`).
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
