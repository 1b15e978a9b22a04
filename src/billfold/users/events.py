"""Events the User Service publishes (`billfold.users.*`, CloudEvents via the outbox)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

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
