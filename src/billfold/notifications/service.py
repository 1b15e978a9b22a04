"""The use cases: turning an intent ("tell Bob he received 5 EUR") into a stored notification and
its deliveries (preferences, quiet hours, rate limit, dedupe, fallback), sending due deliveries
(retries with backoff, dead tokens, fallback to SMS), the inbox and the preferences."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import users
from billfold.config import Settings
from billfold.notifications import store
from billfold.notifications.catalog import (
    CATEGORIES,
    CHANNELS,
    HELD_IN_QUIET_HOURS,
    KINDS,
    OUTSIDE,
    SECURITY,
    Kind,
)
from billfold.notifications.channels import Channel, Message, Outcome
from billfold.notifications.templates import Rendered, render
from billfold.platform.clock import rfc3339, utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.ids import new_id
from billfold.platform.keys import SealedBox, SealError, SealRing
from billfold.platform.observability import get_logger

log = get_logger(__name__)

# A worker that claimed a delivery owns it this long; past it, another worker may send it.
LEASE_SECONDS = 60


@dataclass(frozen=True)
class NotificationsRuntime:
    """What the service needs per process: settings, and the keys of one-time codes (`codes`
    opens what the users service sealed; `sealed` opened what older deliveries kept)."""

    settings: Settings
    sealed: SealedBox

    @cached_property
    def codes(self) -> SealRing:
        return users.one_time_code_ring(self.settings)

    def provider(self, channel: str, platform: str | None = None) -> str | None:
        """The configured provider of a channel (and, for push, a device platform), if any."""
        s = self.settings
        if channel == "in_app":
            return "inapp"
        if channel == "email":
            return None if s.email_provider == "none" else s.email_provider
        if channel == "sms":
            return "twilio" if s.twilio_account_sid else None
        if platform in ("ios", "watch"):
            return "apns" if s.apns_key_file else None
        if platform == "android":
            return "fcm" if s.fcm_service_account_file else None
        return None


@dataclass(frozen=True)
class Intent:
    """Something to tell one user: a kind, its template data, a key that makes it once only.
    `direct` sends it on exactly that channel to exactly that address (one-time codes);
    `sealed` is the event whose sealed secret (a one-time code) the message needs: it stays
    sealed in the delivery and is opened only to send it."""

    user_id: str
    kind: str
    dedupe_key: str
    context: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    event: dict[str, Any] | None = None
    direct: tuple[str, str] | None = None
    sealed: dict[str, Any] | None = None


# --- preferences ---------------------------------------------------------------------------------


def effective(rows: Sequence[Any]) -> dict[str, dict[str, bool]]:
    """Every category's channels: the defaults, overlaid with the user's choices; a locked
    category's default channels stay on whatever is stored."""
    stored = {(r[0], r[1]): bool(r[2]) for r in rows}
    out: dict[str, dict[str, bool]] = {}
    for name, cat in CATEGORIES.items():
        out[name] = {}
        for ch in CHANNELS:
            on = stored.get((name, ch), cat.default(ch))
            if cat.locked and cat.default(ch):
                on = True
            out[name][ch] = on
    return out


async def get_preferences(
    conn: AsyncConnection, user_id: str
) -> tuple[dict[str, dict[str, bool]], tuple[time, time] | None]:
    """The user's effective preferences and quiet hours."""
    return effective(await store.preferences(conn, user_id)), await store.quiet_hours(conn, user_id)


class PreferenceLocked(ValueError):
    """An attempt to switch off a channel of a security-critical category."""


async def update_preferences(
    conn: AsyncConnection,
    user_id: str,
    changes: dict[str, dict[str, bool]],
    quiet: tuple[time, time] | object | None,
) -> None:
    """Apply `changes` (category → channel → on/off) and, unless `quiet` is `KEEP`, the quiet
    hours (None switches them off). Unknown names are refused by the API before this."""
    rows: list[tuple[str, str, bool]] = []
    for category, channels in changes.items():
        cat = CATEGORIES[category]
        for channel, on in channels.items():
            if cat.locked and cat.default(channel) and not on:
                raise PreferenceLocked(f"{category}.{channel}")
            rows.append((category, channel, on))
    now = utcnow()
    await store.set_preferences(conn, user_id, rows, now)
    if quiet is not KEEP:
        await store.set_quiet_hours(conn, user_id, quiet, now)  # type: ignore[arg-type]


