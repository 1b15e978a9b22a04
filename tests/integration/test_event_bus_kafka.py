"""The Kafka event bus against a real Kafka-protocol broker (tansu): per-key order, exactly one
effect after a consumer crash mid-batch and after a relay crash between publish and mark-sent,
dead letters after retries, and replays."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.config import Settings
from billfold.platform.bus.consumers import Consumer
from billfold.platform.bus.kafka import (
    KafkaConfig,
    KafkaConsumerRunner,
    KafkaPublisher,
    KafkaRelay,
    ensure_topics,
)
from billfold.platform.bus.replay import replay
from billfold.platform.db import unit_of_work
from billfold.platform.events import Event, record_event

TYPE = "billfold.test.kafka_step"


class Crash(BaseException):
    """A process dying: not an error any retry loop would catch."""


@pytest.fixture
def bus_settings(settings: Settings, kafka_broker: str) -> Settings:
    """The test's settings on the broker, with topics and groups of its own."""
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "kafka_bootstrap": kafka_broker,
            "kafka_topic_prefix": f"t{tag}.",
            "kafka_group_prefix": f"g{tag}.",
            "kafka_enable_idempotence": False,  # tansu refuses InitProducerId
            "kafka_topic_partitions": 3,
            "consumer_backoff_seconds": 0.01,
            # A restarted consumer rejoins its group in about a second, not ten.
            "kafka_session_timeout_ms": 1_000,
            "kafka_heartbeat_interval_ms": 100,
            "kafka_rebalance_timeout_ms": 1_000,
        }
    )


@pytest.fixture
async def publisher(bus_settings: Settings) -> AsyncIterator[KafkaPublisher]:
    p = KafkaPublisher(KafkaConfig.from_settings(bus_settings))
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def effects(app: Any) -> str:
    """A table of consumer effects, without a unique key: a double effect would show."""
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS public.bus_test_effects "
                "(consumer text NOT NULL, event_id text NOT NULL, i int)"
            )
        )
    return f"c{uuid.uuid4().hex[:8]}"  # the test's consumer name


async def effect_counts(engine: Any, consumer: str) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_id, count(*) AS n FROM public.bus_test_effects "
                "WHERE consumer = :c GROUP BY event_id"
            ),
            {"c": consumer},
        )
        return {r.event_id: r.n for r in rows}


async def write(engine: Any, aggregate: str, n: int, **data: Any) -> list[Event]:
    events = [
        Event(
            type=TYPE,
            source="/tests/kafka",
            subject=aggregate,
            aggregate_id=aggregate,
            data={"i": i, **data},
        )
        for i in range(n)
    ]
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        for e in events:
            await record_event(conn, e)
    return events


async def drain(relay: KafkaRelay) -> None:
    while await relay.relay_once():
        pass


async def read_topic(
    config: KafkaConfig, topic: str, count: int, keys: list[str] | None = None
) -> list[Any]:
    """The records of `topic` (with one of `keys`, if given) from its start, by a fresh group,
    once there are `count` of them (within 20 s)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=config.bootstrap,
        group_id=None,  # no group: no rebalance to wait for
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(20):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records += [r for r in part if keys is None or r.key.decode() in keys]
    finally:
        await consumer.stop()
    return records


def recording_consumer(name: str, **behaviour: Any) -> tuple[Consumer, list[dict[str, Any]]]:
    """A consumer that records each event as an effect row; `crash_at` (an `i`) crashes the
    process on that event the first time, `poison` events always fail."""
    seen: list[dict[str, Any]] = []
    crash_at = behaviour.get("crash_at")

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        seen.append(event)
        data = event["data"]
        if data.get("poison"):
            raise ValueError("cannot handle this one")
        await conn.execute(
            text("INSERT INTO public.bus_test_effects VALUES (:c, :e, :i)"),
            {"c": name, "e": event["id"], "i": data.get("i")},
        )
        if crash_at is not None and data.get("i") == crash_at and not behaviour.get("crashed"):
            behaviour["crashed"] = True
            raise Crash  # after the effect, before its commit: rolled back with the inbox row

    return Consumer(name, frozenset({TYPE}), handle), seen


async def run_until(
    runner: KafkaConsumerRunner, done: Any, within: float = 30
) -> asyncio.Task[None]:
    """Run `runner` until `done()` (an async predicate) holds; returns the finished task."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async with asyncio.timeout(within):
            while not await done():
                if task.done():
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait([task], timeout=10)
    return task


