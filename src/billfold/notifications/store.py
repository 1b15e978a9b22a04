"""SQL on the `notifications` schema; nothing else writes these tables."""

from __future__ import annotations

import json
from datetime import datetime, time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

_NOTIFICATION_COLUMNS = (
    "id, user_id, kind, category, event_id, event_type, locale, in_app, title, body, data, "
    "read_at, created_at"
)
_DELIVERY_COLUMNS = (
    "id, notification_id, user_id, channel, provider, target, status, content, sealed_content, "
    "attempts, max_attempts, next_attempt_at, lease_until, fallback_of, provider_message_id, "
    "error, created_at, updated_at"
)


# --- notifications (the inbox) -------------------------------------------------------------------


async def insert_notification(conn: AsyncConnection, values: dict[str, Any]) -> bool:
    """Insert a notification unless this user already has one with its dedupe key."""
    result = await conn.execute(
        text(
            """
            INSERT INTO notifications.notifications (id, user_id, kind, category, dedupe_key,
                event_id, event_type, locale, in_app, title, body, data, created_at)
            VALUES (:id, :user_id, :kind, :category, :dedupe_key, :event_id, :event_type,
                :locale, :in_app, :title, :body, CAST(:data AS jsonb), :now)
            ON CONFLICT (user_id, dedupe_key) DO NOTHING
            RETURNING id
            """
        ),
        {**values, "data": json.dumps(values["data"], separators=(",", ":"), default=str)},
    )
    return result.first() is not None


async def get_notification(conn: AsyncConnection, user_id: str, ntf_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications.notifications "
                "WHERE id = :id AND user_id = :uid AND in_app"
            ),
            {"id": ntf_id, "uid": user_id},
        )
    ).first()


async def list_inbox(
    conn: AsyncConnection,
    user_id: str,
    limit: int | None,
    after: str | None,
    *,
    unread_only: bool = False,
    newest_first: bool = True,
) -> list[Row[Any]]:
    unread = " AND read_at IS NULL" if unread_only else ""
    return await fetch_page(
        conn,
        f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications.notifications "
        f"WHERE user_id = :uid AND in_app{unread}",
        {"uid": user_id},
        limit=limit,
        after=after,
        newest_first=newest_first,
    )


async def unread_count(conn: AsyncConnection, user_id: str) -> int:
    result = await conn.execute(
        text(
            "SELECT count(*) FROM notifications.notifications "
            "WHERE user_id = :uid AND in_app AND read_at IS NULL"
        ),
        {"uid": user_id},
    )
    return int(result.scalar_one())


async def set_read(
    conn: AsyncConnection, user_id: str, ntf_id: str, read: bool, now: datetime
) -> Row[Any] | None:
    """Mark one inbox item read (keeping the first read time) or unread; None if not theirs."""
    result = await conn.execute(
        text(
            f"""
            UPDATE notifications.notifications
            SET read_at = CASE WHEN :read THEN coalesce(read_at, :now) ELSE NULL END
            WHERE id = :id AND user_id = :uid AND in_app
            RETURNING {_NOTIFICATION_COLUMNS}
            """
        ),
        {"id": ntf_id, "uid": user_id, "read": read, "now": now},
    )
    return result.first()


