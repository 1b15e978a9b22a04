"""The Kafka bus: the relay publishes the outbox to one topic per service, keyed by aggregate;
each consumer reads those topics in a consumer group of its own.

Delivery is at least once at both hops and effects are exactly once through the consumers'
inbox: the relay marks a batch published only after the broker acknowledged all of it
(`acks=all`), and a consumer commits its offsets only after the events' effects and inbox rows
committed in PostgreSQL. A crash anywhere in between re-sends or re-reads, never loses; the
inbox turns the repeat into a no-op. Records use the CloudEvents Kafka binding in structured
mode: the value is the JSON envelope, `content-type: application/cloudevents+json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.config import Settings
from billfold.platform.bus.consumers import Consumer, ConsumerSink
from billfold.platform.bus.postgres import OutboxRelay, envelope
from billfold.platform.observability import Metrics, get_logger

log = get_logger(__name__)

CONTENT_TYPE = b"application/cloudevents+json"
DEAD_LETTERS = "dead-letters"
# Broker error codes a topic creation may answer for a topic that is already there.
_TOPIC_EXISTS = TopicAlreadyExistsError.errno


@dataclass(frozen=True)
class KafkaConfig:
    """Where and how billfold talks to Kafka (from `Settings`, see config.py)."""

    bootstrap: str
    topic_prefix: str = "billfold."
    group_prefix: str = "billfold."
    client_id: str = "billfold"
    enable_idempotence: bool = True
    partitions: int = 6
    replication_factor: int = 1
    ssl_cafile: str = ""
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConfig:
        return cls(
            bootstrap=settings.kafka_bootstrap,
            topic_prefix=settings.kafka_topic_prefix,
            group_prefix=settings.kafka_group_prefix,
            client_id=settings.kafka_client_id,
            enable_idempotence=settings.kafka_enable_idempotence,
            partitions=settings.kafka_topic_partitions,
            replication_factor=settings.kafka_replication_factor,
            ssl_cafile=settings.kafka_ssl_cafile,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            rebalance_timeout_ms=settings.kafka_rebalance_timeout_ms,
        )

    def topic(self, event_type: str) -> str:
        """`billfold.p2p.transfer.completed` → `<prefix>p2p`: one topic per publishing service."""
        parts = event_type.split(".")
        return f"{self.topic_prefix}{parts[1] if len(parts) > 2 else 'other'}"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic_prefix}{DEAD_LETTERS}"

    def group(self, consumer: str) -> str:
        return f"{self.group_prefix}{consumer}"

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "client_id": self.client_id}
        if self.ssl_cafile:
            context: ssl.SSLContext = create_ssl_context(cafile=self.ssl_cafile)
            options |= {"security_protocol": "SSL", "ssl_context": context}
        return options


async def ensure_topics(config: KafkaConfig, topics: Sequence[str]) -> None:
    """Create the `topics` that do not exist yet (a consumer group cannot subscribe to a topic
    nobody has created; the relay's producer would auto-create it with broker defaults)."""
    admin = AIOKafkaAdminClient(**config.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(set(topics) - existing)
        if not missing:
            return
        new = [NewTopic(t, config.partitions, config.replication_factor) for t in missing]
        response = await admin.create_topics(new)
        for topic, code, *_ in getattr(response, "topic_errors", []):
            if code not in (0, _TOPIC_EXISTS):
                raise RuntimeError(f"could not create Kafka topic {topic}: error {code}")
    finally:
        await admin.close()


class KafkaPublisher:
    """The process's producer: `acks=all`, idempotent where the broker supports it."""

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self._producer = self._new_producer()
        self._known_topics: set[str] = set()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.config.client_options(),
            acks="all",
            enable_idempotence=self.config.enable_idempotence,
            linger_ms=2,
        )

    async def start(self) -> None:
        """Connect; after a failed start, a later call starts over with a fresh producer."""
        try:
            await self._producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = self._new_producer()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, records: Sequence[tuple[dict[str, Any], str]]) -> None:
        """Send `(envelope, key)` records and return once the broker acknowledged every one of
        them; raises if any failed. Sent together, so one batch costs about one round trip."""
        topics = {self.config.topic(event["type"]) for event, _ in records}
        if topics - self._known_topics:
            # With the partitions and replication configured, not the broker's defaults (and
            # brokers that do not auto-create topics still take the event).
            await ensure_topics(self.config, sorted(topics - self._known_topics))
            self._known_topics |= topics
        pending = [
            await self._producer.send(
                self.config.topic(event["type"]),
                value=json.dumps(event, separators=(",", ":"), default=str).encode(),
                key=key.encode(),
                headers=[("content-type", CONTENT_TYPE), ("ce_type", event["type"].encode())],
            )
            for event, key in records
        ]
        await asyncio.gather(*pending)

    async def dead_letter(
        self,
        value: bytes,
        key: bytes | None,
        consumer: str,
        error: str,
        origin: ConsumerRecord[Any, Any],
    ) -> None:
        """Park a record that `consumer` gave up on in the dead-letter topic, with the error."""
        await self._producer.send_and_wait(
            self.config.dead_letter_topic,
            value=value,
            key=key,
            headers=[
                ("content-type", CONTENT_TYPE),
                ("consumer", consumer.encode()),
                ("error", error.encode()[:2000]),
                ("origin", f"{origin.topic}/{origin.partition}/{origin.offset}".encode()),
            ],
        )


