"""The embedded bus: relay the outbox with LISTEN/NOTIFY plus polling, in `seq` order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.platform.events import OUTBOX_CHANNEL
from billfold.platform.observability import Metrics, get_logger

log = get_logger(__name__)

Sink = Callable[[dict[str, Any]], Awaitable[None]]

_BATCH = text(
    """
    SELECT seq, id, type, source, subject, aggregate_id, time, data FROM platform.outbox
    WHERE published_at IS NULL ORDER BY seq LIMIT :limit FOR UPDATE SKIP LOCKED
    """
)
# Once delivered, a one-time code (verification, step-up) has no business staying in clear in
# the outbox: the published row keeps everything else, without `code`.
# One relay at a time per database when order across batches matters (see `exclusive`).
_ONE_RELAY = text("SELECT pg_try_advisory_xact_lock(hashtext('billfold.outbox_relay'))")
_MARK = text(
    "UPDATE platform.outbox SET published_at = now(), data = data - 'code' WHERE seq = ANY(:seqs)"
)


def envelope(row: Any) -> dict[str, Any]:
    """The CloudEvents envelope of an outbox row."""
    return {
        "specversion": "1.0",
        "id": row.id,
        "type": row.type,
        "source": row.source,
        "subject": row.subject,
        "time": row.time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": row.data,
    }


async def dev_log_sink(event: dict[str, Any]) -> None:
    """Development delivery: log the event (verification codes show up here, unredacted)."""
    data = event["data"]
    if event["type"].endswith(("verification.requested", "code_requested", "reset.requested")):
        # Printed on purpose: in development this log line *is* the SMS/email.
        print(
            f"[dev-sink] {data.get('channel')} code for {data.get('target')}: {data.get('code')}",
            flush=True,
        )
    log.info("event", type=event["type"], subject=event["subject"], id=event["id"])


class OutboxRelay:
    """Publishes committed outbox events to `sink`, at least once, in order."""

    # With several relays (worker replicas), SKIP LOCKED lets two of them publish consecutive
    # batches at once, so a later event of an aggregate can overtake an earlier one. An
    # exclusive relay publishes only while it holds a transaction-scoped advisory lock: the
    # others find it taken and wait for their next wake-up.
    exclusive = False

    def __init__(
        self,
        engine: AsyncEngine,
        database_url: str,
        sink: Sink,
        metrics: Metrics | None = None,
        poll_seconds: float = 1.0,
        batch: int = 200,
    ) -> None:
        self._engine = engine
        self._url = database_url
        self._sink = sink
        self._metrics = metrics
        self._poll = poll_seconds
        self._batch = batch
        self._wake = asyncio.Event()
        self._stopping = False

    async def relay_once(self) -> int:
        async with self._engine.begin() as conn:
            if self.exclusive and not (await conn.execute(_ONE_RELAY)).scalar():
                return 0
            rows = (await conn.execute(_BATCH, {"limit": self._batch})).all()
            if rows:
                await self.publish(rows)
                if self._metrics:
                    for row in rows:
                        self._metrics.events_published.labels(row.type).inc()
                # Marked in the transaction that holds the rows' locks, after the sink took them:
                # a crash before this commit publishes them again (at least once).
                await conn.execute(_MARK, {"seqs": [r.seq for r in rows]})
        return len(rows)

    async def publish(self, rows: Sequence[Any]) -> None:
        """Hand one batch of outbox rows (in `seq` order) to the bus; return once it has them.
        The embedded bus calls the sink per event; the Kafka relay overrides this."""
        for row in rows:
            await self._sink(envelope(row))

    async def run(self) -> None:
        listener = await self._listen()
        try:
            while not self._stopping:
                # Clear before the pass, not after: a NOTIFY that arrives during the pass
                # must trigger another pass instead of waiting for the poll.
                self._wake.clear()
                try:
                    while await self.relay_once() == self._batch:
                        pass
                except Exception:
                    log.exception("outbox relay failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
        finally:
            if listener is not None:
                await listener.close()

    async def _listen(self) -> asyncpg.Connection | None:
        url = make_url(self._url)
        try:
            conn = await asyncpg.connect(
                user=url.username,
                password=url.password,
                database=url.database,
                host=url.query.get("host") or url.host,
                port=url.port,
            )
        except Exception:
            log.warning("outbox relay could not LISTEN; polling only")
            return None
        await conn.add_listener(OUTBOX_CHANNEL, lambda *_: self._wake.set())
        return conn

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
