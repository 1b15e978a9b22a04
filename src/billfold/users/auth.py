"""Signing in: password, refresh-token rotation, device signature ("biometric"); sessions."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import NotFound, ProblemError, TooManyRequests
from billfold.platform.ids import is_valid_id, new_id
from billfold.users import events
from billfold.users.locks import account_locked
from billfold.users.runtime import UsersRuntime
from billfold.users.store import accounts as accounts_store
from billfold.users.store import sessions as store

USER_SCOPES = ("profile", "devices", "wallet", "pay")
WEARABLE_SCOPES = ("pay",)
ADMIN_SCOPES = ("admin",)
CHALLENGE_TTL_SECONDS = 120


def cannot_sign_in(status: str | None) -> ProblemError:
    """Why an account whose credential checked out gets no session: locked (403
    `account_locked`), or gone/closed (the generic invalid grant)."""
    if status == "locked":
        return account_locked()
    return invalid_grant("This account cannot sign in; contact support")


def invalid_grant(detail: str = "The credentials are not valid") -> ProblemError:
    # `error` mirrors RFC 6749 §5.2 for OAuth2 client libraries.
    return ProblemError(
        detail,
        status=400,
        code="invalid_grant",
        title="Invalid grant",
        extra={"error": "invalid_grant"},
    )


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    expires_in: int
    refresh_token: str
    scope: str
    session_id: str
    token_type: str = "Bearer"


@dataclass(frozen=True)
class ClientContext:
    ip: str | None
    user_agent: str | None


def allowed_scopes(role: str, device_platform: str | None) -> list[str]:
    if device_platform == "watch":
        return list(WEARABLE_SCOPES)
    scopes = list(USER_SCOPES)
    if role == "admin":
        scopes += ADMIN_SCOPES
    return scopes


def _narrow(allowed: list[str], requested: str | None) -> list[str]:
    if not requested:
        return allowed
    wanted = requested.split()
    unknown = [s for s in wanted if s not in allowed]
    if unknown:
        raise ProblemError(
            f"Scope not allowed: {' '.join(unknown)}",
            status=400,
            code="invalid_scope",
            extra={"error": "invalid_scope"},
        )
    return [s for s in allowed if s in wanted]


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def open_session(
    uow: UnitOfWork,
    rt: UsersRuntime,
    *,
    user: Any,
    device: Any | None,
    method: str,
    scope: str | None,
    client: ClientContext,
) -> TokenGrant:
    conn = await uow.connection()
    # The grants read the status without a lock, before a slow credential check. Re-read it
    # under a share lock: a lock in flight is waited for (and refuses this sign-in), a lock that
    # comes later waits for this commit and so revokes the session created here.
    status = await accounts_store.share_lock_status(conn, user.id)
    if status != "active":
        raise cannot_sign_in(status)
    now = utcnow()
    scopes = _narrow(allowed_scopes(user.role, device.platform if device else None), scope)
    session_id = new_id("ses")
    await store.insert_session(
        conn,
        {
            "id": session_id,
            "user_id": user.id,
            "device_id": device.id if device else None,
            "auth_method": method,
            "scopes": scopes,
            "ip": client.ip,
            "user_agent": client.user_agent,
            "now": now,
            "expires_at": now + timedelta(seconds=rt.settings.session_ttl_seconds),
        },
    )
    refresh = secrets.token_urlsafe(32)
    await store.insert_refresh_token(
        conn,
        _token_hash(refresh),
        session_id,
        now,
        now + timedelta(seconds=rt.settings.refresh_token_ttl_seconds),
    )
    if device is not None:
        await store.update_device(conn, device.id, {"last_seen_at": now})
    await events.publish(
        conn,
        events.SESSION_CREATED,
        user.id,
        {
            "session_id": session_id,
            "device_id": device.id if device else None,
            "auth_method": method,
            "ip": client.ip,
            "user_agent": client.user_agent,
        },
    )
    access, ttl = await rt.tokens.issue(
        user_id=user.id,
        session_id=session_id,
        scopes=scopes,
        role=user.role,
        device_id=device.id if device else None,
        auth_method=method,
        extra={"auth_time": int(now.timestamp())},
    )
    return TokenGrant(access, ttl, refresh, " ".join(scopes), session_id)


# --- password grant, with backoff after repeated failures ----------------------------------------


# Takes a numbered attempt atomically. The attempt that reaches the limit locks the account
# *before* its password is checked, so concurrent guesses past the limit are refused unchecked.
# KEYS: failures, locked; ARGV: max_failures, base_seconds, cap_seconds, window_seconds.
# Returns {allowed, attempt_or_retry_after}.
_TAKE_ATTEMPT = """
local ttl = redis.call('TTL', KEYS[2])
if ttl > 0 then return {0, ttl} end
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
local max = tonumber(ARGV[1])
if n >= max then
  local lock = math.min(tonumber(ARGV[2]) * (2 ^ (n - max)), tonumber(ARGV[3]))
  redis.call('SET', KEYS[2], '1', 'EX', math.floor(lock))
