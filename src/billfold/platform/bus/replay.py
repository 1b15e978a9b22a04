"""Re-delivery of past events from the outbox (`billfold events replay`).

A replay marks the chosen outbox rows unpublished again, so the running relay delivers them
once more, in `seq` order, on whichever bus is configured (the same path as a first delivery;
nothing else to keep in step). Consumers dedupe by their inbox, so a consumer that handled an
event before skips it; one that dead-lettered it (no inbox row) handles it now. `force` also
deletes the named consumers' inbox rows for those events, so exactly those consumers run again:
only for consumers whose effects are safe to repeat, which is why it needs consumer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import OUTBOX_CHANNEL

# The chosen rows: from an event id (that event included) or from a time, of some types
# (`%` patterns), up to now. Only published rows: the relay has the others in hand already.
_CHOSEN = """
    SELECT seq, id FROM platform.outbox
    WHERE published_at IS NOT NULL
      AND (CAST(:from_seq AS bigint) IS NULL OR seq >= :from_seq)
      AND (CAST(:since AS timestamptz) IS NULL OR time >= :since)
      AND (CAST(:types AS text[]) IS NULL OR type LIKE ANY(:types))
"""
_FIRST_SEQ = text("SELECT seq FROM platform.outbox WHERE id = :id")
_COUNT = text(f"WITH chosen AS ({_CHOSEN}) SELECT count(*) FROM chosen")  # noqa: S608
_CLEAR_INBOX = text(
    f"""
    WITH chosen AS ({_CHOSEN})
    DELETE FROM platform.inbox WHERE consumer = ANY(:consumers)
      AND event_id IN (SELECT id FROM chosen)
    """  # noqa: S608
)
_COUNT_INBOX = text(
    f"""
    WITH chosen AS ({_CHOSEN})
    SELECT count(*) FROM platform.inbox WHERE consumer = ANY(:consumers)
      AND event_id IN (SELECT id FROM chosen)
    """  # noqa: S608
)
_UNPUBLISH = text(
    f"""
    UPDATE platform.outbox SET published_at = NULL
    WHERE seq IN (SELECT seq FROM ({_CHOSEN}) AS chosen)
    """  # noqa: S608
)
_WAKE = text("SELECT pg_notify(:channel, '')")


class ReplayError(ValueError):
    """The replay request names nothing to start from, or an event that is not in the outbox."""


@dataclass(frozen=True)
class ReplayResult:
    events: int
    inbox_cleared: int


def type_patterns(types: Sequence[str]) -> list[str] | None:
    """`billfold.p2p.*` → a LIKE pattern; an exact type stays exact (`_` and `%` escaped)."""
    if not types:
        return None
    patterns = []
    for t in types:
        escaped = t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        patterns.append(escaped[:-1] + "%" if escaped.endswith("*") else escaped)
    return patterns


async def replay(
    conn: AsyncConnection,
    *,
    from_event: str | None = None,
    since: datetime | None = None,
    types: Sequence[str] = (),
    consumers: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
) -> ReplayResult:
    """Queue published events for re-delivery (see the module's docstring), in the caller's
    transaction; the relay is woken when it commits. `force` needs `consumers`."""
    if from_event is None and since is None:
        raise ReplayError("say where to start: an event id or a time")
    if force and not consumers:
        raise ReplayError("--force clears inbox rows of the consumers named with --consumer")
    from_seq = None
    if from_event is not None:
        from_seq = (await conn.execute(_FIRST_SEQ, {"id": from_event})).scalar()
        if from_seq is None:
            raise ReplayError(f"event {from_event} is not in the outbox")
    params = {"from_seq": from_seq, "since": since, "types": type_patterns(types)}
    inbox_params = {**params, "consumers": list(consumers)}
    if dry_run:
        events = int((await conn.execute(_COUNT, params)).scalar_one())
        cleared = int((await conn.execute(_COUNT_INBOX, inbox_params)).scalar_one()) if force else 0
        return ReplayResult(events, cleared)
    cleared = (await conn.execute(_CLEAR_INBOX, inbox_params)).rowcount if force else 0
    events = (await conn.execute(_UNPUBLISH, params)).rowcount
    # Delivered on commit (NOTIFY is transactional): no wait for the relay's next poll.
    await conn.execute(_WAKE, {"channel": OUTBOX_CHANNEL})
    return ReplayResult(events, cleared)
