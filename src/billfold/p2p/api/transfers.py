"""Transfer routes: send, history, one transfer, cancel, limits; admin reversal and overrides."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, status
from pydantic import AfterValidator, AwareDatetime

from billfold import users
from billfold.gateway import IdempotencyRequired, Principal, Uow, client_ip, require_admin
from billfold.p2p import limits, transfers
from billfold.p2p.api.deps import Me, Runtime, StepUpHeader
from billfold.p2p.models import (
    MAX_AMOUNT,
    USER_ID_PATTERN,
    LimitOverride,
    LimitsView,
    NewTransfer,
    ReverseTransfer,
    Transfer,
    TransferStatus,
)
from billfold.p2p.store import transfers as store
from billfold.platform.errors import NotFound, problem_responses
from billfold.platform.ids import is_valid_id
from billfold.platform.money import Currency
from billfold.platform.pagination import Page, PageParams, make_page, page_params

router = APIRouter(tags=["transfers"])
TransferId = Annotated[str, Path(max_length=64)]
Admin = Annotated[Principal, Depends(require_admin)]


def _in_utc(instant: datetime) -> datetime:
    try:
        return instant.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is year 0 in UTC: the driver refused it
        raise ValueError("must fall within the years 1 to 9999 in UTC") from None


# An instant with its UTC offset that UTC can hold (a 500 from the database driver otherwise).
UtcInstant = Annotated[AwareDatetime, AfterValidator(_in_utc)]


@router.post(
    "/v1/transfers",
    status_code=status.HTTP_201_CREATED,
    response_model=Transfer,
    summary="Send money to someone",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 409, 422, 428),
)
async def send_transfer(
    body: NewTransfer,
    me: Me,
    uow: Uow,
    rt: Runtime,
    request: Request,
    step_up: StepUpHeader = None,
) -> Transfer:
    """Send `amount` (minor units) of `currency` from your wallet to a user (by `user_id` or
    `handle`: completed at once) or to an e-mail address or phone number (`pending_claim`:
    the money waits in escrow until the owner of that verified contact claims it, and returns
    to you if nobody does in time). Limits, balance, posting and the event commit together or
    not at all. Requires `Idempotency-Key`."""
    row = await transfers.send(
        await uow.connection(), rt, me, body, ip=client_ip(request), step_up_token=step_up
    )
    return transfers.view(row, me.user_id)


@router.get(
    "/v1/transfers",
    response_model=Page[Transfer],
    summary="Your transfers, sent and received",
    responses=problem_responses(401, 403, 422),
)
async def list_transfers(
    me: Me,
    uow: Uow,
    page: Annotated[PageParams, Depends(page_params)],
    status_: Annotated[TransferStatus | None, Query(alias="status")] = None,
    direction: Annotated[str | None, Query(pattern="^(sent|received)$")] = None,
    # A user id, a time with its UTC offset (a bare local time is ambiguous) and amounts a
    # bigint holds: anything else is a 422 here, not a database error (a 500) or a guess.
    counterparty: Annotated[str | None, Query(pattern=USER_ID_PATTERN)] = None,
    created_from: Annotated[UtcInstant | None, Query(alias="from")] = None,
    created_to: Annotated[UtcInstant | None, Query(alias="to")] = None,
    amount_min: Annotated[int | None, Query(ge=0, le=MAX_AMOUNT)] = None,
    amount_max: Annotated[int | None, Query(ge=0, le=MAX_AMOUNT)] = None,
    currency: Annotated[Currency | None, Query()] = None,
) -> Page[Transfer]:
    """Newest first. `counterparty` is a user id; `from`/`to` bound `created_at` (to exclusive)."""
    filters = store.TransferFilters(
        status=status_,
        direction=direction,
        counterparty_id=counterparty,
        created_from=created_from,
        created_to=created_to,
        amount_min=amount_min,
        amount_max=amount_max,
        currency=currency,
    )
    rows = await store.list_for_user(
        await uow.connection(), me.user_id, filters, limit=page.limit, after=page.after
    )
    return make_page([transfers.view(r, me.user_id) for r in rows], page.limit, "id")


@router.get(
    "/v1/transfers/limits",
    response_model=LimitsView,
    summary="Your transfer limits: limit, used and remaining",
    responses=problem_responses(401, 403),
)
async def transfer_limits(me: Me, uow: Uow) -> LimitsView:
    """Per currency: the most per transfer, and the daily and monthly windows in your own time
    zone (from your profile) with what is used, what remains and when each window resets."""
    conn = await uow.connection()
    party = await users.get_party(conn, me.user_id)
    assert party is not None
    return await limits.view(conn, party)


@router.get(
    "/v1/transfers/{transfer_id}",
    response_model=Transfer,
    summary="One transfer you sent or received",
    responses=problem_responses(401, 403, 404),
)
async def get_transfer(transfer_id: TransferId, me: Me, uow: Uow) -> Transfer:
    row = await transfers.get(await uow.connection(), transfer_id, me.user_id)
    return transfers.view(row, me.user_id)


@router.post(
    "/v1/transfers/{transfer_id}/cancel",
    response_model=Transfer,
    summary="Cancel a transfer nobody has received yet",
    responses=problem_responses(401, 403, 404, 409),
)
async def cancel_transfer(transfer_id: TransferId, me: Me, uow: Uow) -> Transfer:
    """Only the sender, only while `pending_claim` or `pending`: the money returns at once."""
    row = await transfers.cancel(await uow.connection(), transfer_id, me.user_id)
    return transfers.view(row, me.user_id)


@router.post(
    "/v1/admin/transfers/{transfer_id}/reverse",
    response_model=Transfer,
    summary="Reverse a completed transfer (administrators)",
    dependencies=[IdempotencyRequired],
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def reverse_transfer(
    transfer_id: TransferId, body: ReverseTransfer, admin: Admin, uow: Uow
) -> Transfer:
    """Takes the money back from the recipient with a reversing posting (422
    `insufficient_funds` if they no longer have it); the transfer becomes `reversed`."""
    row = await transfers.reverse(await uow.connection(), transfer_id, body.reason)
    return transfers.view(row, row.sender_id)


@router.put(
    "/v1/admin/users/{user_id}/transfer-limits/{currency}",
    response_model=LimitsView,
    summary="Override a user's transfer limits (administrators)",
    responses=problem_responses(401, 403, 404, 422),
)
async def override_limits(
    user_id: Annotated[str, Path(max_length=64)],
    currency: Annotated[Currency, Path()],
    body: LimitOverride,
    admin: Admin,
    uow: Uow,
) -> LimitsView:
    """Null fields fall back to the user's KYC tier default. Answers the user's limits after."""
    conn = await uow.connection()
    party = await users.get_party(conn, user_id) if is_valid_id(user_id, "usr") else None
    if party is None:
        raise NotFound("No such user", code="user_not_found")
    await limits.override(conn, party, currency, body)
    return await limits.view(conn, party)
