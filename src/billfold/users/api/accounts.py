"""Registration, profile, avatar and contact verification routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Response, UploadFile, status

from billfold.gateway import Principal, Uow, require_scopes
from billfold.platform.errors import problem_responses
from billfold.users import passwords, service
from billfold.users.api.deps import Runtime, StepUpHeader
from billfold.users.models import (
    ChangePassword,
    ConfirmVerification,
    RegisterUser,
    StartVerification,
    UpdateProfile,
    User,
    Verification,
)

router = APIRouter(tags=["users"])
Me = Annotated[Principal, Depends(require_scopes("profile"))]


@router.post(
    "/v1/users",
    status_code=status.HTTP_201_CREATED,
    response_model=User,
    summary="Register a new user",
    responses=problem_responses(409, 422, 429),
)
async def register(body: RegisterUser, uow: Uow, rt: Runtime) -> User:
    """Creates the account. `409 contact_in_use` when the email, phone or handle is taken
    (without saying which). Verify the email and phone afterwards with `/v1/me/verifications`."""
    return await service.register_user(uow, rt, body)


@router.get(
    "/v1/me", response_model=User, summary="Your profile", responses=problem_responses(401, 403)
)
async def get_me(me: Me, uow: Uow) -> User:
    return await service.get_me(await uow.connection(), me.user_id)


@router.patch(
    "/v1/me",
    response_model=User,
    summary="Update your profile",
    responses=problem_responses(401, 403, 409, 422),
)
async def patch_me(
    body: UpdateProfile, me: Me, uow: Uow, rt: Runtime, step_up: StepUpHeader = None
) -> User:
    """A new email or phone is stored unverified and must be verified again."""
    return await service.update_profile(uow, rt, me, body, step_up)


@router.post(
    "/v1/me/password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Change your password",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def change_password(body: ChangePassword, me: Me, uow: Uow, rt: Runtime) -> Response:
    """The current password proves it is you, so no recent sign-in or step-up is needed.
    `422 invalid_password` for a wrong current password (counted toward the same lockout as
    sign-in: `429 too_many_attempts`), `422 validation_failed` for a weak new password or one
    equal to the current. Every other session is signed out (refresh and access tokens); this
    one stays. `Idempotency-Key` is ignored: the body holds passwords and is never stored."""
    await passwords.change_password(uow, rt, me, body)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/v1/me/avatar",
    response_model=User,
    summary="Upload your avatar (image, at most 1 MB)",
    responses=problem_responses(401, 403, 413, 422),
)
async def put_avatar(me: Me, uow: Uow, rt: Runtime, file: Annotated[UploadFile, File()]) -> User:
    data = await file.read(rt.settings.avatar_max_bytes + 1)
    return await service.set_avatar(uow, rt, me.user_id, data)


@router.get(
    "/v1/me/avatar",
    summary="Your avatar image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, **problem_responses(401, 404)},
)
async def get_avatar(me: Me, uow: Uow, rt: Runtime) -> Response:
    data, content_type = await service.get_avatar(await uow.connection(), rt, me.user_id)
    return Response(data, media_type=content_type)


@router.post(
    "/v1/me/verifications",
    status_code=status.HTTP_201_CREATED,
    response_model=Verification,
    summary="Send a one-time code to your email or phone",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def start_verification(
    body: StartVerification, me: Me, uow: Uow, rt: Runtime
) -> Verification:
    return await service.start_verification(uow, rt, me.user_id, body.channel)


@router.post(
    "/v1/me/verifications/{verification_id}/confirm",
    response_model=Verification,
    summary="Confirm a one-time code",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def confirm_verification(
    verification_id: Annotated[str, Path(max_length=64)],
    body: ConfirmVerification,
    me: Me,
    uow: Uow,
    rt: Runtime,
) -> Verification:
    """`422 invalid_code` with `attempts_left`; after the last attempt the code is spent."""
    return await service.confirm_verification(uow, rt, me.user_id, verification_id, body.code)
