"""Users and their contact verifications."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

_USER_COLUMNS = (
    "u.id, u.email, u.phone, u.password_hash, u.name, u.handle, u.date_of_birth, u.country, "
    "u.address, u.locale, u.timezone, u.avatar_key, u.email_verified_at, u.phone_verified_at, "
    "u.kyc_status, u.kyc_tier, u.role, u.status, u.created_at, u.updated_at, "
    "(t.confirmed_at IS NOT NULL) AS two_factor_enabled"
)
_FROM = "FROM users.users u LEFT JOIN users.totp_factors t ON t.user_id = u.id"


async def insert_user(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any] | None:
    """Insert a user; None when the email, phone or handle is taken (unique indexes decide)."""
    row = (
        await conn.execute(
            text(
                """
                INSERT INTO users.users (id, email, phone, password_hash, name, handle,
                    date_of_birth, country, locale, timezone, role, created_at, updated_at)
                VALUES (:id, :email, :phone, :password_hash, :name, :handle, :date_of_birth,
                    :country, :locale, :timezone, :role, :now, :now)
                ON CONFLICT DO NOTHING
                RETURNING id
                """
            ),
            values,
        )
    ).first()
    return row


async def get_user(
    conn: AsyncConnection, user_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE OF u" if for_update else ""
    return (
        await conn.execute(
            text(f"SELECT {_USER_COLUMNS} {_FROM} WHERE u.id = :id{lock}"), {"id": user_id}
        )
    ).first()


async def share_lock_status(conn: AsyncConnection, user_id: str) -> str | None:
    """The user's status under a share lock held to the end of the transaction: it waits for a
    lock or unlock in flight (they take `FOR UPDATE`) and then reads what it committed, and a
    lock that comes later waits for this transaction (so it sees what it created)."""
    return (
        await conn.execute(
            text("SELECT status FROM users.users WHERE id = :id FOR SHARE"), {"id": user_id}
        )
    ).scalar_one_or_none()


async def find_user_by_email(conn: AsyncConnection, email: str) -> Row[Any] | None:
    return (
        await conn.execute(text(f"SELECT {_USER_COLUMNS} {_FROM} WHERE u.email = :e"), {"e": email})
    ).first()


async def contact_taken(
    conn: AsyncConnection,
    *,
    email: str | None,
    phone: str | None,
    handle: str | None,
    exclude_user: str | None = None,
) -> list[str]:
    """Which of these contact fields already belong to someone else."""
    row = (
        await conn.execute(
            text(
                """
                SELECT
                  bool_or(email = :email) AS email,
                  bool_or(phone = :phone) AS phone,
                  bool_or(lower(handle) = :handle) AS handle
                FROM users.users
                WHERE (email = :email OR phone = :phone OR lower(handle) = :handle)
                  AND id IS DISTINCT FROM :exclude
                """
            ),
            {"email": email, "phone": phone, "handle": handle, "exclude": exclude_user},
        )
    ).one()
    return [name for name in ("email", "phone", "handle") if getattr(row, name)]


async def update_user(
    conn: AsyncConnection, user_id: str, changes: dict[str, Any], now: datetime
) -> None:
    if not changes:
        return
    params = dict(changes)
    sets = []
    for column in changes:
        if column == "address":
            sets.append("address = CAST(:address AS jsonb)")
            params["address"] = (
                None if changes["address"] is None else json.dumps(changes["address"])
            )
        else:
            sets.append(f"{column} = :{column}")
    params.update({"id": user_id, "now": now})
    await conn.execute(
        text(f"UPDATE users.users SET {', '.join(sets)}, updated_at = :now WHERE id = :id"), params
    )


async def insert_verification(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(
        text(
            """
            INSERT INTO users.verifications (id, user_id, channel, target, code_hash, expires_at,
                created_at)
            VALUES (:id, :user_id, :channel, :target, :code_hash, :expires_at, :now)
            """
        ),
        values,
    )


async def get_verification(
    conn: AsyncConnection, user_id: str, verification_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(
                "SELECT id, user_id, channel, target, code_hash, attempts, expires_at, confirmed_at, "
                f"created_at FROM users.verifications WHERE id = :id AND user_id = :uid{lock}"
            ),
            {"id": verification_id, "uid": user_id},
        )
    ).first()


async def count_recent_verifications(conn: AsyncConnection, user_id: str, since: datetime) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "SELECT count(*) FROM users.verifications WHERE user_id = :uid AND created_at > :since"
                ),
                {"uid": user_id, "since": since},
            )
        ).scalar_one()
    )


async def spend_verification_attempt(
    conn: AsyncConnection, user_id: str, verification_id: str, max_attempts: int
) -> int | None:
    """Take one attempt of a pending verification; its new count, or None if none is left
    (spent, confirmed or expired). Atomic, so parallel guesses cannot exceed `max_attempts`."""
    return (
        await conn.execute(
            text(
                "UPDATE users.verifications SET attempts = attempts + 1 "
                "WHERE id = :id AND user_id = :uid AND attempts < :max "
                "AND confirmed_at IS NULL AND expires_at > now() RETURNING attempts"
            ),
            {"id": verification_id, "uid": user_id, "max": max_attempts},
        )
    ).scalar_one_or_none()


async def mark_verification_confirmed(
    conn: AsyncConnection, verification_id: str, confirmed_at: datetime
) -> bool:
    """Confirm once: False when it already was (a parallel request with the right code)."""
    row = (
        await conn.execute(
            text(
                "UPDATE users.verifications SET confirmed_at = :confirmed "
                "WHERE id = :id AND confirmed_at IS NULL RETURNING id"
            ),
            {"id": verification_id, "confirmed": confirmed_at},
        )
    ).first()
    return row is not None


async def replace_password_hash(
    conn: AsyncConnection, user_id: str, old_hash: str, new_hash: str, now: datetime
) -> bool:
    """Swap the password hash only if it is still `old_hash`: False when a concurrent change or
    reset got there first (the caller's check of the old password no longer holds)."""
    row = (
        await conn.execute(
            text(
                "UPDATE users.users SET password_hash = :new, updated_at = :now "
                "WHERE id = :id AND password_hash = :old RETURNING id"
            ),
            {"id": user_id, "old": old_hash, "new": new_hash, "now": now},
        )
    ).first()
    return row is not None


_PARTIES = text(
    """
    SELECT id, name, handle, status, kyc_tier, timezone, locale,
           CASE WHEN email_verified_at IS NOT NULL THEN email END AS verified_email,
           CASE WHEN phone_verified_at IS NOT NULL THEN phone END AS verified_phone,
           id = :subject AS is_subject,
           coalesce(id = :user_id OR email = :email OR phone = :phone
                    OR lower(handle) = lower(:handle), false) AS is_match
    FROM users.users
    WHERE id = :subject OR id = :user_id OR email = :email OR phone = :phone
       OR lower(handle) = lower(:handle)
    """
)


async def find_parties(
    conn: AsyncConnection,
    subject: str,
    *,
    user_id: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    handle: str | None = None,
) -> list[Row[Any]]:
    """The subject's row and the one found by one of the other keys, in one round trip."""
    params = {"subject": subject, "user_id": user_id, "email": email, "phone": phone}
    return list((await conn.execute(_PARTIES, {**params, "handle": handle})).all())
