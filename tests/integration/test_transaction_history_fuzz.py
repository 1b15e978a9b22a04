"""Hostile query and path values on every history route: always a 2xx or a problem+json 4xx with
a stable `code`, never a 500, never someone else's transaction."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tests.conftest import SignedIn, sign_up
from tests.integration.history_support import add_transaction

HOSTILE = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "'",
    "' OR '1'='1",
    '"; DROP TABLE transactions.transactions; --',
    "%",
    "_",
    "\\",
    "!&|:*()<->",
    "star:* & !bucks",
    "😀☕",
    "\uff33\uff34\uff21\uff32\uff22\uff35\uff23\uff2b\uff33",  # full-width STARBUCKS
    "x" * 5000,
    "-1",
    "0",
    "1e309",
    "9" * 40,
    "12.5",
    "NaN",
    "null",
    "[]",
    "{}",
    "2026-02-30T00:00:00Z",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "2026-03-01",
    "txn_" + "0" * 26,
    "txn_" + "z" * 26,
    "../../etc/passwd",
    "%00",
    "\u202e",
]
FILTERS = [
    "from",
    "to",
    "status",
    "category",
    "merchant_id",
    "merchant",
    "amount_min",
    "amount_max",
    "currency",
    "payment_method_id",
    "source",
    "q",
]
# Each route with the query parameters it reads (others are ignored by every route alike).
ROUTES = {
    "/v1/transactions": [*FILTERS, "order", "limit", "cursor"],
    "/v1/transactions/export.csv": FILTERS,
    "/v1/transactions/summary": ["month"],
    "/v1/transactions/{mine}/receipt": ["source_id"],
}


def _b64(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _check(r: httpx.Response, context: Any) -> None:
    assert r.status_code < 500, (context, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json"), context
        assert r.json()["code"], context


@pytest.fixture
async def world(app: Any, client: httpx.AsyncClient) -> dict[str, Any]:
    me, other = await sign_up(client), await sign_up(client)
    mine = await add_transaction(app, me.user["id"], merchant="Starbucks")
    theirs = await add_transaction(app, other.user["id"], merchant="Starbucks Secret")
    return {"me": me, "mine": mine, "theirs": theirs}


async def test_hostile_query_values_never_fail(
    client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    me: SignedIn = world["me"]
    for route, params in ROUTES.items():
        path = route.format(mine=world["mine"])
        for name in params:
            for value in HOSTILE:
                r = await client.get(path, params={name: value}, headers=me.headers)
                _check(r, (path, name, value))
                assert world["theirs"] not in r.text
                assert "Starbucks Secret" not in r.text
    # Cursors that decode to hostile text, with and without a search.
    for value in HOSTILE:
        for extra in ({}, {"q": "starbucks"}, {"q": "starbucks", "order": "newest"}):
            cursor = _b64(value) if value else "="
            r = await client.get(
                "/v1/transactions", params={"cursor": cursor, **extra}, headers=me.headers
            )
            _check(r, ("cursor", value, extra))


async def test_hostile_path_ids_are_not_found(
    client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    me: SignedIn = world["me"]
    # (A raw NUL cannot be sent in a URL at all; "%00" is among the values.)
    for value in [world["theirs"], *(v for v in HOSTILE[1:] if "\x00" not in v)]:
        for suffix in ("", "/receipt"):
            r = await client.get(f"/v1/transactions/{value}{suffix}", headers=me.headers)
            _check(r, (value, suffix))
            assert r.status_code in (404, 405, 422), (value, suffix, r.status_code)
            assert "Starbucks Secret" not in r.text


async def test_summary_months_at_the_ends_of_the_calendar(
    client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """The first and last months a date can name, in zones on both sides of Greenwich: a
    summary or a 422, never a 500 (9999-12 ends in the year 10000; 0001-01 east of Greenwich
    starts in the year 0)."""
    me: SignedIn = world["me"]
    for zone in ("UTC", "Pacific/Kiritimati", "Europe/Berlin", "America/New_York"):
        r = await client.patch("/v1/me", json={"timezone": zone}, headers=me.headers)
        assert r.status_code == 200, r.text
        for month in ("0000-12", "0001-01", "0001-02", "9999-01", "9999-11", "9999-12"):
            r = await client.get(
                "/v1/transactions/summary", params={"month": month}, headers=me.headers
            )
            _check(r, (zone, month))
            if month in ("0000-12", "9999-12"):
                assert r.status_code == 422 and r.json()["code"] == "validation_failed"
            if month in ("0001-02", "9999-01", "9999-11"):
                assert r.status_code == 200 and r.json()["month"] == month, (zone, r.text)
