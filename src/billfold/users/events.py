"""Events the User Service publishes (`billfold.users.*`, CloudEvents via the outbox)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.config import Settings
from billfold.platform.events import Event, record_event
from billfold.platform.keys import SealRing

SOURCE = "/billfold/users"

USER_REGISTERED = "billfold.users.user.registered"
PROFILE_UPDATED = "billfold.users.profile.updated"
VERIFICATION_REQUESTED = "billfold.users.verification.requested"
CONTACT_VERIFIED = "billfold.users.contact.verified"
KYC_STATUS_CHANGED = "billfold.users.kyc.status_changed"
DEVICE_ENROLLED = "billfold.users.device.enrolled"
DEVICE_REVOKED = "billfold.users.device.revoked"
SESSION_CREATED = "billfold.users.session.created"
SESSION_REVOKED = "billfold.users.session.revoked"
REFRESH_TOKEN_REUSED = "billfold.users.refresh_token.reused"
TWO_FACTOR_ENABLED = "billfold.users.two_factor.enabled"
TWO_FACTOR_DISABLED = "billfold.users.two_factor.disabled"
STEP_UP_CODE_REQUESTED = "billfold.users.step_up.code_requested"
PASSKEY_REGISTERED = "billfold.users.passkey.registered"
PASSKEY_REMOVED = "billfold.users.passkey.removed"
PASSWORD_CHANGED = "billfold.users.password.changed"
PASSWORD_RESET_REQUESTED = "billfold.users.password_reset.requested"
PASSWORD_RESET = "billfold.users.password.reset"
# An account locked (a fraud policy, an administrator) or unlocked: the security notification.
ACCOUNT_LOCKED = "billfold.users.account.locked"
ACCOUNT_UNLOCKED = "billfold.users.account.unlocked"


async def publish(conn: AsyncConnection, type_: str, user_id: str, data: dict[str, Any]) -> Event:
    """Record a users event for `user_id` in the current transaction."""
    return await record_event(
        conn,
        Event(
            type=type_,
            source=SOURCE,
            subject=user_id,
            aggregate_id=user_id,
            data={"user_id": user_id, **data},
        ),
    )


def one_time_code_ring(settings: Settings) -> SealRing:
    """The keys one-time codes are sealed under, for the users service (sealing) and the
    notification service (opening) alike."""
    return SealRing.from_settings(settings, "one-time-codes")


# The events that carry a one-time code, and the field that names what the code is for.
CODE_REFERENCES = {
    VERIFICATION_REQUESTED: "verification_id",
    STEP_UP_CODE_REQUESTED: "challenge_id",
    PASSWORD_RESET_REQUESTED: "reset_id",
}


def one_time_code_aad(type_: str, data: Mapping[str, Any]) -> bytes:
    """What a sealed code is bound to: its event type, user, reference, channel and address,
    so it opens only for the message it was sealed for (a changed target does not open)."""
    reference = data.get(CODE_REFERENCES[type_])
    parts = [type_, data.get("user_id"), reference, data.get("channel"), data.get("target")]
    return json.dumps(parts, separators=(",", ":")).encode()


async def publish_code(
    conn: AsyncConnection,
    codes: SealRing,
    type_: str,
    user_id: str,
    data: dict[str, Any],
    code: str,
) -> Event:
    """Record a one-time-code event: the code travels sealed for the notification service
    (`sealed_code`: kid + AES-256-GCM ciphertext), never in clear in the outbox or on Kafka."""
    data = {"user_id": user_id, **data}
    sealed = codes.seal(code.encode(), one_time_code_aad(type_, data))
    return await publish(conn, type_, user_id, {**data, "sealed_code": sealed})


def open_one_time_code(codes: SealRing, event: Mapping[str, Any]) -> str | None:
    """The code a one-time-code event carries, for whoever sends it; None when the event has
    none (stripped). Raises `SealError` when it does not open."""
    data = event.get("data") or {}
    sealed = data.get("sealed_code")
    if not isinstance(sealed, Mapping):
        return None
    return codes.open(sealed, one_time_code_aad(event["type"], data)).decode()