KEEP = object()


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def quiet_until(now: datetime, timezone: str, window: tuple[time, time] | None) -> datetime | None:
    """When the user's quiet hours end, if `now` is inside them (local times in `timezone`; a
    window such as 22:00-07:00 wraps midnight). None: not quiet now."""
    if window is None:
        return None
    start, end = window
    if start == end:
        return None
    zone = _zone(timezone)
    local = now.astimezone(zone)
    t = local.time().replace(tzinfo=None)
    if start < end:
        if not start <= t < end:
            return None
        day = local.date()
    else:
        if not (t >= start or t < end):
            return None
        day = local.date() + timedelta(days=1) if t >= start else local.date()
    return datetime.combine(day, end, tzinfo=zone).astimezone(UTC)


# --- notify: from an intent to a notification and its deliveries ---------------------------------


@dataclass
class _Target:
    channel: str
    provider: str
    target: str
    status: str = "queued"
    error: str | None = None
    next_attempt_at: datetime | None = None
    detail: str = "queued"


def view(row: Row[Any] | dict[str, Any]) -> dict[str, Any]:
    """A notification as the inbox shows it (also what the live stream sends)."""
    r = row if isinstance(row, dict) else row._mapping
    return {
        "id": r["id"],
        "kind": r["kind"],
        "category": r["category"],
        "title": r["title"],
        "body": r["body"],
        "data": {k: v for k, v in (r["data"] or {}).items() if k != "context"},
        "read": r["read_at"] is not None,
        "read_at": rfc3339(r["read_at"]) if r["read_at"] else None,
        "created_at": rfc3339(r["created_at"]),
    }


def _content(channel: str, rendered: Rendered, inbox_item: dict[str, Any]) -> dict[str, Any]:
    if channel == "push":
        return {"title": rendered.title, "body": rendered.body}
    if channel == "email":
        return {"subject": rendered.subject, "text": rendered.email}
    if channel == "sms":
        return {"text": rendered.sms}
    return inbox_item


async def _targets(
    conn: AsyncConnection,
    rt: NotificationsRuntime,
    party: users.Party,
    kind: Kind,
    intent: Intent,
) -> list[_Target]:
    if intent.direct is not None:
        channel, address = intent.direct
        provider = rt.provider(channel)
        return [_Target(channel, provider, address)] if provider else []
    prefs = effective(await store.preferences(conn, party.user_id))[kind.category]
    targets: list[_Target] = []
    if prefs["push"]:
        for device in await users.push_devices(conn, party.user_id):
            provider = rt.provider("push", device.platform)
            if provider:
                targets.append(_Target("push", provider, device.device_id))
    email, sms = rt.provider("email"), rt.provider("sms")
    if prefs["email"] and email and party.verified_email:
        targets.append(_Target("email", email, party.verified_email))
    want_sms = prefs["sms"] or (
        # A security alert that cannot be pushed (no device to push to) goes by SMS.
        kind.category == SECURITY
        and prefs["push"]
        and not any(t.channel == "push" for t in targets)
    )
    if want_sms and sms and party.verified_phone:
        targets.append(_Target("sms", sms, party.verified_phone))
    if prefs["in_app"]:
        targets.append(_Target("in_app", "inapp", party.user_id))
    return targets


