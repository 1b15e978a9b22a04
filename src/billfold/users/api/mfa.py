"""Two-factor routes (authenticator app) and step-up challenges."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Response, status

from billfold.gateway import Principal, Uow, current_principal, require_scopes
from billfold.platform.errors import problem_responses
from billfold.users import mfa
from billfold.users.api.deps import Runtime
from billfold.users.models import (
    OtpCode,
    StartStepUp,
    StepUpChallenge,
    StepUpToken,
    TotpCode,
    TotpEnrolment,
    TwoFactorStatus,
    VerifyStepUp,
)

router = APIRouter(tags=["two-factor"])
Me = Annotated[Principal, Depends(require_scopes("profile"))]
Caller = Annotated[Principal, Depends(current_principal)]


@router.get(
    "/v1/me/two-factor",
    response_model=TwoFactorStatus,
    summary="Your two-factor settings",
    responses=problem_responses(401, 403),
)
async def get_status(me: Me, uow: Uow) -> TwoFactorStatus:
    return await mfa.two_factor_status(uow, me.user_id)


@router.post(
    "/v1/me/two-factor/totp",
    status_code=status.HTTP_201_CREATED,
    response_model=TotpEnrolment,
    summary="Start enrolling an authenticator app (TOTP)",
    responses=problem_responses(401, 403, 409),
)
async def start_totp(me: Me, uow: Uow, rt: Runtime) -> TotpEnrolment:
    """Returns the seed and an `otpauth://` URI once; confirm with a code from the app to turn
    two-factor on. `409 totp_already_enabled` when it is on already."""
    return await mfa.start_totp_enrolment(uow, rt, me.user_id)


@router.post(
    "/v1/me/two-factor/totp/confirm",
    response_model=TwoFactorStatus,
    summary="Turn on two-factor with a code from the authenticator app",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def confirm_totp(body: TotpCode, me: Me, uow: Uow, rt: Runtime) -> TwoFactorStatus:
    """`422 invalid_code` (with `attempts_left`); after 5 wrong codes `429 too_many_attempts`
    with `Retry-After`."""
    return await mfa.confirm_totp(uow, rt, me.user_id, body.code)


@router.delete(
    "/v1/me/two-factor/totp",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Turn off two-factor (needs a current code)",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def disable_totp(
    me: Me,
    uow: Uow,
    rt: Runtime,
    body: TotpCode | None = None,
    x_totp_code: Annotated[OtpCode | None, Header(alias="X-TOTP-Code")] = None,
) -> Response:
    """Send the code as `{"code": "123456"}` or in the `X-TOTP-Code` header."""
    code = body.code if body is not None else x_totp_code
    await mfa.disable_totp(uow, rt, me.user_id, code)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/v1/auth/step-up/challenges",
    status_code=status.HTTP_201_CREATED,
    response_model=StepUpChallenge,
    response_model_exclude_none=True,
    summary="Start a step-up: confirm it is you before a sensitive action",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def start_step_up(body: StartStepUp, me: Caller, uow: Uow, rt: Runtime) -> StepUpChallenge:
    """`totp`: answer with a code from the authenticator app. `sms` / `email`: a code is sent
    to your verified phone or email. `device_signature`: this session's device signs
    `signing_input` with its enrolled key (after the local biometric check)."""
    return await mfa.start_step_up(uow, rt, me, body)


@router.post(
    "/v1/auth/step-up/challenges/{challenge_id}/verify",
    response_model=StepUpToken,
    summary="Answer a step-up challenge and get a step-up token",
    responses=problem_responses(401, 404, 409, 422, 429),
)
async def verify_step_up(
    challenge_id: Annotated[str, Path(max_length=64)],
    body: VerifyStepUp,
    me: Caller,
    uow: Uow,
    rt: Runtime,
) -> StepUpToken:
    """The token is valid for 5 minutes, once, for this session and the challenge's `purpose`
    and `reference`; send it where the action asks for it. It is not an access token."""
    return await mfa.verify_step_up_challenge(uow, rt, me, challenge_id, body)
