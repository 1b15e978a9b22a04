"""Changing a password, and resetting a forgotten one without revealing who has an account.

A reset lives in Redis for `RESET_TTL_SECONDS`: only an HMAC of its 6-digit code is kept, the
code itself travels once, sealed for the notification service, in the
`password_reset.requested` outbox event. Every request answers alike: an unknown email, an inactive account or a
request over the per-email limit gets a decoy reset that looks and counts down exactly like a
real one, and no code is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import (
    Conflict,
    FieldError,
    Forbidden,
    NotFound,
    ProblemError,
    Unprocessable,
)
from billfold.platform.ids import is_opaque_token
from billfold.users import auth, events, mfa
from billfold.users.models import ChangePassword, PasswordResetStarted
from billfold.users.runtime import UsersRuntime
from billfold.users.store import accounts as accounts_store

RESET_TTL_SECONDS = 15 * 60
RESET_MAX_ATTEMPTS = 5
RESETS_PER_EMAIL_PER_WINDOW = 3
RESET_REQUEST_WINDOW_SECONDS = 3600

# Takes a numbered attempt of a live reset before its code is compared, atomically, so
# concurrent guesses cannot outnumber the attempts. KEYS: reset, attempts; ARGV: max, ttl.
# Returns {1, attempt, record} or {0, attempt} when the reset is unknown, expired or spent.
_TAKE_RESET_ATTEMPT = """
local record = redis.call('GET', KEYS[1])
if not record then return {0, 0} end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2])) end
if n > tonumber(ARGV[1]) then return {0, n} end
return {1, n, record}
"""


def _digest(rt: UsersRuntime, label: str, value: str) -> str:
    return rt.keyed_hash("password-reset", f"{label}:{value}").hex()


def _reset_key(rt: UsersRuntime, reset_id: str) -> str:
    return rt.key("password-reset", reset_id)


def _dead_reset() -> ProblemError:
    # One answer for unknown, expired, used and spent resets (and decoys once spent).
    return ProblemError(
        "This password reset is not valid (unknown, expired, used or out of attempts); "
        "request a new one",
        status=400,
        code="invalid_reset",
        title="Invalid password reset",
    )


# --- change ---------------------------------------------------------------------------------------


async def change_password(
    uow: UnitOfWork, rt: UsersRuntime, principal: Principal, request: ChangePassword
) -> None:
    """Set a new password, proving presence with the current one.

    No recent sign-in or step-up is asked for: knowing the current password is itself the proof
    a stolen access token lacks. Wrong current passwords count toward the same per-email lockout
    as the password grant (a token cannot be used to guess the password). Every other session
    of the user is revoked, with its refresh tokens and live access tokens; this one is kept.
    """
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, principal.user_id)
    if user is None:
        raise NotFound("No such user")
    if user.status != "active":
        raise Forbidden("This account cannot change its password", code="user_inactive")
    if request.new_password == request.current_password:
        raise Unprocessable(
            "The new password must differ from the current one",
            errors=[FieldError(pointer="#/new_password", detail="must differ from the current")],
        )
    await auth.take_password_attempt(rt, user.email)
    if not await rt.verify_password(user.password_hash, request.current_password):
        raise Unprocessable(
            "The current password is not correct",
            code="invalid_password",
            errors=[FieldError(pointer="#/current_password", detail="not the current password")],
        )
    await auth.clear_password_failures(rt, user.email)
    new_hash = await rt.hash_password(request.new_password)
    now = utcnow()
    if not await accounts_store.replace_password_hash(
        conn, user.id, user.password_hash, new_hash, now
    ):
        raise Conflict("The password was changed by another request meanwhile")
    revoked = await auth.revoke_user_sessions(
        uow, rt, user.id, "password_changed", keep_session=principal.session_id
    )
    await events.publish(
        conn,
        events.PASSWORD_CHANGED,
        user.id,
        {"session_id": principal.session_id, "sessions_revoked": len(revoked)},
    )


# --- reset ----------------------------------------------------------------------------------------


async def _within_request_limit(rt: UsersRuntime, email: str) -> bool:
    """Counted per email whether or not it has an account, so the limit reveals nothing."""
    key = rt.key("password-reset-requests", hashlib.sha256(email.encode()).hexdigest())
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, RESET_REQUEST_WINDOW_SECONDS, nx=True)
        count, _ = await pipe.execute()
    return int(count) <= RESETS_PER_EMAIL_PER_WINDOW


async def start_password_reset(
    uow: UnitOfWork, rt: UsersRuntime, email: str
) -> PasswordResetStarted:
    """Always the same answer and nearly the same work: the lookup, the counter, a code and a
    stored reset happen for every email. Only a known active account within the per-email limit
    gets a real reset whose code is emailed (via the outbox); the others get a decoy."""
    within_limit = await _within_request_limit(rt, email)
    conn = await uow.connection()
    user = await accounts_store.find_user_by_email(conn, email)
    reset_id = secrets.token_urlsafe(16)
    code = f"{secrets.randbelow(1_000_000):06d}"
    real = user is not None and user.status == "active" and within_limit
    record = {
        "user_id": user.id if real and user is not None else None,
        "code_hash": _digest(rt, "code", f"{reset_id}:{code}"),
        # The reset dies when the password changes before it is used (another reset, a change).
        "password": _digest(rt, "password", user.password_hash) if real and user else "",
    }
    await rt.redis.set(_reset_key(rt, reset_id), json.dumps(record), ex=RESET_TTL_SECONDS)
    if real and user is not None:
        # The notification service delivers the code; the event is its only carrier.
        await events.publish_code(
            conn,
            rt.codes,
            events.PASSWORD_RESET_REQUESTED,
            user.id,
            {
                "reset_id": reset_id,
                "channel": "email",
                "target": user.email,
                "locale": user.locale,
                "expires_in": RESET_TTL_SECONDS,
            },
            code,
        )
    return PasswordResetStarted(reset_id=reset_id, expires_in=RESET_TTL_SECONDS)


async def confirm_password_reset(
    uow: UnitOfWork, rt: UsersRuntime, reset_id: str, code: str, new_password: str
) -> None:
    """Set a new password with the emailed code. Each guess takes one of `RESET_MAX_ATTEMPTS`
    attempts before the code is compared; wrong → 422 `invalid_code` with `attempts_left`, then
    the reset is dead (400 `invalid_reset`, also for unknown and expired ids). Success revokes
    every session of the user and ends the sign-in lockout; two-factor stays on, so a sign-in
    afterwards still needs the second factor."""
    if not is_opaque_token(reset_id, max_length=64):
        raise _dead_reset()
    key = _reset_key(rt, reset_id)
    taken = await rt.redis.register_script(_TAKE_RESET_ATTEMPT)(
        keys=[key, key + ":attempts"], args=[RESET_MAX_ATTEMPTS, RESET_TTL_SECONDS]
    )
    if not int(taken[0]):
        raise _dead_reset()
    attempts = int(taken[1])
    record = json.loads(taken[2])
    right = hmac.compare_digest(record["code_hash"], _digest(rt, "code", f"{reset_id}:{code}"))
    if not right or record["user_id"] is None:  # a decoy has no right code
        left = max(0, RESET_MAX_ATTEMPTS - attempts)
        if left == 0:
            await rt.redis.delete(key)
        raise mfa.invalid_code(left, then="request a new password reset")
    if not await rt.redis.delete(key):  # single use: a concurrent confirmation won
        raise _dead_reset()
    user_id = str(record["user_id"])
    new_hash = await rt.hash_password(new_password)  # before the row lock is taken
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, user_id, for_update=True)
    if (
        user is None
        or user.status != "active"
        or not hmac.compare_digest(record["password"], _digest(rt, "password", user.password_hash))
    ):
        raise _dead_reset()
    now = utcnow()
    replaced = await accounts_store.replace_password_hash(
        conn, user_id, user.password_hash, new_hash, now
    )
    assert replaced  # the row is locked and its hash was just read
    revoked = await auth.revoke_user_sessions(uow, rt, user_id, "password_reset")
    await events.publish(
        conn,
        events.PASSWORD_RESET,
        user_id,
        {"reset_id": reset_id, "sessions_revoked": len(revoked)},
    )
    email = user.email

    async def end_lockout() -> None:
        await auth.clear_password_failures(rt, email)

    uow.after_commit(end_lockout)