async def notify(conn: AsyncConnection, rt: NotificationsRuntime, intent: Intent) -> str | None:
    """Store the notification and queue its deliveries, in the caller's transaction. Returns its
    id, or None when it was a duplicate (same dedupe key) or the user is gone."""
    kind = KINDS[intent.kind]
    party = await users.get_party(conn, intent.user_id)
    if party is None or party.status == "closed":
        return None
    context = {"name": party.name, **intent.context}
    # A secret (the code) is not opened here: what is rendered now is only the row's title.
    rendered = render(
        kind.name,
        {"code": "", **context} if kind.secret else context,
        locale=party.locale,
        timezone=party.timezone,
    )
    now = utcnow()
    ntf_id = new_id("ntf")
    row = {
        "id": ntf_id,
        "user_id": party.user_id,
        "kind": kind.name,
        "category": kind.category,
        "dedupe_key": intent.dedupe_key,
        "event_id": intent.event["id"] if intent.event else None,
        "event_type": intent.event["type"] if intent.event else None,
        "locale": rendered.language,
        "in_app": kind.inbox and not kind.secret,
        # A one-time code is never stored in clear: the row keeps its title only.
        "title": rendered.title,
        "body": "" if kind.secret else rendered.body,
        # The template data stays with it (a fallback SMS is rendered from it later), except
        # for a one-time code's.
        "data": intent.data if kind.secret else {**intent.data, "context": intent.context},
        "now": now,
    }
    if not await store.insert_notification(conn, row):
        return None
    targets = await _targets(conn, rt, party, kind, intent)
    if kind.category != SECURITY:
        await _rate_limit(conn, rt, party.user_id, targets, now)
        resume = quiet_until(now, party.timezone, await store.quiet_hours(conn, party.user_id))
        # A direct message goes to someone else's address: the owner's quiet hours are not theirs.
        if resume is not None and intent.direct is None:
            for t in targets:
                if t.channel in HELD_IN_QUIET_HOURS and t.status == "queued":
                    t.next_attempt_at = resume
                    t.detail = f"held for quiet hours until {rfc3339(resume)}"
    inbox_item = view({**row, "read_at": None, "created_at": now})
    for t in targets:
        delivery_id = new_id("dlv")
        content = _content(t.channel, rendered, inbox_item)
        values: dict[str, Any] = {
            "id": delivery_id,
            "notification_id": ntf_id,
            "user_id": party.user_id,
            "channel": t.channel,
            "provider": t.provider,
            "target": t.target,
            "status": t.status,
            "max_attempts": rt.settings.notifications_max_attempts,
            "next_attempt_at": t.next_attempt_at or now,
            "error": t.error,
            "now": now,
        }
        if kind.secret:
            # The event's sealed code and what to render it with, nothing in clear: the
            # dispatcher opens and renders it at send time, and wipes it once sent.
            values["sealed_content"] = json.dumps(
                {
                    "event": intent.sealed,
                    "render": {
                        "kind": kind.name,
                        "context": context,
                        "locale": party.locale,
                        "timezone": party.timezone,
                    },
                },
                separators=(",", ":"),
            ).encode()
        else:
            values["content"] = content
        await store.insert_delivery(conn, values, t.detail)
    return ntf_id


async def _rate_limit(
    conn: AsyncConnection,
    rt: NotificationsRuntime,
    user_id: str,
    targets: list[_Target],
    now: datetime,
) -> None:
    """Past the hourly budget of outside messages, a notification reaches the inbox only (the
    refused deliveries are logged as failed `rate_limited`)."""
    outside = [t for t in targets if t.channel in OUTSIDE]
    if not outside:
        return
    used = await store.recent_outside_count(conn, user_id, now - timedelta(hours=1))
    left = max(rt.settings.notifications_rate_limit_per_hour - used, 0)
    for t in outside[left:]:
        t.status, t.error, t.detail = "failed", "rate_limited", "rate_limited"


def _aad(delivery_id: str) -> bytes:
    return f"notifications.deliveries:{delivery_id}:content".encode()


# --- dispatch: sending what is due ---------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    row: Row[Any]
    message: Message | None
    push_token: str | None = None
    error: str | None = None


