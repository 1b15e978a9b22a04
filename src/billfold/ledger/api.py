"""Wallet routes: balances and statement. Top-ups and withdrawals need a payment method, so
their routes live with Payment Methods (which calls `ledger.top_up` / `ledger.withdraw`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from billfold.gateway import Principal, Uow, require_scopes
from billfold.ledger import service
from billfold.ledger.models import (
    InvalidAsOf,
    PastBalance,
    PastWallet,
    StatementEntry,
    Wallet,
    WalletBalance,
)
from billfold.platform.clock import utcnow
from billfold.platform.errors import FieldError, problem_responses
from billfold.platform.money import Currency
from billfold.platform.pagination import Page, PageParams, bigint_cursor, make_page, page_params

router = APIRouter(tags=["wallet"])

# The wallet is the user's money: reading or moving it needs the `wallet` scope (watches hold
# only `pay`).
Me = Annotated[Principal, Depends(require_scopes("wallet"))]


def parse_as_of(value: str) -> datetime:
    """An RFC 3339 instant with an explicit offset, not in the future, as UTC."""

    def invalid(detail: str) -> InvalidAsOf:
        return InvalidAsOf(detail, errors=[FieldError(parameter="as_of", detail=detail)])

    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(
            "as_of must be an RFC 3339 date-time such as 2025-01-31T23:59:59Z "
            "(in a URL, encode a '+' offset as %2B)"
        ) from None
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise invalid("as_of needs a UTC offset (Z or ±hh:mm): a local time is ambiguous")
    try:
        instant = instant.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is in year 0 in UTC
        raise invalid("as_of is outside the years 1 to 9999 in UTC") from None
    if instant > utcnow():
        raise invalid("as_of is in the future: a balance then is not known yet")
    return instant


@router.get(
    "/v1/wallet",
    response_model=Wallet | PastWallet,
    summary="Your balances, now or at a past instant",
    responses=problem_responses(401, 403, 422),
)
async def get_wallet(
    me: Me,
    uow: Uow,
    as_of: Annotated[
        str | None,
        Query(
            max_length=64,
            description="RFC 3339 instant with an offset (e.g. `2025-01-31T23:59:59Z`): the "
            "posted balance of each currency then",
        ),
    ] = None,
) -> Wallet | PastWallet:
    """Per currency: `posted` (the sum of all entries), `held` (reserved by pending payments
    or transfers) and `available` = posted - held, what you can spend now. A new wallet has no
    balances. With `as_of`, the posted balance of each currency at that instant (the running
    balance after the last entry at or before it); holds keep no history, so a past balance has
    no `held` or `available`."""
    conn = await uow.connection()
    if as_of is not None:
        instant = parse_as_of(as_of)
        past = await service.balances(conn, me.user_id, as_of=instant)
        return PastWallet(
            as_of=instant,
            balances=[PastBalance(currency=b.currency, posted=b.posted) for b in past],
        )
    now = await service.balances(conn, me.user_id)
    return Wallet(balances=[WalletBalance.of(b) for b in now])


@router.get(
    "/v1/wallet/entries",
    response_model=Page[StatementEntry],
    summary="Your wallet statement, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_entries(
    me: Me,
    uow: Uow,
    page: Annotated[PageParams, Depends(page_params)],
    currency: Annotated[Currency | None, Query(description="Only this currency")] = None,
) -> Page[StatementEntry]:
    """Every entry of your wallet, newest first: what moved it (`kind`, `reference`, `memo`),
    the signed `amount` (`direction` credit or debit) and the posted balance right after it
    (`balance_after`, running per currency)."""
    entries = await service.statement(
        await uow.connection(),
        me.user_id,
        currency=currency,
        limit=page.limit + 1,
        after=bigint_cursor(page.after),
    )
    found = make_page(entries, page.limit, "seq")
    return Page[StatementEntry](
        data=[
            StatementEntry(
                posting_id=e.posting_id,
                kind=e.posting_kind,
                reference=e.reference,
                memo=e.memo,
                direction="credit" if e.amount > 0 else "debit",
                amount=e.amount,
                currency=e.currency,
                balance_after=e.balance_after,
                created_at=e.created_at,
            )
            for e in found.data
        ],
        next_cursor=found.next_cursor,
    )
