"""SQL of p2p.transfers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, execute_with_event, with_event
from billfold.platform.ids import is_valid_id
from billfold.platform.pagination import fetch_page

COLUMNS = (
    "id, sender_id, sender_name, recipient_id, recipient_name, recipient_kind, recipient_hint, "
    "amount, currency, note, status, failure_reason, request_id, posting_id, hold_id, "
    "claim_expires_at, limit_day, limit_month, created_at, updated_at, completed_at"
)

# The new transfer and its first event, in one round trip.
_INSERT = with_event(
    f"""
    INSERT INTO p2p.transfers (
        id, sender_id, sender_name, recipient_id, recipient_name, recipient_kind,
        recipient_contact_hash, recipient_contact_sealed, recipient_hint, amount, currency, note,
        status, request_id,
        posting_id, hold_id, claim_expires_at, limit_day, limit_month,
        completed_at, created_at, updated_at)
    VALUES (
        :id, :sender_id, :sender_name, :recipient_id, :recipient_name, :recipient_kind,
        :recipient_contact_hash, :recipient_contact_sealed, :recipient_hint, :amount, :currency,
        :note, :status, :request_id,
        :posting_id, :hold_id, :claim_expires_at, :limit_day, :limit_month,
        CASE WHEN :status = 'completed' THEN now() END, now(), now())
    RETURNING {COLUMNS}
    """
)
_GET_VISIBLE = text(
    f"""
    SELECT {COLUMNS} FROM p2p.transfers
    WHERE id = :id AND (sender_id = :user_id OR recipient_id = :user_id)
    """
)
_GET_FOR_UPDATE = text(f"SELECT {COLUMNS} FROM p2p.transfers WHERE id = :id FOR UPDATE")
_SET_STATUS = text(
    f"""
    UPDATE p2p.transfers SET
        status = :status,
        recipient_id = coalesce(:recipient_id, recipient_id),
        recipient_name = coalesce(:recipient_name, recipient_name),
        posting_id = coalesce(:posting_id, posting_id),
        failure_reason = coalesce(:failure_reason, failure_reason),
        claim_expires_at = coalesce(:claim_expires_at, claim_expires_at),
        completed_at = CASE WHEN :status = 'completed' THEN now() ELSE completed_at END,
        updated_at = now()
    WHERE id = :id
    RETURNING {COLUMNS}
    """
)


@dataclass(frozen=True)
class TransferFilters:
    status: str | None = None
    direction: str | None = None
    counterparty_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    amount_min: int | None = None
    amount_max: int | None = None
    currency: str | None = None


async def insert(conn: AsyncConnection, values: dict[str, Any], event: Event) -> Row[Any]:
    """Insert a transfer and record `event` (its first) with it."""
    return (await execute_with_event(conn, _INSERT, values, event)).one()


async def get_visible(conn: AsyncConnection, transfer_id: str, user_id: str) -> Row[Any] | None:
    """The transfer if `user_id` sent or received it; None otherwise (others get a 404)."""
    if not is_valid_id(transfer_id, "p2p"):  # junk (a NUL would be a database error) is a 404
        return None
    return (await conn.execute(_GET_VISIBLE, {"id": transfer_id, "user_id": user_id})).first()


async def sealed_contact(conn: AsyncConnection, transfer_id: str) -> bytes | None:
    sql = text("SELECT recipient_contact_sealed FROM p2p.transfers WHERE id = :id")
    value = (await conn.execute(sql, {"id": transfer_id})).scalar_one_or_none()
    return bytes(value) if value is not None else None


async def get_for_update(conn: AsyncConnection, transfer_id: str) -> Row[Any] | None:
    if not is_valid_id(transfer_id, "p2p"):
        return None
    return (await conn.execute(_GET_FOR_UPDATE, {"id": transfer_id})).first()


async def set_status(
    conn: AsyncConnection,
    transfer_id: str,
    status: str,
    *,
    recipient_id: str | None = None,
    recipient_name: str | None = None,
    posting_id: str | None = None,
    failure_reason: str | None = None,
    claim_expires_at: datetime | None = None,
) -> Row[Any]:
    params = {
        "id": transfer_id,
        "status": status,
        "recipient_id": recipient_id,
        "recipient_name": recipient_name,
        "posting_id": posting_id,
        "failure_reason": failure_reason,
        "claim_expires_at": claim_expires_at,
    }
    return (await conn.execute(_SET_STATUS, params)).one()


async def list_for_user(
    conn: AsyncConnection,
    user_id: str,
    filters: TransferFilters,
    *,
    limit: int,
    after: str | None,
) -> list[Row[Any]]:
    """Sent and received transfers of `user_id`, newest first, filtered."""
    direction = {
        "sent": "sender_id = :user_id",
        "received": "recipient_id = :user_id",
        None: "(sender_id = :user_id OR recipient_id = :user_id)",
    }[filters.direction]
    query = f"""
        SELECT {COLUMNS} FROM p2p.transfers
        WHERE {direction}
          AND (CAST(:status AS text) IS NULL OR status = :status)
          AND (CAST(:counterparty AS text) IS NULL
               OR (sender_id = :user_id AND recipient_id = :counterparty)
               OR (recipient_id = :user_id AND sender_id = :counterparty))
          AND (CAST(:created_from AS timestamptz) IS NULL OR created_at >= :created_from)
          AND (CAST(:created_to AS timestamptz) IS NULL OR created_at < :created_to)
          AND (CAST(:amount_min AS bigint) IS NULL OR amount >= :amount_min)
          AND (CAST(:amount_max AS bigint) IS NULL OR amount <= :amount_max)
          AND (CAST(:currency AS text) IS NULL OR currency = :currency)
    """
    params = {
        "user_id": user_id,
        "status": filters.status,
        "counterparty": filters.counterparty_id,
        "created_from": filters.created_from,
        "created_to": filters.created_to,
        "amount_min": filters.amount_min,
        "amount_max": filters.amount_max,
        "currency": filters.currency,
    }
    return await fetch_page(conn, query, params, limit=limit + 1, after=after)


# --- claims: transfers waiting in escrow for the owner of a contact ----------------------------

# Plain FOR UPDATE (not SKIP LOCKED): a claim must not miss a transfer only because a cancel or
# another claim holds it for a moment; it waits, and the status is checked again on the row it
# then locks, so what was cancelled or claimed meanwhile drops out. Locked in id order, all before
# any ledger posting, so two claims never wait on each other in a cycle.
_LOCK_UNCLAIMED = text(
    f"""
    SELECT {COLUMNS} FROM p2p.transfers
    WHERE recipient_contact_hash = ANY(:hashes) AND status = 'pending_claim'
      AND sender_id <> :claimant
    ORDER BY id
    FOR UPDATE
    """
)
# One expired claim at a time, skipping those another worker holds (or that failed this run).
_LOCK_NEXT_EXPIRED_CLAIM = text(
    f"""
    SELECT {COLUMNS} FROM p2p.transfers
    WHERE status = 'pending_claim' AND claim_expires_at <= now() AND id <> ALL(:skip)
    ORDER BY claim_expires_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
    """
)


async def lock_unclaimed(
    conn: AsyncConnection, contact_hashes: list[bytes], claimant_id: str
) -> list[Row[Any]]:
    """Lock the `pending_claim` transfers addressed to any of `contact_hashes` that
    `claimant_id` did not send themselves, oldest first."""
    if not contact_hashes:
        return []
    params = {"hashes": contact_hashes, "claimant": claimant_id}
    return list((await conn.execute(_LOCK_UNCLAIMED, params)).all())


async def lock_next_expired_claim(conn: AsyncConnection, skip: list[str]) -> Row[Any] | None:
    """The unclaimed transfer longest past its deadline that nobody else is handling."""
    return (await conn.execute(_LOCK_NEXT_EXPIRED_CLAIM, {"skip": skip})).first()
