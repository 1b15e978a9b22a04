"""Sign-in routes: OAuth2 token endpoint, device challenges, logout, JWKS, sessions."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from billfold.gateway import Principal, Uow, current_principal, require_scopes
from billfold.platform.errors import ProblemError, problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params
from billfold.users import auth, mfa, passwords
from billfold.users.api.deps import Runtime, client_context
from billfold.users.auth import ClientContext
from billfold.users.models import (
    ConfirmPasswordReset,
    DeviceChallenge,
    DeviceChallengeRequest,
    DeviceSignatureGrant,
    MfaOtpGrant,
    PasskeyGrant,
    PasswordGrant,
    PasswordResetStarted,
    RefreshGrant,
    Session,
    StartPasswordReset,
    TokenRequest,
    TokenResponse,
    normalize_email,
)
from billfold.users.store import sessions as store

router = APIRouter(tags=["auth"])
Client = Annotated[ClientContext, Depends(client_context)]
_TOKEN_REQUEST: TypeAdapter[Any] = TypeAdapter(TokenRequest)
_GRANTS = ("password", "refresh_token", "device_signature", "passkey", "mfa_otp")

_TOKEN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {"schema": _TOKEN_REQUEST.json_schema()},
            "application/json": {"schema": _TOKEN_REQUEST.json_schema()},
        },
    }
}


async def _parse_token_request(request: Request) -> Any:
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/x-www-form-urlencoded":
            data: Any = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        elif ctype == "application/json":
            data = json.loads(raw)
        else:
            raise ProblemError(
                "Send the token request as application/x-www-form-urlencoded or application/json",
                status=415,
                code="unsupported_media_type",
                title="Unsupported media type",
            )
    # ValueError: also integers over Python's digit limit; RecursionError: deep nesting.
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProblemError("The request body could not be parsed", code="malformed_body") from None
    if not isinstance(data, dict) or data.get("grant_type") not in _GRANTS:
        raise ProblemError(
            f"grant_type must be one of: {', '.join(_GRANTS)}",
            status=400,
            code="unsupported_grant_type",
            extra={"error": "unsupported_grant_type"},
        )
    try:
        return _TOKEN_REQUEST.validate_python(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"][1:])} for e in exc.errors(include_input=False)]
        raise RequestValidationError(errors) from None


@router.post(
    "/v1/auth/token",
    response_model=TokenResponse,
    summary="Get tokens (grants: password, mfa_otp, refresh_token, device_signature, passkey)",
    openapi_extra=_TOKEN_BODY,
    responses=problem_responses(400, 403, 415, 422, 429),
)
async def token(request: Request, uow: Uow, rt: Runtime, client: Client) -> TokenResponse:
    """Form-encoded (RFC 6749) or JSON. `refresh_token` rotates: each refresh token works once,
    and presenting a used one revokes the session. `400 invalid_grant` for bad credentials,
    `429 too_many_attempts` after repeated password failures. With two-factor on, the password
    grant answers `403 mfa_required` with an `mfa_token`; finish with `grant_type=mfa_otp`."""
    grant = await _parse_token_request(request)
    if isinstance(grant, PasswordGrant):
        try:
            email = normalize_email(grant.username)
        except ValueError:
            raise auth.invalid_grant("The email or password is not correct") from None
        result = await auth.password_grant(
            uow,
            rt,
            email=email,
            password=grant.password,
            device_id=grant.device_id,
            scope=grant.scope,
            client=client,
        )
    elif isinstance(grant, RefreshGrant):
        result = await auth.refresh_grant(
            uow, rt, refresh_token=grant.refresh_token, scope=grant.scope
        )
    elif isinstance(grant, DeviceSignatureGrant):
        result = await auth.device_signature_grant(
            uow,
            rt,
            device_id=grant.device_id,
            challenge_id=grant.challenge_id,
            signature=grant.signature,
            scope=grant.scope,
            client=client,
        )
    elif isinstance(grant, PasskeyGrant):
        from billfold.users import passkeys

        result = await passkeys.passkey_grant(
            uow,
            rt,
            challenge_id=grant.challenge_id,
            credential=grant.credential,
            scope=grant.scope,
            client=client,
        )
    elif isinstance(grant, MfaOtpGrant):
        result = await mfa.mfa_otp_grant(
            uow, rt, mfa_token=grant.mfa_token, otp=grant.otp, client=client
        )
    else:  # pragma: no cover - the adapter admits only the grants above
        raise ProblemError("unsupported grant", code="unsupported_grant_type")
    return TokenResponse(
        access_token=result.access_token,
        expires_in=result.expires_in,
        refresh_token=result.refresh_token,
        scope=result.scope,
        session_id=result.session_id,
    )


@router.post(
    "/v1/auth/challenge",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceChallenge,
    summary="A nonce for device-signature (biometric) sign-in",
    responses=problem_responses(422, 429),
)
async def device_challenge(body: DeviceChallengeRequest, rt: Runtime) -> DeviceChallenge:
    """The phone unlocks its Secure Enclave / TEE key with the local biometric check and signs
    `signing_input`; then it calls `/v1/auth/token` with `grant_type=device_signature`.
    No biometric data ever reaches the server. Valid for 2 minutes, once."""
    return DeviceChallenge(**await auth.create_device_challenge(rt, body.device_id))


@router.post(
    "/v1/auth/password-reset",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PasswordResetStarted,
    summary="Forgot password: email a reset code",
    responses=problem_responses(422, 429),
)
async def start_password_reset(
    body: StartPasswordReset, uow: Uow, rt: Runtime
) -> PasswordResetStarted:
    """Always `202` with a `reset_id`, whether or not the email has an account (and when it has
    asked too often: at most 3 codes per email an hour); only a real account gets an email
    with a 6-digit code, valid for 15 minutes. Finish with `/v1/auth/password-reset/confirm`."""
    return await passwords.start_password_reset(uow, rt, body.email)


@router.post(
    "/v1/auth/password-reset/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Set a new password with the emailed code",
    responses=problem_responses(400, 422, 429),
)
async def confirm_password_reset(body: ConfirmPasswordReset, uow: Uow, rt: Runtime) -> Response:
    """`422 invalid_code` with `attempts_left` (5 per reset); then, and for an unknown or
    expired `reset_id`, `400 invalid_reset`. Success signs out every session; sign in again
    with the new password (two-factor, if on, is still asked for). `Idempotency-Key` is
    ignored: the body holds a password and is never stored."""
    await passwords.confirm_password_reset(uow, rt, body.reset_id, body.code, body.new_password)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/v1/auth/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End the current session",
    responses=problem_responses(401),
)
async def logout(
    uow: Uow, rt: Runtime, me: Annotated[Principal, Depends(current_principal)]
) -> Response:
    await auth.revoke_session(uow, rt, me.user_id, me.session_id, reason="logout")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(rt: Runtime, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "public, max-age=300"
    return rt.tokens.keyring.jwks()


Devices = Annotated[Principal, Depends(require_scopes("devices"))]


@router.get(
    "/v1/sessions",
    response_model=Page[Session],
    summary="Your active sessions",
    responses=problem_responses(401, 403, 422),
)
async def list_sessions(
    me: Devices, uow: Uow, page: Annotated[PageParams, Depends(page_params)]
) -> Page[Session]:
    from billfold.platform.clock import utcnow

    rows = await store.list_sessions(
        await uow.connection(), me.user_id, utcnow(), page.limit + 1, page.after
    )
    items = [
        Session(
            id=r.id,
            device_id=r.device_id,
            auth_method=r.auth_method,
            scopes=list(r.scopes),
            ip=r.ip,
            user_agent=r.user_agent,
            created_at=r.created_at,
            last_used_at=r.last_used_at,
            expires_at=r.expires_at,
            current=r.id == me.session_id,
        )
        for r in rows
    ]
    return make_page(items, page.limit, "id")


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a session (its refresh tokens and live access tokens stop working)",
    responses=problem_responses(401, 403, 404),
)
async def delete_session(
    session_id: Annotated[str, Path(max_length=64)], me: Devices, uow: Uow, rt: Runtime
) -> Response:
    await auth.revoke_session(uow, rt, me.user_id, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