class Dispatcher:
    """Sends due deliveries with the configured channel clients (the worker's job)."""

    def __init__(
        self,
        engine: AsyncEngine,
        rt: NotificationsRuntime,
        channels: dict[str, Channel],
        *,
        batch: int = 50,
    ) -> None:
        self._engine = engine
        self._rt = rt
        self._channels = channels
        self._batch = batch

    async def run_once(self) -> int:
        """Claim and send one batch of due deliveries; returns how many were claimed."""
        now = utcnow()
        async with unit_of_work(self._engine) as uow:
            conn = await uow.connection()
            rows = await store.claim_due(
                conn, self._batch, now, now + timedelta(seconds=LEASE_SECONDS)
            )
            jobs = [await self._prepare(conn, row) for row in rows]
        if not jobs:
            return 0
        outcomes = await asyncio.gather(*(self._send(job) for job in jobs))
        async with unit_of_work(self._engine) as uow:
            conn = await uow.connection()
            for job, outcome in zip(jobs, outcomes, strict=True):
                await self._record(conn, job, outcome)
        return len(jobs)

    async def drain(self, rounds: int = 20) -> int:
        """Send until nothing is due (at most `rounds` batches): what a send queues at once (an
        SMS fallback) goes out in the same pass."""
        total = 0
        for _ in range(rounds):
            n = await self.run_once()
            total += n
            if n == 0:
                break
        return total

    async def _prepare(self, conn: AsyncConnection, row: Row[Any]) -> _Job:
        if row.sealed_content is not None:
            try:
                content = self._open(row)
            except (SealError, ValueError, KeyError, TypeError):
                return _Job(row, None, error="the sealed content does not open")
        else:
            content = row.content or {}
        target, token = row.target, None
        if row.channel == "push":
            devices = {d.device_id: d for d in await users.push_devices(conn, row.user_id)}
            device = devices.get(row.target)
            if device is None:
                return _Job(row, None, error="no_push_token")
            target = token = device.push_token
        data = {"notification_id": row.notification_id, "delivery_id": row.id}
        return _Job(row, Message(row.id, target, content, data), token)

    def _open(self, row: Row[Any]) -> dict[str, Any]:
        """A secret delivery's content, opened and rendered only now, to send it."""
        raw = bytes(row.sealed_content)
        if not raw.startswith(b"{"):
            # Sealed whole under the process box (deliveries queued before codes were sealed
            # by the users service). Told apart by the first byte: a sealed box starts with
            # its version byte (0x01), never "{", and a new envelope is JSON, an object. A
            # box version of 0x7b would break this test.
            return dict(json.loads(self._rt.sealed.open(raw, _aad(row.id))))
        envelope = json.loads(raw)
        code = users.open_one_time_code(self._rt.codes, envelope["event"])
        if code is None:
            raise ValueError("no sealed code")
        spec = envelope["render"]
        rendered = render(
            spec["kind"],
            {**spec["context"], "code": code},
            locale=spec["locale"],
            timezone=spec["timezone"],
        )
        return _content(row.channel, rendered, {})

    async def _send(self, job: _Job) -> Outcome:
        if job.message is None:
            return Outcome("failed", error=job.error)
        channel = self._channels.get(job.row.provider)
        if channel is None:
            return Outcome("retry", error=f"provider {job.row.provider} is not configured")
        try:
            return await channel.send(job.message)
        except Exception as exc:  # a client bug must not lose the batch's other outcomes
            log.exception("notification channel failed", provider=job.row.provider)
            return Outcome("retry", error=f"{type(exc).__name__}")

    async def _record(self, conn: AsyncConnection, job: _Job, outcome: Outcome) -> None:
        row, now = job.row, utcnow()
        secret = row.sealed_content is not None
        if outcome.status in ("sent", "delivered"):
            await store.finish(
                conn,
                row.id,
                outcome.status,
                now,
                detail=outcome.provider_message_id,
                provider_message_id=outcome.provider_message_id,
                wipe_secret=secret,
            )
            return
        if outcome.status == "retry" and row.attempts < row.max_attempts:
            delay = self._rt.settings.notifications_retry_base_seconds * 2 ** (row.attempts - 1)
            delay = max(delay, outcome.retry_after or 0)
            await store.finish(
                conn,
                row.id,
                "queued",
                now,
                detail=outcome.error,
                next_attempt_at=now + timedelta(seconds=delay),
            )
            return
        # Failed for good: a dead token is forgotten; a security alert that could not be
        # pushed goes by SMS instead. The failed row is the dead letter (with its error).
        detail = outcome.error or "failed"
        if outcome.status == "retry":
            detail = f"gave up after {row.attempts} attempts: {detail}"
        await store.finish(conn, row.id, "failed", now, detail=detail, wipe_secret=secret)
        if outcome.unregistered and job.push_token is not None:
            await users.forget_push_token(conn, row.target, job.push_token)
        if row.channel == "push":
            await self._fallback(conn, row, now)

    async def _fallback(self, conn: AsyncConnection, row: Row[Any], now: datetime) -> None:
        notification = await store.get_notification_any(conn, row.notification_id)
        if notification is None or notification.category != SECURITY:
            return
        provider = self._rt.provider("sms")
        if provider is None or await store.has_channel(conn, row.notification_id, "sms"):
            return
        party = await users.get_party(conn, row.user_id)
        if party is None or not party.verified_phone:
            return
        kind = KINDS[notification.kind]
        rendered = render(
            kind.name,
            {"name": party.name, **_context_of(notification)},
            locale=party.locale,
            timezone=party.timezone,
        )
        await store.insert_delivery(
            conn,
            {
                "id": new_id("dlv"),
                "notification_id": row.notification_id,
                "user_id": row.user_id,
                "channel": "sms",
                "provider": provider,
                "target": party.verified_phone,
                "status": "queued",
                "content": {"text": rendered.sms},
                "max_attempts": self._rt.settings.notifications_max_attempts,
                "next_attempt_at": now,
                "fallback_of": row.id,
                "now": now,
            },
            f"fallback for push {row.id}",
        )

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.aclose()


