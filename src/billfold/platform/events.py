"""CloudEvents 1.0 envelopes written to the transactional outbox in the caller's transaction."""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.platform.clock import rfc3339, utcnow
from billfold.platform.ids import new_id
from billfold.platform.observability import get_logger

log = get_logger("billfold.platform.events")

OUTBOX_CHANNEL = "billfold_outbox"
# Set on a connection that wrote to the outbox in its current transaction (see `outbox_written`).
_WRITTEN = "billfold.outbox_written"

_INSERT = text(
    """
    INSERT INTO platform.outbox (id, type, source, subject, aggregate_id, time, data)
    VALUES (:id, :type, :source, :subject, :aggregate_id, :time, CAST(:data AS jsonb))
    """
)
# Its own tiny transaction, after the business commit: a NOTIFY inside the business
# transaction would take PostgreSQL's global notify-queue lock at pre-commit and hold it through
# the WAL flush, so every transfer would commit one at a time (see docs/performance.md).
_NOTIFY = text("SELECT pg_notify(:channel, '')")
# Commits that land within this window share one wake-up.
_WAKE_COALESCE_SECONDS = 0.005


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
        },
    )
    conn.info[_WRITTEN] = True
    return event


def outbox_written(conn: AsyncConnection) -> bool:
    """Whether `conn`'s current transaction recorded an event; resets the mark (call it once,
    when the transaction ends, so a pooled connection does not carry it to its next user)."""
    return bool(conn.info.pop(_WRITTEN, False))


class _RelayWakeup:
    """At most one pending NOTIFY per engine: a burst of commits wakes the relay once."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self) -> None:
        if self._pending:
            return
        self._pending = True
        task = asyncio.get_running_loop().create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        try:
            await asyncio.sleep(_WAKE_COALESCE_SECONDS)
        finally:
            # Cleared before the NOTIFY is sent: a commit that lands while it is on its way
            # asks for another one rather than being covered by a wake-up that may precede it.
            self._pending = False
        try:
            async with self._engine.connect() as conn:
                await conn.execute(_NOTIFY, {"channel": OUTBOX_CHANNEL})
                await conn.commit()
        except Exception as exc:  # the relay's poll delivers the events anyway, only later
            log.warning("outbox wake-up failed", error=type(exc).__name__)


_wakeups: weakref.WeakKeyDictionary[AsyncEngine, _RelayWakeup] = weakref.WeakKeyDictionary()


def wake_relay(engine: AsyncEngine) -> None:
    """Tell the outbox relay (in any process) that committed events are waiting. Best effort and
    asynchronous: a lost wake-up only delays delivery until the relay's next poll."""
    wakeup = _wakeups.get(engine)
    if wakeup is None:
        wakeup = _wakeups[engine] = _RelayWakeup(engine)
    wakeup.request()
