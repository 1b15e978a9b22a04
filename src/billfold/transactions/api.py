"""Payment routes: pay, look, resume after step-up, capture, void, refund, increment.

These routes keep their own idempotency (the edge's would hold a database connection for the
whole request, across the network's answer): each stores the user's Idempotency-Key with what
it creates, in the same transaction, and a retry finds it there.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response, status
from sqlalchemy.engine import Row

from billfold.gateway import Principal, Uow, client_ip, require_idempotency_key, require_scopes
from billfold.platform import idempotency
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import problem_responses
from billfold.transactions import operations, service
from billfold.transactions.models import (
    CaptureResult,
    IncrementResult,
    NewCapture,
    NewIncrement,
    NewPayment,
    NewRefund,
    Payment,
    RefundResult,
)
from billfold.transactions.runtime import TransactionsRuntime

router = APIRouter(tags=["payments"])


# `async def` without I/O on purpose: a plain `def` dependency costs a thread-pool hop.
async def transactions_runtime(request: Request) -> TransactionsRuntime:
    return request.app.state.transactions  # type: ignore[no-any-return]


async def idempotency_key(key: Annotated[str, Depends(require_idempotency_key)]) -> str:
    idempotency.check_key(key)
    return key


Runtime = Annotated[TransactionsRuntime, Depends(transactions_runtime)]
# Paying needs the `pay` scope (a watch holds only that one).
Me = Annotated[Principal, Depends(require_scopes("pay"))]
Key = Annotated[str, Depends(idempotency_key)]
PaymentId = Annotated[str, Path(max_length=64)]
StepUpHeader = Annotated[str | None, Header(alias="X-Step-Up-Token", max_length=4096)]
# Answered while the payment waits for the user or a reviewer; 201 when it is decided.
_PENDING = frozenset({"challenge_required", "review"})
_REPLAYED = "Idempotent-Replayed"


def _status_of(payment_status: str) -> int:
    return status.HTTP_202_ACCEPTED if payment_status in _PENDING else status.HTTP_201_CREATED


@router.post(
    "/v1/payments",
    status_code=status.HTTP_201_CREATED,
    response_model=Payment,
    summary="Pay a merchant with a card or the wallet balance",
    responses={
        202: {"model": Payment, "description": "`challenge_required` or `review`"},
        **problem_responses(401, 403, 404, 409, 422, 428),
    },
)
async def create_payment(
    body: NewPayment,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Key,
    request: Request,
    response: Response,
    step_up: StepUpHeader = None,
) -> Payment:
    """Authorize `amount` of `currency` at `merchant`: with a verified card
    (`source: card`, `payment_method_id`; its payment token and a fresh cryptogram go to the
    network, never the card number) or with the wallet balance (`source: wallet`; a ledger hold).
    201 with `authorized`, `declined` (see `decline_code` / `decline_reason`) or `failed`; 202
    with `challenge_required` (step up, then resume) or `review`. A retry with the same
    Idempotency-Key answers the same payment (header `Idempotent-Replayed: true`), 409
    `payment_in_progress` while it is still being authorized."""
    outcome = await service.pay(
        uow.engine,
        rt,
        me,
        body,
        idempotency_key=key,
        step_up_token=step_up,
        ip=client_ip(request),
        auth_ms=request.scope.get("state", {}).get("auth_ms"),
    )
    response.status_code = _status_of(outcome.row.status)
    if outcome.replayed:
        response.headers[_REPLAYED] = "true"
    return await _view(uow, outcome.row, children=outcome.replayed)


async def _view(uow: UnitOfWork, row: Row[Any], *, children: bool = True) -> Payment:
    """The payment as answered; with `children`, its captures, refunds and increments, read on
    a short connection of its own (the request holds none)."""
    if not children:
        return await service.view(None, row)
    async with uow.engine.connect() as conn:
        payment = await service.view(conn, row)
        await conn.rollback()
    return payment


@router.get(
    "/v1/payments/{payment_id}",
    response_model=Payment,
    summary="One of your payments, with its captures, refunds and increments",
    responses=problem_responses(401, 403, 404, 422),
)
async def get_payment(payment_id: PaymentId, me: Me, uow: Uow) -> Payment:
    conn = await uow.connection()
    row = await service.get(conn, payment_id, me.user_id)
    return await service.view(conn, row)


@router.post(
    "/v1/payments/{payment_id}/resume",
    response_model=Payment,
    summary="Continue a payment after a step-up",
    responses={
        202: {"model": Payment, "description": "`review`"},
        **problem_responses(401, 403, 404, 409, 422, 428),
    },
)
async def resume_payment(
    payment_id: PaymentId,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Key,
    request: Request,
    response: Response,
    step_up: Annotated[str, Header(alias="X-Step-Up-Token", max_length=4096)],
) -> Payment:
    """For a `challenge_required` payment: `X-Step-Up-Token` from a step-up with purpose
    `payment` and reference the payment id. The payment is then authorized as any other (201,
    or 202 for `review`); 409 `payment_not_resumable` if it is not waiting for a step-up. A
    payment resumes once, so the Idempotency-Key is required but not stored: a retry is that
    409, and `GET /v1/payments/{id}` answers the outcome."""
    row = await service.resume(uow.engine, rt, me, payment_id, step_up, ip=client_ip(request))
    response.status_code = _status_of(row.status)
    return await _view(uow, row, children=False)


@router.post(
    "/v1/payments/{payment_id}/capture",
    status_code=status.HTTP_201_CREATED,
    response_model=CaptureResult,
    summary="Capture all or part of an authorized payment",
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def capture_payment(
    payment_id: PaymentId,
    body: NewCapture,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Key,
    response: Response,
) -> CaptureResult:
    """Several partial captures add up to at most the authorized amount (422
    `capture_exceeds_authorized` beyond); `final: true` releases what is left."""
    done = await operations.capture(uow.engine, rt, me, payment_id, body, idempotency_key=key)
    if done.replayed:
        response.headers[_REPLAYED] = "true"
    view = service.capture_view(done.item)
    return CaptureResult(**view.model_dump(), payment=await _view(uow, done.payment))


@router.post(
    "/v1/payments/{payment_id}/void",
    response_model=Payment,
    summary="Cancel an authorization nothing was captured of",
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def void_payment(payment_id: PaymentId, me: Me, uow: Uow, rt: Runtime, key: Key) -> Payment:
    """The wallet hold is released or the card authorization reversed; `voided`. 409
    `payment_not_voidable` once something was captured. Voiding again answers the voided
    payment, so the Idempotency-Key is required but not stored."""
    row = await operations.void(uow.engine, rt, me, payment_id)
    return await _view(uow, row)


@router.post(
    "/v1/payments/{payment_id}/refunds",
    status_code=status.HTTP_201_CREATED,
    response_model=RefundResult,
    summary="Refund all or part of what was captured",
    responses={
        202: {"model": RefundResult, "description": "`pending`: the network did not answer yet"},
        **problem_responses(401, 403, 404, 409, 422, 428),
    },
)
async def refund_payment(
    payment_id: PaymentId,
    body: NewRefund,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Key,
    response: Response,
) -> RefundResult:
    """Several refunds add up to at most what was captured (422 `refund_exceeds_captured`
    beyond). A wallet payment's money is back in the wallet at once; a card refund is
    `succeeded` or `failed` by the network's answer, `pending` (202) if it did not answer in time
    (billfold asks again)."""
    done = await operations.refund(uow.engine, rt, me, payment_id, body, idempotency_key=key)
    if done.replayed:
        response.headers[_REPLAYED] = "true"
    if done.item.status == "pending":
        response.status_code = status.HTTP_202_ACCEPTED
    view = service.refund_view(done.item, done.payment.source)
    return RefundResult(**view.model_dump(), payment=await _view(uow, done.payment))


@router.post(
    "/v1/payments/{payment_id}/increment",
    status_code=status.HTTP_201_CREATED,
    response_model=IncrementResult,
    summary="Raise an open authorization (a tip, a longer stay)",
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def increment_payment(
    payment_id: PaymentId,
    body: NewIncrement,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Key,
    response: Response,
) -> IncrementResult:
    """`approved` raises `authorized_amount`; `declined` (see `decline_code`) leaves it."""
    done = await operations.increment(uow.engine, rt, me, payment_id, body, idempotency_key=key)
    if done.replayed:
        response.headers[_REPLAYED] = "true"
    view = service.increment_view(done.item, done.payment.source)
    return IncrementResult(**view.model_dump(), payment=await _view(uow, done.payment))
