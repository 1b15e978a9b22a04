"""Registration, profile and contact verification."""

from __future__ import annotations

import hmac
import io
import secrets
from datetime import date, timedelta
from typing import Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import (
    Conflict,
    FieldError,
    NotFound,
    ProblemError,
    TooManyRequests,
    Unprocessable,
)
from billfold.platform.ids import is_valid_id, new_id
from billfold.users import events, kyc, mfa
from billfold.users.models import (
    Address,
    RegisterUser,
    UpdateProfile,
    User,
    Verification,
    mask_email,
    mask_phone,
)
from billfold.users.runtime import UsersRuntime
from billfold.users.store import accounts as store

_MAX_VERIFICATIONS_PER_HOUR = 5
_AVATAR_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}


def _contact_in_use() -> Conflict:
    # Deliberately does not say which field: no probing who has an account.
    return Conflict(
        "An account already uses this email address, phone number or handle",
        code="contact_in_use",
    )


def to_user(row: Row[Any]) -> User:
    return User(
        id=row.id,
        email=row.email,
        phone=row.phone,
        name=row.name,
        handle=row.handle,
        date_of_birth=row.date_of_birth,
        country=row.country,
        address=Address.model_validate(row.address) if row.address else None,
        locale=row.locale,
        timezone=row.timezone,
        avatar_url="/v1/me/avatar" if row.avatar_key else None,
        email_verified=row.email_verified_at is not None,
        phone_verified=row.phone_verified_at is not None,
        kyc_status=row.kyc_status,
        kyc_tier=row.kyc_tier,
        two_factor_enabled=bool(row.two_factor_enabled),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_birth_date(dob: date) -> None:
    today = utcnow().date()
    if dob >= today or dob < date(today.year - 130, 1, 1):
        raise Unprocessable(
            "date_of_birth must be a real date in the past",
            code="validation_failed",
            errors=[FieldError(pointer="#/date_of_birth", detail="not a plausible birth date")],
        )


async def register_user(
    uow: UnitOfWork, rt: UsersRuntime, request: RegisterUser, *, role: str = "user"
) -> User:
    """Create an account; exactly one of many concurrent registrations of one email wins."""
    _check_birth_date(request.date_of_birth)
    password_hash = await rt.hash_password(request.password)
    conn = await uow.connection()
    now = utcnow()
    user_id = new_id("usr")
    inserted = await store.insert_user(
        conn,
        {
            "id": user_id,
            "email": request.email,
            "phone": request.phone,
            "password_hash": password_hash,
            "name": request.name,
            "handle": request.handle,
            "date_of_birth": request.date_of_birth,
            "country": request.country,
            "locale": request.locale,
            "timezone": request.timezone,
            "role": role,
            "now": now,
        },
    )
    if inserted is None:
        raise _contact_in_use()
    await events.publish(
        conn,
        events.USER_REGISTERED,
        user_id,
        {"country": request.country, "locale": request.locale},
    )
    row = await store.get_user(conn, user_id)
    assert row is not None
    return to_user(row)


async def get_me(conn: AsyncConnection, user_id: str) -> User:
    row = await store.get_user(conn, user_id)
    if row is None:
        raise NotFound("No such user")
    return to_user(row)


async def update_profile(
    uow: UnitOfWork,
    rt: UsersRuntime,
    principal: Principal,
    request: UpdateProfile,
    step_up_token: str | None = None,
) -> User:
    """Change profile fields; a new email or phone is unverified until confirmed again, and
    changing either (where codes and alerts go) needs a recent sign-in or step-up."""
    user_id = principal.user_id
    conn = await uow.connection()
    row = await store.get_user(conn, user_id, for_update=True)
    if row is None:
        raise NotFound("No such user")
    fields = request.model_dump(exclude_unset=True)
    if any(fields.get(k, 0) is None for k in ("name", "email", "phone", "locale", "timezone")):
        raise Unprocessable("name, email, phone, locale and timezone cannot be removed")
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "address":
            value = request.address.model_dump() if request.address else None
            if value != row.address:
                changes["address"] = value
        elif value != getattr(row, name):
            changes[name] = value
    if "email" in changes or "phone" in changes:
        await mfa.require_recent_auth(rt, principal, step_up_token)
    new_email, new_phone, new_handle = (
        changes.get("email"),
        changes.get("phone"),
        changes.get("handle"),
    )
    if new_email or new_phone or new_handle:
        taken = await store.contact_taken(
            conn, email=new_email, phone=new_phone, handle=new_handle, exclude_user=user_id
        )
        if taken:
            raise _contact_in_use()
    if "email" in changes:
        changes["email_verified_at"] = None
    if "phone" in changes:
        changes["phone_verified_at"] = None
    if changes:
        try:
            await store.update_user(conn, user_id, changes, utcnow())
        except Exception as exc:  # a concurrent change won the unique index
            if "unique" in str(exc).lower():
                raise _contact_in_use() from None
            raise
        await events.publish(
            conn,
            events.PROFILE_UPDATED,
            user_id,
            {"fields": sorted(k for k in changes if not k.endswith("_verified_at"))},
        )
        if "email" in changes or "phone" in changes:
            await kyc.refresh_tier(conn, user_id)  # an unverified contact lowers the tier
    return await get_me(conn, user_id)


def _code_hash(rt: UsersRuntime, verification_id: str, code: str) -> bytes:
    return rt.keyed_hash("verification", f"{verification_id}:{code}")


def _verification_view(rt: UsersRuntime, row: Row[Any]) -> Verification:
    now = utcnow()
    max_attempts = rt.settings.verification_max_attempts
    if row.confirmed_at is not None:
        status = "confirmed"
    elif row.attempts >= max_attempts:
        status = "failed"
    elif row.expires_at <= now:
        status = "expired"
    else:
        status = "pending"
    target = mask_email(row.target) if row.channel == "email" else mask_phone(row.target)
    return Verification(
        id=row.id,
        channel=row.channel,
        target=target,
        status=status,  # type: ignore[arg-type]
        expires_at=row.expires_at,
        attempts_left=max(0, max_attempts - row.attempts),
    )


async def start_verification(
    uow: UnitOfWork, rt: UsersRuntime, user_id: str, channel: str
) -> Verification:
    """Send a one-time code to the user's current email or phone (via an outbox event)."""
    conn = await uow.connection()
    user = await store.get_user(conn, user_id, for_update=True)
    if user is None:
        raise NotFound("No such user")
    verified_at = user.email_verified_at if channel == "email" else user.phone_verified_at
    if verified_at is not None:
        raise Conflict(f"The {channel} is already verified", code="already_verified")
    now = utcnow()
    recent = await store.count_recent_verifications(conn, user_id, now - timedelta(hours=1))
    if recent >= _MAX_VERIFICATIONS_PER_HOUR:
        raise TooManyRequests(
            "Too many verification codes requested; try again later",
            code="too_many_verifications",
            headers={"Retry-After": "3600"},
        )
    verification_id = new_id("vrf")
    code = f"{secrets.randbelow(1_000_000):06d}"
    target = user.email if channel == "email" else user.phone
    await store.insert_verification(
        conn,
        {
            "id": verification_id,
            "user_id": user_id,
            "channel": channel,
            "target": target,
            "code_hash": _code_hash(rt, verification_id, code),
            "expires_at": now + timedelta(seconds=rt.settings.verification_code_ttl_seconds),
            "now": now,
        },
    )
    # The notification service delivers the code; the event is its only carrier.
    await events.publish_code(
        conn,
        rt.codes,
        events.VERIFICATION_REQUESTED,
        user_id,
        {
            "verification_id": verification_id,
            "channel": channel,
            "target": target,
            "locale": user.locale,
            "expires_in": rt.settings.verification_code_ttl_seconds,
        },
        code,
    )
    row = await store.get_verification(conn, user_id, verification_id)
    assert row is not None
    return _verification_view(rt, row)


async def confirm_verification(
    uow: UnitOfWork, rt: UsersRuntime, user_id: str, verification_id: str, code: str
) -> Verification:
    if not is_valid_id(verification_id, "vrf"):
        raise NotFound("No such verification")
    max_attempts = rt.settings.verification_max_attempts
    # The attempt is counted before the code is compared, atomically and in a transaction of its
    # own that commits whatever this request does: parallel guesses each take one attempt, so at
    # most `max_attempts` codes are ever compared. The request's own connection is not taken
    # until the code is right, so a request never holds two pool connections here.
    async with uow.engine.begin() as side:
        row = await store.get_verification(side, user_id, verification_id)
        if row is None:
            raise NotFound("No such verification")
        status = _verification_view(rt, row).status
        if status != "pending":
            raise _not_pending(status)
        user = await store.get_user(side, user_id)
        assert user is not None
        _ensure_current(row, user)
        attempts = await store.spend_verification_attempt(
            side, user_id, verification_id, max_attempts
        )
        if attempts is None:
            # A parallel request spent the last attempt or confirmed it, or it just expired.
            row = await store.get_verification(side, user_id, verification_id)
            assert row is not None
            status = _verification_view(rt, row).status
            # Still pending by our clock means the database's clock saw it expire.
            raise _not_pending("expired" if status == "pending" else status)
    if not hmac.compare_digest(bytes(row.code_hash), _code_hash(rt, verification_id, code)):
        left = max(0, max_attempts - attempts)
        raise mfa.invalid_code(left, then="request a new code")
    conn = await uow.connection()
    user = await store.get_user(conn, user_id, for_update=True)
    assert user is not None
    _ensure_current(row, user)
    now = utcnow()
    if not await store.mark_verification_confirmed(conn, verification_id, now):
        raise Conflict("This verification is confirmed", code="verification_confirmed")
    column = "email_verified_at" if row.channel == "email" else "phone_verified_at"
    await store.update_user(conn, user_id, {column: now}, now)
    await events.publish(
        conn, events.CONTACT_VERIFIED, user_id, {"channel": row.channel, "verification_id": row.id}
    )
    await kyc.refresh_tier(conn, user_id)
    updated = await store.get_verification(conn, user_id, verification_id)
    assert updated is not None
    return _verification_view(rt, updated)


def _not_pending(status: str) -> Conflict:
    return Conflict(f"This verification is {status}", code=f"verification_{status}")


def _ensure_current(row: Row[Any], user: Row[Any]) -> None:
    current = user.email if row.channel == "email" else user.phone
    if current != row.target:
        raise Conflict("The contact changed since this code was sent", code="verification_stale")


def sniff_image(data: bytes) -> str:
    """The content type of a real, decodable image; anything else is refused."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise Unprocessable(
            "The avatar must be a PNG, JPEG, WebP or GIF image", code="invalid_image"
        ) from None
    if fmt not in _AVATAR_FORMATS:
        raise Unprocessable(
            "The avatar must be a PNG, JPEG, WebP or GIF image", code="invalid_image"
        )
    return _AVATAR_FORMATS[fmt]


async def set_avatar(uow: UnitOfWork, rt: UsersRuntime, user_id: str, data: bytes) -> User:
    if len(data) > rt.settings.avatar_max_bytes:
        raise ProblemError(
            f"The avatar must be at most {rt.settings.avatar_max_bytes} bytes",
            status=413,
            code="payload_too_large",
            title="Payload too large",
        )
    content_type = sniff_image(data)
    conn = await uow.connection()
    row = await store.get_user(conn, user_id, for_update=True)
    if row is None:
        raise NotFound("No such user")
    key = f"avatars/{user_id}/{new_id('evt').removeprefix('evt_')}"
    await rt.blobs.put(key, data, content_type)
    await store.update_user(conn, user_id, {"avatar_key": key}, utcnow())
    await events.publish(conn, events.PROFILE_UPDATED, user_id, {"fields": ["avatar"]})
    if row.avatar_key:
        old = row.avatar_key

        async def drop_old() -> None:
            await rt.blobs.delete(old)

        uow.after_commit(drop_old)
    return to_user(await store.get_user(conn, user_id))  # type: ignore[arg-type]


async def get_avatar(conn: AsyncConnection, rt: UsersRuntime, user_id: str) -> tuple[bytes, str]:
    row = await store.get_user(conn, user_id)
    if row is None or not row.avatar_key:
        raise NotFound("No avatar")
    blob = await rt.blobs.get(row.avatar_key)
    if blob is None:
        raise NotFound("No avatar")
    return blob
