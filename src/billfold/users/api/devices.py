"""Device routes: enrol, list, get, rename, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from billfold.gateway import Principal, Uow, require_scopes
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params
from billfold.users import devices
from billfold.users.api.deps import Runtime, StepUpHeader
from billfold.users.models import Device, EnrolDevice, UpdateDevice
from billfold.users.store import sessions as store

router = APIRouter(tags=["devices"])
Me = Annotated[Principal, Depends(require_scopes("devices"))]
DeviceId = Annotated[str, Path(max_length=64)]


@router.post(
    "/v1/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=Device,
    summary="Enrol a device",
    responses=problem_responses(401, 403, 422),
)
async def enrol(
    body: EnrolDevice, me: Me, uow: Uow, rt: Runtime, step_up: StepUpHeader = None
) -> Device:
    """Send the public half of a P-256 key made in the Secure Enclave / TEE to enable
    device-signature (biometric) sign-in. Watches get the `pay` scope only. Enrolling a key
    needs a sign-in in the last 10 minutes or an `X-Step-Up-Token` for `sensitive_change`
    (403 `step_up_required` otherwise)."""
    return await devices.enrol_device(uow, rt, me, body, step_up)


@router.get(
    "/v1/devices",
    response_model=Page[Device],
    summary="Your devices",
    responses=problem_responses(401, 403, 422),
)
async def list_devices(
    me: Me, uow: Uow, page: Annotated[PageParams, Depends(page_params)]
) -> Page[Device]:
    rows = await store.list_devices(await uow.connection(), me.user_id, page.limit + 1, page.after)
    return make_page([devices.to_device(r, me.device_id) for r in rows], page.limit, "id")


@router.get(
    "/v1/devices/{device_id}",
    response_model=Device,
    summary="One of your devices",
    responses=problem_responses(401, 403, 404),
)
async def get_device(device_id: DeviceId, me: Me, uow: Uow) -> Device:
    return await devices.get_device(await uow.connection(), me.user_id, device_id, me.device_id)


@router.patch(
    "/v1/devices/{device_id}",
    response_model=Device,
    summary="Rename a device or update its push token",
    responses=problem_responses(401, 403, 404, 422),
)
async def patch_device(device_id: DeviceId, body: UpdateDevice, me: Me, uow: Uow) -> Device:
    return await devices.update_device(uow, me.user_id, device_id, body, me.device_id)


@router.delete(
    "/v1/devices/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a device and all its sessions",
    responses=problem_responses(401, 403, 404),
)
async def delete_device(device_id: DeviceId, me: Me, uow: Uow, rt: Runtime) -> Response:
    await devices.revoke_device(uow, rt, me.user_id, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
