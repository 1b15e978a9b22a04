"""TOTP factors (`users.totp_factors`): one per user, the seed sealed at rest."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

_COLUMNS = "user_id, secret, confirmed_at, last_used_step, created_at"


async def get_totp(
    conn: AsyncConnection, user_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(f"SELECT {_COLUMNS} FROM users.totp_factors WHERE user_id = :uid{lock}"),
            {"uid": user_id},
        )
    ).first()


async def put_pending_totp(
    conn: AsyncConnection, user_id: str, sealed_secret: bytes, now: datetime
) -> bool:
    """Start (or restart) an enrolment; False when a confirmed factor already exists."""
    row = (
        await conn.execute(
            text(
                """
                INSERT INTO users.totp_factors (user_id, secret, created_at)
                VALUES (:uid, :secret, :now)
                ON CONFLICT (user_id) DO UPDATE
                    SET secret = EXCLUDED.secret, created_at = EXCLUDED.created_at,
                        last_used_step = NULL
                    WHERE users.totp_factors.confirmed_at IS NULL
                RETURNING user_id
                """
            ),
            {"uid": user_id, "secret": sealed_secret, "now": now},
        )
    ).first()
    return row is not None


async def confirm_totp(conn: AsyncConnection, user_id: str, step: int, now: datetime) -> None:
    await conn.execute(
        text(
            "UPDATE users.totp_factors SET confirmed_at = :now, last_used_step = :step "
            "WHERE user_id = :uid"
        ),
        {"uid": user_id, "step": step, "now": now},
    )


async def record_totp_step(conn: AsyncConnection, user_id: str, step: int) -> None:
    """Remember the last time step used, so no code of that step (or earlier) works again."""
    await conn.execute(
        text("UPDATE users.totp_factors SET last_used_step = :step WHERE user_id = :uid"),
        {"uid": user_id, "step": step},
    )


async def delete_totp(conn: AsyncConnection, user_id: str) -> None:
    await conn.execute(
        text("DELETE FROM users.totp_factors WHERE user_id = :uid"), {"uid": user_id}
    )
