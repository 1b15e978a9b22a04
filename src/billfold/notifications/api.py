"""Notification routes: the inbox, its live stream (Server-Sent Events), preferences, and the
administrators' view of failed deliveries."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from redis.asyncio import Redis
from sqlalchemy.engine import Row
from starlette.types import Receive, Scope, Send

from billfold import users
from billfold.gateway import Principal, TokenVerifier, Uow, require_admin, require_scopes
from billfold.notifications import service, store
from billfold.notifications.catalog import CATEGORIES, CHANNELS
from billfold.notifications.channels import stream_channel
from billfold.notifications.channels.twilio import (
    FINAL_STATUSES,
    STATUS_CALLBACK_PATH,
    valid_signature,
)
from billfold.notifications.models import (
    CategoryPreference,
    DeliveryLogEntry,
    DeliveryStatus,
    DeliveryView,
    NotificationDetail,
    NotificationView,
    PreferenceLockedProblem,
    Preferences,
    PreferencesUpdate,
    QuietHours,
    ReadAll,
    UnreadCount,
)
from billfold.notifications.streams import StreamGate, StreamRefused, StreamSlot
from billfold.platform.clock import utcnow
from billfold.platform.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ProblemError,
    ServiceUnavailable,
    TooManyRequests,
    problem_responses,
)
from billfold.platform.ids import is_valid_id
from billfold.platform.pagination import Page, PageParams, make_page, page_params

logger = logging.getLogger(__name__)

router = APIRouter(tags=["notifications"])

Me = Annotated[Principal, Depends(require_scopes("profile"))]
Admin = Annotated[Principal, Depends(require_admin)]

# A comment line this often keeps proxies from closing an idle stream.
HEARTBEAT_SECONDS = 15.0
# When a client refused for lack of stream capacity may try again.
STREAM_RETRY_AFTER_SECONDS = 5


def _not_found() -> NotFound:
    return NotFound("No such notification", code="notification_not_found")


def _view(row: Row[Any]) -> NotificationView:
    return NotificationView.model_validate(service.view(row))


def _mask(channel: str, target: str) -> str:
    if channel == "email":
        return users.mask_email(target)
    if channel == "sms":
        return users.mask_phone(target)
    if channel == "in_app":
        return "inbox"
    return target  # a device id: the user's own, not a secret


def _delivery(row: Row[Any], log: list[Row[Any]]) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        notification_id=row.notification_id,
        channel=row.channel,
        provider=row.provider,
        target=_mask(row.channel, row.target),
        status=row.status,
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        log=[DeliveryLogEntry(status=e.status, detail=e.detail, at=e.at) for e in log],
    )


@router.get(
    "/v1/notifications",
    response_model=Page[NotificationView],
    summary="Your inbox, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_notifications(
    me: Me,
    uow: Uow,
    page: Annotated[PageParams, Depends(page_params)],
    unread: Annotated[bool, Query(description="Only unread notifications")] = False,
) -> Page[NotificationView]:
    conn = await uow.connection()
    rows = await store.list_inbox(conn, me.user_id, page.limit + 1, page.after, unread_only=unread)
    return make_page([_view(r) for r in rows], page.limit, "id")


@router.get(
    "/v1/notifications/unread-count",
    response_model=UnreadCount,
    summary="How many notifications you have not read",
    responses=problem_responses(401, 403),
)
async def unread_count(me: Me, uow: Uow) -> UnreadCount:
    return UnreadCount(unread=await store.unread_count(await uow.connection(), me.user_id))


@router.post(
    "/v1/notifications/read-all",
    response_model=ReadAll,
    summary="Mark every notification read",
    responses=problem_responses(401, 403),
)
async def read_all(me: Me, uow: Uow) -> ReadAll:
    conn = await uow.connection()
    updated = await store.read_all(conn, me.user_id, utcnow())
    await service.mark_seen(conn, me.user_id, None, "read")
    return ReadAll(updated=updated)


# Receipts of streamed items still being written (a reference keeps each task alive).
_RECEIPTS: set[asyncio.Task[None]] = set()


async def _shown(engine: Any, user_id: str, ids: list[str]) -> None:
    """Record that the stream showed these items. Shielded: a client that leaves right after
    an event cancels the stream, not the receipt of what it was shown."""
    if not ids:
        return
    task = asyncio.create_task(service.mark_streamed(engine, user_id, ids))
    _RECEIPTS.add(task)
    task.add_done_callback(_RECEIPTS.discard)
    await asyncio.shield(task)


@dataclass(frozen=True)
class _StreamSession:
    """What the stream needs to know whether its caller may still listen: the bearer token
    (re-verified as the edge does, which reads the revoked-session key) and its expiry."""

    verifier: TokenVerifier
    token: str
    expires_at: float
    check_every: float

    async def ended(self) -> str | None:
        """Why the stream must end now (`token_expired`, `session_revoked`), or None."""
        if time.time() >= self.expires_at:
            return "token_expired"
        try:
            await self.verifier.verify(self.token)
        except ProblemError:
            return "session_revoked"
        except Exception:
            # Unknown is not "still allowed": the client reconnects and the edge decides.
            logger.warning("live stream: session check failed", exc_info=True)
            return "session_unverified"
        return None


def _ended(reason: str) -> bytes:
    return f"event: session_ended\ndata: {json.dumps({'reason': reason})}\n\n".encode()


async def _event_stream(
    request: Request,
    redis: Redis,
    channel: str,
    backlog: list[NotificationView],
    user_id: str,
    session: _StreamSession,
) -> AsyncIterator[bytes]:
    engine = request.app.state.resources.engine
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        yield b"retry: 3000\n\n"
        seen = ""
        for item in backlog:
            seen = max(seen, item.id)
            yield _sse(item.id, item.model_dump_json())
        await _shown(engine, user_id, [item.id for item in backlog])
        idle = 0.0
        next_check = time.monotonic() + session.check_every
        while not await request.is_disconnected():
            if time.time() >= session.expires_at or time.monotonic() >= next_check:
                next_check = time.monotonic() + session.check_every
                reason = await session.ended()
                if reason is not None:
                    yield _ended(reason)
                    return
            timeout = min(1.0, session.check_every)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is None:
                idle += timeout
                if idle >= HEARTBEAT_SECONDS:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                continue
            idle = 0.0
            data = json.loads(message["data"])
            if data.get("id", "") <= seen:
                continue  # already sent from the backlog
            yield _sse(data["id"], json.dumps(data, separators=(",", ":")))
            await _shown(engine, user_id, [data["id"]])
    finally:
        await pubsub.unsubscribe(channel)
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class _SlotStreamingResponse(StreamingResponse):
    """Gives the stream's slot back however the response ends (also when the client left
    before the body began, when the body generator never runs)."""

    def __init__(self, slot: StreamSlot, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


def _sse(event_id: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: notification\ndata: {data}\n\n".encode()


@router.get(
    "/v1/notifications/stream",
    summary="Your notifications as they arrive (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "An endless event stream"},
        **problem_responses(401, 403, 429, 503),
    },
)
async def stream(
    request: Request,
    me: Me,
    uow: Uow,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse:
    """`text/event-stream`: one `notification` event per new inbox item (`id` is the
    notification id). Reconnect with `Last-Event-ID` to receive what arrived meanwhile. The
    stream ends, after a `session_ended` event (`reason`: `token_expired`, `session_revoked`),
    when the access token expires or its session is revoked (logout, account lock): reconnect
    with a fresh token. Any API
    process can serve it: deliveries are announced over Redis pub/sub. Each process holds a
    bounded number of streams: past it, 503 `stream_capacity` with `Retry-After`; one user may
    hold only a few of them (5): past that, 429 `too_many_streams`."""
    res = request.app.state.resources
    gate: StreamGate = request.app.state.notification_streams
    try:
        slot = gate.admit(me.user_id)
    except StreamRefused as refused:
        retry = {"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)}
        if refused.per_user:
            raise TooManyRequests(
                f"You have {gate.per_user} live streams open already; close one first",
                code="too_many_streams",
                headers=retry,
            ) from None
        raise ServiceUnavailable(
            "Too many live streams are open on this server; try again shortly",
            code="stream_capacity",
            headers=retry,
        ) from None
    channel = stream_channel(res.settings.redis_prefix, me.user_id)
    # The edge verified this very header, so it is a bearer token with an `exp`.
    session = _StreamSession(
        verifier=request.app.state.users.tokens,
        token=request.headers["authorization"].partition(" ")[2].strip(),
        expires_at=float(me.claims["exp"]),
        check_every=gate.session_check_seconds,
    )
    try:
        backlog: list[NotificationView] = []
        if last_event_id and is_valid_id(last_event_id, "ntf"):
            conn = await uow.connection()
            rows = await store.list_inbox(conn, me.user_id, 100, last_event_id, newest_first=False)
            backlog = [_view(r) for r in rows]
        # The stream must not hold the request's database connection (nor its transaction).
        await uow.rollback()
    except BaseException:
        slot.release()
        raise
    # Its pub/sub connection comes from the streams' own pool, never the API's.
    return _SlotStreamingResponse(
        slot,
        _event_stream(request, gate.redis, channel, backlog, me.user_id, session),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )


@router.get(
    "/v1/notifications/{notification_id}",
    response_model=NotificationDetail,
    summary="One notification and where it was delivered",
    responses=problem_responses(401, 403, 404),
)
async def get_notification(me: Me, uow: Uow, notification_id: str) -> NotificationDetail:
    """The notification and its deliveries (channel, masked target, status, attempts) with
    each one's log (`queued → sending → sent → delivered | failed`)."""
    if not is_valid_id(notification_id, "ntf"):
        raise _not_found()
    conn = await uow.connection()
    row = await store.get_notification(conn, me.user_id, notification_id)
    if row is None:
        raise _not_found()
    deliveries = await store.deliveries_of(conn, row.id)
    log = await store.delivery_log(conn, [d.id for d in deliveries])
    return NotificationDetail(
        **_view(row).model_dump(),
        deliveries=[_delivery(d, [e for e in log if e.delivery_id == d.id]) for d in deliveries],
    )