end
return {1, n}
"""
_LOCKOUT_CAP_SECONDS = 3600
_FAILURE_WINDOW_SECONDS = 24 * 3600
MFA_TOKEN_TTL_SECONDS = 300


def mfa_required(mfa_token: str) -> ProblemError:
    """The password was right; the account also needs its second factor (`mfa_otp` grant)."""
    return ProblemError(
        "This account has two-factor authentication: send a code with grant_type=mfa_otp",
        status=403,
        code="mfa_required",
        title="Second factor required",
        extra={
            "error": "mfa_required",
            "mfa_token": mfa_token,
            "methods": ["totp"],
            "expires_in": MFA_TOKEN_TTL_SECONDS,
        },
    )


def _login_failure_keys(rt: UsersRuntime, email: str) -> tuple[str, str]:
    failures_key = rt.key("login-failures", hashlib.sha256(email.encode()).hexdigest())
    return failures_key, failures_key + ":locked"


async def take_password_attempt(rt: UsersRuntime, email: str) -> None:
    """Number one password attempt for `email` before the password is checked (429
    `too_many_attempts` while locked). Every check of a password against an account goes
    through here: the password grant and the current password of a password change."""
    allowed, value = await rt.redis.register_script(_TAKE_ATTEMPT)(
        keys=list(_login_failure_keys(rt, email)),
        args=[
            rt.settings.login_max_failures,
            rt.settings.login_lockout_base_seconds,
            _LOCKOUT_CAP_SECONDS,
            _FAILURE_WINDOW_SECONDS,
        ],
    )
    if not allowed:
        raise TooManyRequests(
            "Too many failed sign-in attempts; try again later",
            code="too_many_attempts",
            headers={"Retry-After": str(int(value))},
        )


async def clear_password_failures(rt: UsersRuntime, email: str) -> None:
    """End the backoff for `email`: after the right password, or a completed password reset."""
    await rt.redis.delete(*_login_failure_keys(rt, email))


async def password_grant(
    uow: UnitOfWork,
    rt: UsersRuntime,
    *,
    email: str,
    password: str,
    device_id: str | None,
    scope: str | None,
    client: ClientContext,
) -> TokenGrant:
    """Same answer and the same work for an unknown email as for a wrong password."""
    await take_password_attempt(rt, email)
    conn = await uow.connection()
    user = await accounts_store.find_user_by_email(conn, email)
    ok = await rt.verify_password(user.password_hash if user else None, password)
    if not ok or user is None:
        raise invalid_grant("The email or password is not correct")
    await clear_password_failures(rt, email)  # the right password ends the backoff
    if user.status != "active":
        raise cannot_sign_in(user.status)
    device = None
    if device_id is not None:
        device = (
            await store.get_device(conn, user.id, device_id)
            if is_valid_id(device_id, "dev")
            else None
        )
        if device is None:
            raise invalid_grant("Unknown device")
    if user.two_factor_enabled:
        mfa_token = secrets.token_urlsafe(32)
        await rt.redis.set(
            rt.key("mfa-pending", mfa_token),
            json.dumps({"user_id": user.id, "device_id": device_id, "scope": scope}),
            ex=MFA_TOKEN_TTL_SECONDS,
        )
        raise mfa_required(mfa_token)
    return await open_session(
        uow, rt, user=user, device=device, method="pwd", scope=scope, client=client
    )


async def take_mfa_pending(rt: UsersRuntime, mfa_token: str) -> dict[str, Any]:
    """The sign-in waiting for its second factor (kept until the factor succeeds or expires)."""
    raw = await rt.redis.get(rt.key("mfa-pending", mfa_token))
    if raw is None:
        raise invalid_grant("The mfa_token is unknown or expired; sign in again")
    return dict(json.loads(raw))


async def finish_mfa_sign_in(
    uow: UnitOfWork,
    rt: UsersRuntime,
    *,
    mfa_token: str,
    pending: dict[str, Any],
    client: ClientContext,
) -> TokenGrant:
    """Open the session once the second factor has been checked; the mfa_token is spent."""
    if not await rt.redis.delete(rt.key("mfa-pending", mfa_token)):
        raise invalid_grant("The mfa_token was already used; sign in again")
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, pending["user_id"])
    if user is None or user.status != "active":
        raise cannot_sign_in(user.status if user else None)
    device = None
    if pending.get("device_id"):
        device = await store.get_device(conn, user.id, pending["device_id"])
        if device is None:
            raise invalid_grant("Unknown device")
    return await open_session(
        uow,
        rt,
        user=user,
        device=device,
        method="mfa",
        scope=pending.get("scope"),
        client=client,
    )


# --- refresh grant: rotation with reuse detection --------------------------------------------------


async def refresh_grant(
    uow: UnitOfWork, rt: UsersRuntime, *, refresh_token: str, scope: str | None
) -> TokenGrant:
    """Rotate: the presented token is spent, a new one is returned. Presenting a spent token
    again means it leaked: the whole session (the token family) is revoked."""
    conn = await uow.connection()
    token_hash = _token_hash(refresh_token)
    row = await store.take_refresh_token(conn, token_hash)
    now = utcnow()
    if row is None:
        raise invalid_grant("The refresh token is not valid")
    if row.used_at is not None:
        await uow.rollback()
        async with uow.engine.begin() as side:  # must outlive this failing request
            revoked = await store.revoke_sessions(
                side, user_id=row.user_id, session_id=row.id, now=now, reason="refresh_token_reuse"
            )
            await events.publish(
                side, events.REFRESH_TOKEN_REUSED, row.user_id, {"session_id": row.id}
            )
        await rt.tokens.revoke_sessions(revoked)
        raise invalid_grant("The refresh token was already used; the session has been revoked")
    if row.user_status == "locked":  # its sessions were revoked with the lock: say why
        raise account_locked()
    if row.revoked_at is not None or row.expires_at <= now or row.token_expires_at <= now:
        raise invalid_grant("The session has ended; sign in again")
    if row.user_status != "active":
        raise cannot_sign_in(row.user_status)
    scopes = _narrow(list(row.scopes), scope)
    await store.mark_refresh_token_used(conn, token_hash, now)
    new_refresh = secrets.token_urlsafe(32)
    await store.insert_refresh_token(
        conn,
        _token_hash(new_refresh),
        row.id,
        now,
        min(row.expires_at, now + timedelta(seconds=rt.settings.refresh_token_ttl_seconds)),
    )
    await store.touch_session(conn, row.id, now)
    access, ttl = await rt.tokens.issue(
        user_id=row.user_id,
        session_id=row.id,
        scopes=scopes,
        role=row.role,
        device_id=row.device_id,
        auth_method=row.auth_method,
        # A refresh is not a fresh sign-in: "recent authentication" stays the session's start.
        extra={"auth_time": int(row.created_at.timestamp())},
    )
    return TokenGrant(access, ttl, new_refresh, " ".join(scopes), row.id)


# --- device signature ("biometric") ---------------------------------------------------------------


def b64url_decode(value: str) -> bytes | None:
    """base64url with or without padding; None when it is not."""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


def login_message(challenge_id: str, nonce: str) -> bytes:
    """What the device signs with its enrolled key after the local biometric check."""
    return f"billfold-device-login:{challenge_id}:{nonce}".encode()


async def create_device_challenge(
    rt: UsersRuntime, device_id: str, purpose: str = "login"
) -> dict[str, Any]:
    """A single-use nonce for a device to sign. Issued for any device id, so it reveals nothing."""
    challenge_id = secrets.token_urlsafe(16)
    nonce = secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(seconds=CHALLENGE_TTL_SECONDS)
    await rt.redis.set(
        rt.key("device-challenge", challenge_id),
        json.dumps({"device_id": device_id, "nonce": nonce, "purpose": purpose}),
        ex=CHALLENGE_TTL_SECONDS,
    )
    return {
        "challenge_id": challenge_id,
        "nonce": nonce,
        "expires_at": expires_at,
        "signing_input": login_message(challenge_id, nonce).decode(),
    }


def verify_device_signature(public_key_pem: str, message: bytes, signature: bytes) -> bool:
    """ECDSA P-256/SHA-256; DER (Secure Enclave, Android Keystore) or raw r||s (WebCrypto)."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    if len(signature) == 64 and signature[0] != 0x30:
        signature = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


