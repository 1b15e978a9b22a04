"""The SQL behind the fraud features: the user's profile for the live features, every feature
derived from PostgreSQL for the fallback, and the history that rebuilds the Redis state.

These read the users', payments' and transfers' tables (never write them): the features are a
read model of their history, and the fallback must answer when Redis cannot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

# Payments whose authorization succeeded (the live features count them on the events
# `authorized`, `captured` and `review_approved`); voided and expired ones were authorized first.
COMPLETED_PAYMENT = (
    "t.authorized_amount > 0 AND t.status IN ('authorized', 'partially_captured', 'captured', "
    "'partially_refunded', 'refunded', 'voided', 'expired')"
)
# Transfers whose money left the sender (events `completed` and `pending_claim`): a transfer held
# for review has no posting until it is released.
COMPLETED_TRANSFER = (
    "p.posting_id IS NOT NULL AND p.status IN ('completed', 'pending_claim', 'expired', "
    "'reversed', 'cancelled')"
)


@dataclass(frozen=True, slots=True)
class Profile:
    """What the features need to know about a user (users.users)."""

    created_at: datetime
    kyc_tier: int
    country: str
    timezone: str


_PROFILE = text(
    """
    SELECT u.created_at, u.kyc_tier, u.country, u.timezone,
           (SELECT d.created_at FROM users.devices d
             WHERE d.id = :device AND d.user_id = u.id) AS device_created_at
      FROM users.users u
     WHERE u.id = :user
    """
)


async def profile(
    conn: AsyncConnection, user_id: str, device_id: str | None
) -> tuple[Profile | None, datetime | None]:
    """The user's profile and when `device_id` was enrolled for them (None: not theirs)."""
    row = (await conn.execute(_PROFILE, {"user": user_id, "device": device_id or ""})).first()
    if row is None:
        return None, None
    return (
        Profile(row.created_at, int(row.kyc_tier), row.country.strip(), row.timezone),
        row.device_created_at,
    )


