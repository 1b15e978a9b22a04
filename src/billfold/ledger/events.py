"""Events the ledger publishes (`billfold.ledger.*`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/ledger"

# A hold passed its expiry and the sweeper released what remained of it.
HOLD_EXPIRED = "billfold.ledger.hold.expired"
# Money came into a wallet from outside (the funding account), and left it again.
WALLET_TOPPED_UP = "billfold.ledger.wallet.topped_up"
WALLET_WITHDRAWN = "billfold.ledger.wallet.withdrawn"


async def publish(
    conn: AsyncConnection,
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    aggregate_id: str | None = None,
) -> Event:
    """Write an event to the outbox in the caller's transaction. `aggregate_id` (default: the
    subject) is what the relay keeps in order: a wallet's events use the owner's id, so its
    top-ups and withdrawals are published in the order they happened."""
    return await record_event(
        conn,
        Event(
            type=type_,
            source=SOURCE,
            subject=subject,
            aggregate_id=aggregate_id or subject,
            data=data,
        ),
    )
