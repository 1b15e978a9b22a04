"""CloudEvents 1.0 envelopes written to the transactional outbox in the caller's transaction."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Result, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.platform.clock import rfc3339, utcnow
from billfold.platform.driver import DriverStatement
from billfold.platform.ids import new_id
from billfold.platform.observability import get_logger

log = get_logger("billfold.platform.events")

OUTBOX_CHANNEL = "billfold_outbox"
# Set on a connection that wrote to the outbox in its current transaction (see `outbox_written`).
_WRITTEN = "billfold.outbox_written"

_OUTBOX_INSERT = """
    INSERT INTO platform.outbox (id, type, source, subject, aggregate_id, time, data)
    VALUES (:{p}id, :{p}type, :{p}source, :{p}subject, :{p}aggregate_id, :{p}time,
            CAST(:{p}data AS jsonb))
"""
_INSERT = text(_OUTBOX_INSERT.format(p=""))
_WITH_PREFIX = "outbox_"
# The same row written only when the statement it rides with returned one (`with_event`'s
# `only_if_rows`): an INSERT … SELECT, whose parameters need their types spelled out.
_OUTBOX_INSERT_IF_ROWS = """
    INSERT INTO platform.outbox (id, type, source, subject, aggregate_id, time, data)
    SELECT CAST(:{p}id AS text), CAST(:{p}type AS text), CAST(:{p}source AS text),
           CAST(:{p}subject AS text), CAST(:{p}aggregate_id AS text),
           CAST(:{p}time AS timestamptz), CAST(:{p}data AS jsonb)
    WHERE EXISTS (SELECT 1 FROM main)
"""
# Its own tiny transaction, after the business commit: a NOTIFY inside the business
# transaction would take PostgreSQL's global notify-queue lock at pre-commit and hold it through
# the WAL flush, so every transfer would commit one at a time (see docs/performance.md).
_NOTIFY_RAW = f"NOTIFY {OUTBOX_CHANNEL}"
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


def _params(event: Event, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}id": event.id,
        f"{prefix}type": event.type,
        f"{prefix}source": event.source,
        f"{prefix}subject": event.subject,
        f"{prefix}aggregate_id": event.aggregate_id or event.subject,
        f"{prefix}time": event.time,
        f"{prefix}data": json.dumps(event.data, separators=(",", ":"), default=str),
    }


async def record_event(conn: AsyncConnection, event: Event) -> Event:
    """Add `event` to the outbox inside the current transaction; it is published only if it commits."""
    await conn.execute(_INSERT, _params(event))
    conn.info[_WRITTEN] = True
    return event


def with_event(statement: str, *, ctes: str = "", only_if_rows: bool = False) -> TextClause:
    """One data-modifying `statement` (with RETURNING) and an outbox insert as one SQL statement:
    a business row and its event in one round trip, both or neither. Run it with
    `execute_with_event`; the result is the statement's own RETURNING rows.

    `ctes` (`name AS (…), …`) come first, for a `statement` that reads what they wrote (two
    tables' rows and one event, still one statement). With `only_if_rows`, the event is written
    only if `statement` returned a row (a conditional UPDATE that found nothing writes none)."""
    outbox = _OUTBOX_INSERT_IF_ROWS if only_if_rows else _OUTBOX_INSERT
    # Composed from the callers' SQL constants, never from input.
    return text(
        f"WITH {ctes + ', ' if ctes else ''}main AS ({statement}), "  # noqa: S608
        f"event AS ({outbox.format(p=_WITH_PREFIX)}) "
        "SELECT * FROM main"
    )


async def execute_with_event(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any], event: Event
) -> Result[Any]:
    """Execute a `with_event` statement: `params` are the statement's, `event` goes to the outbox."""
    result = await conn.execute(statement, {**params, **_params(event, _WITH_PREFIX)})
    conn.info[_WRITTEN] = True
    return result


async def send_with_event(
    conn: AsyncConnection, statement: DriverStatement, params: dict[str, Any], event: Event
) -> None:
    """`execute_with_event` for a hot path that needs no result: a `with_event` statement
    compiled as a `DriverStatement`, sent on the driver's connection (same transaction)."""
    await statement.execute(conn, {**params, **_params(event, _WITH_PREFIX)})
    conn.info[_WRITTEN] = True


async def fetch_with_event(
    conn: AsyncConnection, statement: DriverStatement, params: dict[str, Any], event: Event
) -> Mapping[str, Any] | None:
    """`send_with_event` that answers the statement's first RETURNING row (a mapping, as
    `DriverStatement.fetchrow` decodes it), or None."""
    row = await statement.fetchrow(conn, {**params, **_params(event, _WITH_PREFIX)})
    conn.info[_WRITTEN] = True
    return row


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
                # On the driver's connection, outside any transaction: one round trip instead of
                # SQLAlchemy's BEGIN, statement, COMMIT (1.1 -> 0.3 ms of CPU per wake-up).
                raw = await conn.get_raw_connection()
                await raw.driver_connection.execute(_NOTIFY_RAW)  # type: ignore[union-attr]
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