def spread_keys(count: int, partitions: int) -> list[str]:
    """Random aggregate ids that Kafka's default (murmur2) partitioner puts in more than one partition.

    Random ids alone land in one partition 1 run in 27 (4 keys, 3 partitions), and the spread
    assertion then fails for no fault of the relay.
    """
    while True:
        keys = [f"agg-{uuid.uuid4().hex[:6]}" for _ in range(count)]
        if len({(murmur2(k.encode()) & 0x7FFFFFFF) % partitions for k in keys}) > 1:
            return keys


async def test_relay_publishes_cloudevents_keyed_by_aggregate_in_order(
    app, bus_settings, publisher
):
    engine = app.state.resources.engine
    config = publisher.config
    aggregates = spread_keys(4, config.partitions)
    written: dict[str, list[Event]] = {a: [] for a in aggregates}
    for _ in range(3):  # interleaved commits of several aggregates
        for a in aggregates:
            written[a] += await write(engine, a, 4)
    relay = KafkaRelay(engine, bus_settings.database_url, publisher, batch=7)
    await drain(relay)

    records = await read_topic(config, config.topic(TYPE), 48, aggregates)
    by_key: dict[str, list[dict[str, Any]]] = {}
    partitions: dict[str, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key.decode(), []).append(json.loads(r.value))
        partitions.setdefault(r.key.decode(), set()).add(r.partition)
        assert dict(r.headers)["content-type"] == b"application/cloudevents+json"
    for a in aggregates:
        assert [e["id"] for e in by_key[a]] == [e.id for e in written[a]]
        assert len(partitions[a]) == 1  # one aggregate, one partition: its order holds
        first = by_key[a][0]
        assert first == {**written[a][0].envelope(), "time": first["time"]}
    assert len({p for ps in partitions.values() for p in ps}) > 1  # spread over partitions
    async with engine.connect() as conn:
        unpublished = await conn.scalar(
            text(
                "SELECT count(*) FROM platform.outbox "
                "WHERE subject = ANY(:s) AND published_at IS NULL"
            ),
            {"s": aggregates},
        )
    assert unpublished == 0


async def test_consumer_crash_mid_batch_redelivers_with_exactly_one_effect(
    app, bus_settings, publisher, effects
):
    engine = app.state.resources.engine
    events = await write(engine, f"agg-{uuid.uuid4().hex[:6]}", 10)
    await drain(KafkaRelay(engine, bus_settings.database_url, publisher))
    consumer, seen = recording_consumer(effects, crash_at=6)

    async def all_done() -> bool:
        return len(await effect_counts(engine, effects)) == 10

    # First run: events 0-5 commit their effects, the process dies on 6 before any offset of
    # the batch is committed.
    crashed = await run_until(KafkaConsumerRunner(engine, consumer, publisher), all_done)
    assert crashed.done()
    failure = crashed.exception()
    assert isinstance(failure, BaseExceptionGroup) and failure.subgroup(Crash) is not None
    assert len(await effect_counts(engine, effects)) == 6
    # The restarted consumer (same group) reads the batch again from the committed offset.
    seen.clear()
    await run_until(KafkaConsumerRunner(engine, consumer, publisher), all_done)
    counts = await effect_counts(engine, effects)
    assert counts == {e.id: 1 for e in events}
    assert [e["data"]["i"] for e in seen] == list(range(6, 10))  # 0-5 skipped by the inbox
    # …and the redelivery was real: the handler saw nothing twice only thanks to the inbox.
    async with engine.connect() as conn:
        inbox = await conn.scalar(
            text("SELECT count(*) FROM platform.inbox WHERE consumer = :c"), {"c": effects}
        )
    assert inbox == 10


