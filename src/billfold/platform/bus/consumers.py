"""In-process event consumers: each handles an event once (inbox) in its own transaction.

The relay hands every published event to `ConsumerSink`, which runs the consumers that subscribe
to its type. A consumer's effect and its inbox row commit together, so a redelivered event is a
no-op; a consumer that fails is retried with backoff and then parked in `platform.dead_letters`
without holding up the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.platform.bus.postgres import Sink
from billfold.platform.db import unit_of_work
from billfold.platform.observability import get_logger

log = get_logger(__name__)

Handler = Callable[[AsyncConnection, dict[str, Any]], Awaitable[None]]

_CLAIM = text(
    """
    INSERT INTO platform.inbox (consumer, event_id) VALUES (:consumer, :event_id)
    ON CONFLICT DO NOTHING RETURNING event_id
    """
)
_DEAD_LETTER = text(
    """
    INSERT INTO platform.dead_letters (consumer, event_id, event, error, attempts)
    VALUES (:consumer, :event_id, CAST(:event AS jsonb), :error, :attempts)
    """
)


@dataclass(frozen=True)
class Consumer:
    """`handle(conn, event)` for events whose type is in `types`; `name` keys its inbox."""

    name: str
    types: frozenset[str]
    handle: Handler


class ConsumerSink:
    """A relay sink that delivers to in-process consumers, then to `downstream`."""

    def __init__(
        self,
        engine: AsyncEngine,
        consumers: Sequence[Consumer],
        downstream: Sink | None = None,
        *,
        attempts: int = 3,
        backoff_seconds: float = 0.2,
    ) -> None:
        self._engine = engine
        self._consumers = list(consumers)
        self._downstream = downstream
        self._attempts = attempts
        self._backoff = backoff_seconds

    async def __call__(self, event: dict[str, Any]) -> None:
        for consumer in self._consumers:
            if event["type"] in consumer.types:
                await self.deliver(consumer, event)
        if self._downstream is not None:
            await self._downstream(event)

    @property
    def consumers(self) -> list[Consumer]:
        """The consumers this sink delivers to (the Kafka bus runs each in its own group)."""
        return list(self._consumers)

    async def deliver(self, consumer: Consumer, event: dict[str, Any]) -> bool:
        """Run one consumer on one event, at most once; False if it was dead-lettered."""
        error = await self.attempt(consumer, event)
        if error is None:
            return True
        await self.dead_letter(consumer, event, error)
        return False

    async def attempt(self, consumer: Consumer, event: dict[str, Any]) -> str | None:
        """Run `consumer` on `event` with retries and backoff: None once its effect and inbox row
        are committed (or it had handled the event before), else the last error."""
        error = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with unit_of_work(self._engine) as uow:
                    conn = await uow.connection()
                    params = {"consumer": consumer.name, "event_id": event["id"]}
                    if (await conn.execute(_CLAIM, params)).first() is not None:
                        await consumer.handle(conn, event)
                return None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:2000]
                log.warning(
                    "consumer failed", consumer=consumer.name, event_id=event["id"], attempt=attempt
                )
                if attempt < self._attempts:
                    await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        return error

    async def dead_letter(
        self, consumer: Consumer, event: dict[str, Any], error: str, *, event_id: str | None = None
    ) -> None:
        """Park `event` in `platform.dead_letters` with the error that stopped `consumer`."""
        async with unit_of_work(self._engine) as uow:
            await (await uow.connection()).execute(
                _DEAD_LETTER,
                {
                    "consumer": consumer.name,
                    "event_id": event_id or event["id"],
                    "event": json.dumps(event, default=str),
                    "error": error,
                    "attempts": self._attempts,
                },
            )
        log.error(
            "consumer gave up; event dead-lettered",
            consumer=consumer.name,
            id=event_id or event["id"],
        )


def select_consumers(consumers: Sequence[Consumer], names: Sequence[str]) -> list[Consumer]:
    """The consumers that `names` select: a consumer's full name (`p2p.claims`) or its service
    (`p2p` selects every `p2p.*`). An empty selection is all of them; a name that selects
    nothing is a ValueError (a typo would otherwise run a worker that consumes nothing)."""
    if not names:
        return list(consumers)
    chosen: list[Consumer] = []
    for name in names:
        matched = [c for c in consumers if c.name == name or c.name.startswith(f"{name}.")]
        if not matched:
            known = ", ".join(sorted(c.name for c in consumers))
            raise ValueError(f"no consumer is called {name!r} (known: {known})")
        chosen += [c for c in matched if c not in chosen]
    return chosen