async def consume_device_challenge(
    rt: UsersRuntime, challenge_id: str, device_id: str, purpose: str
) -> str:
    """Take the challenge (single use) and return its nonce, or fail."""
    raw = await rt.redis.getdel(rt.key("device-challenge", challenge_id))
    if raw is None:
        raise invalid_grant("The challenge is unknown, used or expired")
    data = json.loads(raw)
    if data["device_id"] != device_id or data["purpose"] != purpose:
        raise invalid_grant("The challenge does not belong to this device")
    return str(data["nonce"])


async def device_signature_grant(
    uow: UnitOfWork,
    rt: UsersRuntime,
    *,
    device_id: str,
    challenge_id: str,
    signature: str,
    scope: str | None,
    client: ClientContext,
) -> TokenGrant:
    nonce = await consume_device_challenge(rt, challenge_id, device_id, "login")
    conn = await uow.connection()
    device = (
        await store.get_device_any_owner(conn, device_id) if is_valid_id(device_id, "dev") else None
    )
    if device is None or not device.public_key:
        raise invalid_grant("This device cannot sign in with a device key")
    raw_signature = b64url_decode(signature)
    if raw_signature is None:
        raise invalid_grant("The signature is not valid base64url")
    if not verify_device_signature(
        device.public_key, login_message(challenge_id, nonce), raw_signature
    ):
        raise invalid_grant("The device signature does not verify")
    user = await accounts_store.get_user(conn, device.user_id)
    if user is None or user.status != "active":
        raise cannot_sign_in(user.status if user else None)
    return await open_session(
        uow, rt, user=user, device=device, method="device", scope=scope, client=client
    )