# Every feature's raw material in one statement (one round trip): windows end at :at and, like
# the live ones, count the attempt being checked (added by the caller, as it has no row yet).
_FALLBACK = text(
    f"""
    WITH pay AS (
        SELECT t.id, t.amount, t.currency, t.status, t.created_at, t.updated_at, t.device_id
          FROM transactions.transactions t
         WHERE t.user_id = :user AND t.created_at > CAST(:at AS timestamptz) - interval '24 hours' AND t.id <> :sid
    ), xfer AS (
        SELECT p.id, p.amount, p.currency, p.status, p.created_at, p.updated_at,
               p.recipient_id AS rcpt
          FROM p2p.transfers p
         WHERE p.sender_id = :user AND p.created_at > CAST(:at AS timestamptz) - interval '24 hours' AND p.id <> :sid
    ), att AS (
        SELECT amount, currency, created_at FROM pay
        UNION ALL SELECT amount, currency, created_at FROM xfer
    ), done AS (
        SELECT t.amount, t.created_at FROM transactions.transactions t
         WHERE t.user_id = :user AND t.currency = :currency AND t.id <> :sid
           AND {COMPLETED_PAYMENT}
        UNION ALL
        SELECT p.amount, p.created_at FROM p2p.transfers p
         WHERE p.sender_id = :user AND p.currency = :currency AND p.id <> :sid
           AND {COMPLETED_TRANSFER}
    ), habit AS (
        SELECT t.created_at FROM transactions.transactions t
         WHERE t.user_id = :user AND t.id <> :sid AND {COMPLETED_PAYMENT}
        UNION ALL
        SELECT p.created_at FROM p2p.transfers p
         WHERE p.sender_id = :user AND p.id <> :sid AND {COMPLETED_TRANSFER}
    ), card AS (
        SELECT t.status, t.created_at, t.updated_at FROM transactions.transactions t
         WHERE t.payment_method_id = :pm AND t.created_at > CAST(:at AS timestamptz) - interval '1 hour'
           AND t.id <> :sid
    ), rcv AS (
        SELECT p.sender_id FROM p2p.transfers p
         WHERE p.recipient_id = :rcpt AND p.created_at > CAST(:at AS timestamptz) - interval '24 hours'
           AND p.id <> :sid
    ), loc AS (
        SELECT d.latitude, d.longitude, t.created_at
          FROM transactions.transactions t
          JOIN transactions.transaction_details d ON d.transaction_id = t.id
         WHERE t.user_id = :user AND t.id <> :sid AND d.latitude IS NOT NULL
           AND d.longitude IS NOT NULL AND t.created_at <= :at
         ORDER BY t.created_at DESC LIMIT 1
    )
    SELECT
        (SELECT count(*) FROM att WHERE created_at > CAST(:at AS timestamptz) - interval '1 minute') AS user_count_1m,
        (SELECT count(*) FROM att WHERE created_at > CAST(:at AS timestamptz) - interval '1 hour') AS user_count_1h,
        (SELECT count(*) FROM att) AS user_count_24h,
        (SELECT coalesce(sum(amount), 0) FROM att
          WHERE currency = :currency AND created_at > CAST(:at AS timestamptz) - interval '1 hour') AS user_sum_1h,
        (SELECT coalesce(sum(amount), 0) FROM att WHERE currency = :currency) AS user_sum_24h,
        (SELECT count(*) FROM pay WHERE status = 'declined') +
        (SELECT count(*) FROM xfer WHERE status = 'failed') AS user_declines_24h,
        (SELECT count(*) FROM pay
          WHERE device_id = :device AND created_at > CAST(:at AS timestamptz) - interval '1 hour') AS device_count_1h,
        (SELECT count(*) FROM card
          WHERE created_at > CAST(:at AS timestamptz) - interval '1 minute') AS card_count_1m,
        (SELECT count(*) FROM card) AS card_count_1h,
        (SELECT count(*) FROM card WHERE status = 'declined') AS card_declines_1h,
        (SELECT count(*) FROM rcv) AS recipient_count_24h,
        (SELECT count(DISTINCT sender_id) FROM rcv WHERE sender_id <> :user)
            AS recipient_other_senders_24h,
        (SELECT count(DISTINCT rcpt) FROM xfer WHERE rcpt <> :rcpt) AS user_other_recipients_24h,
        (SELECT count(*) FROM done) AS hist_n,
        (SELECT coalesce(sum(amount), 0) FROM done) AS hist_sum,
        (SELECT coalesce(sum(amount::float8 * amount::float8), 0) FROM done) AS hist_sumsq,
        (SELECT coalesce(max(amount), 0) FROM done) AS hist_max,
        (SELECT count(*) FROM habit
          WHERE ((extract(hour FROM created_at AT TIME ZONE 'UTC')::int - :hour + 24) % 24)
                IN (0, 1, 23)) AS hours_near,
        (SELECT count(*) FROM habit) AS hours_total,
        (SELECT latitude FROM loc) AS prev_lat,
        (SELECT longitude FROM loc) AS prev_lon,
        (SELECT created_at FROM loc) AS prev_at,
        EXISTS (SELECT 1 FROM transactions.transactions t
                  JOIN transactions.transaction_details d ON d.transaction_id = t.id
                 WHERE t.user_id = :user AND d.merchant_country = :country AND t.id <> :sid
                   AND {COMPLETED_PAYMENT}) AS country_seen,
        (SELECT min(t.created_at) FROM transactions.transactions t
          WHERE t.user_id = :user AND t.device_id = :device AND t.id <> :sid
            AND {COMPLETED_PAYMENT}) AS device_used_at,
        EXISTS (SELECT 1 FROM p2p.transfers p
                 WHERE p.sender_id = :user AND p.id <> :sid AND {COMPLETED_TRANSFER}
                   AND p.recipient_id = :rcpt)
            AS recipient_seen
    """  # composed from this module's constants only
)


async def fallback_row(conn: AsyncConnection, params: dict[str, Any]) -> Row[Any]:
    """The raw material of `PostgresFeatures` (see `_FALLBACK` for the parameters)."""
    return (await conn.execute(_FALLBACK, params)).one()


# --- Rebuild: the history the Redis state is made of, oldest first. ----------------------------

