"""Reading a user's transactions: the list (filters, free-text search, cursor), one transaction,
the CSV export and the monthly spending summary.

Reads bypass the payment rules (as cosmicpython's `views.py` does): each use case is one or two
SQL statements on the `transactions` schema, always scoped to the owner, so someone else's id
is simply not found.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.platform.errors import FieldError, NotFound, ProblemError
from billfold.platform.ids import is_valid_id
from billfold.platform.money import minor_units
from billfold.platform.pagination import Page, decode_cursor, encode_cursor, invalid_cursor
from billfold.transactions import declines
from billfold.transactions.search import (
    FILTER_SQL,
    HistoryFilters,
    Order,
    SearchCursor,
    SearchIndex,
    SearchRequest,
)

# --- views ---------------------------------------------------------------------------------


class MerchantView(BaseModel):
    id: str
    name: str
    mcc: str
    category: str
    category_label: str
    country: str | None = None
    city: str | None = None


class CardView(BaseModel):
    brand: str | None
    last4: str | None


class CaptureView(BaseModel):
    id: str
    amount: int
    final: bool
    created_at: datetime


class RefundView(BaseModel):
    id: str
    amount: int
    status: str
    created_at: datetime


class HistoryItem(BaseModel):
    """A transaction as the history shows it (the list, search and `GET …/{id}`)."""

    id: str
    status: str
    source: str = Field(description="`card` or `wallet` (the wallet balance)")
    payment_method_id: str | None
    card: CardView | None = Field(description="brand and last 4 digits; null for the wallet")
    amount: int = Field(description="what the payment asked for, in minor units")
    currency: str
    authorized_amount: int
    captured_amount: int
    refunded_amount: int
    merchant: MerchantView
    channel: str
    description: str | None
    note: str | None
    decline_code: str | None
    decline_reason: str | None = Field(description="the decline code in words for people")
    auth_code: str | None
    created_at: datetime
    updated_at: datetime
    score: float | None = Field(
        default=None, description="search relevance (only in answers to `q`)"
    )


class ReceiptRef(BaseModel):
    source_id: str = Field(description="the capture (`cap_…`) or refund (`ref_…`) it is for")
    kind: str = Field(description="`capture` or `refund`")
    amount: int
    currency: str
    created_at: datetime


class TransactionDetail(HistoryItem):
    """One transaction with its captures, refunds and receipts."""

    captures: list[CaptureView]
    refunds: list[RefundView]
    receipts: list[ReceiptRef]


class CategorySpending(BaseModel):
    category: str
    label: str
    amount: int = Field(description="captured minus refunded, in minor units")
    count: int = Field(description="transactions with money spent in this category")


class CurrencySpending(BaseModel):
    currency: str
    total: int
    categories: list[CategorySpending]


class MonthlySummary(BaseModel):
    month: str = Field(description="YYYY-MM in `time_zone`")
    time_zone: str
    start: datetime = Field(description="the month's first instant (UTC)")
    end: datetime = Field(description="the next month's first instant (UTC), exclusive")
    currencies: list[CurrencySpending]


# --- SQL -----------------------------------------------------------------------------------

_COLUMNS = """
    t.id, t.user_id, t.status, t.source, t.payment_method_id, t.amount, t.currency,
    t.authorized_amount, t.captured_amount, t.refunded_amount, t.merchant_id, t.merchant_name,
    t.mcc, t.category, c.label AS category_label, t.channel, t.description, t.note,
    t.decline_code, t.auth_code, t.created_at, t.updated_at,
    d.merchant_country, d.merchant_city, d.card_brand, d.card_last4
"""
_FROM = """
    FROM transactions.transactions t
    JOIN transactions.categories c ON c.category = t.category
    LEFT JOIN transactions.transaction_details d ON d.transaction_id = t.id