async def read_all(conn: AsyncConnection, user_id: str, now: datetime) -> int:
    result = await conn.execute(
        text(
            "UPDATE notifications.notifications SET read_at = :now "
            "WHERE user_id = :uid AND in_app AND read_at IS NULL"
        ),
        {"uid": user_id, "now": now},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# --- deliveries and their log --------------------------------------------------------------------


async def insert_delivery(conn: AsyncConnection, values: dict[str, Any], detail: str) -> None:
    """A delivery and the first entry of its log, in one statement."""
    content = values.get("content")
    await conn.execute(
        text(
            """
            WITH d AS (
                INSERT INTO notifications.deliveries (id, notification_id, user_id, channel,
                    provider, target, status, content, sealed_content, max_attempts,
                    next_attempt_at, fallback_of, error, created_at, updated_at)
                VALUES (:id, :notification_id, :user_id, :channel, :provider, :target, :status,
                    CAST(:content AS jsonb), :sealed_content, :max_attempts, :next_attempt_at,
                    :fallback_of, :error, :now, :now)
                RETURNING id, status
            )
            INSERT INTO notifications.delivery_log (delivery_id, status, detail)
            SELECT id, status, :detail FROM d
            """
        ),
        {
            "fallback_of": None,
            "error": None,
            "sealed_content": None,
            **values,
            "content": json.dumps(content) if content is not None else None,
            "detail": detail,
        },
    )


async def claim_due(
    conn: AsyncConnection, limit: int, now: datetime, lease_until: datetime
) -> list[Row[Any]]:
    """Take up to `limit` deliveries that are due (queued, or `sending` with a lapsed lease: a
    worker died mid-send) for this worker: `sending` until `lease_until`, one attempt more."""
    result = await conn.execute(
        text(
            f"""
            WITH due AS (
                SELECT id FROM notifications.deliveries
                WHERE (status = 'queued' AND next_attempt_at <= :now)
                   OR (status = 'sending' AND lease_until <= :now)
                ORDER BY next_attempt_at
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE notifications.deliveries d
                SET status = 'sending', lease_until = :lease, attempts = d.attempts + 1,
                    updated_at = :now
                FROM due WHERE d.id = due.id
                RETURNING d.*
            ), logged AS (
                INSERT INTO notifications.delivery_log (delivery_id, status, detail)
                SELECT id, 'sending', 'attempt ' || attempts FROM claimed
            )
            SELECT {_DELIVERY_COLUMNS} FROM claimed ORDER BY next_attempt_at
            """
        ),
        {"limit": limit, "now": now, "lease": lease_until},
    )
    return list(result.all())


async def finish(
    conn: AsyncConnection,
    delivery_id: str,
    status: str,
    now: datetime,
    *,
    detail: str | None,
    provider_message_id: str | None = None,
    next_attempt_at: datetime | None = None,
    wipe_secret: bool = False,
) -> None:
    """Record a send's outcome (only while this worker still holds the delivery's lease)."""
    await conn.execute(
        text(
            """
            WITH d AS (
                UPDATE notifications.deliveries
                SET status = :status, updated_at = :now, lease_until = NULL,
                    error = CASE WHEN :status IN ('sent', 'delivered') THEN NULL ELSE :detail END,
                    provider_message_id = coalesce(:message_id, provider_message_id),
                    next_attempt_at = coalesce(:next_at, next_attempt_at),
                    sealed_content = CASE WHEN :wipe THEN NULL ELSE sealed_content END,
                    content = CASE WHEN :wipe AND sealed_content IS NOT NULL THEN NULL
                                   ELSE content END
                WHERE id = :id AND status = 'sending'
                RETURNING id
            )
            INSERT INTO notifications.delivery_log (delivery_id, status, detail)
            SELECT id, :log_status, :detail FROM d
            """
        ),
        {
            "id": delivery_id,
            "status": status,
            "log_status": "retry" if status == "queued" else status,
            "now": now,
            "detail": detail,
            "message_id": provider_message_id,
            "next_at": next_attempt_at,
            "wipe": wipe_secret,
        },
    )


async def lock_for_receipt(
    conn: AsyncConnection, provider: str, delivery_id: str | None, message_id: str
) -> Row[Any] | None:
    """The delivery a provider reports on (by our id when the report carries it, else by the
    provider's message id), locked against the dispatcher recording the same send."""
    result = await conn.execute(
        text(
            f"""
            SELECT {_DELIVERY_COLUMNS} FROM notifications.deliveries
            WHERE provider = :provider AND (
                (CAST(:id AS text) IS NOT NULL AND id = :id)
                OR (CAST(:id AS text) IS NULL AND provider_message_id = :mid))
            FOR UPDATE
            """
        ),
        {"provider": provider, "id": delivery_id, "mid": message_id},
    )
    return result.first()


async def settle(
    conn: AsyncConnection,
    delivery_id: str,
    status: str,
    now: datetime,
    *,
    detail: str | None,
    provider_message_id: str | None = None,
) -> None:
    """Move a delivery on by a report (a provider's receipt, the inbox being read or
    streamed): its status, its log line; a secret's content goes once it left us."""
    await conn.execute(
        text(
            """
            WITH d AS (
                UPDATE notifications.deliveries
                SET status = :status, updated_at = :now, lease_until = NULL,
                    error = CASE WHEN :status = 'failed' THEN :detail ELSE NULL END,
                    provider_message_id = coalesce(:message_id, provider_message_id),
                    content = CASE WHEN sealed_content IS NOT NULL THEN NULL ELSE content END,
                    sealed_content = NULL
                WHERE id = :id
                RETURNING id
            )
            INSERT INTO notifications.delivery_log (delivery_id, status, detail)
            SELECT id, :status, :detail FROM d
            """
        ),
        {
            "id": delivery_id,
            "status": status,
            "now": now,
            "detail": detail,
            "message_id": provider_message_id,
        },
    )


async def mark_seen(
    conn: AsyncConnection,
    user_id: str,
    notification_ids: list[str] | None,
    now: datetime,
    detail: str,
) -> int:
    """The user saw these inbox items (None: all of them): their in-app deliveries that were
    not yet delivered are. One still `sending` was seen on a stream before its sender recorded
    the announcement: it is `sent` first (the sender's late record then changes nothing)."""
    params = {"uid": user_id, "ids": notification_ids, "now": now, "detail": detail}
    mine = (
        "user_id = :uid AND channel = 'in_app' "
        "AND (CAST(:ids AS text[]) IS NULL OR notification_id = ANY(:ids))"
    )
    await conn.execute(
        text(
            f"""
            WITH d AS (
                UPDATE notifications.deliveries
                SET status = 'sent', updated_at = :now, lease_until = NULL
                WHERE {mine} AND status = 'sending'
                RETURNING id
            )
            INSERT INTO notifications.delivery_log (delivery_id, status, detail)
            SELECT id, 'sent', 'announced' FROM d
            """
        ),
        params,
    )
    result = await conn.execute(
        text(
            f"""
            WITH d AS (
                UPDATE notifications.deliveries
                SET status = 'delivered', updated_at = :now, lease_until = NULL, error = NULL
                WHERE {mine} AND status IN ('queued', 'sent')
                RETURNING id
            ), logged AS (
                INSERT INTO notifications.delivery_log (delivery_id, status, detail)
                SELECT id, 'delivered', :detail FROM d
            )
            SELECT count(*) FROM d
            """
        ),
        params,
    )
    return int(result.scalar_one())


async def deliveries_of(conn: AsyncConnection, notification_id: str) -> list[Row[Any]]:
    result = await conn.execute(
        text(
            f"SELECT {_DELIVERY_COLUMNS} FROM notifications.deliveries "
            "WHERE notification_id = :nid ORDER BY id"
        ),
        {"nid": notification_id},
    )
    return list(result.all())


async def delivery_log(conn: AsyncConnection, delivery_ids: list[str]) -> list[Row[Any]]:
    result = await conn.execute(
        text(
            "SELECT delivery_id, status, detail, at FROM notifications.delivery_log "
            "WHERE delivery_id = ANY(:ids) ORDER BY id"
        ),
        {"ids": delivery_ids},
    )
    return list(result.all())


async def list_deliveries(
    conn: AsyncConnection,
    limit: int,
    after: str | None,
    *,
    user_id: str | None,
    status: str | None,
) -> list[Row[Any]]:
    return await fetch_page(
        conn,
        f"SELECT {_DELIVERY_COLUMNS} FROM notifications.deliveries "
        "WHERE (CAST(:uid AS text) IS NULL OR user_id = :uid) "
        "AND (CAST(:status AS text) IS NULL OR status = :status)",
        {"uid": user_id, "status": status},
        limit=limit,
        after=after,
    )


async def recent_outside_count(conn: AsyncConnection, user_id: str, since: datetime) -> int:
    """How many push/e-mail/SMS deliveries of non-security notifications the user got since."""
    result = await conn.execute(
        text(
            """
            SELECT count(*) FROM notifications.deliveries d
            JOIN notifications.notifications n ON n.id = d.notification_id
            WHERE d.user_id = :uid AND d.created_at >= :since
              AND d.channel IN ('push', 'email', 'sms') AND n.category <> 'security'
              AND d.error IS DISTINCT FROM 'rate_limited'
            """
        ),
        {"uid": user_id, "since": since},
    )
    return int(result.scalar_one())


async def count_kind_since(conn: AsyncConnection, user_id: str, kind: str, since: datetime) -> int:
    """How many `kind` notifications the user owns since `since`. Counted under a transaction
    lock per (user, kind): two consumers handling the same user's events at once cannot both
    take the last place under a cap."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"notifications.{kind}:{user_id}"},
    )
    result = await conn.execute(
        text(
            "SELECT count(*) FROM notifications.notifications "
            "WHERE user_id = :uid AND kind = :kind AND created_at >= :since"
        ),
        {"uid": user_id, "kind": kind, "since": since},
    )
    return int(result.scalar_one())


async def has_channel(conn: AsyncConnection, notification_id: str, channel: str) -> bool:
    result = await conn.execute(
        text(
            "SELECT 1 FROM notifications.deliveries WHERE notification_id = :nid "
            "AND channel = :channel LIMIT 1"
        ),
        {"nid": notification_id, "channel": channel},
    )
    return result.first() is not None


async def get_notification_any(conn: AsyncConnection, ntf_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications.notifications WHERE id = :id"),
            {"id": ntf_id},
        )
    ).first()


# --- preferences and settings --------------------------------------------------------------------


async def preferences(conn: AsyncConnection, user_id: str) -> list[Row[Any]]:
    result = await conn.execute(
        text(
            "SELECT category, channel, enabled FROM notifications.preferences WHERE user_id = :uid"
        ),
        {"uid": user_id},
    )
    return list(result.all())


async def set_preferences(
    conn: AsyncConnection, user_id: str, rows: list[tuple[str, str, bool]], now: datetime
) -> None:
    if not rows:
        return
    await conn.execute(
        text(
            """
            INSERT INTO notifications.preferences (user_id, category, channel, enabled, updated_at)
            SELECT :uid, c, ch, e, :now
            FROM unnest(CAST(:cats AS text[]), CAST(:chans AS text[]), CAST(:ens AS boolean[]))
                AS t(c, ch, e)
            ON CONFLICT (user_id, category, channel)
            DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = EXCLUDED.updated_at
            """
        ),
        {
            "uid": user_id,
            "cats": [r[0] for r in rows],
            "chans": [r[1] for r in rows],
            "ens": [r[2] for r in rows],
            "now": now,
        },
    )


async def quiet_hours(conn: AsyncConnection, user_id: str) -> tuple[time, time] | None:
    row = (
        await conn.execute(
            text("SELECT quiet_start, quiet_end FROM notifications.settings WHERE user_id = :uid"),
            {"uid": user_id},
        )
    ).first()
    if row is None or row.quiet_start is None:
        return None
    return row.quiet_start, row.quiet_end


async def set_quiet_hours(
    conn: AsyncConnection, user_id: str, window: tuple[time, time] | None, now: datetime
) -> None:
    start, end = window if window is not None else (None, None)
    await conn.execute(
        text(
            """
            INSERT INTO notifications.settings (user_id, quiet_start, quiet_end, updated_at)
            VALUES (:uid, :start, :end, :now)
            ON CONFLICT (user_id) DO UPDATE SET quiet_start = EXCLUDED.quiet_start,
                quiet_end = EXCLUDED.quiet_end, updated_at = EXCLUDED.updated_at
            """
        ),
        {"uid": user_id, "start": start, "end": end, "now": now},
    )


# --- sign-ins --------------------------------------------------------------------------------------


async def remember_signin(
    conn: AsyncConnection, user_id: str, fingerprint: str
) -> tuple[bool, int]:
    """Record where a user signed in from: (whether it is new, how many were known before)."""
    row = (
        await conn.execute(
            text(
                """
                WITH known AS (
                    SELECT count(*) AS n FROM notifications.known_signins WHERE user_id = :uid
                ), ins AS (
                    INSERT INTO notifications.known_signins (user_id, fingerprint)
                    VALUES (:uid, :fp) ON CONFLICT DO NOTHING RETURNING 1
                )
                SELECT (SELECT count(*) FROM ins) AS new, (SELECT n FROM known) AS known
                """
            ),
            {"uid": user_id, "fp": fingerprint},
        )
    ).one()
    return bool(row.new), int(row.known)


async def requeue(conn: AsyncConnection, delivery_id: str, now: datetime) -> bool:
    """A failed delivery gets a fresh set of attempts (a secret one cannot: its content is gone)."""
    result = await conn.execute(
        text(
            """
            WITH d AS (
                UPDATE notifications.deliveries
                SET status = 'queued', attempts = 0, next_attempt_at = :now, updated_at = :now
                WHERE id = :id AND status = 'failed'
                  AND (content IS NOT NULL OR sealed_content IS NOT NULL)
                RETURNING id
            ), logged AS (
                INSERT INTO notifications.delivery_log (delivery_id, status, detail)
                SELECT id, 'queued', 'requeued by an administrator' FROM d
            )
            SELECT id FROM d
            """
        ),
        {"id": delivery_id, "now": now},
    )
    return result.first() is not None


async def get_delivery(conn: AsyncConnection, delivery_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(f"SELECT {_DELIVERY_COLUMNS} FROM notifications.deliveries WHERE id = :id"),
            {"id": delivery_id},
        )
    ).first()


async def raise_flag(conn: AsyncConnection, user_id: str, key: str) -> bool:
    """Set a condition flag; True if it was not set (the user has not been told yet)."""
    result = await conn.execute(
        text(
            "INSERT INTO notifications.flags (user_id, key) VALUES (:uid, :key) "
            "ON CONFLICT DO NOTHING RETURNING 1"
        ),
        {"uid": user_id, "key": key},
    )
    return result.first() is not None


async def clear_flag(conn: AsyncConnection, user_id: str, key: str) -> None:
    await conn.execute(
        text("DELETE FROM notifications.flags WHERE user_id = :uid AND key = :key"),
        {"uid": user_id, "key": key},
    )