class KafkaRelay(OutboxRelay):
    """The outbox relay of the Kafka bus: each batch goes to the broker, and is marked published
    (in the transaction that holds the rows' locks) only after the broker acknowledged all of it.
    Exclusive: one relay publishes at a time, so an aggregate's events reach its partition in
    outbox order even with several workers."""

    exclusive = True

    def __init__(
        self,
        engine: AsyncEngine,
        database_url: str,
        publisher: KafkaPublisher,
        metrics: Metrics | None = None,
        poll_seconds: float = 1.0,
        batch: int = 500,
    ) -> None:
        async def unused(event: dict[str, Any]) -> None:  # publish() is overridden
            raise NotImplementedError

        super().__init__(engine, database_url, unused, metrics, poll_seconds, batch)
        self.publisher = publisher

    async def publish(self, rows: Sequence[Any]) -> None:
        # Key = aggregate id (record_event falls back to the subject): one aggregate's events
        # land in one partition, in outbox order.
        await self.publisher.publish([(envelope(row), row.aggregate_id) for row in rows])


class KafkaConsumerRunner:
    """Runs one `Consumer` on the Kafka bus in its own consumer group.

    Each record is handled through `ConsumerSink.attempt` (effect + inbox row in one
    transaction, retries with backoff); the partitions of a batch run side by side, each in
    order, and the batch's offsets are committed after all its records were handled, so a crash
    mid-batch re-reads them and the inbox skips what was done. A record that still fails, or cannot be read at all, goes to the dead-letter topic and
    `platform.dead_letters` before its offset is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        consumer: Consumer,
        publisher: KafkaPublisher,
        *,
        attempts: int = 3,
        backoff_seconds: float = 0.2,
        max_records: int = 200,
        restart_seconds: float = 1.0,
        parallel_partitions: int = 4,
    ) -> None:
        self.consumer = consumer
        self.config = publisher.config
        self._publisher = publisher
        self._sink = ConsumerSink(
            engine, [consumer], attempts=attempts, backoff_seconds=backoff_seconds
        )
        self._max_records = max_records
        # At most this many partitions in flight (each holds a pooled connection while it works).
        self._parallel = asyncio.Semaphore(parallel_partitions)
        self._restart = restart_seconds
        self.topics = sorted({self.config.topic(t) for t in consumer.types})

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; a failure (broker or database gone) restarts the group
        membership after a pause, from the last committed offsets."""
        while not stop.is_set():
            try:
                await self._consume(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kafka consumer failed; restarting", consumer=self.consumer.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._restart)

    async def _consume(self, stop: asyncio.Event) -> None:
        kafka = AIOKafkaConsumer(
            *self.topics,
            **self.config.client_options(),
            group_id=self.config.group(self.consumer.name),
            enable_auto_commit=False,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            rebalance_timeout_ms=self.config.rebalance_timeout_ms,
            # A new group starts at the oldest retained event, not "from now on".
            auto_offset_reset="earliest",
        )
        await kafka.start()
        try:
            while not stop.is_set():
                batch = await kafka.getmany(timeout_ms=500, max_records=self._max_records)
                if not batch:
                    continue
                # Partitions side by side, each in order: an aggregate's events share a
                # partition, so per-aggregate order holds while the database round trips of
                # different partitions overlap. Offsets are committed once every partition's
                # records are handled; if one fails, the others stop and all are read again
                # (the inbox skips what was done).
                async with asyncio.TaskGroup() as group:
                    for records in batch.values():
                        group.create_task(self._partition(records))
                await kafka.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
        finally:
            await kafka.stop()

    async def _partition(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        async with self._parallel:
            for record in records:
                await self.handle(record)

    async def handle(self, record: ConsumerRecord[Any, Any]) -> None:
        """Deliver one record to the consumer (or park it); returns when that is durable."""
        raw: bytes = record.value or b""
        try:
            event = json.loads(raw)
            if not (
                isinstance(event, dict)
                and isinstance(event.get("id"), str)
                and isinstance(event.get("type"), str)
            ):
                raise ValueError("not a CloudEvents envelope with an id and a type")
        except ValueError as exc:
            origin = f"kafka:{record.topic}/{record.partition}/{record.offset}"
            error = f"unreadable record: {exc}"[:2000]
            await self._publisher.dead_letter(raw, record.key, self.consumer.name, error, record)
            await self._sink.dead_letter(
                self.consumer,
                {"raw": raw.decode(errors="replace")[:10_000]},
                error,
                event_id=origin,
            )
            return
        if event["type"] not in self.consumer.types:
            return  # the topic carries the service's other events too
        failure = await self._sink.attempt(self.consumer, event)
        if failure is not None:
            await self._publisher.dead_letter(raw, record.key, self.consumer.name, failure, record)
            await self._sink.dead_letter(self.consumer, event, failure)


class KafkaBus:
    """What `billfold worker` runs on the Kafka bus: the outbox relay and one consumer group
    per selected consumer, until `stop` is set."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        consumers: Sequence[Consumer],
        metrics: Metrics | None = None,
        *,
        relay: bool = True,
    ) -> None:
        self.config = KafkaConfig.from_settings(settings)
        self.publisher = KafkaPublisher(self.config)
        self.relay = (
            KafkaRelay(engine, settings.database_url, self.publisher, metrics) if relay else None
        )
        self.runners = [
            KafkaConsumerRunner(
                engine,
                consumer,
                self.publisher,
                attempts=settings.consumer_attempts,
                backoff_seconds=settings.consumer_backoff_seconds,
            )
            for consumer in consumers
        ]

    async def run(self, stop: asyncio.Event, retry_seconds: float = 5.0) -> None:
        topics = {t for runner in self.runners for t in runner.topics}
        # A broker that is not reachable yet (a worker starting before Kafka) is waited for:
        # the outbox keeps the events meanwhile.
        while True:
            try:
                await ensure_topics(self.config, sorted({*topics, self.config.dead_letter_topic}))
                await self.publisher.start()
                break
            except Exception:
                log.exception("kafka not reachable; retrying", bootstrap=self.config.bootstrap)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_seconds)
                if stop.is_set():
                    return
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.relay is not None:
                tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay-kafka"))
            tasks += [
                asyncio.create_task(r.run(stop), name=f"consumer:{r.consumer.name}")
                for r in self.runners
            ]
            await stop.wait()
        finally:
            if self.relay is not None:
                self.relay.stop()
            # A consumer finishes the batch in hand (its offsets then commit); one stuck past
            # the grace period is cancelled and its uncommitted records are read again later.
            _, late = await asyncio.wait(tasks, timeout=10) if tasks else (set(), set())
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.publisher.stop()