# --- sessions -------------------------------------------------------------------------------------


async def revoke_session(
    uow: UnitOfWork, rt: UsersRuntime, user_id: str, session_id: str, reason: str = "user_revoked"
) -> None:
    if not is_valid_id(session_id, "ses"):
        raise NotFound("No such session")
    conn = await uow.connection()
    now = utcnow()
    session = await store.get_session(conn, user_id, session_id)
    if session is None or session.revoked_at is not None or session.expires_at <= now:
        raise NotFound("No such session")
    await revoke_user_sessions(uow, rt, user_id, reason, session_id=session_id, now=now)


async def revoke_user_sessions(
    uow: UnitOfWork,
    rt: UsersRuntime,
    user_id: str,
    reason: str,
    *,
    session_id: str | None = None,
    keep_session: str | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Revoke the user's live sessions (one, or all but `keep_session`; refresh tokens die with
    them), announce each, and deny their live access tokens once the change is committed."""
    conn = await uow.connection()
    revoked = await store.revoke_sessions(
        conn,
        user_id=user_id,
        session_id=session_id,
        keep_session=keep_session,
        now=now or utcnow(),
        reason=reason,
    )
    for sid in revoked:
        await events.publish(
            conn, events.SESSION_REVOKED, user_id, {"session_id": sid, "reason": reason}
        )
    deny_tokens_after_commit(uow, rt, revoked)
    return revoked


def deny_tokens_after_commit(uow: UnitOfWork, rt: UsersRuntime, session_ids: list[str]) -> None:
    """The live access tokens of revoked sessions stop working once the revocation commits."""

    async def deny_tokens() -> None:
        await rt.tokens.revoke_sessions(session_ids)

    uow.after_commit(deny_tokens)
