"""The worker's background runner builds its own runtimes, relays, and stops cleanly."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from billfold.jobs import run_background
from billfold.platform.db import create_engine
from billfold.platform.events import Event, record_event


async def test_worker_runner_relays_with_its_own_runtimes_and_stops(settings: Any) -> None:
    engine = create_engine(settings.database_url, pool_size=2)
    try:
        async with engine.begin() as conn:
            event = await record_event(
                conn, Event(type="billfold.test.worker", source="/test", subject="w", data={})
            )
        stop = asyncio.Event()
        runner = asyncio.create_task(run_background(engine, settings, stop))
        published = None
        # The relay first delivers the backlog the session's other tests left in the shared
        # outbox (each event through every consumer): on a busy machine that takes seconds.
        for _ in range(600):
            async with engine.connect() as conn:
                published = await conn.scalar(
                    text("SELECT published_at FROM platform.outbox WHERE id = :id"),
                    {"id": event.id},
                )
            if published is not None:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(runner, 15)
        assert published is not None
    finally:
        await engine.dispose()
