"""History routes: the list (filters, free-text search, cursor), one transaction, the CSV export,
the monthly summary by category and the PDF receipts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, AwareDatetime

from billfold import users
from billfold.gateway import Principal, Uow, require_scopes
from billfold.platform.blobs import BlobStore
from billfold.platform.errors import problem_responses
from billfold.platform.money import Currency
from billfold.platform.pagination import Page, PageParams, page_params
from billfold.transactions import history, receipts
from billfold.transactions.history import HistoryItem, MonthlySummary, TransactionDetail
from billfold.transactions.models import MAX_AMOUNT, PaymentStatus
from billfold.transactions.search import (
    MAX_QUERY_LENGTH,
    HistoryFilters,
    PostgresSearchIndex,
    SearchIndex,
)

history_router = APIRouter(tags=["transactions"])

# Reading the history needs the full app's `wallet` scope (a watch's `pay`-only token pays but
# does not browse or export the history).
Me = Annotated[Principal, Depends(require_scopes("wallet"))]
TransactionId = Annotated[str, Path(max_length=64)]

_DEFAULT_INDEX = PostgresSearchIndex()
# A merchant id as the payment flow accepts it (`MerchantIn.id`).
MERCHANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"


def _in_utc(instant: datetime) -> datetime:
    try:
        return instant.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is year 0 in UTC
        raise ValueError("must fall within the years 1 to 9999 in UTC") from None


UtcInstant = Annotated[AwareDatetime, AfterValidator(_in_utc)]


# `async def` without I/O on purpose: a plain `def` dependency costs a thread-pool hop.
async def search_index(request: Request) -> SearchIndex:
    """The app's `SearchIndex` (`app.state.search_index`), PostgreSQL's by default."""
    return getattr(request.app.state, "search_index", None) or _DEFAULT_INDEX


async def blob_store(request: Request) -> BlobStore:
    return request.app.state.blobs  # type: ignore[no-any-return]


Index = Annotated[SearchIndex, Depends(search_index)]
Blobs = Annotated[BlobStore, Depends(blob_store)]


async def history_filters(
    created_from: Annotated[UtcInstant | None, Query(alias="from")] = None,
    created_to: Annotated[UtcInstant | None, Query(alias="to")] = None,
    status: Annotated[PaymentStatus | None, Query()] = None,
    category: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
    merchant_id: Annotated[str | None, Query(pattern=MERCHANT_ID_PATTERN)] = None,
    # No control characters (a NUL would be a database error): a name as payments store it.
    merchant: Annotated[
        str | None, Query(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    ] = None,
    amount_min: Annotated[int | None, Query(ge=0, le=MAX_AMOUNT)] = None,
    amount_max: Annotated[int | None, Query(ge=0, le=MAX_AMOUNT)] = None,
    currency: Annotated[Currency | None, Query()] = None,
    payment_method_id: Annotated[str | None, Query(pattern=r"^pm_[0-9a-z]{26}$")] = None,
    source: Annotated[Literal["card", "wallet"] | None, Query()] = None,
) -> HistoryFilters:
    """The filters every history route shares; `to` is exclusive, amounts in minor units."""
    return HistoryFilters(
        created_from=created_from,
        created_to=created_to,
        status=status,
        category=category,
        merchant_id=merchant_id,
        merchant=merchant,
        amount_min=amount_min,
        amount_max=amount_max,
        currency=currency,
        payment_method_id=payment_method_id,
        source=source,
    )


Filters = Annotated[HistoryFilters, Depends(history_filters)]
# Free text is cut into words of letters and digits before it reaches the database.
FreeText = Annotated[str | None, Query(max_length=MAX_QUERY_LENGTH)]


@history_router.get(
    "/v1/transactions",
    response_model=Page[HistoryItem],
    summary="Your transactions: filters, free-text search, cursor pages",
    responses=problem_responses(401, 403, 422),
)
async def list_transactions(
    me: Me,
    uow: Uow,
    index: Index,
    filters: Filters,
    page: Annotated[PageParams, Depends(page_params)],
    q: FreeText = None,
    order: Annotated[Literal["relevance", "newest"] | None, Query()] = None,
) -> Page[HistoryItem]:
    """Newest first. `q` searches merchant names, descriptions and notes, tolerating typos
    ("starbuks" finds Starbucks); its hits come best first (`score`) unless `order=newest`."""
    return await history.list_transactions(
        await uow.connection(),
        index,
        history.ListRequest(
            user_id=me.user_id,
            filters=filters,
            limit=page.limit,
            after=page.after,
            q=q,
            order=order,
        ),
    )


@history_router.get(
    "/v1/transactions/export.csv",
    response_class=StreamingResponse,
    summary="Your transactions as CSV (the list's filters and `q`)",
    responses={
        200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV, header row first"},
        **problem_responses(401, 403, 422),
    },
)
async def export_transactions(
    me: Me, request: Request, index: Index, filters: Filters, q: FreeText = None
) -> StreamingResponse:
    """Every matching transaction, newest first, streamed. Amounts are decimal strings in the
    currency's minor units (`12.34` USD, `1234` JPY); text cells that a spreadsheet would run
    as a formula start with `'`."""
    engine = request.app.state.resources.engine
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    return StreamingResponse(
        history.export_csv(engine, index, me.user_id, filters, q),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="transactions-{stamp}.csv"'},
    )


@history_router.get(
    "/v1/transactions/summary",
    response_model=MonthlySummary,
    summary="Your spending in a month, by category and currency",
    responses=problem_responses(401, 403, 422),
)
async def spending_summary(
    me: Me,
    uow: Uow,
    month: Annotated[str | None, Query(pattern=r"^[0-9]{4}-[0-9]{2}$")] = None,
) -> MonthlySummary:
    """`month` (YYYY-MM, default the current one) in your profile's time zone: per currency and
    category, what was captured minus what was refunded of the month's transactions."""
    conn = await uow.connection()
    party = await users.get_party(conn, me.user_id)
    time_zone = party.timezone if party else "UTC"
    return await history.monthly_summary(conn, me.user_id, time_zone, month)


@history_router.get(
    "/v1/transactions/{transaction_id}",
    response_model=TransactionDetail,
    summary="One of your transactions",
    responses=problem_responses(401, 403, 404),
)
async def get_transaction(transaction_id: TransactionId, me: Me, uow: Uow) -> TransactionDetail:
    """With its captures, refunds and receipts. Someone else's id is 404
    `transaction_not_found`, like one that does not exist."""
    return await history.get_transaction(await uow.connection(), me.user_id, transaction_id)


@history_router.get(
    "/v1/transactions/{transaction_id}/receipt",
    response_class=Response,
    summary="A PDF receipt of one of your transactions",
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The receipt"},
        **problem_responses(401, 403, 404),
    },
)
async def get_receipt(
    transaction_id: TransactionId,
    me: Me,
    uow: Uow,
    blobs: Blobs,
    source_id: Annotated[str | None, Query(pattern=r"^(cap|ref)_[0-9a-z]{26}$")] = None,
) -> Response:
    """The newest receipt (of a capture or a refund), or the one of `source_id`. Streamed from
    billfold, never a link: the owner check happens on every download."""
    conn = await uow.connection()
    row = await history.get_row(conn, me.user_id, transaction_id)
    source, pdf = await receipts.receipt_pdf(conn, blobs, row.id, source_id)
    return Response(
        pdf,
        media_type=receipts.PDF,
        headers={"Content-Disposition": f'inline; filename="receipt-{source}.pdf"'},
    )
