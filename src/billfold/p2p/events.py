"""Events the P2P Transfer Service publishes (`billfold.p2p.*`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/p2p"

TRANSFER_PENDING = "billfold.p2p.transfer.pending"
TRANSFER_COMPLETED = "billfold.p2p.transfer.completed"
TRANSFER_FAILED = "billfold.p2p.transfer.failed"
TRANSFER_CANCELLED = "billfold.p2p.transfer.cancelled"
TRANSFER_PENDING_CLAIM = "billfold.p2p.transfer.pending_claim"
TRANSFER_EXPIRED = "billfold.p2p.transfer.expired"
TRANSFER_REVERSED = "billfold.p2p.transfer.reversed"

REQUEST_CREATED = "billfold.p2p.request.created"
REQUEST_ACCEPTED = "billfold.p2p.request.accepted"
REQUEST_DECLINED = "billfold.p2p.request.declined"
REQUEST_CANCELLED = "billfold.p2p.request.cancelled"
REQUEST_EXPIRED = "billfold.p2p.request.expired"
# The transfer that paid an accepted request never arrived (cancelled, refused on review, review
# expired): the request is pending again, for the payer to pay once more or decline.
REQUEST_REOPENED = "billfold.p2p.request.reopened"


def event(type_: str, aggregate_id: str, data: dict[str, Any]) -> Event:
    """A p2p event; the aggregate (transfer or request id) keys its order."""
    return Event(
        type=type_, source=SOURCE, subject=aggregate_id, aggregate_id=aggregate_id, data=data
    )


async def publish(
    conn: AsyncConnection, type_: str, aggregate_id: str, data: dict[str, Any]
) -> Event:
    """Record a p2p event in the caller's transaction."""
    return await record_event(conn, event(type_, aggregate_id, data))


def request_data(row: Row[Any], **extra: Any) -> dict[str, Any]:
    """The data of a `billfold.p2p.request.*` event."""
    return {
        "request_id": row.id,
        "status": row.status,
        "requester_id": row.requester_id,
        "payer_id": row.payer_id,
        "amount": row.amount,
        "currency": row.currency,
        "transfer_id": row.transfer_id,
        **extra,
    }
