"""The fraud features on real Redis and PostgreSQL: windows that slide, an attempt recorded once
however often it is checked, outcome events that count once however often they are delivered,
impossible travel in km and km/h, new device/recipient/country, the profile from PostgreSQL,
the fallback's same names, a rebuild equal to the incremental state, and Redis going away."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from typer.testing import CliRunner

from billfold.fraud import FEATURE_NAMES, FeaturesUnavailable, RiskSubject
from billfold.fraud.features import (
    PostgresFeatures,
    RedisFeatures,
    consumers,
    haversine_km,
    rebuild,
)
from billfold.platform.bus.consumers import Consumer, ConsumerSink
from billfold.platform.db import create_engine
from billfold.platform.ids import new_id

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
BERLIN = (52.52, 13.405)
PARIS = (48.8566, 2.3522)
TOKYO = (35.6762, 139.6503)


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(database_url, pool_size=2)
    yield e
    await e.dispose()


@pytest.fixture(scope="module")
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def live(redis: Redis) -> RedisFeatures:
    # A prefix of its own per test: no test sees another's windows.
    return RedisFeatures(redis, prefix=f"bft:{uuid.uuid4().hex[:8]}:", budget_ms=2000)


@pytest.fixture
async def conn(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as c:
        yield c


async def add_user(
    engine: AsyncEngine,
    *,
    country: str = "DE",
    timezone: str = "Europe/Berlin",
    created_at: datetime = T0 - timedelta(days=400),
    kyc_tier: int = 2,
) -> str:
    user_id = new_id("usr")
    tag = uuid.uuid4().hex[:12]
    async with engine.begin() as c:
        await c.execute(
            text(
                """
                INSERT INTO users.users (id, email, phone, password_hash, name, date_of_birth,
                                         country, timezone, kyc_tier, created_at, updated_at)
                VALUES (:id, :email, :phone, 'x', 'Test User', '1990-01-01', :country, :tz,
                        :tier, :created, :created)
                """
            ),
            {
                "id": user_id,
                "email": f"{tag}@example.com",
                "phone": f"+49151{int(tag[:8], 16) % 10**8:08d}",
                "country": country,
                "tz": timezone,
                "tier": kyc_tier,
                "created": created_at,
            },
        )
    return user_id


async def add_device(engine: AsyncEngine, user_id: str, created_at: datetime) -> str:
    device_id = new_id("dev")
    async with engine.begin() as c:
        await c.execute(
            text(
                """
                INSERT INTO users.devices (id, user_id, name, platform, scopes, created_at)
                VALUES (:id, :user, 'phone', 'ios', ARRAY['payments'], :at)
                """
            ),
            {"id": device_id, "user": user_id, "at": created_at},
        )
    return device_id


async def add_payment(
    engine: AsyncEngine,
    user_id: str,
    amount: int,
    at: datetime,
    *,
    status: str = "captured",
    currency: str = "EUR",
    country: str = "DE",
    place: tuple[float, float] | None = None,
    device_id: str | None = None,
    mcc: str = "5411",
    updated_at: datetime | None = None,
) -> str:
    txn_id = new_id("txn")
    authorized = amount if status not in ("declined", "failed") else 0
    async with engine.begin() as c:
        await c.execute(
            text(
                """
                INSERT INTO transactions.transactions (
                    id, user_id, source, status, amount, currency, authorized_amount,
                    captured_amount, merchant_id, merchant_name, mcc, category, channel,
                    device_id, idempotency_key, request_hash, created_at, updated_at)
                VALUES (:id, :user, 'wallet', :status, :amount, :currency, :auth, :captured,
                        'mer_1', 'Shop', :mcc, 'groceries', 'contactless', :device, :id, 'h',
                        :at, :updated)
                """
            ),
            {
                "id": txn_id,
                "user": user_id,
                "status": status,
                "amount": amount,
                "currency": currency,
                "auth": authorized,
                "captured": amount if status == "captured" else 0,
                "mcc": mcc,
                "device": device_id,
                "at": at,
                "updated": updated_at or at,
            },
        )
        await c.execute(
            text(
                """
                INSERT INTO transactions.transaction_details
                    (transaction_id, merchant_country, latitude, longitude)
                VALUES (:id, :country, :lat, :lon)
                """
            ),
            {
                "id": txn_id,
                "country": country,
                "lat": place[0] if place else None,
                "lon": place[1] if place else None,
            },
        )
    return txn_id


async def add_transfer(
    engine: AsyncEngine,
    sender_id: str,
    recipient_id: str,
    amount: int,
    at: datetime,
    *,
    status: str = "completed",
    currency: str = "EUR",
) -> str:
    transfer_id = new_id("p2p")
    async with engine.begin() as c:
        await c.execute(
            text(
                """
                INSERT INTO p2p.transfers (
                    id, sender_id, sender_name, recipient_id, recipient_name, recipient_kind,
                    recipient_hint, amount, currency, status, posting_id, limit_day, limit_month,
                    created_at, updated_at, completed_at)
                VALUES (:id, :sender, 'S', :rcpt, 'R', 'user_id', 'R', :amount, :currency,
                        :status, :posting, :day, :month, :at, :at, :done)
                """
            ),
            {
                "id": transfer_id,
                "sender": sender_id,
                "rcpt": recipient_id,
                "amount": amount,
                "currency": currency,
                "status": status,
                "posting": new_id("pst") if status == "completed" else None,
                "day": at.date(),
                "month": at.date().replace(day=1),
                "at": at,
                "done": at if status == "completed" else None,
            },
        )
    return transfer_id


def payment(
    user_id: str,
    amount: int = 1_000,
    at: datetime = T0,
    *,
    subject_id: str | None = None,
    currency: str = "EUR",
    place: tuple[float, float] | None = None,
    country: str = "DE",
    device_id: str | None = None,
    card: str | None = None,
    ip: str | None = None,
    mcc: str = "5411",
    stepped_up: bool = False,
) -> RiskSubject:
    return RiskSubject(
        kind="payment",
        subject_id=subject_id or new_id("txn"),
        user_id=user_id,
        amount=amount,
        currency=currency,
        at=at,
        device_id=device_id,
        ip=ip,
        source="card" if card else "wallet",
        payment_method_id=card,
        mcc=mcc,
        merchant_country=country,
        latitude=place[0] if place else None,
        longitude=place[1] if place else None,
        channel="contactless",
        stepped_up=stepped_up,
    )


def transfer(
    user_id: str,
    recipient_id: str,
    amount: int = 1_000,
    at: datetime = T0,
    *,
    subject_id: str | None = None,
    device_id: str | None = None,
    currency: str = "EUR",
) -> RiskSubject:
    return RiskSubject(
        kind="transfer",
        subject_id=subject_id or new_id("p2p"),
        user_id=user_id,
        amount=amount,
        currency=currency,
        at=at,
        device_id=device_id,
        recipient_id=recipient_id,
        recipient_key=recipient_id,
    )


def envelope(type_: str, data: dict[str, Any], at: datetime) -> dict[str, Any]:
    return {"id": new_id("evt"), "type": type_, "time": at.isoformat(), "data": data}


def payment_event(
    type_: str,
    txn_id: str,
    user_id: str,
    amount: int,
    at: datetime,
    *,
    country: str = "DE",
    device_id: str | None = None,
    currency: str = "EUR",
    event_at: datetime | None = None,
) -> dict[str, Any]:
    return envelope(
        f"billfold.transactions.payment.{type_}",
        {
            "transaction_id": txn_id,
            "user_id": user_id,
            "status": type_,
            "source": "wallet",
            "payment_method_id": None,
            "amount": amount,
            "currency": currency,
            "merchant": {"id": "mer_1", "name": "Shop", "mcc": "5411", "country": country},
            "channel": "contactless",
            "device_id": device_id,
            "created_at": at.isoformat(),
        },
        event_at or at,
    )


def transfer_event(
    status: str,
    transfer_id: str,
    sender_id: str,
    recipient_id: str,
    amount: int,
    at: datetime,
    currency: str = "EUR",
) -> dict[str, Any]:
    return envelope(
        f"billfold.p2p.transfer.{status}",
        {
            "transfer_id": transfer_id,
            "status": status,
            "sender_id": sender_id,
            "recipient_id": recipient_id,
            "amount": amount,
            "currency": currency,
            "request_id": None,
        },
        at,
    )


async def handle(live: RedisFeatures, event: dict[str, Any], *, times: int = 1) -> None:
    """Run the consumer of `event`'s type `times` times, without the inbox: what a redelivery
    after a lost inbox commit does."""
    (consumer,) = [c for c in consumers(live) if event["type"] in c.types]
    for _ in range(times):
        await consumer.handle(None, event)  # type: ignore[arg-type]


async def test_every_name_and_an_attempt_recorded_once(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(engine)
    first = payment(user, 1_500, card="pm_card1", device_id="dev_x", ip="203.0.113.7")
    f = await live.snapshot(conn, first)
    assert tuple(f) == FEATURE_NAMES
    assert f["degraded"] is False
    assert (f["user_count_1m"], f["user_sum_24h"], f["card_count_1h"]) == (1, 1_500, 1)
    assert (f["device_count_1h"], f["ip_count_1h"], f["ip_users_24h"]) == (1, 1, 1)

    # Checking the same payment again (a retry, a resumed step-up) records nothing new.
    again = await live.snapshot(conn, first)
    assert again == f

    second = payment(user, 500, T0 + timedelta(seconds=5), card="pm_card1", ip="203.0.113.7")
    g = await live.snapshot(conn, second)
    assert (g["user_count_1m"], g["user_sum_1h"], g["card_count_1m"], g["ip_count_1h"]) == (
        2,
        2_000,
        2,
        2,
    )


async def test_windows_slide(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(engine)
    for offset in (timedelta(0), timedelta(seconds=30)):
        await live.snapshot(conn, payment(user, 100, T0 + offset, card="pm_c"))

    f = await live.snapshot(conn, payment(user, 200, T0 + timedelta(seconds=50), card="pm_c"))
    assert (f["user_count_1m"], f["user_count_1h"], f["card_count_1m"]) == (3, 3, 3)
    assert (f["user_sum_1h"], f["user_sum_24h"]) == (400, 400)

    # Two minutes on: the first three left the minute, not the hour.
    f = await live.snapshot(conn, payment(user, 1, T0 + timedelta(minutes=2), card="pm_c"))
    assert (f["user_count_1m"], f["user_count_1h"], f["card_count_1m"]) == (1, 4, 1)

    # An hour and a minute after the first: the first minute's three left the hour.
    f = await live.snapshot(conn, payment(user, 2, T0 + timedelta(minutes=61), card="pm_c"))
    assert (f["user_count_1h"], f["user_count_24h"], f["card_count_1h"]) == (2, 5, 2)
    assert (f["user_sum_1h"], f["user_sum_24h"]) == (3, 403)

    # A day after the last one only this one is left.
    f = await live.snapshot(conn, payment(user, 7, T0 + timedelta(hours=26)))
    assert (f["user_count_24h"], f["user_sum_24h"]) == (1, 7)


async def test_sums_are_per_currency(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(engine)
    await live.snapshot(conn, payment(user, 5_000, currency="USD"))
    f = await live.snapshot(conn, payment(user, 300, T0 + timedelta(seconds=1)))
    assert (f["user_count_1h"], f["user_sum_1h"]) == (2, 300)


async def test_impossible_travel(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(engine)
    f = await live.snapshot(conn, payment(user, place=BERLIN))
    assert (f["has_location"], f["km_from_last"], f["speed_kmh"]) == (True, 0.0, 0.0)

    tokyo = payment(user, at=T0 + timedelta(hours=1), place=TOKYO, country="JP")
    f = await live.snapshot(conn, tokyo)
    km = haversine_km(*BERLIN, *TOKYO)
    assert 8_900 < km < 8_950
    assert f["km_from_last"] == pytest.approx(km, abs=0.01)
    assert f["speed_kmh"] == pytest.approx(km, abs=0.01)  # in one hour
    assert f["country_mismatch"] is True and f["new_country"] is True

    # The re-check of the same payment still compares with Berlin, not with itself.
    assert await live.snapshot(conn, tokyo) == f

    # Paris three days later: a plausible journey from Tokyo.
    f = await live.snapshot(conn, payment(user, at=T0 + timedelta(days=3), place=PARIS))
    assert f["km_from_last"] == pytest.approx(haversine_km(*TOKYO, *PARIS), abs=0.01)
    assert float(f["speed_kmh"]) < 200  # type: ignore[arg-type]

    # A payment without a location says nothing about travel.
    f = await live.snapshot(conn, payment(user, at=T0 + timedelta(days=3, hours=1)))
    assert (f["has_location"], f["speed_kmh"]) == (False, 0.0)


async def test_new_device_recipient_and_country(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(engine, country="DE")
    bob = await add_user(engine)
    enrolled = await add_device(engine, user, T0 - timedelta(hours=48))

    f = await live.snapshot(conn, payment(user, device_id=enrolled))
    assert f["new_device"] is False
    assert f["device_age_hours"] == pytest.approx(48.0)
    f = await live.snapshot(conn, payment(user, device_id="dev_stranger"))
    assert (f["new_device"], f["device_age_hours"]) == (True, 0.0)
    f = await live.snapshot(conn, payment(user))
    assert f["new_device"] is True  # none given

    # Home is never a new country; France is, until the user has paid there.
    assert (await live.snapshot(conn, payment(user, country="DE")))["new_country"] is False
    paris = payment(user, country="FR", at=T0 + timedelta(minutes=1))
    assert (await live.snapshot(conn, paris))["new_country"] is True
    await handle(
        live,
        payment_event("authorized", paris.subject_id, user, 1_000, paris.at, country="FR"),
    )
    f = await live.snapshot(conn, payment(user, country="FR", at=T0 + timedelta(minutes=2)))
    assert (f["new_country"], f["country_mismatch"]) == (False, True)

    # A recipient is new until a transfer to them went through.
    first = transfer(user, bob, at=T0 + timedelta(minutes=3))
    assert (await live.snapshot(conn, first))["new_recipient"] is True
    await handle(live, transfer_event("completed", first.subject_id, user, bob, 1_000, first.at))
    f = await live.snapshot(conn, transfer(user, bob, at=T0 + timedelta(minutes=4)))
    assert f["new_recipient"] is False
    assert (f["recipient_count_24h"], f["recipient_senders_24h"]) == (2, 1)
    assert f["user_recipients_24h"] == 1

    # A device used in a completed payment is known from then on.
    used = payment(user, device_id="dev_later", at=T0 + timedelta(minutes=5))
    await live.snapshot(conn, used)
    await handle(
        live,
        payment_event("captured", used.subject_id, user, 1_000, used.at, device_id="dev_later"),
    )
    f = await live.snapshot(
        conn, payment(user, device_id="dev_later", at=used.at + timedelta(hours=2))
    )
    assert (f["new_device"], f["device_age_hours"]) == (False, pytest.approx(2.0))

    # Enrolment seen through the users' event.
    await handle(
        live,
        envelope(
            "billfold.users.device.enrolled",
            {"user_id": user, "device_id": "dev_enrolled_now"},
            T0 + timedelta(hours=3),
        ),
    )
    f = await live.snapshot(
        conn, payment(user, device_id="dev_enrolled_now", at=T0 + timedelta(hours=4))
    )
    assert (f["new_device"], f["device_age_hours"]) == (False, pytest.approx(1.0))


async def test_fan_out_and_fan_in(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    mule = await add_user(engine)
    senders = [await add_user(engine) for _ in range(4)]
    for i, sender in enumerate(senders):
        f = await live.snapshot(conn, transfer(sender, mule, at=T0 + timedelta(minutes=i)))
    assert (f["recipient_count_24h"], f["recipient_senders_24h"]) == (4, 4)
    recipients = [await add_user(engine) for _ in range(5)]
    for i, r in enumerate(recipients):
        f = await live.snapshot(conn, transfer(mule, r, at=T0 + timedelta(minutes=10 + i)))
    assert f["user_recipients_24h"] == 5
    assert f["new_recipient"] is True


async def test_outcome_events_count_once_under_redelivery(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures, redis: Redis
) -> None:
    user = await add_user(engine)
    amounts = [1_000, 2_000, 3_000]
    for i, amount in enumerate(amounts):
        s = payment(user, amount, T0 + timedelta(minutes=i), card="pm_c")
        await live.snapshot(conn, s)
        await handle(live, payment_event("authorized", s.subject_id, user, amount, s.at), times=3)
        # The capture of the same payment is the same completed payment.
        await handle(live, payment_event("captured", s.subject_id, user, amount, s.at), times=2)

    declined = payment(user, 50, T0 + timedelta(minutes=5), card="pm_c")
    await live.snapshot(conn, declined)
    event = payment_event("declined", declined.subject_id, user, 50, declined.at)
    await handle(live, event, times=3)

    f = await live.snapshot(conn, payment(user, 6_000, T0 + timedelta(minutes=6), card="pm_c"))
    assert f["history_count"] == 3
    assert f["amount_mean"] == pytest.approx(2_000)
    assert f["amount_std"] == pytest.approx(816.4966, abs=1e-3)
    assert f["amount_zscore"] == pytest.approx((6_000 - 2_000) / 816.4966, abs=1e-3)
    assert f["amount_to_max"] == pytest.approx(2.0)
    assert (f["user_declines_24h"], f["card_declines_1h"]) == (1, 1)
    # All three completed at 12:0x UTC: within ±1 h of a 12:06 attempt.
    assert f["hour_habit_share"] == 1.0
    # Habits are of any currency (amounts are not): a USD payment at 20:00 halves nothing here
    # but counts in the share.
    usd = payment(user, 100, T0 + timedelta(hours=8), currency="USD")
    await live.snapshot(conn, usd)
    await handle(
        live, payment_event("authorized", usd.subject_id, user, 100, usd.at, currency="USD")
    )
    f = await live.snapshot(conn, payment(user, 10, T0 + timedelta(minutes=9)))
    assert (f["history_count"], f["hour_habit_share"]) == (3, 0.75)

    # Through the real sink with its inbox, a second delivery is not even handled.
    sink = ConsumerSink(engine, consumers(live))
    s = payment(user, 4_000, T0 + timedelta(minutes=7))
    await live.snapshot(conn, s)
    again = payment_event("authorized", s.subject_id, user, 4_000, s.at)
    await sink(again)
    await sink(again)
    f = await live.snapshot(conn, payment(user, 10, T0 + timedelta(minutes=8)))
    assert f["history_count"] == 4


async def test_a_blocked_transfer_counts_as_a_decline(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user, bob = await add_user(engine), await add_user(engine)
    blocked = transfer(user, bob)
    await live.snapshot(conn, blocked)
    await live.record_decision(blocked, "block")
    await live.record_decision(blocked, "block")
    await handle(
        live,
        envelope(
            "billfold.fraud.decision.made",
            {"subject_id": blocked.subject_id, "user_id": user, "action": "block"},
            T0,
        ),
    )
    f = await live.snapshot(conn, transfer(user, bob, at=T0 + timedelta(seconds=1)))
    assert f["user_declines_24h"] == 1


async def test_profile_from_postgres_and_refreshed_on_change(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    user = await add_user(
        engine, timezone="Asia/Tokyo", created_at=T0 - timedelta(days=10, hours=12), kyc_tier=1
    )
    f = await live.snapshot(conn, payment(user))
    assert f["account_age_days"] == pytest.approx(10.5)
    assert f["kyc_tier"] == 1
    assert f["hour_of_day"] == 21  # 12:00 UTC in Tokyo

    async with engine.begin() as c:
        await c.execute(text("UPDATE users.users SET kyc_tier = 2 WHERE id = :id"), {"id": user})
    # The copy in Redis is still the old one…
    assert (await live.snapshot(conn, payment(user)))["kyc_tier"] == 1
    # …until the users' event says it changed.
    await handle(
        live,
        envelope("billfold.users.kyc.status_changed", {"user_id": user, "tier": 2}, T0),
    )
    assert (await live.snapshot(conn, payment(user)))["kyc_tier"] == 2


async def test_postgres_fallback_gives_the_same_names(
    engine: AsyncEngine, conn: AsyncConnection
) -> None:
    user, bob = await add_user(engine), await add_user(engine)
    device = await add_device(engine, user, T0 - timedelta(days=2))
    for i, amount in enumerate((1_000, 2_000, 3_000)):
        await add_payment(engine, user, amount, T0 - timedelta(days=3, minutes=i), place=BERLIN)
    await add_payment(engine, user, 700, T0 - timedelta(minutes=30), status="declined")
    await add_transfer(engine, user, bob, 500, T0 - timedelta(minutes=10))

    f = await PostgresFeatures().snapshot(
        conn, payment(user, 6_000, device_id=device, place=TOKYO, country="JP")
    )
    assert tuple(f) == FEATURE_NAMES
    assert f["degraded"] is True
    assert (f["user_count_1h"], f["user_sum_1h"], f["user_declines_24h"]) == (3, 7_200, 1)
    assert f["history_count"] == 4  # three payments and the transfer, in EUR
    assert f["amount_to_max"] == pytest.approx(2.0)
    assert (f["new_device"], f["device_age_hours"]) == (False, pytest.approx(48.0))
    assert f["km_from_last"] == pytest.approx(haversine_km(*BERLIN, *TOKYO), abs=0.01)
    assert (f["new_country"], f["country_mismatch"]) == (True, True)
    g = await PostgresFeatures().snapshot(conn, transfer(user, bob))
    assert (g["new_recipient"], g["recipient_count_24h"], g["user_recipients_24h"]) == (
        False,
        2,
        1,
    )


async def test_rebuild_equals_incremental(
    engine: AsyncEngine, conn: AsyncConnection, live: RedisFeatures
) -> None:
    """The same history fed to the live path (checks and events) and rebuilt from PostgreSQL
    gives the same features."""
    user, bob, carol = await add_user(engine), await add_user(engine), await add_user(engine)
    device = await add_device(engine, user, T0 - timedelta(days=30))
    now = datetime.now(UTC).replace(microsecond=0)
    history = [  # (minutes ago, amount, status, place, country)
        (3 * 24 * 60, 1_200, "captured", BERLIN, "DE"),
        (2 * 24 * 60, 800, "captured", PARIS, "FR"),
        (300, 4_000, "authorized", PARIS, "FR"),
        (50, 300, "declined", None, "DE"),
        (5, 900, "captured", BERLIN, "DE"),
    ]
    for minutes, amount, status, place, country in history:
        at = now - timedelta(minutes=minutes)
        txn = await add_payment(
            engine, user, amount, at, status=status, place=place, country=country, device_id=device
        )
        await live.snapshot(
            conn,
            payment(
                user, amount, at, subject_id=txn, place=place, country=country, device_id=device
            ),
        )
        kind = "declined" if status == "declined" else "authorized"
        await handle(
            live,
            payment_event(kind, txn, user, amount, at, country=country, device_id=device),
        )
    for minutes, who in ((100, bob), (20, carol)):
        at = now - timedelta(minutes=minutes)
        xfer = await add_transfer(engine, user, who, 2_500, at)
        await live.snapshot(conn, transfer(user, who, 2_500, at, subject_id=xfer))
        await handle(live, transfer_event("completed", xfer, user, who, 2_500, at))

    probe = payment(
        user, 5_000, now, subject_id="txn_probe", place=TOKYO, country="JP", device_id=device
    )
    incremental = await live.snapshot(conn, probe)
    probe_transfer = transfer(user, bob, 100, now, subject_id="p2p_probe")
    incremental_transfer = await live.snapshot(conn, probe_transfer)

    report = await rebuild(engine, live, now=now)
    assert report.deleted_keys > 0 and report.completed >= 6
    rebuilt = await live.snapshot(conn, probe)
    rebuilt_transfer = await live.snapshot(conn, probe_transfer)
    assert rebuilt == incremental
    assert rebuilt_transfer == incremental_transfer
    # And they say what the history says.
    assert incremental["history_count"] == 6
    assert incremental["user_count_24h"] == 6  # three payments, two transfers and the probe
    assert incremental["user_declines_24h"] == 1
    assert incremental["new_device"] is False
    assert incremental["km_from_last"] == pytest.approx(haversine_km(*BERLIN, *TOKYO), abs=0.01)
    assert incremental_transfer["new_recipient"] is False


async def test_rebuild_features_command(
    engine: AsyncEngine,
    redis: Redis,
    database_url: str,
    redis_url: str,
    conn: AsyncConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from billfold.cli import app

    prefix = f"bft:{uuid.uuid4().hex[:8]}:"
    live = RedisFeatures(redis, prefix=prefix, budget_ms=2000)
    user = await add_user(engine)
    await add_payment(engine, user, 1_000, datetime.now(UTC) - timedelta(days=1))
    stale = f"{prefix}fraud:{{{user}}}:hist"
    await redis.hset(stale, "EUR:n", 99)  # type: ignore[misc]

    monkeypatch.setenv("BILLFOLD_DATABASE_URL", database_url)
    monkeypatch.setenv("BILLFOLD_REDIS_URL", redis_url)
    monkeypatch.setenv("BILLFOLD_REDIS_PREFIX", prefix)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["fraud", "rebuild-features"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "fraud features rebuilt" in result.output
    f = await live.snapshot(conn, payment(user, 1_000, datetime.now(UTC)))
    assert f["history_count"] == 1


async def test_closed_port_raises_features_unavailable(
    engine: AsyncEngine, conn: AsyncConnection
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broken = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        features = RedisFeatures(broken, budget_ms=200)
        user = await add_user(engine)
        with pytest.raises(FeaturesUnavailable):
            await features.snapshot(conn, payment(user))
    finally:
        await broken.aclose()


async def test_over_budget_raises_features_unavailable(
    engine: AsyncEngine, conn: AsyncConnection
) -> None:
    """A Redis that takes the request and does not answer in time (a silent socket)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    slow = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        features = RedisFeatures(slow, budget_ms=50)
        user = await add_user(engine)
        started = asyncio.get_running_loop().time()
        with pytest.raises(FeaturesUnavailable):
            await features.snapshot(conn, payment(user))
        assert asyncio.get_running_loop().time() - started < 0.5
    finally:
        await slow.aclose()
        server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_redis_stopped_then_features_unavailable_fast(
    engine: AsyncEngine, conn: AsyncConnection
) -> None:
    """A real Redis that answers, then is stopped: the next check fails fast and says so."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    assert binary, "redis-server (or valkey-server) is needed for this test"
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            d,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            features = RedisFeatures(client, budget_ms=100)
            user = await add_user(engine)
            f = await features.snapshot(conn, payment(user))
            assert f["user_count_1m"] == 1
            proc.terminate()
            await proc.wait()
            started = asyncio.get_running_loop().time()
            with pytest.raises(FeaturesUnavailable):
                await features.snapshot(conn, payment(user, at=T0 + timedelta(seconds=1)))
            assert asyncio.get_running_loop().time() - started < 1.0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await client.aclose()


async def test_consumers_cover_the_outcome_events(live: RedisFeatures) -> None:
    types = set().union(*(c.types for c in consumers(live)))
    assert {
        "billfold.transactions.payment.authorized",
        "billfold.transactions.payment.declined",
        "billfold.p2p.transfer.completed",
        "billfold.p2p.transfer.failed",
        "billfold.users.device.enrolled",
        "billfold.users.kyc.status_changed",
    } <= types
    assert all(isinstance(c, Consumer) for c in consumers(live))
    assert len({c.name for c in consumers(live)}) == len(consumers(live))


async def test_real_transfers_through_the_workers_sink(app: Any, client: Any) -> None:
    """Transfers made over HTTP, their real outbox events delivered (twice) by the worker's own
    sink: the app's live features learn the history once, and a rebuild from PostgreSQL into
    an empty prefix says the same (IP windows aside: PostgreSQL keeps no IPs)."""
    from billfold import jobs
    from tests.conftest import fund, sign_up
    from tests.integration.transfer_support import outbox_events, send_ok

    alice, bob = await sign_up(client), await sign_up(client)
    await fund(app, alice.user["id"], 100_000)
    sent = [await send_ok(client, alice, amount, bob) for amount in (1_000, 2_000, 3_000)]

    sink = jobs.event_sink(app.state.resources.engine, app.state.p2p)
    for transfer_ in sent:
        (event,) = await outbox_events(app, "billfold.p2p.transfer.completed", transfer_["id"])
        await sink(event)
        await sink(event)
    (registered,) = await outbox_events(app, "billfold.users.user.registered", alice.user["id"])
    await sink(registered)

    # The app's own key space, with a budget a loaded test machine cannot overrun.
    app_features: RedisFeatures = app.state.fraud.features
    prefix = app.state.resources.settings.redis_prefix
    features = RedisFeatures(app_features.redis, prefix=prefix, budget_ms=5_000)
    probe = RiskSubject(
        kind="transfer",
        subject_id="p2p_probe_http",
        user_id=alice.user["id"],
        amount=4_000,
        currency="USD",
        at=datetime.now(UTC),
        recipient_id=bob.user["id"],
        recipient_key=bob.user["id"],
    )
    async with app.state.resources.engine.connect() as c:
        live_view = await features.snapshot(c, probe)
        assert (live_view["history_count"], live_view["new_recipient"]) == (3, False)
        assert live_view["amount_mean"] == 2_000.0
        assert live_view["amount_to_max"] == pytest.approx(4 / 3, abs=1e-4)
        assert (live_view["user_count_1h"], live_view["recipient_senders_24h"]) == (4, 1)
        assert (live_view["kyc_tier"], live_view["new_device"]) == (0, True)

        fresh = RedisFeatures(
            features.redis, prefix=f"bft:{uuid.uuid4().hex[:8]}:", budget_ms=5_000
        )
        await rebuild(app.state.resources.engine, fresh, now=probe.at)
        rebuilt = await fresh.snapshot(c, probe)
    differs = {k for k in FEATURE_NAMES if rebuilt[k] != live_view[k]}
    assert differs <= {"ip_count_1h", "ip_users_24h"}, differs
