"""Passkey routes: register, list, remove (signed in) and sign-in options (anonymous).

Sign-in itself is `POST /v1/auth/token` with `grant_type=passkey`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from billfold.gateway import Principal, Uow, require_scopes
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params
from billfold.users import passkeys
from billfold.users.api.deps import Runtime, StepUpHeader
from billfold.users.models import (
    Passkey,
    PasskeyAuthenticationRequest,
    PasskeyOptions,
    RegisterPasskey,
)
from billfold.users.store import passkeys as store

router = APIRouter(tags=["passkeys"])
Me = Annotated[Principal, Depends(require_scopes("devices"))]
PasskeyId = Annotated[str, Path(max_length=64)]


@router.post(
    "/v1/me/passkeys/registration-options",
    response_model=PasskeyOptions,
    summary="Options for navigator.credentials.create() to register a passkey",
    responses=problem_responses(401, 403),
)
async def registration_options(me: Me, uow: Uow, rt: Runtime) -> PasskeyOptions:
    """Pass `options` to `navigator.credentials.create({publicKey: ...})` (decode the base64url
    fields), then send the result with `challenge_id` to `POST /v1/me/passkeys` within 5
    minutes. Each challenge works once."""
    return await passkeys.registration_options(uow, rt, me.user_id)


@router.post(
    "/v1/me/passkeys",
    status_code=status.HTTP_201_CREATED,
    response_model=Passkey,
    summary="Register a passkey",
    responses=problem_responses(400, 401, 403, 409, 422),
)
async def register(
    body: RegisterPasskey, me: Me, uow: Uow, rt: Runtime, step_up: StepUpHeader = None
) -> Passkey:
    """`400 invalid_challenge` for an unknown, used or expired challenge; `422
    invalid_credential` when the attestation does not verify (origin, RP id, challenge);
    `403 step_up_required` unless you signed in within 10 minutes or send an
    `X-Step-Up-Token` for `sensitive_change`."""
    return await passkeys.register_passkey(uow, rt, me, body, step_up)


@router.get(
    "/v1/me/passkeys",
    response_model=Page[Passkey],
    summary="Your passkeys",
    responses=problem_responses(401, 403, 422),
)
async def list_passkeys(
    me: Me, uow: Uow, page: Annotated[PageParams, Depends(page_params)]
) -> Page[Passkey]:
    rows = await store.list_credentials(
        await uow.connection(), me.user_id, page.limit + 1, page.after
    )
    return make_page([passkeys.to_passkey(r) for r in rows], page.limit, "id")


@router.get(
    "/v1/me/passkeys/{passkey_id}",
    response_model=Passkey,
    summary="One of your passkeys",
    responses=problem_responses(401, 403, 404),
)
async def get_passkey(passkey_id: PasskeyId, me: Me, uow: Uow) -> Passkey:
    return await passkeys.get_passkey(uow, me.user_id, passkey_id)


@router.delete(
    "/v1/me/passkeys/{passkey_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a passkey",
    responses=problem_responses(401, 403, 404),
)
async def delete_passkey(passkey_id: PasskeyId, me: Me, uow: Uow) -> Response:
    await passkeys.delete_passkey(uow, me.user_id, passkey_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/v1/auth/passkey/options",
    response_model=PasskeyOptions,
    summary="Options for navigator.credentials.get() to sign in with a passkey",
    responses=problem_responses(422, 429),
)
async def authentication_options(
    uow: Uow, rt: Runtime, body: PasskeyAuthenticationRequest | None = None
) -> PasskeyOptions:
    """Optionally name the account by `email`; otherwise the browser offers the passkeys it
    holds for this site. Then call `/v1/auth/token` with `grant_type=passkey`, the
    `challenge_id` and the credential, within 5 minutes."""
    return await passkeys.authentication_options(uow, rt, body.email if body else None)
