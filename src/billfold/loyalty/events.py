"""Events the Loyalty Service publishes (`billfold.loyalty.*`), all keyed by the member's user
id so a user's point events are published in the order they happened, and the types of the
events it consumes (by type string: it imports neither transactions nor p2p)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/loyalty"

POINTS_EARNED = "billfold.loyalty.points.earned"
POINTS_REVERSED = "billfold.loyalty.points.reversed"
POINTS_REDEEMED = "billfold.loyalty.points.redeemed"
POINTS_EXPIRED = "billfold.loyalty.points.expired"
# Its data is {user_id, from_tier, to_tier, multiplier}: notifications tell the user.
TIER_CHANGED = "billfold.loyalty.tier.changed"

# What it listens to.
PAYMENT_CAPTURED = "billfold.transactions.payment.captured"
PAYMENT_REFUNDED = "billfold.transactions.payment.refunded"


async def publish(conn: AsyncConnection, type_: str, user_id: str, data: dict[str, Any]) -> Event:
    """Write a loyalty event about `user_id` to the outbox in the caller's transaction."""
    return await record_event(
        conn,
        Event(type=type_, source=SOURCE, subject=user_id, aggregate_id=user_id, data=data),
    )
