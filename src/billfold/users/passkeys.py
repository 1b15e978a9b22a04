"""WebAuthn passkeys for the web portal: registration and sign-in ceremonies (py_webauthn).

Challenges live in Redis for a few minutes and are single use. Sign-in is the token grant
`grant_type=passkey`; it checks the assertion and the signature counter, then opens a
session like any other sign-in.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Row
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url, options_to_json_dict
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Conflict, NotFound, ProblemError, Unprocessable
from billfold.platform.ids import is_valid_id, new_id
from billfold.platform.observability import get_logger
from billfold.users import events, mfa
from billfold.users.auth import (
    ClientContext,
    TokenGrant,
    b64url_decode,
    cannot_sign_in,
    invalid_grant,
    open_session,
)
from billfold.users.models import Passkey, PasskeyOptions, RegisterPasskey
from billfold.users.runtime import UsersRuntime
from billfold.users.store import accounts as accounts_store
from billfold.users.store import passkeys as store

log = get_logger("billfold.users.passkeys")

CEREMONY_TTL_SECONDS = 300
MAX_CREDENTIAL_JSON_BYTES = 64 * 1024
SUPPORTED_ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
_KNOWN_TRANSPORTS = frozenset(t.value for t in AuthenticatorTransport)


def _transports(values: list[str]) -> list[AuthenticatorTransport]:
    return [AuthenticatorTransport(v) for v in values if v in _KNOWN_TRANSPORTS]


def _descriptor(row: Row[Any]) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(
        id=bytes(row.credential_id), transports=_transports(list(row.transports)) or None
    )


def to_passkey(row: Row[Any]) -> Passkey:
    return Passkey(
        id=row.id,
        name=row.name,
        credential_id=bytes_to_base64url(bytes(row.credential_id)),
        transports=list(row.transports),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _b64url(value: Any) -> bytes | None:
    if not isinstance(value, str) or len(value) > 2048:
        return None
    return b64url_decode(value)


def _check_size(credential: dict[str, Any]) -> None:
    if len(json.dumps(credential, default=str)) > MAX_CREDENTIAL_JSON_BYTES:
        raise Unprocessable("The credential is too large", code="invalid_credential")


async def _save_challenge(rt: UsersRuntime, kind: str, record: dict[str, Any]) -> str:
    challenge_id = secrets.token_urlsafe(16)
    await rt.redis.set(rt.key(kind, challenge_id), json.dumps(record), ex=CEREMONY_TTL_SECONDS)
    return challenge_id


# --- registration (signed in) --------------------------------------------------------------------


async def registration_options(uow: UnitOfWork, rt: UsersRuntime, user_id: str) -> PasskeyOptions:
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, user_id)
    if user is None:
        raise NotFound("No such user")
    existing = await store.list_credentials(conn, user_id)
    s = rt.settings
    options = generate_registration_options(
        rp_id=s.webauthn_rp_id,
        rp_name=s.webauthn_rp_name,
        user_id=user_id.encode(),
        user_name=user.email,
        user_display_name=user.name,
        timeout=CEREMONY_TTL_SECONDS * 1000,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[_descriptor(r) for r in existing],
        supported_pub_key_algs=SUPPORTED_ALGORITHMS,
    )
    challenge_id = await _save_challenge(
        rt,
        "passkey-registration",
        {"user_id": user_id, "challenge": bytes_to_base64url(options.challenge)},
    )
    return PasskeyOptions(
        challenge_id=challenge_id,
        options=options_to_json_dict(options),
        expires_at=utcnow() + timedelta(seconds=CEREMONY_TTL_SECONDS),
    )


async def _take_registration_challenge(rt: UsersRuntime, user_id: str, challenge_id: str) -> bytes:
    """Single use; a challenge of someone else is answered like an unknown one (and kept)."""
    key = rt.key("passkey-registration", challenge_id)
    raw = await rt.redis.get(key)
    record = json.loads(raw) if raw is not None else None
    if record is None or record["user_id"] != user_id or not await rt.redis.delete(key):
        raise ProblemError(
            "The registration challenge is unknown, used or expired; request new options",
            status=400,
            code="invalid_challenge",
        )
    challenge = _b64url(record["challenge"])
    assert challenge is not None
    return challenge


async def register_passkey(
    uow: UnitOfWork,
    rt: UsersRuntime,
    principal: Principal,
    request: RegisterPasskey,
    step_up_token: str | None = None,
) -> Passkey:
    """A new passkey is a new way to sign in: only after a recent sign-in or step-up."""
    user_id = principal.user_id
    _check_size(request.credential)
    await mfa.require_recent_auth(rt, principal, step_up_token)
    challenge = await _take_registration_challenge(rt, user_id, request.challenge_id)
    try:
        verified = verify_registration_response(
            credential=request.credential,
            expected_challenge=challenge,
            expected_rp_id=rt.settings.webauthn_rp_id,
            expected_origin=rt.settings.webauthn_origin,
            require_user_verification=True,
            supported_pub_key_algs=SUPPORTED_ALGORITHMS,
        )
    except WebAuthnException as exc:
        raise Unprocessable(
            f"The passkey could not be verified: {exc}", code="invalid_credential"
        ) from None
    except Exception:  # the library parses untrusted input; any failure is the caller's
        raise Unprocessable(
            "The passkey could not be verified: malformed credential", code="invalid_credential"
        ) from None
    response = request.credential.get("response")
    raw_transports = response.get("transports") if isinstance(response, dict) else None
    transports = (
        [t for t in raw_transports if isinstance(t, str) and t in _KNOWN_TRANSPORTS]
        if isinstance(raw_transports, list)
        else []
    )
    conn = await uow.connection()
    passkey_id = new_id("cred")
    inserted = await store.insert_credential(
        conn,
        {
            "id": passkey_id,
            "user_id": user_id,
            "credential_id": verified.credential_id,
            "public_key": verified.credential_public_key,
            "sign_count": verified.sign_count,
            "transports": sorted(set(transports)),
            "name": request.name,
            "now": utcnow(),
        },
    )
    if not inserted:
        raise Conflict("This passkey is already registered", code="passkey_already_registered")
    await events.publish(
        conn,
        events.PASSKEY_REGISTERED,
        user_id,
        {"passkey_id": passkey_id, "name": request.name},
    )
    row = await store.get_credential(conn, user_id, passkey_id)
    assert row is not None
    return to_passkey(row)


async def _own_passkey(uow: UnitOfWork, user_id: str, passkey_id: str) -> Row[Any]:
    row = (
        await store.get_credential(await uow.connection(), user_id, passkey_id)
        if is_valid_id(passkey_id, "cred")
        else None
    )
    if row is None:
        raise NotFound("No such passkey")
    return row


async def get_passkey(uow: UnitOfWork, user_id: str, passkey_id: str) -> Passkey:
    return to_passkey(await _own_passkey(uow, user_id, passkey_id))


async def delete_passkey(uow: UnitOfWork, user_id: str, passkey_id: str) -> None:
    await _own_passkey(uow, user_id, passkey_id)
    conn = await uow.connection()
    if not await store.delete_credential(conn, user_id, passkey_id):
        raise NotFound("No such passkey")
    await events.publish(conn, events.PASSKEY_REMOVED, user_id, {"passkey_id": passkey_id})


# --- authentication (anonymous) ------------------------------------------------------------------


async def authentication_options(
    uow: UnitOfWork, rt: UsersRuntime, email: str | None
) -> PasskeyOptions:
    """Options for signing in with a discoverable passkey (all are: resident keys are required
    at registration), so the answer never lists credentials and reveals nothing about an email.
    An email only binds the challenge: an assertion for another account is then refused."""
    bound_to: str | None = None
    if email is not None:
        conn = await uow.connection()
        user = await accounts_store.find_user_by_email(conn, email)
        bound_to = user.id if user is not None and user.status == "active" else ""  # "" = nobody
    allow: list[PublicKeyCredentialDescriptor] = []
    options = generate_authentication_options(
        rp_id=rt.settings.webauthn_rp_id,
        timeout=CEREMONY_TTL_SECONDS * 1000,
        allow_credentials=allow,
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    challenge_id = await _save_challenge(
        rt,
        "passkey-authentication",
        {"challenge": bytes_to_base64url(options.challenge), "user_id": bound_to},
    )
    return PasskeyOptions(
        challenge_id=challenge_id,
        options=options_to_json_dict(options),
        expires_at=utcnow() + timedelta(seconds=CEREMONY_TTL_SECONDS),
    )


async def passkey_grant(
    uow: UnitOfWork,
    rt: UsersRuntime,
    *,
    challenge_id: str,
    credential: dict[str, Any],
    scope: str | None,
    client: ClientContext,
) -> TokenGrant:
    """Verify a WebAuthn assertion against its single-use challenge, then open a session."""
    _check_size(credential)
    raw = await rt.redis.getdel(rt.key("passkey-authentication", challenge_id))
    if raw is None:
        raise invalid_grant("The challenge is unknown, used or expired")
    record = json.loads(raw)
    challenge = _b64url(record["challenge"])
    credential_id = _b64url(credential.get("rawId"))
    if challenge is None or not credential_id:
        raise invalid_grant("The passkey assertion is malformed")
    conn = await uow.connection()
    row = await store.find_by_credential_id(conn, credential_id, for_update=True)
    if row is None:
        raise invalid_grant("This passkey is not registered")
    bound_to = record.get("user_id")
    if bound_to is not None and bound_to != row.user_id:
        raise invalid_grant("This passkey does not belong to the account that asked")
    response = credential.get("response")
    user_handle = response.get("userHandle") if isinstance(response, dict) else None
    if user_handle is not None and _b64url(user_handle) != row.user_id.encode():
        raise invalid_grant("The passkey's user handle does not match")
    try:
        # The counter is checked below, once the signature is known to be genuine.
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rt.settings.webauthn_rp_id,
            expected_origin=rt.settings.webauthn_origin,
            credential_public_key=bytes(row.public_key),
            credential_current_sign_count=0,
            require_user_verification=True,
        )
    except Exception:  # the library parses untrusted input; any failure is the caller's
        raise invalid_grant("The passkey assertion does not verify") from None
    new_count, stored = verified.new_sign_count, int(row.sign_count)
    if (new_count > 0 or stored > 0) and new_count <= stored:
        # A genuine signature with a counter that did not move forward: a cloned authenticator.
        log.warning(
            "passkey counter regression", passkey_id=row.id, stored=stored, presented=new_count
        )
        raise invalid_grant("The passkey's signature counter went backwards; it may be cloned")
    user = await accounts_store.get_user(conn, row.user_id)
    if user is None or user.status != "active":
        raise cannot_sign_in(user.status if user else None)
    await store.record_use(conn, row.id, new_count, utcnow())
    return await open_session(
        uow, rt, user=user, device=None, method="passkey", scope=scope, client=client
    )