async def _set_read(me: Principal, uow: Uow, notification_id: str, read: bool) -> NotificationView:
    if not is_valid_id(notification_id, "ntf"):
        raise _not_found()
    conn = await uow.connection()
    row = await store.set_read(conn, me.user_id, notification_id, read, utcnow())
    if row is None:
        raise _not_found()
    if read:
        await service.mark_seen(conn, me.user_id, [notification_id], "read")
    return _view(row)


@router.post(
    "/v1/notifications/{notification_id}/read",
    response_model=NotificationView,
    summary="Mark a notification read",
    responses=problem_responses(401, 403, 404),
)
async def mark_read(me: Me, uow: Uow, notification_id: str) -> NotificationView:
    return await _set_read(me, uow, notification_id, True)


@router.post(
    "/v1/notifications/{notification_id}/unread",
    response_model=NotificationView,
    summary="Mark a notification unread",
    responses=problem_responses(401, 403, 404),
)
async def mark_unread(me: Me, uow: Uow, notification_id: str) -> NotificationView:
    return await _set_read(me, uow, notification_id, False)


# --- preferences -----------------------------------------------------------------------------------


async def _preferences(request: Request, uow: Uow, user_id: str) -> Preferences:
    conn = await uow.connection()
    prefs, quiet = await service.get_preferences(conn, user_id)
    party = await users.get_party(conn, user_id)
    return Preferences(
        categories=[
            CategoryPreference(
                category=name,  # type: ignore[arg-type]
                channels=prefs[name],  # type: ignore[arg-type]
                locked_channels=[c for c in CHANNELS if cat.locked and cat.default(c)],  # type: ignore[misc]
            )
            for name, cat in CATEGORIES.items()
        ],
        quiet_hours=(
            QuietHours(start=quiet[0].strftime("%H:%M"), end=quiet[1].strftime("%H:%M"))
            if quiet
            else None
        ),
        timezone=party.timezone if party else "UTC",
    )


