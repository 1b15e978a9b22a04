"""Free-text search over a user's transactions behind the `SearchIndex` protocol.

`PostgresSearchIndex` is the one billfold ships: a full-text match (`simple` configuration,
prefix terms, so "coffe" finds "Coffee Corner") OR a trigram word similarity above a tuned
threshold (so "starbuks" finds "Starbucks"), ranked, on the generated `search_text` /
`search_vector` columns of migration 0006. An Elasticsearch/OpenSearch adapter would implement
the same protocol (index documents from the `billfold.transactions.*` events, answer ranked
ids); callers never see which one runs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# Trigram word similarity at or above which a query word counts as a typo of a stored word.
# Measured on pg_trgm 1.6: one missing or swapped letter in a name scores 0.57 to 0.83
# (starbuks→Starbucks 0.67, strbucks 0.58, walmrt→Walmart 0.57, coffe→Coffee 0.83), while
# unrelated near-words score ≤ 0.5 (lunch→launch 0.5, ubr→uber 0.5, tea→steam 0.25).
TYPO_THRESHOLD = 0.55
MAX_QUERY_LENGTH = 200
# A query is cut into at most this many words: each becomes one prefix term of the tsquery.
MAX_TERMS = 8

_WORD = re.compile(r"[^\W_]+")

Order = Literal["relevance", "newest"]


@dataclass(frozen=True)
class HistoryFilters:
    """The list's filters; every one is optional and they combine with AND."""

    created_from: datetime | None = None
    created_to: datetime | None = None  # exclusive
    status: str | None = None
    category: str | None = None
    merchant_id: str | None = None
    merchant: str | None = None  # a merchant name, matched exactly (case-insensitive)
    amount_min: int | None = None
    amount_max: int | None = None
    currency: str | None = None
    payment_method_id: str | None = None
    source: str | None = None  # 'card' | 'wallet'

    def params(self) -> dict[str, Any]:
        return {
            "created_from": self.created_from,
            "created_to": self.created_to,
            "status": self.status,
            "category": self.category,
            "merchant_id": self.merchant_id,
            "merchant": self.merchant,
            "amount_min": self.amount_min,
            "amount_max": self.amount_max,
            "currency": self.currency,
            "payment_method_id": self.payment_method_id,
            "source": self.source,
        }


# The filters as SQL on `transactions.transactions t`, shared by the list, the search, the CSV
# export and anything else that must agree on what "these filters" select.
FILTER_SQL = """
    t.user_id = :user_id
    AND (CAST(:created_from AS timestamptz) IS NULL OR t.created_at >= :created_from)
    AND (CAST(:created_to AS timestamptz) IS NULL OR t.created_at < :created_to)
    AND (CAST(:status AS text) IS NULL OR t.status = :status)
    AND (CAST(:category AS text) IS NULL OR t.category = :category)
    AND (CAST(:merchant_id AS text) IS NULL OR t.merchant_id = :merchant_id)
    AND (CAST(:merchant AS text) IS NULL OR lower(t.merchant_name) = lower(:merchant))
    AND (CAST(:amount_min AS bigint) IS NULL OR t.amount >= :amount_min)
    AND (CAST(:amount_max AS bigint) IS NULL OR t.amount <= :amount_max)
    AND (CAST(:currency AS text) IS NULL OR t.currency = :currency)
    AND (CAST(:payment_method_id AS text) IS NULL OR t.payment_method_id = :payment_method_id)
    AND (CAST(:source AS text) IS NULL OR t.source = :source)
"""


@dataclass(frozen=True)
class SearchCursor:
    """Where the previous page ended: its last hit's score (exact decimal) and id."""

    score: Decimal | None
    transaction_id: str

    def encode(self) -> str:
        return (
            f"{self.score}|{self.transaction_id}"
            if self.score is not None
            else (self.transaction_id)
        )

    @classmethod
    def decode(cls, value: str) -> SearchCursor | None:
        """None when `value` is not a cursor of this shape (the caller answers 422)."""
        score, sep, txn = value.rpartition("|")
        if not sep:
            return cls(None, value)
        try:
            number = Decimal(score)
        except ArithmeticError:
            return None
        # Scores are in [0, 2] with 6 places; anything else (NaN, 1e999999) is not ours.
        if not number.is_finite() or not 0 <= number <= 10 or number.as_tuple().exponent != -6:
            return None
        return cls(number, txn)


@dataclass(frozen=True)
class SearchHit:
    transaction_id: str
    score: Decimal


@dataclass(frozen=True)
class SearchRequest:
    user_id: str
    query: str
    filters: HistoryFilters = field(default_factory=HistoryFilters)
    order: Order = "relevance"
    limit: int = 20
    after: SearchCursor | None = None


