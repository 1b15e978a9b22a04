"""Money request routes: ask someone for money, list, accept (pay), decline, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, status

from billfold.gateway import IdempotencyRequired, Uow, client_ip
from billfold.p2p import requests
from billfold.p2p.api.deps import Me, Runtime, StepUpHeader
from billfold.p2p.models import (
    NewTransferRequest,
    RequestDirection,
    RequestStatus,
    TransferRequest,
)
from billfold.p2p.store import requests as store
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params

router = APIRouter(tags=["transfer-requests"])
RequestId = Annotated[str, Path(max_length=64)]


@router.post(
    "/v1/transfer-requests",
    status_code=status.HTTP_201_CREATED,
    response_model=TransferRequest,
    summary="Ask someone for money",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 409, 422, 428),
)
async def create_request(
    body: NewTransferRequest, me: Me, uow: Uow, rt: Runtime
) -> TransferRequest:
    """Ask a user (by `user_id` or `handle`) or an e-mail address / phone number to pay you
    `amount` of `currency`. A request to an e-mail/phone is accepted alike whether or not
    anyone has it; it reaches whoever has that contact verified, and you see who that is once
    they answer. It expires after the configured time. Requires `Idempotency-Key`."""
    row = await requests.create(await uow.connection(), rt, me, body)
    return requests.view(row, me.user_id)


@router.get(
    "/v1/transfer-requests",
    response_model=Page[TransferRequest],
    summary="Requests you made and requests to you",
    responses=problem_responses(401, 403, 422),
)
async def list_requests(
    me: Me,
    uow: Uow,
    rt: Runtime,
    page: Annotated[PageParams, Depends(page_params)],
    direction: Annotated[RequestDirection | None, Query()] = None,
    status_: Annotated[RequestStatus | None, Query(alias="status")] = None,
) -> Page[TransferRequest]:
    """Newest first. `direction`: `outgoing` (you asked) or `incoming` (you are asked)."""
    conn = await uow.connection()
    _, hashes = await requests.viewer(conn, rt, me.user_id)
    rows = await store.list_for_user(
        conn,
        me.user_id,
        hashes,
        direction=direction,
        status=status_,
        limit=page.limit,
        after=page.after,
    )
    return make_page([requests.view(r, me.user_id) for r in rows], page.limit, "id")


@router.get(
    "/v1/transfer-requests/{request_id}",
    response_model=TransferRequest,
    summary="One request you made or are asked to pay",
    responses=problem_responses(401, 403, 404),
)
async def get_request(request_id: RequestId, me: Me, uow: Uow, rt: Runtime) -> TransferRequest:
    row = await requests.get(await uow.connection(), rt, request_id, me.user_id)
    return requests.view(row, me.user_id)


@router.post(
    "/v1/transfer-requests/{request_id}/accept",
    response_model=TransferRequest,
    summary="Pay a request made to you",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def accept_request(
    request_id: RequestId,
    me: Me,
    uow: Uow,
    rt: Runtime,
    request: Request,
    step_up: StepUpHeader = None,
) -> TransferRequest:
    """Sends the requested amount to the requester as a transfer (`transfer_id`), with the
    same limits, balance and risk checks as `POST /v1/transfers` (and the same
    `X-Step-Up-Token` when one is asked for). Only the payer, only while `pending`; a request
    is paid once. Requires `Idempotency-Key`."""
    row = await requests.accept(
        await uow.connection(),
        rt,
        me,
        request_id,
        ip=client_ip(request),
        step_up_token=step_up,
    )
    return requests.view(row, me.user_id)


@router.post(
    "/v1/transfer-requests/{request_id}/decline",
    response_model=TransferRequest,
    summary="Decline a request made to you",
    responses=problem_responses(401, 403, 404, 409),
)
async def decline_request(request_id: RequestId, me: Me, uow: Uow, rt: Runtime) -> TransferRequest:
    """Only the payer, only while `pending`."""
    row = await requests.decline(await uow.connection(), rt, request_id, me.user_id)
    return requests.view(row, me.user_id)


@router.post(
    "/v1/transfer-requests/{request_id}/cancel",
    response_model=TransferRequest,
    summary="Withdraw a request you made",
    responses=problem_responses(401, 403, 404, 409),
)
async def cancel_request(request_id: RequestId, me: Me, uow: Uow, rt: Runtime) -> TransferRequest:
    """Only the requester, only while `pending`."""
    row = await requests.cancel(await uow.connection(), rt, request_id, me.user_id)
    return requests.view(row, me.user_id)