"""
_LIST = text(
    f"""
    SELECT {_COLUMNS} {_FROM}
    WHERE {FILTER_SQL}
      AND (CAST(:after AS text) IS NULL OR t.id < :after)
    ORDER BY t.id DESC
    LIMIT :limit
    """
)
_BY_IDS = text(f"SELECT {_COLUMNS} {_FROM} WHERE t.user_id = :user_id AND t.id = ANY(:ids)")
_ONE = text(f"SELECT {_COLUMNS} {_FROM} WHERE t.user_id = :user_id AND t.id = :id")
_CAPTURES = text(
    "SELECT id, amount, final, created_at FROM transactions.captures "
    "WHERE transaction_id = :id ORDER BY id"
)
_REFUNDS = text(
    "SELECT id, amount, status, created_at FROM transactions.refunds "
    "WHERE transaction_id = :id ORDER BY id"
)
_RECEIPTS = text(
    "SELECT source_id, kind, amount, currency, created_at FROM transactions.receipts "
    "WHERE transaction_id = :id ORDER BY created_at, source_id"
)
# Spending of a month: what was captured and not refunded, of the transactions made in that
# month (the list's `from`/`to` over the same month selects the same rows). Only succeeded
# refunds count: `refunded_amount` also holds card refunds still waiting for the network.
_SUMMARY = text(
    """
    SELECT t.currency, t.category, c.label, c.position,
           sum(t.captured_amount - r.refunded) AS amount, count(*) AS n
    FROM transactions.transactions t
    JOIN transactions.categories c ON c.category = t.category
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(x.amount), 0) AS refunded FROM transactions.refunds x
        WHERE x.transaction_id = t.id AND x.status = 'succeeded'
    ) r
    WHERE t.user_id = :user_id AND t.created_at >= :start AND t.created_at < :end
      AND t.captured_amount > r.refunded
    GROUP BY t.currency, t.category, c.label, c.position
    ORDER BY t.currency, amount DESC, c.position
    """
)


def _item(row: Row[Any], score: Decimal | None = None) -> HistoryItem:
    return HistoryItem(
        id=row.id,
        status=row.status,
        source=row.source,
        payment_method_id=row.payment_method_id,
        card=CardView(brand=row.card_brand, last4=row.card_last4) if row.source == "card" else None,
        amount=row.amount,
        currency=row.currency,
        authorized_amount=row.authorized_amount,
        captured_amount=row.captured_amount,
        refunded_amount=row.refunded_amount,
        merchant=MerchantView(
            id=row.merchant_id,
            name=row.merchant_name,
            mcc=row.mcc,
            category=row.category,
            category_label=row.category_label,
            country=row.merchant_country,
            city=row.merchant_city,
        ),
        channel=row.channel,
        description=row.description,
        note=row.note,
        decline_code=row.decline_code,
        decline_reason=declines.reason_for(row.decline_code, row.source),
        auth_code=row.auth_code,
        created_at=row.created_at,
        updated_at=row.updated_at,
        score=float(score) if score is not None else None,
    )


# --- use cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ListRequest:
    user_id: str
    filters: HistoryFilters
    limit: int
    after: str | None  # the decoded cursor
    q: str | None = None
    order: Order | None = None  # default: relevance with `q`, newest without


async def list_transactions(
    conn: AsyncConnection, index: SearchIndex, request: ListRequest
) -> Page[HistoryItem]:
    """One page of the user's transactions, newest first; with `q`, the search's hits (best
    first unless `order=newest`). The cursor is the last item's id (and score, for relevance)."""
    q = (request.q or "").strip()
    if not q:
        after = request.after
        if after is not None and not is_valid_id(after, "txn"):
            raise invalid_cursor()
        params = {
            **request.filters.params(),
            "user_id": request.user_id,
            "after": after,
            "limit": request.limit + 1,
        }
        rows = list((await conn.execute(_LIST, params)).all())
        items = [_item(r) for r in rows[: request.limit]]
        more = len(rows) > request.limit
        return Page[HistoryItem](
            data=items, next_cursor=encode_cursor(items[-1].id) if more and items else None
        )
    order: Order = request.order or "relevance"
    cursor = SearchCursor.decode(request.after) if request.after is not None else None
    if request.after is not None and (
        cursor is None
        or not is_valid_id(cursor.transaction_id, "txn")
        or (cursor.score is None) != (order == "newest")
    ):
        raise invalid_cursor()
    hits = await index.search(
        conn,
        SearchRequest(
            user_id=request.user_id,
            query=q,
            filters=request.filters,
            order=order,
            limit=request.limit + 1,
            after=cursor,
        ),
    )
    page_hits = hits[: request.limit]
    rows_by_id = await _rows_by_id(conn, request.user_id, [h.transaction_id for h in page_hits])
    items = [
        _item(rows_by_id[h.transaction_id], h.score)
        for h in page_hits
        if h.transaction_id in rows_by_id  # an external index may lag behind a deletion
    ]
    next_cursor = None
    if len(hits) > request.limit and page_hits:
        last = page_hits[-1]
        mark = SearchCursor(last.score if order == "relevance" else None, last.transaction_id)
        next_cursor = encode_cursor(mark.encode())
    return Page[HistoryItem](data=items, next_cursor=next_cursor)


async def _rows_by_id(
    conn: AsyncConnection, user_id: str, ids: Sequence[str]
) -> dict[str, Row[Any]]:
    if not ids:
        return {}
    rows = (await conn.execute(_BY_IDS, {"user_id": user_id, "ids": list(ids)})).all()
    return {r.id: r for r in rows}


async def get_row(conn: AsyncConnection, user_id: str, transaction_id: str) -> Row[Any]:
    """The user's transaction row, or 404 `transaction_not_found` (also for other users')."""
    row = None
    if is_valid_id(transaction_id, "txn"):  # junk never reaches the database
        row = (await conn.execute(_ONE, {"user_id": user_id, "id": transaction_id})).first()
    if row is None:
        raise NotFound("No transaction with this id is yours", code="transaction_not_found")
    return row