class SearchIndex(Protocol):
    """Ranked free-text search over one user's transactions.

    `conn` is the caller's database connection: the PostgreSQL index answers through it (one
    snapshot with the rows the caller then reads); an external index ignores it. Hits are only
    ids and scores: the caller loads the rows from the database, which stays the record and
    checks the owner again."""

    async def search(self, conn: AsyncConnection, request: SearchRequest) -> list[SearchHit]:
        """At most `request.limit` hits past `request.after`, best first (or newest first)."""
        ...

    async def index(self, conn: AsyncConnection, transaction_id: str) -> None:
        """Make the transaction's current text searchable (after it was created or changed)."""
        ...


def terms(query: str) -> list[str]:
    """The words of a query (letters and digits; everything else separates), at most
    `MAX_TERMS`. Nothing of the user's text reaches `to_tsquery` syntax."""
    # NFKC first: full-width letters or a ligature ("fi" as one character) are the plain word.
    return _WORD.findall(unicodedata.normalize("NFKC", query[:MAX_QUERY_LENGTH]))[:MAX_TERMS]


def prefix_tsquery(words: list[str]) -> str:
    """`word1:* & word2:*`: every word must start a word of the text (folded in SQL)."""
    return " & ".join(f"{w}:*" for w in words)


class PostgresSearchIndex:
    """`SearchIndex` on PostgreSQL full text + pg_trgm (migration 0006's generated columns)."""

    def __init__(self, threshold: float = TYPO_THRESHOLD) -> None:
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self._threshold = threshold

    async def index(self, conn: AsyncConnection, transaction_id: str) -> None:
        # `search_text` and `search_vector` are generated columns: PostgreSQL keeps them
        # current in the same statement that writes the row.
        return None

    async def search(self, conn: AsyncConnection, request: SearchRequest) -> list[SearchHit]:
        words = terms(request.query)
        if not words:
            return []
        # The `%>` operator (word similarity, GIN-indexable) reads its threshold from a
        # setting. And a custom plan every time: a generic plan of this prepared statement
        # cannot see which filters are unset or how many rows the user has, and was measured
        # scanning all of a 20,000-row user's rows (~240 ms) where the plan for the actual
        # values intersects the GIN bitmaps (~30 ms). `true`: only for this transaction.
        await conn.execute(
            text(
                "SELECT set_config('pg_trgm.word_similarity_threshold', :t, true),"
                " set_config('plan_cache_mode', 'force_custom_plan', true)"
            ),
            {"t": str(self._threshold)},
        )
        if request.order == "relevance":
            order = "score DESC, id DESC"
            after = (
                "(CAST(:after_score AS numeric) IS NULL OR (score, id) < (:after_score, :after_id))"
            )
        else:
            order = "id DESC"
            after = "(CAST(:after_id AS text) IS NULL OR id < :after_id)"
        # Every word must match, each either as the start of a word of the text (full text,
        # prefix) or as a near spelling of a stretch of it (trigrams): "merchant 1999" is not
        # every merchant. Both conditions are GIN-indexable, so PostgreSQL intersects the
        # index bitmaps before it reads a row. Only the word count shapes the SQL.
        matches = " AND ".join(
            f"(t.search_vector @@ to_tsquery('simple', transactions.search_fold(:p{i}))"
            f" OR t.search_text %> transactions.search_fold(:w{i}))"
            for i in range(len(words))
        )
        similarity = " + ".join(
            f"word_similarity(transactions.search_fold(:w{i}), t.search_text)"
            for i in range(len(words))
        )
        # Score: the full-text rank of all prefixes plus the mean word similarity, rounded to
        # an exact decimal so a cursor compares equal to the score it came from.
        sql = f"""
            WITH hits AS (
                SELECT t.id,
                       round(CAST(
                           ts_rank(t.search_vector,
                                   to_tsquery('simple', transactions.search_fold(:tsquery)))
                           + ({similarity}) / {len(words)} AS numeric), 6) AS score
                FROM transactions.transactions t
                WHERE {FILTER_SQL}
                  AND {matches}
            )
            SELECT id, score FROM hits
            WHERE {after}
            ORDER BY {order}
            LIMIT :limit
        """  # noqa: S608 - composed from this module's constants and a word count only
        params = {
            **request.filters.params(),
            **{f"w{i}": w for i, w in enumerate(words)},
            **{f"p{i}": f"{w}:*" for i, w in enumerate(words)},
            "user_id": request.user_id,
            "tsquery": prefix_tsquery(words),
            "after_score": request.after.score if request.after else None,
            "after_id": request.after.transaction_id if request.after else None,
            "limit": request.limit,
        }
        rows = (await conn.execute(text(sql), params)).all()
        return [SearchHit(r.id, r.score) for r in rows]
