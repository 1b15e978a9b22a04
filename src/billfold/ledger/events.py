"""Events the ledger publishes (`billfold.ledger.*`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/ledger"

HOLD_EXPIRED = "billfold.ledger.hold.expired"
WALLET_TOPPED_UP = "billfold.ledger.wallet.topped_up"
WALLET_WITHDRAWN = "billfold.ledger.wallet.withdrawn"


async def publish(conn: AsyncConnection, type_: str, subject: str, data: dict[str, Any]) -> Event:
    return await record_event(
        conn, Event(type=type_, source=SOURCE, subject=subject, aggregate_id=subject, data=data)
    )