_COMPLETED_HISTORY = text(
    f"""
    SELECT t.user_id, t.id, t.amount, t.currency, t.created_at AS at,
           d.merchant_country AS country, t.device_id AS device, NULL AS rcpt
      FROM transactions.transactions t
      LEFT JOIN transactions.transaction_details d ON d.transaction_id = t.id
     WHERE {COMPLETED_PAYMENT}
    UNION ALL
    SELECT p.sender_id, p.id, p.amount, p.currency, p.created_at,
           NULL, NULL, p.recipient_id
      FROM p2p.transfers p
     WHERE {COMPLETED_TRANSFER}
     ORDER BY at, id
    """  # composed from this module's constants only
)

_RECENT_ATTEMPTS = text(
    """
    SELECT 'payment' AS kind, t.id, t.user_id, t.amount, t.currency, t.created_at AS at,
           t.device_id AS device, t.payment_method_id AS card,
           NULL AS rcpt, d.latitude, d.longitude
      FROM transactions.transactions t
      LEFT JOIN transactions.transaction_details d ON d.transaction_id = t.id
     WHERE t.created_at > :since
    UNION ALL
    SELECT 'transfer', p.id, p.sender_id, p.amount, p.currency, p.created_at,
           NULL, NULL, p.recipient_id, NULL, NULL
      FROM p2p.transfers p
     WHERE p.created_at > :since
     ORDER BY at, id
    """
)

_RECENT_DECLINES = text(
    """
    SELECT t.id, t.user_id, t.payment_method_id AS card, t.updated_at AS at
      FROM transactions.transactions t
     WHERE t.status = 'declined' AND t.updated_at > :since
    UNION ALL
    SELECT p.id, p.sender_id, NULL, p.updated_at
      FROM p2p.transfers p
     WHERE p.status = 'failed' AND p.updated_at > :since
     ORDER BY at, id
    """
)

# The newest locations of every user (the live state keeps the last three).
_LOCATIONS = text(
    """
    SELECT user_id, id, latitude, longitude, at FROM (
        SELECT t.user_id, t.id, d.latitude, d.longitude, t.created_at AS at,
               row_number() OVER (PARTITION BY t.user_id ORDER BY t.created_at DESC, t.id DESC)
                   AS n
          FROM transactions.transactions t
          JOIN transactions.transaction_details d ON d.transaction_id = t.id
         WHERE d.latitude IS NOT NULL AND d.longitude IS NOT NULL
    ) newest
     WHERE n <= 3
    """
)

# When each user first had each device: enrolled, or first used in a completed payment.
_DEVICES = text(
    f"""
    SELECT user_id, device, min(at) AS first_seen FROM (
        SELECT d.user_id, d.id AS device, d.created_at AS at FROM users.devices d
        UNION ALL
        SELECT t.user_id, t.device_id, t.created_at FROM transactions.transactions t
         WHERE t.device_id IS NOT NULL AND {COMPLETED_PAYMENT}
    ) seen
     GROUP BY user_id, device
    """  # composed from this module's constants only
)


async def _stream(
    conn: AsyncConnection, statement: Any, params: dict[str, Any] | None = None
) -> AsyncIterator[Row[Any]]:
    result = await conn.stream(statement, params or {})
    async for row in result:
        yield row


def completed_history(conn: AsyncConnection) -> AsyncIterator[Row[Any]]:
    """Every completed payment and transfer, oldest first."""
    return _stream(conn, _COMPLETED_HISTORY)


def recent_attempts(conn: AsyncConnection, since: datetime) -> AsyncIterator[Row[Any]]:
    """Every payment and transfer attempted after `since`, oldest first."""
    return _stream(conn, _RECENT_ATTEMPTS, {"since": since})


def recent_declines(conn: AsyncConnection, since: datetime) -> AsyncIterator[Row[Any]]:
    """Declined payments and failed transfers after `since`, oldest first."""
    return _stream(conn, _RECENT_DECLINES, {"since": since})


def latest_locations(conn: AsyncConnection) -> AsyncIterator[Row[Any]]:
    """Each user's three newest payment locations."""
    return _stream(conn, _LOCATIONS)


def device_first_seen(conn: AsyncConnection) -> AsyncIterator[Row[Any]]:
    """(user, device, first seen) for every enrolled or used device."""
    return _stream(conn, _DEVICES)
