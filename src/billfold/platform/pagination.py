"""Cursor pagination: `{"data": [...], "next_cursor": ...}` with `?limit=` and `?cursor=`."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.errors import FieldError, ProblemError

T = TypeVar("T")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def invalid_cursor(detail: str = "not a cursor from this list") -> ProblemError:
    """The 422 `invalid_cursor` problem, for a cursor no page of this API handed out."""
    return ProblemError(
        "The cursor is not valid; use next_cursor from the previous page",
        status=422,
        code="invalid_cursor",
        errors=[FieldError(parameter="cursor", detail=detail)],
    )


def decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not value or not value.isprintable() or len(value) > 200:
        raise invalid_cursor("not a cursor from this API")
    return value


# ASCII digits without a leading zero: str.isdigit() also accepts digits (such as "²") that
# int() refuses, and a page never hands out "007".
_BIGINT_CURSOR = re.compile(r"[1-9][0-9]{0,18}")
_MAX_BIGINT = 2**63 - 1


def bigint_cursor(after: str | None) -> int | None:
    """A decoded cursor that is a positive bigint key (a sequence or identity column), or the
    422 `invalid_cursor`: anything else did not come from a page of that list."""
    if after is None:
        return None
    if _BIGINT_CURSOR.fullmatch(after) and int(after) <= _MAX_BIGINT:
        return int(after)
    raise invalid_cursor()


class PageParams(BaseModel):
    limit: int
    after: str | None


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> PageParams:
    """Dependency: validated `limit` and the decoded `cursor`."""
    return PageParams(limit=limit, after=decode_cursor(cursor))


def make_page(items: list[T], limit: int, key: str) -> Page[T]:
    """`items` was fetched with limit + 1 rows; `key` names the sort attribute of each item."""
    more = len(items) > limit
    items = items[:limit]
    next_cursor = encode_cursor(str(getattr(items[-1], key))) if more and items else None
    return Page[T](data=items, next_cursor=next_cursor)


async def fetch_page(
    conn: AsyncConnection,
    query: str,
    params: Mapping[str, Any],
    *,
    limit: int | None,
    after: str | None,
    key: str = "id",
    newest_first: bool = True,
) -> list[Row[Any]]:
    """One keyset page of `query` (a `SELECT … WHERE …` of the caller's): the rows past the
    cursor `after` in `key` order, at most `limit` (None: all). Ids sort by time, so `id`
    order is creation order."""
    op, order = ("<", "DESC") if newest_first else (">", "ASC")
    sql = (
        f"{query} AND (CAST(:after AS text) IS NULL OR {key} {op} :after) "
        f"ORDER BY {key} {order} LIMIT :limit"
    )
    result = await conn.execute(text(sql), {**params, "after": after, "limit": limit})
    return list(result.all())
