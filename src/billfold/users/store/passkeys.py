"""WebAuthn credentials (passkeys) in `users.webauthn_credentials`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

_COLUMNS = (
    "id, user_id, credential_id, public_key, sign_count, transports, name, created_at, last_used_at"
)


async def insert_credential(conn: AsyncConnection, values: dict[str, Any]) -> bool:
    """False when this authenticator credential is already registered (to anyone)."""
    row = (
        await conn.execute(
            text(
                """
                INSERT INTO users.webauthn_credentials (id, user_id, credential_id, public_key,
                    sign_count, transports, name, created_at)
                VALUES (:id, :user_id, :credential_id, :public_key, :sign_count, :transports,
                    :name, :now)
                ON CONFLICT (credential_id) DO NOTHING
                RETURNING id
                """
            ),
            values,
        )
    ).first()
    return row is not None


async def get_credential(conn: AsyncConnection, user_id: str, passkey_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {_COLUMNS} FROM users.webauthn_credentials "
                "WHERE id = :id AND user_id = :uid"
            ),
            {"id": passkey_id, "uid": user_id},
        )
    ).first()


async def find_by_credential_id(
    conn: AsyncConnection, credential_id: bytes, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(
                f"SELECT {_COLUMNS} FROM users.webauthn_credentials "
                f"WHERE credential_id = :cid{lock}"
            ),
            {"cid": credential_id},
        )
    ).first()


async def list_credentials(
    conn: AsyncConnection, user_id: str, limit: int | None = None, after: str | None = None
) -> list[Row[Any]]:
    return await fetch_page(
        conn,
        f"SELECT {_COLUMNS} FROM users.webauthn_credentials WHERE user_id = :uid",
        {"uid": user_id},
        limit=limit,
        after=after,
    )


async def record_use(
    conn: AsyncConnection, passkey_id: str, sign_count: int, now: datetime
) -> None:
    await conn.execute(
        text(
            "UPDATE users.webauthn_credentials SET sign_count = :count, last_used_at = :now "
            "WHERE id = :id"
        ),
        {"id": passkey_id, "count": sign_count, "now": now},
    )


async def delete_credential(conn: AsyncConnection, user_id: str, passkey_id: str) -> bool:
    row = (
        await conn.execute(
            text(
                "DELETE FROM users.webauthn_credentials WHERE id = :id AND user_id = :uid "
                "RETURNING id"
            ),
            {"id": passkey_id, "uid": user_id},
        )
    ).first()
    return row is not None