def _context_of(notification: Row[Any]) -> dict[str, Any]:
    """The template data a notification was made from (kept in its data under `context`)."""
    data = notification.data or {}
    return dict(data.get("context", {}))


async def retry_delivery(conn: AsyncConnection, delivery_id: str) -> bool:
    """Queue a failed (dead-lettered) delivery once more (admin)."""
    return await store.requeue(conn, delivery_id, utcnow())


async def provider_receipt(
    conn: AsyncConnection,
    provider: str,
    delivery_id: str | None,
    message_id: str,
    final: str | None,
    detail: str,
) -> bool:
    """A provider's report on a message it accepted (`final`: `delivered`, `failed`, or None
    for "I have it"). False when no delivery of ours is that message.

    The report may come before the dispatcher recorded the provider's answer (it records a
    batch after all its sends), or after it gave up on an answer that never came: either way
    the provider has the message, so the delivery is `sent` (with the provider's id) first,
    and the dispatcher's late record changes nothing. A repeated or late report of a
    delivery already delivered changes nothing either; one already failed changes only when
    the provider says it was delivered (the dispatcher gave up on an answer that never came,
    yet the provider had it and it arrived)."""
    row = await store.lock_for_receipt(conn, provider, delivery_id, message_id)
    if row is None or row.provider_message_id not in (None, message_id):
        return False
    now = utcnow()
    if row.status == "failed" and final == "delivered":
        await store.settle(
            conn, row.id, "delivered", now, detail=detail, provider_message_id=message_id
        )
        return True
    if row.status in ("delivered", "failed"):
        return True
    if row.status in ("queued", "sending"):
        await store.settle(
            conn,
            row.id,
            "sent",
            now,
            detail=f"{message_id} (reported by {provider})",
            provider_message_id=message_id,
        )
    if final is not None:
        await store.settle(conn, row.id, final, now, detail=detail)
    return True


async def mark_streamed(engine: AsyncEngine, user_id: str, notification_ids: list[str]) -> None:
    """Items a live stream showed are delivered, in a short transaction of its own (a stream
    holds no connection between events). Best effort: a receipt is never worth breaking the
    stream for."""
    if not notification_ids:
        return
    try:
        async with unit_of_work(engine) as uow:
            await mark_seen(await uow.connection(), user_id, notification_ids, "streamed")
    except Exception:
        log.warning("could not record streamed notifications", exc_info=True)


async def mark_seen(
    conn: AsyncConnection, user_id: str, notification_ids: list[str] | None, how: str
) -> int:
    """The user saw these inbox items (None: every one): read, or shown on a live stream.
    Their in-app deliveries are `delivered` (in-app's only receipt)."""
    return await store.mark_seen(conn, user_id, notification_ids, utcnow(), how)
