"""Locking an account: no sign-in of any kind, every session and refresh token revoked, and the
live access tokens of those sessions denied at the edge; unlocking lets the owner sign in again.

A lock is a security measure other services take (the Fraud Service's lock policy, an
administrator): it writes `users.users.status = 'locked'`, a `billfold.users.session.revoked`
event per session it ends and one `billfold.users.account.locked` event (the audit record: who,
why), in the caller's transaction. Access tokens are denied through the same Redis list as any
revoked session (checked by the edge on every request, no extra round trip); the caller denies
them once its transaction commits (`deny_access_tokens`)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.config import Settings
from billfold.platform.clock import utcnow
from billfold.platform.errors import NotFound, ProblemError
from billfold.users import events
from billfold.users.store import accounts as accounts_store
from billfold.users.store import sessions as sessions_store
from billfold.users.tokens import deny_sessions

# The reason a locked account's sessions carry (`revoke_reason`, the session.revoked event).
SESSION_REVOKE_REASON = "account_locked"


class AccountNotFound(NotFound):
    code = "user_not_found"


def account_locked() -> ProblemError:
    """The answer to any sign-in (password, refresh, device key, passkey, second factor) of a
    locked account. Given only after the credential itself checked out, so it tells nothing to
    someone who does not hold one."""
    return ProblemError(
        "This account is locked; contact support",
        status=403,
        code="account_locked",
        title="Account locked",
        extra={"error": "account_locked"},
    )


@dataclass(frozen=True, slots=True)
class LockChange:
    """What a lock or unlock did: `changed` is False when the account was already in that
    state (nothing written); `revoked_sessions` are the sessions a lock ended."""

    user_id: str
    status: str
    changed: bool
    revoked_sessions: tuple[str, ...] = ()


async def lock_account(
    conn: AsyncConnection, user_id: str, *, reason: str, by: str | None = None
) -> LockChange:
    """Lock `user_id` in the caller's transaction: status `locked`, every live session (and its
    refresh tokens) revoked with a session.revoked event each, and `billfold.users.account.locked`
    with `reason` and `by` (an administrator's id, None for a policy). Idempotent: an account
    already locked (or closed) is left as it is. Deny the revoked sessions' access tokens after
    the commit (`deny_access_tokens`)."""
    user = await accounts_store.get_user(conn, user_id, for_update=True)
    if user is None:
        raise AccountNotFound("No such user")
    if user.status != "active":
        return LockChange(user_id, str(user.status), changed=False)
    now = utcnow()
    await accounts_store.update_user(conn, user_id, {"status": "locked"}, now)
    revoked = await sessions_store.revoke_sessions(
        conn, user_id=user_id, now=now, reason=SESSION_REVOKE_REASON
    )
    for sid in revoked:
        await events.publish(
            conn,
            events.SESSION_REVOKED,
            user_id,
            {"session_id": sid, "reason": SESSION_REVOKE_REASON},
        )
    await events.publish(
        conn,
        events.ACCOUNT_LOCKED,
        user_id,
        {"reason": reason, "by": by, "revoked_sessions": len(revoked)},
    )
    return LockChange(user_id, "locked", changed=True, revoked_sessions=tuple(revoked))


async def unlock_account(
    conn: AsyncConnection, user_id: str, *, reason: str, by: str | None = None
) -> LockChange:
    """Unlock a locked account (status `active`) with `billfold.users.account.unlocked`. The
    owner signs in again: the sessions the lock ended stay ended. An account that is not locked
    is left as it is (a closed one is never reopened here)."""
    user = await accounts_store.get_user(conn, user_id, for_update=True)
    if user is None:
        raise AccountNotFound("No such user")
    if user.status != "locked":
        return LockChange(user_id, str(user.status), changed=False)
    await accounts_store.update_user(conn, user_id, {"status": "active"}, utcnow())
    await events.publish(conn, events.ACCOUNT_UNLOCKED, user_id, {"reason": reason, "by": by})
    return LockChange(user_id, "active", changed=True)


async def account_status(conn: AsyncConnection, user_id: str) -> str | None:
    """`active`, `locked` or `closed`; None for no such user."""
    user = await accounts_store.get_user(conn, user_id)
    return None if user is None else str(user.status)


async def deny_access_tokens(redis: Redis, settings: Settings, change: LockChange) -> None:
    """Make the live access tokens of the sessions a lock ended fail at the edge at once (they
    would otherwise work until they expire, at most `access_token_ttl_seconds`)."""
    await deny_sessions(redis, settings, list(change.revoked_sessions))