@router.get(
    "/v1/me/notification-preferences",
    response_model=Preferences,
    summary="Which notifications reach you where",
    responses=problem_responses(401, 403),
)
async def get_preferences(request: Request, me: Me, uow: Uow) -> Preferences:
    """Per category, each channel on or off (defaults until you change them), and your quiet
    hours. One-time codes go where you ask for them and follow no preference."""
    return await _preferences(request, uow, me.user_id)


@router.put(
    "/v1/me/notification-preferences",
    response_model=Preferences,
    summary="Change which notifications reach you where",
    responses=problem_responses(401, 403, 422),
)
async def put_preferences(
    request: Request, me: Me, uow: Uow, body: PreferencesUpdate
) -> Preferences:
    """Security alerts cannot be switched off on their default channels (422
    `notification_preference_locked`); you may add channels to them."""
    changes: dict[str, dict[str, bool]] = {}
    for change in body.categories:
        changes.setdefault(change.category, {}).update(dict(change.channels.items()))
    quiet: object = service.KEEP
    if "quiet_hours" in body.model_fields_set:
        quiet = body.quiet_hours.window() if body.quiet_hours else None
    try:
        await service.update_preferences(await uow.connection(), me.user_id, changes, quiet)
    except service.PreferenceLocked as exc:
        raise PreferenceLockedProblem(str(exc)) from None
    return await _preferences(request, uow, me.user_id)


