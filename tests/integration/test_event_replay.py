"""`billfold events replay` on the embedded bus: published events go round again through the
relay; consumers that handled them skip them (inbox), a dead-lettered consumer gets its second
chance, and `--force` re-runs exactly the named consumer."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from typer.testing import CliRunner

from billfold import cli
from billfold.platform.bus.consumers import Consumer, ConsumerSink
from billfold.platform.bus.postgres import OutboxRelay
from billfold.platform.db import unit_of_work
from billfold.platform.events import Event, record_event

TYPE = "billfold.test.replayed"


async def write(engine: Any, subject: str, n: int) -> list[Event]:
    events = [
        Event(type=TYPE, source="/tests/replay", subject=subject, data={"i": i}) for i in range(n)
    ]
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        for e in events:
            await record_event(conn, e)
    return events


async def drain(relay: OutboxRelay) -> None:
    while await relay.relay_once():
        pass


def recorder(name: str, subject: str, *, failing: set[int]) -> tuple[Consumer, list[int]]:
    handled: list[int] = []

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        if event["subject"] != subject:
            return
        if event["data"]["i"] in failing:
            raise RuntimeError("not today")
        handled.append(event["data"]["i"])

    return Consumer(name, frozenset({TYPE}), handle), handled


async def invoke(database_url: str, *args: str) -> Any:
    """The command in a thread (it runs its own event loop), on the test's database."""
    env = {"BILLFOLD_DATABASE_URL": database_url}
    return await asyncio.to_thread(
        CliRunner().invoke, cli.app, ["events", "replay", *args], env=env
    )


async def test_replay_skips_handled_events_retries_dead_letters_and_force_reruns(app, database_url):
    engine = app.state.resources.engine
    subject = f"replay-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    steady, steady_seen = recorder(f"steady-{tag}", subject, failing=set())
    flaky_fails = {1}
    flaky, flaky_seen = recorder(f"flaky-{tag}", subject, failing=flaky_fails)
    sink = ConsumerSink(engine, [steady, flaky], attempts=2, backoff_seconds=0.01)
    relay = OutboxRelay(engine, database_url, sink)
    events = await write(engine, subject, 3)
    await drain(relay)
    assert steady_seen == [0, 1, 2] and flaky_seen == [0, 2]
    async with engine.connect() as conn:
        parked = await conn.scalar(
            text("SELECT count(*) FROM platform.dead_letters WHERE consumer = :c"),
            {"c": flaky.name},
        )
    assert parked == 1

    # Dry run: counts, changes nothing.
    result = await invoke(database_url, "--from", events[0].id, "--type", TYPE, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would re-deliver 3 event(s)" in result.output
    await drain(relay)
    assert steady_seen == [0, 1, 2]

    # A replay: the steady consumer skips all (inbox); the flaky one, fixed now, gets event 1.
    flaky_fails.clear()
    result = await invoke(database_url, "--from", events[0].id, "--type", "billfold.test.*")
    assert result.exit_code == 0 and "re-delivering 3 event(s)" in result.output
    await drain(relay)
    assert steady_seen == [0, 1, 2]
    assert flaky_seen == [0, 2, 1]

    # --force for the steady consumer from event 1: it handles 1 and 2 again; flaky does not.
    result = await invoke(
        database_url, "--from", events[1].id, "--type", TYPE, "--consumer", steady.name, "--force"
    )
    assert result.exit_code == 0, result.output
    assert "re-delivering 2 event(s)" in result.output and "cleared 2 inbox row(s)" in result.output
    await drain(relay)
    assert steady_seen == [0, 1, 2, 1, 2]
    assert flaky_seen == [0, 2, 1]


async def test_replay_refuses_what_it_cannot_do(app, database_url):
    result = await invoke(database_url, "--from", "evt_01m8q1e8cfeykt117y50tb221d")
    assert result.exit_code == 2 and "is not in the outbox" in result.output
    result = await invoke(database_url, "--from", "2026-01-01T00:00:00", "--force")
    assert result.exit_code == 2 and "--force clears inbox rows" in result.output
    result = await invoke(database_url, "--from", "2999-01-01", "--type", TYPE)
    assert result.exit_code == 0 and "re-delivering 0 event(s)" in result.output
