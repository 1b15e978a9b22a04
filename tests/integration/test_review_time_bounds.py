"""Instants outside what UTC can hold in Python (and the database driver) are a 422, never a
500: year 1 east of UTC is year 0 in UTC, year 9999 west of UTC is year 10000."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SignedIn

OUT_OF_RANGE_IN_UTC = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("instant", OUT_OF_RANGE_IN_UTC)
async def test_a_wallet_as_of_outside_the_utc_range_is_a_422(
    client: httpx.AsyncClient, alice: SignedIn, instant: str
) -> None:
    r = await client.get("/v1/wallet", params={"as_of": instant}, headers=alice.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "invalid_as_of"
    assert r.json()["errors"][0]["parameter"] == "as_of"


@pytest.mark.parametrize("bound", ["from", "to"])
@pytest.mark.parametrize("instant", OUT_OF_RANGE_IN_UTC)
async def test_a_history_bound_outside_the_utc_range_is_a_422(
    client: httpx.AsyncClient, alice: SignedIn, bound: str, instant: str
) -> None:
    r = await client.get("/v1/transfers", params={bound: instant}, headers=alice.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "validation_failed"
    assert r.json()["errors"][0]["parameter"] == bound
