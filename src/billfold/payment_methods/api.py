"""Payment method routes, and wallet funding (top-ups and withdrawals) through them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from billfold.gateway import (
    IdempotencyRequired,
    Principal,
    Uow,
    require_idempotency_key,
    require_scopes,
)
from billfold.payment_methods import funding, service, store
from billfold.payment_methods.models import (
    Funding,
    FundingView,
    MethodStatus,
    MethodType,
    NewPaymentMethod,
    PaymentMethod,
    UpdatePaymentMethod,
    VerifyMicroDeposits,
)
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.platform import idempotency
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params

router = APIRouter(tags=["payment-methods"])
wallet_router = APIRouter(tags=["wallet"])

# Cards, bank accounts and the wallet's money need the `wallet` scope (watches hold only `pay`).
Me = Annotated[Principal, Depends(require_scopes("wallet"))]
MethodId = Annotated[str, Path(max_length=64)]


# `async def` without I/O on purpose: a plain `def` dependency costs a thread-pool hop.
async def runtime(request: Request) -> PaymentMethodsRuntime:
    return request.app.state.payment_methods  # type: ignore[no-any-return]


Runtime = Annotated[PaymentMethodsRuntime, Depends(runtime)]


@router.post(
    "/v1/payment-methods",
    status_code=status.HTTP_201_CREATED,
    response_model=PaymentMethod,
    summary="Add a card or a bank account",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 409, 422, 428, 429),
)
async def add_payment_method(
    body: NewPaymentMethod, me: Me, uow: Uow, rt: Runtime
) -> PaymentMethod:
    """A card (`pan`, `expiry_month`, `expiry_year`, `cvv`, `cardholder_name`,
    `billing_address`) is checked (Luhn, brand, expiry, CVV length), stored in the vault and
    verified at once by a zero-amount account verification with its CVV: `verified` (with a
    device-bound payment token) or `failed` (`failure_code` is the network's response code, e.g.
    `N7` CVV mismatch). A bank account (US `routing_number` + `account_number` +
    `account_type`, or `iban` + optional `bic`) is `pending_verification` until you confirm
    the two micro-deposits sent to it. The card number, CVV and account number are never
    stored in clear nor returned. Requires `Idempotency-Key`."""
    row = await service.add(await uow.connection(), rt, me, body)
    return service.view(row)


@router.get(
    "/v1/payment-methods",
    response_model=Page[PaymentMethod],
    summary="Your cards and bank accounts",
    responses=problem_responses(401, 403, 422),
)
async def list_payment_methods(
    me: Me,
    uow: Uow,
    page: Annotated[PageParams, Depends(page_params)],
    type_: Annotated[MethodType | None, Query(alias="type")] = None,
    status_: Annotated[MethodStatus | None, Query(alias="status")] = None,
) -> Page[PaymentMethod]:
    """Newest first; removed methods are gone from the list."""
    rows = await store.list_for_user(
        await uow.connection(),
        me.user_id,
        type_=type_,
        status=status_,
        limit=page.limit + 1,
        after=page.after,
    )
    return make_page([service.view(r) for r in rows], page.limit, "id")


@router.get(
    "/v1/payment-methods/{method_id}",
    response_model=PaymentMethod,
    summary="One of your payment methods",
    responses=problem_responses(401, 403, 404, 422),
)
async def get_payment_method(method_id: MethodId, me: Me, uow: Uow) -> PaymentMethod:
    return service.view(await service.get(await uow.connection(), method_id, me.user_id))


@router.patch(
    "/v1/payment-methods/{method_id}",
    response_model=PaymentMethod,
    summary="Rename a payment method or change a card's billing address",
    responses=problem_responses(401, 403, 404, 422),
)
async def update_payment_method(
    method_id: MethodId, body: UpdatePaymentMethod, me: Me, uow: Uow
) -> PaymentMethod:
    """`nickname` (null clears it) and, for a card, `billing_address`."""
    row = await service.update(await uow.connection(), method_id, me.user_id, body)
    return service.view(row)


@router.post(
    "/v1/payment-methods/{method_id}/default",
    response_model=PaymentMethod,
    summary="Make a verified payment method your default",
    responses=problem_responses(401, 403, 404, 409),
)
async def make_default(method_id: MethodId, me: Me, uow: Uow) -> PaymentMethod:
    """At most one default per user (the database enforces that; a user with a verified method
    has one); the previous one stops being the default in the same transaction."""
    row = await service.make_default(await uow.connection(), method_id, me.user_id)
    return service.view(row)


@router.post(
    "/v1/payment-methods/{method_id}/verify",
    response_model=PaymentMethod,
    summary="Confirm a bank account's two micro-deposits",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def verify_micro_deposits(
    method_id: MethodId, body: VerifyMicroDeposits, me: Me, uow: Uow
) -> PaymentMethod:
    """`{"amounts": [32, 45]}` in minor units, in any order. Wrong: 422
    `invalid_micro_deposit_amounts` with `attempts_left`; out of attempts or past
    `micro_deposits.expires_at`, the method is `failed`."""
    row = await service.verify_micro_deposits(uow, me.user_id, method_id, body.amounts)
    return service.view(row)


@router.delete(
    "/v1/payment-methods/{method_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove a payment method",
    responses=problem_responses(401, 403, 404),
)
async def remove_payment_method(method_id: MethodId, me: Me, uow: Uow, rt: Runtime) -> Response:
    """A card's number and payment tokens are deleted in the vault (once the removal has
    committed); a removed default hands over to your newest other verified method, if any."""
    await service.remove(uow, rt, method_id, me.user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def idempotency_key(key: Annotated[str, Depends(require_idempotency_key)]) -> str:
    idempotency.check_key(key)
    return key


@wallet_router.post(
    "/v1/wallet/topups",
    status_code=status.HTTP_201_CREATED,
    response_model=FundingView,
    summary="Add money to your wallet from a card or bank account",
    responses=problem_responses(401, 402, 403, 404, 409, 422, 428, 503),
)
async def create_topup(
    body: Funding,
    me: Me,
    uow: Uow,
    rt: Runtime,
    key: Annotated[str, Depends(idempotency_key)],
    response: Response,
) -> FundingView:
    """Credit `amount` (minor units) of `currency` from one of your verified payment methods:
    a card is charged through the payment network (declined: 402 `payment_declined` with
    `decline_code`, nothing is posted); a bank account is debited by ACH in its own currency
    (simulated: it settles at once). Requires `Idempotency-Key`, kept by this route itself (no
    database connection is held while the network answers): a retry with the same key answers
    the same top-up (`Idempotent-Replayed: true`) and never charges the card twice; 409
    `idempotency_request_in_progress` while the first request is still at the network."""
    outcome = await funding.top_up(uow.engine, rt, me.user_id, body, idempotency_key=key)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.view


@wallet_router.post(
    "/v1/wallet/withdrawals",
    status_code=status.HTTP_201_CREATED,
    response_model=FundingView,
    summary="Take money out of your wallet to your bank account",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def create_withdrawal(body: Funding, me: Me, uow: Uow, rt: Runtime) -> FundingView:
    """Debit `amount` (minor units) of `currency` from your wallet's available balance (422
    `insufficient_funds` if it is too low; nothing changes then) to one of your verified bank
    accounts in that currency (422 `bank_account_required` for a card). Requires
    `Idempotency-Key`."""
    return await funding.withdraw(await uow.connection(), rt, me.user_id, body)
