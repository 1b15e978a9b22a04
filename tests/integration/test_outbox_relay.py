"""The outbox relay: committed events reach the sink in order, once marked; rolled back never."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from billfold.platform.bus.postgres import OutboxRelay
from billfold.platform.db import unit_of_work
from billfold.platform.events import Event, record_event
from billfold.platform.ids import is_valid_id
from billfold.platform.observability import Metrics


def subject() -> str:
    return f"relay-test-{uuid.uuid4().hex[:12]}"


class Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()

    async def __call__(self, event: dict[str, Any]) -> None:
        async with self.arrived:
            self.events.append(event)
            self.arrived.notify_all()

    def about(self, subj: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["subject"] == subj]

    async def wait_for(self, subj: str, count: int, within: float) -> list[dict[str, Any]]:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.about(subj)) >= count)
        return self.about(subj)


async def write_events(engine: Any, subj: str, n: int, *, fail: bool = False) -> list[Event]:
    events = [
        Event(
            type=f"billfold.test.step_{i}",
            source="/tests/relay",
            subject=subj,
            data={"i": i, "subject": subj},
        )
        for i in range(n)
    ]

    class Rollback(Exception):
        pass

    try:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            for e in events:
                await record_event(conn, e)
            if fail:
                raise Rollback
    except Rollback:
        pass
    return events


async def drain(relay: OutboxRelay) -> None:
    while await relay.relay_once():
        pass


async def published_at(engine: Any, subj: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text(
                        "SELECT published_at FROM platform.outbox WHERE subject = :s ORDER BY seq"
                    ),
                    {"s": subj},
                )
            ).scalars()
        )


async def test_committed_events_are_delivered_in_order_and_marked(app, database_url):
    engine = app.state.resources.engine
    sink = Sink()
    metrics = Metrics()
    relay = OutboxRelay(engine, database_url, sink, metrics=metrics, batch=3)
    subj = subject()
    first = await write_events(engine, subj, 5)
    second = await write_events(engine, subj, 4)
    assert all(p is None for p in await published_at(engine, subj))
    await drain(relay)
    got = sink.about(subj)
    assert [e["id"] for e in got] == [e.id for e in first + second]
    assert [e["data"]["i"] for e in got] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    stamps = await published_at(engine, subj)
    assert len(stamps) == 9 and all(p is not None for p in stamps)
    env = got[0]
    assert env["specversion"] == "1.0"
    assert env["type"] == "billfold.test.step_0"
    assert env["source"] == "/tests/relay"
    assert env["datacontenttype"] == "application/json"
    assert env["time"].endswith("Z")
    assert is_valid_id(env["id"], "evt")
    assert env == {**first[0].envelope(), "time": env["time"]}
    # Delivered once: another pass finds nothing more for this subject.
    await drain(relay)
    assert len(sink.about(subj)) == 9
    assert any(
        s.name == "billfold_outbox_events_published_total" and s.value >= 1
        for metric in metrics.registry.collect()
        for s in metric.samples
    )


async def test_published_events_no_longer_keep_one_time_codes(app, database_url):
    """The sink gets the code (it is the SMS/email); the outbox row keeps no copy of it."""
    engine = app.state.resources.engine
    sink = Sink()
    relay = OutboxRelay(engine, database_url, sink)
    subj = subject()
    async with unit_of_work(engine) as uow:
        await record_event(
            await uow.connection(),
            Event(
                type="billfold.test.verification.requested",
                source="/tests/relay",
                subject=subj,
                data={"channel": "email", "code": "424242", "expires_in": 600},
            ),
        )
    await drain(relay)
    assert [e["data"]["code"] for e in sink.about(subj)] == ["424242"]
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT data, published_at FROM platform.outbox WHERE subject = :s"),
                {"s": subj},
            )
        ).one()
    assert row.published_at is not None
    assert row.data == {"channel": "email", "expires_in": 600}


async def test_rolled_back_events_are_never_delivered(app, database_url):
    engine = app.state.resources.engine
    sink = Sink()
    relay = OutboxRelay(engine, database_url, sink)
    kept, lost = subject(), subject()
    await write_events(engine, lost, 3, fail=True)
    await write_events(engine, kept, 2)
    await drain(relay)
    assert len(sink.about(kept)) == 2
    assert sink.about(lost) == []
    assert await published_at(engine, lost) == []


async def test_a_failing_sink_leaves_events_for_the_next_pass(app, database_url):
    engine = app.state.resources.engine
    subj = subject()
    await write_events(engine, subj, 3)
    calls = 0

    async def flaky(event: dict[str, Any]) -> None:
        nonlocal calls
        if event["subject"] == subj:
            calls += 1
            if calls == 2:
                raise ConnectionError("bus unavailable")

    with pytest.raises(ConnectionError):
        await drain(OutboxRelay(engine, database_url, flaky))
    assert all(p is None for p in await published_at(engine, subj))  # nothing marked
    sink = Sink()
    await drain(OutboxRelay(engine, database_url, sink))
    assert [e["data"]["i"] for e in sink.about(subj)] == [0, 1, 2]  # at least once, in order


async def test_running_relay_is_woken_by_notify(app, database_url):
    engine = app.state.resources.engine
    sink = Sink()
    # A poll interval far longer than the test: only NOTIFY can deliver in time.
    relay = OutboxRelay(engine, database_url, sink, poll_seconds=60)
    primer = subject()
    await write_events(engine, primer, 1)
    task = asyncio.create_task(relay.run())
    try:
        # The first pass runs after LISTEN is set up; once the primer is in, the relay sleeps.
        await sink.wait_for(primer, 1, within=10)
        await asyncio.sleep(0.2)
        subj = subject()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await write_events(engine, subj, 3)
        got = await sink.wait_for(subj, 3, within=5)
        assert loop.time() - started < 5
        assert [e["data"]["i"] for e in got] == [0, 1, 2]
        # A rolled-back write notifies nobody and delivers nothing.
        lost = subject()
        await write_events(engine, lost, 2, fail=True)
        await asyncio.sleep(0.5)
        assert sink.about(lost) == []
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
    assert task.done() and task.exception() is None


async def test_stop_ends_a_sleeping_relay(app, database_url):
    relay = OutboxRelay(app.state.resources.engine, database_url, Sink(), poll_seconds=60)
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.3)
    relay.stop()
    await asyncio.wait_for(task, 5)


async def test_notify_during_a_pass_is_not_lost(app, database_url):
    """An event committed while the relay is busy delivering must not wait for the poll."""
    engine = app.state.resources.engine
    primer, late = subject(), subject()
    sink = Sink()
    release = asyncio.Event()
    in_pass = asyncio.Event()

    async def slow_sink(event: dict[str, Any]) -> None:
        if event["subject"] == primer:
            in_pass.set()
            await release.wait()  # hold the pass open while `late` commits and notifies
        await sink(event)

    relay = OutboxRelay(engine, database_url, slow_sink, poll_seconds=60)
    await write_events(engine, primer, 1)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(in_pass.wait(), 10)
        await write_events(engine, late, 2)
        await asyncio.sleep(0.3)  # the NOTIFY arrives while the pass is still running
        release.set()
        got = await sink.wait_for(late, 2, within=5)
        assert [e["data"]["i"] for e in got] == [0, 1]
    finally:
        release.set()
        relay.stop()
        await asyncio.wait_for(task, 10)


async def test_commits_wake_the_relay_once_per_burst_and_only_after_commit(app, database_url):
    """The wake-up is a NOTIFY of its own after the commit (a NOTIFY inside the business
    transaction would serialise every commit on PostgreSQL's notify-queue lock); a burst of
    commits shares one, a transaction still open or rolled back sends none."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from billfold.platform.events import OUTBOX_CHANNEL

    engine = app.state.resources.engine
    url = make_url(database_url)
    listener = await asyncpg.connect(
        user=url.username,
        password=url.password,
        database=url.database,
        host=url.query.get("host") or url.host,
        port=url.port,
    )
    heard: list[float] = []
    await listener.add_listener(OUTBOX_CHANNEL, lambda *_: heard.append(1.0))
    try:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            await record_event(
                conn, Event(type="billfold.test.open", source="/t", subject="s", data={})
            )
            await asyncio.sleep(0.3)
            assert heard == []  # recorded, not committed: nobody is woken
        await asyncio.sleep(0.3)
        assert len(heard) == 1

        heard.clear()
        await write_events(engine, subject(), 2, fail=True)
        await asyncio.sleep(0.3)
        assert heard == []

        await asyncio.gather(*(write_events(engine, subject(), 1) for _ in range(20)))
        await asyncio.sleep(0.3)
        assert 1 <= len(heard) < 20
    finally:
        await listener.close()