# --- administrators ------------------------------------------------------------------------------


@router.get(
    "/v1/admin/notifications/deliveries",
    response_model=Page[DeliveryView],
    summary="Deliveries, e.g. the failed ones (dead letters)",
    responses=problem_responses(401, 403, 422),
)
async def list_deliveries(
    admin: Admin,
    uow: Uow,
    page: Annotated[PageParams, Depends(page_params)],
    status: Annotated[DeliveryStatus | None, Query()] = None,
    user_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[DeliveryView]:
    conn = await uow.connection()
    rows = await store.list_deliveries(
        conn, page.limit + 1, page.after, user_id=user_id, status=status
    )
    log = await store.delivery_log(conn, [r.id for r in rows])
    views = [_delivery(r, [e for e in log if e.delivery_id == r.id]) for r in rows]
    return make_page(views, page.limit, "id")


@router.post(
    "/v1/admin/notifications/deliveries/{delivery_id}/retry",
    response_model=DeliveryView,
    summary="Send a failed delivery again",
    responses=problem_responses(401, 403, 404, 409),
)
async def retry_delivery(admin: Admin, uow: Uow, delivery_id: str) -> DeliveryView:
    """Queues a failed delivery with a fresh set of attempts (409 `delivery_not_retryable` if it
    has not failed, or was a one-time code whose content is gone)."""
    if not is_valid_id(delivery_id, "dlv"):
        raise NotFound("No such delivery", code="delivery_not_found")
    conn = await uow.connection()
    if not await service.retry_delivery(conn, delivery_id):
        if await store.get_delivery(conn, delivery_id) is None:
            raise NotFound("No such delivery", code="delivery_not_found")
        raise Conflict(
            "Only a failed delivery with content can be retried", code="delivery_not_retryable"
        )
    row = await store.get_delivery(conn, delivery_id)
    assert row is not None
    return _delivery(row, await store.delivery_log(conn, [delivery_id]))


# --- providers' callbacks --------------------------------------------------------------------------


@router.post(
    STATUS_CALLBACK_PATH,
    status_code=204,
    summary="Twilio's message status callback (delivery receipts)",
    responses=problem_responses(403, 404),
)
async def twilio_status(request: Request, uow: Uow) -> Response:
    """Called by Twilio on the `StatusCallback` URL each SMS was sent with (it names the
    delivery), signed with `X-Twilio-Signature` (HMAC-SHA1 under the account's auth token over
    that URL and the sorted form): `delivered` marks the SMS delivered, `undelivered` and
    `failed` mark it failed, the others only confirm Twilio has it. A signature that does not
    verify is 403 `invalid_webhook_signature`; a message that is not one of ours is 404
    `delivery_not_found`; nothing changes either way."""
    settings = request.app.state.resources.settings
    if not settings.twilio_auth_token:
        raise NotFound("SMS is not configured", code="not_found")
    form = await request.form()
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    # Twilio signs the URL exactly as it was given it, query string included.
    url = f"{settings.public_url.rstrip('/')}{STATUS_CALLBACK_PATH}"
    query = request.scope.get("query_string", b"").decode("latin-1")
    if query:
        url = f"{url}?{query}"
    signature = request.headers.get("x-twilio-signature", "")
    if not valid_signature(settings.twilio_auth_token, url, params, signature):
        raise Forbidden("The request is not signed by Twilio", code="invalid_webhook_signature")
    delivery_id = request.query_params.get("delivery")
    sid = params.get("MessageSid", "")
    reported = params.get("MessageStatus", "")
    known = bool(sid) and (delivery_id is None or is_valid_id(delivery_id, "dlv"))
    if known:
        detail = f"twilio {reported} {params.get('ErrorCode', '')}".strip()
        known = await service.provider_receipt(
            await uow.connection(),
            "twilio",
            delivery_id,
            sid,
            FINAL_STATUSES.get(reported),
            detail,
        )
    if not known:
        raise NotFound("No such message", code="delivery_not_found")
    return Response(status_code=204)
