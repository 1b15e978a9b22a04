"""The User Service: registration, KYC, authentication, devices, sessions, profile.

Public face: the app builds `KeyRing`, `AccessTokens` (the gateway's token verifier) and
`UsersRuntime`; other services ask for step-up with `step_up_required` and check the answer with
`verify_step_up` (a single-use `StepUpClaims`); `find_counterparty` / `get_party` tell them who
a user is (`Party`), `is_admin` whether someone is an administrator, and `Email`, `Phone`,
`Handle` validate contacts the same way everywhere. `lock_account` / `unlock_account` lock an
account (no sign-in, every session revoked; `deny_access_tokens` after the commit).
"""

from billfold.users.directory import (
    ContactKind,
    Party,
    PushDevice,
    find_counterparty,
    forget_push_token,
    get_party,
    is_admin,
    push_devices,
)
from billfold.users.events import one_time_code_ring, open_one_time_code
from billfold.users.locks import (
    AccountNotFound,
    LockChange,
    account_locked,
    account_status,
    deny_access_tokens,
    lock_account,
    unlock_account,
)
from billfold.users.mfa import StepUpClaims, step_up_required, verify_step_up
from billfold.users.models import Email, Handle, Phone, mask_email, mask_phone
from billfold.users.runtime import UsersRuntime
from billfold.users.tokens import AccessTokens, KeyRing

__all__ = [
    "AccessTokens",
    "AccountNotFound",
    "ContactKind",
    "Email",
    "Handle",
    "KeyRing",
    "LockChange",
    "Party",
    "Phone",
    "PushDevice",
    "StepUpClaims",
    "UsersRuntime",
    "account_locked",
    "account_status",
    "deny_access_tokens",
    "find_counterparty",
    "forget_push_token",
    "get_party",
    "is_admin",
    "lock_account",
    "mask_email",
    "mask_phone",
    "one_time_code_ring",
    "open_one_time_code",
    "push_devices",
    "step_up_required",
    "unlock_account",
    "verify_step_up",
]
