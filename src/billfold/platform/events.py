"""CloudEvents 1.0 envelopes written to the transactional outbox in the caller's transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.clock import rfc3339, utcnow
from billfold.platform.ids import new_id

OUTBOX_CHANNEL = "billfold_outbox"

# One round trip: the row and the wake-up. NOTIFY is transactional, so listeners hear it only
# after commit (and several in one transaction fold into one).
_INSERT = text(
    """
    WITH added AS (
        INSERT INTO platform.outbox (id, type, source, subject, aggregate_id, time, data)
        VALUES (:id, :type, :source, :subject, :aggregate_id, :time, CAST(:data AS jsonb))
        RETURNING seq
    )
    SELECT pg_notify(:channel, '') FROM added
    """
)


@dataclass(frozen=True)
class Event:
    """A CloudEvents 1.0 event (`specversion` 1.0, JSON data)."""

    type: str
    source: str
    subject: str
    data: dict[str, Any]
    id: str = field(default_factory=lambda: new_id("evt"))
    time: datetime = field(default_factory=utcnow)
    aggregate_id: str | None = None

    def envelope(self) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "subject": self.subject,
            "time": rfc3339(self.time),
            "datacontenttype": "application/json",
            "data": self.data,
        }


async def record_event(conn: AsyncConnection, event: Event) -> Event:
    """Add `event` to the outbox inside the current transaction; it is published only if it commits."""
    await conn.execute(
        _INSERT,
        {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "subject": event.subject,
            "aggregate_id": event.aggregate_id or event.subject,
            "time": event.time,
            "data": json.dumps(event.data, separators=(",", ":"), default=str),
            "channel": OUTBOX_CHANNEL,
        },
    )
    return event
