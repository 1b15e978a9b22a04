"""What other services may know about a user: who they are, their limits' inputs, contacts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.users.store import accounts as store
from billfold.users.store import sessions as session_store

ContactKind = Literal["user_id", "email", "phone", "handle"]


@dataclass(frozen=True, slots=True)
class Party:
    """A registered user as another service sees them (no secrets, verified contacts only)."""

    user_id: str
    name: str
    handle: str | None
    status: str
    kyc_tier: int
    timezone: str
    locale: str
    verified_email: str | None
    verified_phone: str | None

    @property
    def active(self) -> bool:
        return self.status == "active"


def _party(row: Any) -> Party:
    return Party(
        user_id=row.id,
        name=row.name,
        handle=row.handle,
        status=row.status,
        kyc_tier=row.kyc_tier,
        timezone=row.timezone,
        locale=row.locale,
        verified_email=row.verified_email,
        verified_phone=row.verified_phone,
    )


async def get_party(conn: AsyncConnection, user_id: str) -> Party | None:
    party, _ = await find_counterparty(conn, user_id)
    return party


async def find_counterparty(
    conn: AsyncConnection,
    subject_id: str,
    kind: ContactKind | None = None,
    value: str | None = None,
) -> tuple[Party | None, Party | None]:
    """The subject and the user that `kind`/`value` names (id, normalised e-mail, E.164 phone or
    handle), in one round trip. The counterparty is None when no user matches; a match by
    e-mail or phone is returned whether or not that contact is verified, so callers that must
    not reveal registration have to ignore it (see p2p)."""
    keys: dict[str, str | None] = {"user_id": None, "email": None, "phone": None, "handle": None}
    if kind is not None:
        keys[kind] = value
    rows = await store.find_parties(conn, subject_id, **keys)
    subject = next((_party(r) for r in rows if r.is_subject), None)
    other = next((_party(r) for r in rows if r.is_match), None)
    return subject, other


@dataclass(frozen=True, slots=True)
class PushDevice:
    """A live device that can receive push notifications (`platform` picks APNs or FCM)."""

    device_id: str
    platform: str
    push_token: str


async def push_devices(conn: AsyncConnection, user_id: str) -> list[PushDevice]:
    """The user's live devices with a push token (the notification service's push targets)."""
    rows = await session_store.push_devices(conn, user_id)
    return [PushDevice(r.id, r.platform, r.push_token) for r in rows]


async def forget_push_token(conn: AsyncConnection, device_id: str, push_token: str) -> bool:
    """The push provider said `push_token` is no longer valid (APNs 410 Unregistered, FCM
    UNREGISTERED): stop using it. A token the device has replaced meanwhile is left alone."""
    return await session_store.forget_push_token(conn, device_id, push_token)


async def is_admin(conn: AsyncConnection, user_id: str) -> bool:
    """Whether `user_id` is an active administrator (e.g. someone a fraud case may go to)."""
    user = await store.get_user(conn, user_id)
    return user is not None and user.role == "admin" and user.status == "active"
