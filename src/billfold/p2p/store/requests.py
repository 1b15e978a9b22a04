"""SQL of p2p.transfer_requests (money requests)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

COLUMNS = (
    "id, requester_id, requester_name, payer_id, payer_name, payer_kind, payer_contact_hash, "
    "payer_hint, amount, currency, note, status, transfer_id, expires_at, created_at, "
    "updated_at, decided_at"
)

_INSERT = text(
    f"""
    INSERT INTO p2p.transfer_requests (
        id, requester_id, requester_name, payer_id, payer_name, payer_kind, payer_contact_hash,
        payer_hint, amount, currency, note, status, expires_at)
    VALUES (
        :id, :requester_id, :requester_name, :payer_id, :payer_name, :payer_kind,
        :payer_contact_hash, :payer_hint, :amount, :currency, :note, 'pending', :expires_at)
    RETURNING {COLUMNS}
    """
)
_GET = text(f"SELECT {COLUMNS} FROM p2p.transfer_requests WHERE id = :id")
_GET_FOR_UPDATE = text(f"SELECT {COLUMNS} FROM p2p.transfer_requests WHERE id = :id FOR UPDATE")
# Leaves `pending`. A payer found by contact is written down with the answer; the transfer id
# only on acceptance.
_DECIDE = text(
    f"""
    UPDATE p2p.transfer_requests SET
        status = :status,
        payer_id = coalesce(payer_id, :payer_id),
        payer_name = coalesce(payer_name, :payer_name),
        transfer_id = coalesce(:transfer_id, transfer_id),
        decided_at = now(),
        updated_at = now()
    WHERE id = :id AND status = 'pending'
    RETURNING {COLUMNS}
    """
)
# Back to pending when the transfer that paid it never arrived; the payer stays bound.
_REOPEN = text(
    f"""
    UPDATE p2p.transfer_requests SET
        status = 'pending', transfer_id = NULL, decided_at = NULL, updated_at = now()
    WHERE id = :id AND status = 'accepted' AND transfer_id = :transfer_id
    RETURNING {COLUMNS}
    """
)
# Pending requests addressed to a contact nobody had yet: they are the verified owner's now.
# `updated_at` stays: the requester sees it, and a request to a registered (verified) contact
# that changed a moment after it was made, unlike one to a contact nobody has, told them so.
_BIND_PAYER = text(
    """
    UPDATE p2p.transfer_requests SET payer_id = :user_id, payer_name = :name
    WHERE payer_id IS NULL AND status = 'pending' AND payer_contact_hash = ANY(:hashes)
      AND requester_id <> :user_id
    RETURNING id
    """
)
_EXPIRE = text(
    f"""
    UPDATE p2p.transfer_requests r SET status = 'expired', decided_at = now(), updated_at = now()
    FROM (
        SELECT id FROM p2p.transfer_requests
        WHERE status = 'pending' AND expires_at <= now()
        ORDER BY expires_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ) due
    WHERE r.id = due.id
    RETURNING {", ".join("r." + c.strip() for c in COLUMNS.split(","))}
    """
)
# Currencies that transfers are offered in at some KYC tier (a request is paid by a transfer).
# Who sees a request: its requester, its payer, and (before the payer is written down) the
# user who has the e-mail/phone it was addressed to verified, while it is pending.
_OUTGOING = "requester_id = :user_id"
_INCOMING = (
    "(payer_id = :user_id OR (payer_id IS NULL AND status = 'pending' "
    "AND payer_contact_hash = ANY(:hashes) AND requester_id <> :user_id))"
)


async def insert(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    return (await conn.execute(_INSERT, values)).one()


async def get(conn: AsyncConnection, request_id: str) -> Row[Any] | None:
    return (await conn.execute(_GET, {"id": request_id})).first()


async def get_for_update(conn: AsyncConnection, request_id: str) -> Row[Any] | None:
    return (await conn.execute(_GET_FOR_UPDATE, {"id": request_id})).first()


async def decide(
    conn: AsyncConnection,
    request_id: str,
    status: str,
    *,
    payer_id: str | None = None,
    payer_name: str | None = None,
    transfer_id: str | None = None,
) -> Row[Any]:
    """Move a pending request (locked by the caller) to `status`."""
    params = {
        "id": request_id,
        "status": status,
        "payer_id": payer_id,
        "payer_name": payer_name,
        "transfer_id": transfer_id,
    }
    return (await conn.execute(_DECIDE, params)).one()


async def reopen(conn: AsyncConnection, request_id: str, transfer_id: str) -> Row[Any] | None:
    """Reopen the request `transfer_id` paid (None if it is not that request's payment)."""
    params = {"id": request_id, "transfer_id": transfer_id}
    return (await conn.execute(_REOPEN, params)).first()


async def bind_payer(
    conn: AsyncConnection, user_id: str, name: str, contact_hashes: list[bytes]
) -> list[str]:
    """Make `user_id` the payer of the pending requests addressed to their verified contacts."""
    if not contact_hashes:
        return []
    params = {"user_id": user_id, "name": name, "hashes": contact_hashes}
    return list((await conn.execute(_BIND_PAYER, params)).scalars())


async def expire_due(conn: AsyncConnection, limit: int) -> list[Row[Any]]:
    """Expire up to `limit` pending requests past their deadline that no one else holds."""
    return list((await conn.execute(_EXPIRE, {"limit": limit})).all())


async def list_for_user(
    conn: AsyncConnection,
    user_id: str,
    contact_hashes: list[bytes],
    *,
    direction: str | None,
    status: str | None,
    limit: int,
    after: str | None,
) -> list[Row[Any]]:
    """Requests `user_id` made or is asked to pay, newest first (limit rows + 1)."""
    where = {
        "outgoing": _OUTGOING,
        "incoming": _INCOMING,
        None: f"({_OUTGOING} OR {_INCOMING})",
    }[direction]
    query = f"""
        SELECT {COLUMNS} FROM p2p.transfer_requests
        WHERE {where} AND (CAST(:status AS text) IS NULL OR status = :status)
    """
    params = {"user_id": user_id, "hashes": contact_hashes, "status": status}
    return await fetch_page(conn, query, params, limit=limit + 1, after=after)