async def test_relay_crash_between_publish_and_mark_sent_loses_nothing_doubles_nothing(
    app, bus_settings, publisher, effects
):
    engine = app.state.resources.engine
    aggregate = f"agg-{uuid.uuid4().hex[:6]}"
    events = await write(engine, aggregate, 5)

    class CrashingRelay(KafkaRelay):
        async def publish(self, rows: Any) -> None:
            await super().publish(rows)  # the broker has acknowledged the batch…
            raise Crash  # …and the relay dies before marking it sent

    with pytest.raises(Crash):
        await drain(CrashingRelay(engine, bus_settings.database_url, publisher))
    async with engine.connect() as conn:
        unmarked = await conn.scalar(
            text(
                "SELECT count(*) FROM platform.outbox WHERE subject = :s AND published_at IS NULL"
            ),
            {"s": aggregate},
        )
    assert unmarked == 5
    await drain(KafkaRelay(engine, bus_settings.database_url, publisher))  # the restarted relay

    config = publisher.config
    mine = await read_topic(config, config.topic(TYPE), 10, [aggregate])
    # Each event is on the topic twice (at least once; twice here), in order both times.
    assert [json.loads(r.value)["id"] for r in mine] == [e.id for e in events] * 2
    consumer, seen = recording_consumer(effects)
    read: list[str] = []

    class CountingRunner(KafkaConsumerRunner):
        async def handle(self, record: Any) -> None:
            await super().handle(record)
            if record.key.decode() == aggregate:
                read.append(json.loads(record.value)["id"])

    async def all_read() -> bool:
        return len(read) >= 10

    await run_until(CountingRunner(engine, consumer, publisher), all_read)
    assert read == [e.id for e in events] * 2  # the consumer read every copy…
    assert [e["id"] for e in seen] == [e.id for e in events]  # …and handled each event once
    assert await effect_counts(engine, effects) == {e.id: 1 for e in events}


async def test_poison_events_are_dead_lettered_after_retries_and_do_not_block(
    app, bus_settings, publisher, effects
):
    engine = app.state.resources.engine
    aggregate = f"agg-{uuid.uuid4().hex[:6]}"
    poison = (await write(engine, aggregate, 1, poison=True))[0]
    after = await write(engine, aggregate, 2)
    await drain(KafkaRelay(engine, bus_settings.database_url, publisher))
    config = publisher.config
    # And a record nobody can read, straight onto the topic.
    raw = AIOKafkaProducer(bootstrap_servers=config.bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(config.topic(TYPE), b"{not json", key=aggregate.encode())
    finally:
        await raw.stop()
    consumer, seen = recording_consumer(effects)

    async def done() -> bool:
        async with engine.connect() as conn:
            parked = await conn.scalar(
                text("SELECT count(*) FROM platform.dead_letters WHERE consumer = :c"),
                {"c": effects},
            )
        return parked == 2 and len(await effect_counts(engine, effects)) == 2

    await run_until(KafkaConsumerRunner(engine, consumer, publisher, attempts=3), done)
    assert [e["id"] for e in seen].count(poison.id) == 3  # tried three times
    assert await effect_counts(engine, effects) == {e.id: 1 for e in after}
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT event_id, event, error, attempts FROM platform.dead_letters "
                    "WHERE consumer = :c ORDER BY id"
                ),
                {"c": effects},
            )
        ).all()
    assert rows[0].event_id == poison.id and rows[0].event["data"] == {"i": 0, "poison": True}
    assert rows[0].error == "ValueError: cannot handle this one" and rows[0].attempts == 3
    assert rows[1].event_id.startswith(f"kafka:{config.topic(TYPE)}/")
    assert rows[1].error.startswith("unreadable record") and rows[1].event == {"raw": "{not json"}
    parked = await read_topic(config, config.dead_letter_topic, 2)
    headers = [dict(r.headers) for r in parked]
    assert [h["consumer"] for h in headers] == [effects.encode()] * 2
    assert headers[0]["error"] == b"ValueError: cannot handle this one"
    assert json.loads(parked[0].value)["id"] == poison.id
    assert parked[1].value == b"{not json"