async def get_transaction(
    conn: AsyncConnection, user_id: str, transaction_id: str
) -> TransactionDetail:
    """One of the user's transactions with its captures, refunds and receipts."""
    row = await get_row(conn, user_id, transaction_id)
    captures = (await conn.execute(_CAPTURES, {"id": row.id})).all()
    refunds = (await conn.execute(_REFUNDS, {"id": row.id})).all()
    receipts = (await conn.execute(_RECEIPTS, {"id": row.id})).all()
    return TransactionDetail(
        **_item(row).model_dump(exclude={"score"}),
        captures=[CaptureView(**r._mapping) for r in captures],
        refunds=[RefundView(**r._mapping) for r in refunds],
        receipts=[ReceiptRef(**r._mapping) for r in receipts],
    )


# --- CSV -----------------------------------------------------------------------------------

CSV_COLUMNS = (
    "id",
    "created_at",
    "status",
    "merchant",
    "category",
    "amount",
    "captured",
    "refunded",
    "currency",
    "payment",
    "channel",
    "description",
    "note",
    "auth_code",
)
_EXPORT_BATCH = 500
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection);
# OWASP's advice: prefix such a cell with a single quote so it is shown as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")


def safe_cell(value: str | None) -> str:
    """A text cell a spreadsheet shows as text, never evaluates."""
    if not value:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def decimal_amount(amount: int, currency: str) -> str:
    """Minor units as a plain decimal string in the currency's own digits (USD 1234 → "12.34",
    JPY 1234 → "1234", BHD 1234 → "1.234"); exact, no float, no grouping or symbol."""
    digits = minor_units(currency)
    return f"{Decimal(amount).scaleb(-digits):.{digits}f}"


def _csv_line(item: HistoryItem) -> list[str]:
    card = item.card
    payment = (
        "wallet balance"
        if card is None
        else " ".join(p for p in (card.brand, f"ending {card.last4}" if card.last4 else None) if p)
    )
    return [
        item.id,
        item.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        item.status,
        safe_cell(item.merchant.name),
        safe_cell(item.merchant.category_label),
        decimal_amount(item.amount, item.currency),
        decimal_amount(item.captured_amount, item.currency),
        decimal_amount(item.refunded_amount, item.currency),
        item.currency,
        safe_cell(payment),
        item.channel,
        safe_cell(item.description),
        safe_cell(item.note),
        safe_cell(item.auth_code),
    ]


def _encode_rows(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


async def export_csv(
    engine: AsyncEngine,
    index: SearchIndex,
    user_id: str,
    filters: HistoryFilters,
    q: str | None = None,
) -> AsyncIterator[bytes]:
    """The user's transactions matching the filters (and `q`), newest first, as CSV chunks.

    Runs on a connection of its own (the response streams after the request's unit of work is
    done), in one REPEATABLE READ snapshot so the batches add up to one consistent export."""
    yield _encode_rows([list(CSV_COLUMNS)])
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        after: str | None = None
        while True:
            page = await list_transactions(
                conn,
                index,
                ListRequest(
                    user_id=user_id,
                    filters=filters,
                    limit=_EXPORT_BATCH,
                    after=after,
                    q=q,
                    order="newest",
                ),
            )
            if page.data:
                yield _encode_rows([_csv_line(i) for i in page.data])
            if page.next_cursor is None:
                break
            after = _decoded(page.next_cursor)


def _decoded(cursor: str) -> str:
    value = decode_cursor(cursor)
    assert value is not None
    return value


# --- monthly summary -----------------------------------------------------------------------


def month_bounds(month: str | None, time_zone: str, today: date) -> tuple[str, datetime, datetime]:
    """`YYYY-MM` (default: the current month in `time_zone`) → its first instant and the next
    month's, as aware datetimes in that zone (a DST change inside the month is handled by the
    zone, not by adding days)."""
    zone = ZoneInfo(time_zone)
    try:
        year, mon = (today.year, today.month) if month is None else map(int, month.split("-"))
        start = datetime(year, mon, 1, tzinfo=zone)
        end = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=zone)
        # The bounds are answered in UTC: the first and the last month a datetime can hold
        # may not convert (0001-01 east of Greenwich, 9999-12 anywhere).
        start.astimezone(UTC), end.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ProblemError(
            "`month` must be YYYY-MM",
            status=422,
            code="validation_failed",
            errors=[
                FieldError(
                    parameter="month",
                    detail="expected a calendar month YYYY-MM, e.g. 2026-03",
                )
            ],
        ) from None
    return f"{year:04d}-{mon:02d}", start, end


async def monthly_summary(
    conn: AsyncConnection, user_id: str, time_zone: str, month: str | None
) -> MonthlySummary:
    """Spending by category per currency in a calendar month of the user's time zone."""
    today = datetime.now(ZoneInfo(time_zone)).date()
    label, start, end = month_bounds(month, time_zone, today)
    rows = (await conn.execute(_SUMMARY, {"user_id": user_id, "start": start, "end": end})).all()
    by_currency: dict[str, list[CategorySpending]] = {}
    for r in rows:
        by_currency.setdefault(r.currency, []).append(
            CategorySpending(category=r.category, label=r.label, amount=r.amount, count=r.n)
        )
    return MonthlySummary(
        month=label,
        time_zone=time_zone,
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        currencies=[
            CurrencySpending(currency=cur, total=sum(c.amount for c in cats), categories=cats)
            for cur, cats in sorted(by_currency.items())
        ],
    )
