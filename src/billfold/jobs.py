"""Background work of `billfold worker` (and `billfold up`): the outbox relay feeding the
in-process consumers, and the scheduled jobs (expiries, housekeeping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold import (
    fraud,
    ledger,
    loyalty,
    notifications,
    p2p,
    payment_methods,
    transactions,
    users,
)
from billfold.app import build_runtimes, network_client, vault_client
from billfold.config import Settings
from billfold.platform import idempotency
from billfold.platform.bus.consumers import ConsumerSink, select_consumers
from billfold.platform.bus.postgres import OutboxRelay, Sink, dev_log_sink
from billfold.platform.db import unit_of_work
from billfold.platform.observability import Metrics, get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    every_seconds: float
    run: Callable[[], Awaitable[object]]


def scheduled_jobs(
    engine: AsyncEngine,
    settings: Settings,
    payments: transactions.TransactionsRuntime | None = None,
) -> list[Job]:
    async def purge_idempotency_keys() -> None:
        async with unit_of_work(engine) as uow:
            await idempotency.purge_expired(await uow.connection())

    points = loyalty.LoyaltyRuntime(settings)
    jobs = []
    if payments is not None:
        # Payments lapse before their (later-expiring) ledger holds: their own sweeper releases
        # them with the payment's event and the card's reversal.
        jobs += [
            Job(
                "expire-authorizations",
                30,
                lambda: transactions.expire_authorizations(engine, payments),
            ),
            Job(
                "recover-stuck-payments",
                30,
                lambda: transactions.recover_stuck_payments(engine, payments),
            ),
        ]
    return [
        *jobs,
        Job("expire-holds", 30, lambda: ledger.expire_holds(engine)),
        Job("expire-transfer-claims", 60, lambda: p2p.expire_claims(engine)),
        Job("expire-transfer-requests", 60, lambda: p2p.expire_requests(engine)),
        Job("expire-micro-deposits", 300, lambda: payment_methods.expire_micro_deposits(engine)),
        Job("recover-fundings", 60, lambda: payment_methods.recover_fundings(engine, settings)),
        Job("purge-idempotency-keys", 3600, purge_idempotency_keys),
        # Loyalty: lots past their expiry; members whose spend rolled out of the 12 months.
        Job("expire-loyalty-points", 300, lambda: loyalty.expire_points(engine, points)),
        Job("reevaluate-loyalty-tiers", 6 * 3600, lambda: loyalty.reevaluate_tiers(engine, points)),
    ]


async def _production_log_sink(event: dict[str, Any]) -> None:
    """Production's downstream: the event's identity only. One-time codes reach people through
    the notification service; printing them (as the development sink does) would leak them."""
    log.info("event", type=event["type"], subject=event["subject"], id=event["id"])


def _dev_code_sink(p2p_runtime: p2p.P2PRuntime) -> Sink:
    """Development's downstream: the development log, with a one-time code opened first (the
    events carry it sealed; in development that printed line is the e-mail or SMS)."""
    codes = p2p_runtime.users.codes

    async def sink(event: dict[str, Any]) -> None:
        data = event.get("data")
        if isinstance(data, dict) and "sealed_code" in data:
            code = None
            with contextlib.suppress(KeyError, ValueError):
                code = users.open_one_time_code(codes, event)
            event = {**event, "data": {**data, "code": code}}
        await dev_log_sink(event)

    return sink


def event_sink(
    engine: AsyncEngine, p2p_runtime: p2p.P2PRuntime, downstream: Sink | None = None
) -> ConsumerSink:
    """Where the relay delivers: the in-process consumers, then `downstream` (by default the
    development log, which prints one-time codes, outside production)."""
    if downstream is None:
        production = p2p_runtime.settings.environment == "production"
        downstream = _production_log_sink if production else _dev_code_sink(p2p_runtime)
    consumers = [
        *p2p.consumers(p2p_runtime),
        *payment_methods.consumers(),
        # Receipts go to the process's BlobStore (the one the users runtime holds).
        *transactions.receipt_consumers(p2p_runtime.users.blobs),
        *notifications.consumers(notifications_runtime(p2p_runtime)),
        *loyalty.consumers(loyalty.LoyaltyRuntime(p2p_runtime.settings)),
    ]
    # The live fraud features learn outcomes (completed, declined, devices) from events, also
    # while the checks are off: turned on, they start warm.
    consumers += fraud.consumers(p2p_runtime.users.redis, p2p_runtime.settings)
    return ConsumerSink(engine, consumers, downstream)


def notifications_runtime(p2p_runtime: p2p.P2PRuntime) -> notifications.NotificationsRuntime:
    """The notification service's runtime on the same settings and sealed box as the API's (the
    box seals one-time codes until they are sent)."""
    return notifications.NotificationsRuntime(p2p_runtime.settings, p2p_runtime.users.sealed)


async def _every(job: Job, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await job.run()
        except Exception:
            log.exception("job failed; will retry on schedule", job=job.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), job.every_seconds)


async def run_background(
    engine: AsyncEngine,
    settings: Settings,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
    p2p_runtime: p2p.P2PRuntime | None = None,
    payments: transactions.TransactionsRuntime | None = None,
    consumers: Sequence[str] = (),
) -> None:
    """Relay, consumers and jobs until `stop` is set. `billfold up` passes its API's P2P
    runtime (and may pass its payments runtime); the worker builds its own (and closes them).
    `consumers` selects consumers by name or service (`select_consumers`; empty: all); only the
    Kafka bus can split them across workers."""
    if consumers and not settings.kafka_bootstrap:
        # The embedded relay marks an event published once its own consumers have it: a worker
        # running some consumers would take events from the others.
        raise ValueError("selecting consumers needs the Kafka bus (BILLFOLD_KAFKA_BOOTSTRAP)")
    async with contextlib.AsyncExitStack() as owned:
        if p2p_runtime is None:
            redis = Redis.from_url(settings.redis_url, decode_responses=False)
            owned.push_async_callback(redis.aclose)
            # The same construction as the API's (same contact-hash key). The key ring is never
            # started here (the worker signs nothing), so it may share the worker's engine.
            runtimes = build_runtimes(settings, redis, engine)
            owned.push_async_callback(runtimes.users.blobs.aclose)
            owned.push_async_callback(runtimes.vault.aclose)
            owned.push_async_callback(runtimes.network.aclose)
            p2p_runtime = runtimes.p2p
            payments = runtimes.transactions
        if payments is None:
            # The payment sweepers send reversals: a network client (and a vault client) of
            # their own, with the API's settings.
            rt = p2p_runtime.settings
            payments = transactions.TransactionsRuntime(
                rt, p2p_runtime.users, vault_client(rt), network_client(rt)
            )
            owned.push_async_callback(payments.vault.aclose)
            owned.push_async_callback(payments.network.aclose)  # type: ignore[attr-defined]
        await _run(engine, settings, stop, metrics, p2p_runtime, payments, consumers)


async def _run(
    engine: AsyncEngine,
    settings: Settings,
    stop: asyncio.Event,
    metrics: Metrics | None,
    p2p_runtime: p2p.P2PRuntime,
    payments: transactions.TransactionsRuntime,
    consumers: Sequence[str] = (),
) -> None:
    sink = event_sink(engine, p2p_runtime)
    relay: OutboxRelay | None = None
    if settings.kafka_bootstrap:
        from billfold.platform.bus.kafka import KafkaBus

        # The relay publishes to Kafka; each consumer reads it in a group of its own.
        bus = KafkaBus(engine, settings, select_consumers(sink.consumers, consumers), metrics)
        tasks = [asyncio.create_task(bus.run(stop), name="kafka-bus")]
    else:
        relay = OutboxRelay(engine, settings.database_url, sink, metrics)
        tasks = [asyncio.create_task(relay.run(), name="outbox-relay")]
    # Notifications are sent outside the consumers' transactions, by this job (retries wait
    # for their time in the deliveries table).
    dispatcher = notifications.build_dispatcher(
        engine, notifications_runtime(p2p_runtime), p2p_runtime.users.redis
    )
    tasks += [
        asyncio.create_task(_every(job, stop), name=job.name)
        for job in [
            *scheduled_jobs(engine, settings, payments),
            Job("dispatch-notifications", 1, dispatcher.drain),
        ]
    ]
    try:
        await stop.wait()
    finally:
        if relay is not None:
            relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tasks[0], 15)
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dispatcher.aclose()
