"""Devices: enrol (with the device's P-256 key), list, rename, revoke."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import NotFound, Unprocessable
from billfold.platform.ids import is_valid_id, new_id
from billfold.users import events, mfa
from billfold.users.auth import allowed_scopes, deny_tokens_after_commit
from billfold.users.models import Device, EnrolDevice, UpdateDevice
from billfold.users.runtime import UsersRuntime
from billfold.users.store import sessions as store


def normalize_public_key(value: str) -> str:
    """A P-256 public key as PEM (accepts PEM or base64/base64url DER SubjectPublicKeyInfo)."""
    try:
        if value.lstrip().startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(value.encode())
        else:
            raw = value.strip()
            der = base64.urlsafe_b64decode(
                raw.replace("+", "-").replace("/", "_") + "=" * (-len(raw) % 4)
            )
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, TypeError):
        raise Unprocessable(
            "public_key must be a P-256 public key (PEM or base64 DER SPKI)",
            code="invalid_public_key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise Unprocessable("public_key must be an EC P-256 key", code="invalid_public_key")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def to_device(row: Row[Any], current_device: str | None = None) -> Device:
    return Device(
        id=row.id,
        name=row.name,
        platform=row.platform,
        has_push_token=row.push_token is not None,
        has_device_key=row.public_key is not None,
        scopes=list(row.scopes),
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        current=row.id == current_device,
    )


async def enrol_device(
    uow: UnitOfWork,
    rt: UsersRuntime,
    principal: Principal,
    request: EnrolDevice,
    step_up_token: str | None = None,
) -> Device:
    """A device with a key becomes a way to sign in: only after a recent sign-in or step-up."""
    user_id = principal.user_id
    if request.public_key:
        await mfa.require_recent_auth(rt, principal, step_up_token)
    conn = await uow.connection()
    public_key = normalize_public_key(request.public_key) if request.public_key else None
    device_id = new_id("dev")
    scopes = allowed_scopes("user", request.platform)
    await store.insert_device(
        conn,
        {
            "id": device_id,
            "user_id": user_id,
            "name": request.name,
            "platform": request.platform,
            "push_token": request.push_token,
            "public_key": public_key,
            "attestation": json.dumps(request.attestation) if request.attestation else None,
            "scopes": scopes,
            "now": utcnow(),
        },
    )
    await events.publish(
        conn,
        events.DEVICE_ENROLLED,
        user_id,
        {"device_id": device_id, "platform": request.platform, "name": request.name},
    )
    row = await store.get_device(conn, user_id, device_id)
    assert row is not None
    return to_device(row)


async def _own_device(conn: AsyncConnection, user_id: str, device_id: str) -> Row[Any]:
    row = (
        await store.get_device(conn, user_id, device_id) if is_valid_id(device_id, "dev") else None
    )
    if row is None:
        raise NotFound("No such device")
    return row


async def get_device(
    conn: AsyncConnection, user_id: str, device_id: str, current: str | None = None
) -> Device:
    return to_device(await _own_device(conn, user_id, device_id), current)


async def update_device(
    uow: UnitOfWork, user_id: str, device_id: str, request: UpdateDevice, current: str | None = None
) -> Device:
    conn = await uow.connection()
    await _own_device(conn, user_id, device_id)
    changes = request.model_dump(exclude_unset=True)
    if "name" in changes and changes["name"] is None:
        raise Unprocessable("name cannot be removed")
    await store.update_device(conn, device_id, changes)
    return await get_device(conn, user_id, device_id, current)


async def revoke_device(uow: UnitOfWork, rt: UsersRuntime, user_id: str, device_id: str) -> None:
    """Revoking a device ends its sessions and refresh tokens and its live access tokens."""
    conn = await uow.connection()
    await _own_device(conn, user_id, device_id)
    now = utcnow()
    await store.revoke_device(conn, device_id, now)
    revoked = await store.revoke_sessions(
        conn, user_id=user_id, device_id=device_id, now=now, reason="device_revoked"
    )
    await events.publish(
        conn, events.DEVICE_REVOKED, user_id, {"device_id": device_id, "sessions_revoked": revoked}
    )
    deny_tokens_after_commit(uow, rt, revoked)
