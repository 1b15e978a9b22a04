"""Sessions, their rotating refresh tokens, and devices."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

_SESSION_COLUMNS = (
    "s.id, s.user_id, s.device_id, s.auth_method, s.scopes, s.ip, s.user_agent, s.created_at, "
    "s.last_used_at, s.expires_at, s.revoked_at, s.revoke_reason"
)
_DEVICE_COLUMNS = (
    "id, user_id, name, platform, push_token, public_key, attestation, scopes, created_at, "
    "last_seen_at, revoked_at"
)


async def insert_session(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(
        text(
            """
            INSERT INTO users.sessions (id, user_id, device_id, auth_method, scopes, ip, user_agent,
                created_at, last_used_at, expires_at)
            VALUES (:id, :user_id, :device_id, :auth_method, :scopes, :ip, :user_agent, :now, :now,
                :expires_at)
            """
        ),
        values,
    )


async def insert_refresh_token(
    conn: AsyncConnection, token_hash: bytes, session_id: str, now: datetime, expires_at: datetime
) -> None:
    await conn.execute(
        text(
            "INSERT INTO users.refresh_tokens (token_hash, session_id, created_at, expires_at) "
            "VALUES (:h, :sid, :now, :exp)"
        ),
        {"h": token_hash, "sid": session_id, "now": now, "exp": expires_at},
    )


async def take_refresh_token(conn: AsyncConnection, token_hash: bytes) -> Row[Any] | None:
    """Lock a refresh token with its session (one redemption at a time per token), and share-lock
    the user so that the status read is the committed one of a lock or unlock in flight."""
    return (
        await conn.execute(
            text(
                f"""
                SELECT r.token_hash, r.expires_at AS token_expires_at, r.used_at, {_SESSION_COLUMNS},
                       u.role, u.status AS user_status
                FROM users.refresh_tokens r
                JOIN users.sessions s ON s.id = r.session_id
                JOIN users.users u ON u.id = s.user_id
                WHERE r.token_hash = :h
                FOR UPDATE OF r, s FOR SHARE OF u
                """
            ),
            {"h": token_hash},
        )
    ).first()


async def mark_refresh_token_used(conn: AsyncConnection, token_hash: bytes, now: datetime) -> None:
    await conn.execute(
        text("UPDATE users.refresh_tokens SET used_at = :now WHERE token_hash = :h"),
        {"h": token_hash, "now": now},
    )


async def touch_session(conn: AsyncConnection, session_id: str, now: datetime) -> None:
    await conn.execute(
        text("UPDATE users.sessions SET last_used_at = :now WHERE id = :id"),
        {"id": session_id, "now": now},
    )


async def revoke_sessions(
    conn: AsyncConnection,
    *,
    user_id: str,
    now: datetime,
    reason: str,
    session_id: str | None = None,
    device_id: str | None = None,
    keep_session: str | None = None,
) -> list[str]:
    """Revoke live sessions of a user (one, a device's, or all but `keep_session`); returns
    their ids."""
    rows = (
        await conn.execute(
            text(
                """
                UPDATE users.sessions SET revoked_at = :now, revoke_reason = :reason
                WHERE user_id = :uid AND revoked_at IS NULL
                  AND (CAST(:sid AS text) IS NULL OR id = :sid)
                  AND (CAST(:did AS text) IS NULL OR device_id = :did)
                  AND (CAST(:keep AS text) IS NULL OR id <> :keep)
                RETURNING id
                """
            ),
            {
                "uid": user_id,
                "now": now,
                "reason": reason,
                "sid": session_id,
                "did": device_id,
                "keep": keep_session,
            },
        )
    ).all()
    return [r.id for r in rows]


async def list_sessions(
    conn: AsyncConnection, user_id: str, now: datetime, limit: int, after: str | None
) -> list[Row[Any]]:
    return await fetch_page(
        conn,
        f"SELECT {_SESSION_COLUMNS} FROM users.sessions s "
        "WHERE s.user_id = :uid AND s.revoked_at IS NULL AND s.expires_at > :now",
        {"uid": user_id, "now": now},
        limit=limit,
        after=after,
        key="s.id",
    )


async def get_session(conn: AsyncConnection, user_id: str, session_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {_SESSION_COLUMNS} FROM users.sessions s WHERE s.id = :id AND s.user_id = :uid"
            ),
            {"id": session_id, "uid": user_id},
        )
    ).first()


async def insert_device(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(
        text(
            """
            INSERT INTO users.devices (id, user_id, name, platform, push_token, public_key,
                attestation, scopes, created_at)
            VALUES (:id, :user_id, :name, :platform, :push_token, :public_key,
                CAST(:attestation AS jsonb), :scopes, :now)
            """
        ),
        values,
    )


async def get_device(
    conn: AsyncConnection, user_id: str, device_id: str, *, live_only: bool = True
) -> Row[Any] | None:
    live = " AND revoked_at IS NULL" if live_only else ""
    return (
        await conn.execute(
            text(
                f"SELECT {_DEVICE_COLUMNS} FROM users.devices WHERE id = :id AND user_id = :uid{live}"
            ),
            {"id": device_id, "uid": user_id},
        )
    ).first()


async def get_device_any_owner(conn: AsyncConnection, device_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {_DEVICE_COLUMNS} FROM users.devices WHERE id = :id AND revoked_at IS NULL"
            ),
            {"id": device_id},
        )
    ).first()


async def list_devices(
    conn: AsyncConnection, user_id: str, limit: int, after: str | None
) -> list[Row[Any]]:
    return await fetch_page(
        conn,
        f"SELECT {_DEVICE_COLUMNS} FROM users.devices WHERE user_id = :uid AND revoked_at IS NULL",
        {"uid": user_id},
        limit=limit,
        after=after,
    )


async def update_device(conn: AsyncConnection, device_id: str, changes: dict[str, Any]) -> None:
    if not changes:
        return
    sets = ", ".join(f"{c} = :{c}" for c in changes)
    await conn.execute(
        text(f"UPDATE users.devices SET {sets} WHERE id = :id"), {**changes, "id": device_id}
    )


async def revoke_device(conn: AsyncConnection, device_id: str, now: datetime) -> None:
    await conn.execute(
        text("UPDATE users.devices SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL"),
        {"id": device_id, "now": now},
    )


async def push_devices(conn: AsyncConnection, user_id: str) -> list[Row[Any]]:
    """The user's live devices that registered a push token, oldest first."""
    result = await conn.execute(
        text(
            "SELECT id, platform, push_token FROM users.devices WHERE user_id = :uid "
            "AND revoked_at IS NULL AND push_token IS NOT NULL ORDER BY id"
        ),
        {"uid": user_id},
    )
    return list(result.all())


async def forget_push_token(conn: AsyncConnection, device_id: str, push_token: str) -> bool:
    """Clear a device's push token if it is still `push_token` (a newer one is kept)."""
    result = await conn.execute(
        text(
            "UPDATE users.devices SET push_token = NULL WHERE id = :id AND push_token = :token "
            "RETURNING id"
        ),
        {"id": device_id, "token": push_token},
    )
    return result.first() is not None