async def test_replay_redelivers_and_only_force_repeats_an_effect(
    app, bus_settings, publisher, effects
):
    engine = app.state.resources.engine
    events = await write(engine, f"agg-{uuid.uuid4().hex[:6]}", 3)
    relay = KafkaRelay(engine, bus_settings.database_url, publisher)
    await drain(relay)
    consumer, seen = recording_consumer(effects)

    async def seen_count(n: int) -> Any:
        async def check() -> bool:
            return len(seen) >= n

        return check

    await run_until(KafkaConsumerRunner(engine, consumer, publisher), await seen_count(3))
    assert len(await effect_counts(engine, effects)) == 3

    # A plain replay from the second event: delivered again, skipped by the inbox.
    async with unit_of_work(engine) as uow:
        result = await replay(await uow.connection(), from_event=events[1].id, types=[TYPE])
    assert result.events >= 2 and result.inbox_cleared == 0
    await drain(relay)
    # `--force` for this consumer: its inbox rows go, so it handles them once more.
    async with unit_of_work(engine) as uow:
        result = await replay(
            await uow.connection(),
            from_event=events[1].id,
            types=["billfold.test.*"],
            consumers=[effects],
            force=True,
        )
    assert result.inbox_cleared == 2
    await drain(relay)
    seen.clear()
    await run_until(KafkaConsumerRunner(engine, consumer, publisher), await seen_count(2))
    await asyncio.sleep(0.3)
    counts = await effect_counts(engine, effects)
    assert counts == {events[0].id: 1, events[1].id: 2, events[2].id: 2}
    assert {e["id"] for e in seen} == {events[1].id, events[2].id}


async def test_missing_topics_are_created_with_the_configured_partitions(bus_settings):
    config = KafkaConfig.from_settings(bus_settings)
    topic = config.topic("billfold.somewhere.thing.happened")
    assert topic == f"{config.topic_prefix}somewhere"
    await ensure_topics(config, [topic])
    await ensure_topics(config, [topic])  # again: already there is fine
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 3


async def test_one_kafka_relay_publishes_at_a_time(app, bus_settings, publisher):
    """Two workers' relays never publish batches side by side (a later batch could overtake an
    earlier one of the same aggregate): while one holds the relay lock, the other waits."""
    engine = app.state.resources.engine
    aggregate = f"agg-{uuid.uuid4().hex[:6]}"
    await write(engine, aggregate, 2)
    relay = KafkaRelay(engine, bus_settings.database_url, publisher)
    async with engine.connect() as other, other.begin():  # another relay, mid-pass
        await other.execute(text("SELECT pg_advisory_xact_lock(hashtext('billfold.outbox_relay'))"))
        assert await relay.relay_once() == 0
    assert await relay.relay_once() >= 2
    async with engine.connect() as conn:
        unpublished = await conn.scalar(
            text(
                "SELECT count(*) FROM platform.outbox WHERE subject = :s AND published_at IS NULL"
            ),
            {"s": aggregate},
        )
    assert unpublished == 0


async def test_the_worker_bus_waits_for_a_late_broker_then_delivers(app, bus_settings, effects):
    """`KafkaBus` (what `billfold worker` runs) started before its broker: it retries, and once
    the broker is up the relay and the consumer group deliver what the outbox kept."""
    from billfold.platform.bus.kafka import KafkaBus
    from tests.conftest import free_port, tansu_binary

    engine = app.state.resources.engine
    port = free_port()
    settings = bus_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    consumer, seen = recording_consumer(effects)
    bus = KafkaBus(engine, settings, [consumer])
    stop = asyncio.Event()
    task = asyncio.create_task(bus.run(stop, retry_seconds=0.2))
    broker = None
    try:
        events = await write(engine, f"agg-{uuid.uuid4().hex[:6]}", 3)
        await asyncio.sleep(1)
        assert not task.done() and seen == []  # waiting for the broker, not given up
        url = f"tcp://127.0.0.1:{port}"
        args = ["--listener-url", url, "--advertised-listener-url", url, "--silent"]
        broker = await asyncio.create_subprocess_exec(
            str(tansu_binary()),
            "broker",
            *args,
            "--storage-engine",
            "memory://tansu/",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(60):
            while True:
                if len(await effect_counts(engine, effects)) >= 3:
                    break
                await asyncio.sleep(0.1)
        assert await effect_counts(engine, effects) == {e.id: 1 for e in events}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        if broker is not None:
            broker.terminate()
            await asyncio.wait_for(broker.wait(), 10)
