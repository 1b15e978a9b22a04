"""Transfer history over HTTP on real PostgreSQL: sent and received, newest first, filtered,
paged by cursor, and only ever the caller's own transfers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import SignedIn, fund, idem, sign_up
from tests.integration.transfer_support import Always, make_admin, risk, send, send_ok


async def history(
    client: httpx.AsyncClient, who: SignedIn, **params: Any
) -> tuple[list[dict[str, Any]], str | None]:
    r = await client.get("/v1/transfers", params=params, headers=who.headers)
    assert r.status_code == 200, r.text
    page = r.json()
    assert set(page) == {"data", "next_cursor"}
    return page["data"], page["next_cursor"]


async def ids(client: httpx.AsyncClient, who: SignedIn, **params: Any) -> list[str]:
    """Every matching id, following the cursor to the end."""
    seen: list[str] = []
    cursor = None
    while True:
        data, cursor = await history(
            client, who, **params, **({"cursor": cursor} if cursor else {})
        )
        seen += [t["id"] for t in data]
        if cursor is None:
            return seen


@pytest.fixture
async def story(app: Any, client: httpx.AsyncClient) -> dict[str, Any]:
    """Alice, Bob and Carol, and the transfers between them, oldest first:

    t0 alice→bob 100 USD · t1 bob→alice 250 USD · t2 alice→carol 400 USD · t3 alice→bob 300 EUR
    t4 carol→bob 50 USD (not Alice's) · t5 alice→bob 1000 USD, reversed · t6 alice→carol 75 USD,
    pending (held for review)
    """
    alice = await sign_up(client, name="Alice History")
    bob = await sign_up(client, name="Bob History")
    carol = await sign_up(client, name="Carol History")
    admin = await make_admin(app, client)
    for who in (alice, bob, carol):
        await fund(app, who.user["id"], 50_000)
    await fund(app, alice.user["id"], 50_000, "EUR")
    t = [
        await send_ok(client, alice, 100, bob),
        await send_ok(client, bob, 250, alice),
        await send_ok(client, alice, 400, carol),
        await send_ok(client, alice, 300, bob, "EUR"),
        await send_ok(client, carol, 50, bob),
        await send_ok(client, alice, 1_000, bob),
    ]
    r = await client.post(
        f"/v1/admin/transfers/{t[5]['id']}/reverse",
        json={"reason": "duplicate"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200, r.text
    with risk(app, Always("review")):
        r = await send(client, alice, 75, user_id=carol.user["id"])
    assert r.status_code == 201 and r.json()["status"] == "pending", r.text
    t.append(r.json())
    return {"alice": alice, "bob": bob, "carol": carol, "t": [x["id"] for x in t], "rows": t}


async def test_history_is_sent_and_received_newest_first(
    client: httpx.AsyncClient, story: dict[str, Any]
) -> None:
    alice, t = story["alice"], story["t"]
    data, cursor = await history(client, alice)
    assert cursor is None
    assert [x["id"] for x in data] == [t[6], t[5], t[3], t[2], t[1], t[0]]
    by_id = {x["id"]: x for x in data}
    assert by_id[t[1]]["direction"] == "received"
    assert by_id[t[1]]["sender"]["user_id"] == story["bob"].user["id"]
    assert by_id[t[0]]["direction"] == "sent"
    assert by_id[t[5]]["status"] == "reversed" and by_id[t[6]]["status"] == "pending"
    # Each item is what GET /v1/transfers/{id} answers.
    one = await client.get(f"/v1/transfers/{t[1]}", headers=alice.headers)
    assert one.json() == by_id[t[1]]
    # Carol sees hers only; a newcomer sees nothing.
    assert await ids(client, story["carol"]) == [t[6], t[4], t[2]]
    assert await ids(client, await sign_up(client, name="Nobody")) == []


async def test_filters(client: httpx.AsyncClient, story: dict[str, Any]) -> None:
    alice, bob, t = story["alice"], story["bob"], story["t"]
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"direction": "sent"}, [t[6], t[5], t[3], t[2], t[0]]),
        ({"direction": "received"}, [t[1]]),
        ({"status": "completed"}, [t[3], t[2], t[1], t[0]]),
        ({"status": "reversed"}, [t[5]]),
        ({"status": "pending"}, [t[6]]),
        ({"status": "failed"}, []),
        ({"counterparty": bob.user["id"]}, [t[5], t[3], t[1], t[0]]),
        ({"counterparty": story["carol"].user["id"]}, [t[6], t[2]]),
        ({"counterparty": alice.user["id"]}, []),
        ({"counterparty": "usr_" + "0" * 26}, []),
        ({"currency": "EUR"}, [t[3]]),
        ({"currency": "GBP"}, []),
        ({"amount_min": 250}, [t[5], t[3], t[2], t[1]]),
        ({"amount_max": 250}, [t[6], t[1], t[0]]),
        ({"amount_min": 250, "amount_max": 400}, [t[3], t[2], t[1]]),
        ({"amount_min": 401, "amount_max": 400}, []),
        ({"direction": "sent", "counterparty": bob.user["id"], "currency": "USD"}, [t[5], t[0]]),
        ({"direction": "received", "status": "reversed"}, []),
    ]
    for params, expected in cases:
        assert await ids(client, alice, **params) == expected, params
    # Bob's view of the same filters: his received ones from Alice and Carol.
    assert await ids(client, bob, direction="received") == [t[5], t[4], t[3], t[0]]
    assert await ids(client, bob, direction="sent") == [t[1]]


async def test_time_range_filter(client: httpx.AsyncClient, story: dict[str, Any]) -> None:
    alice, t, rows = story["alice"], story["t"], story["rows"]
    at = {r["id"]: r["created_at"] for r in rows}
    # `from` is inclusive, `to` exclusive.
    assert await ids(client, alice, **{"from": at[t[2]]}) == [t[6], t[5], t[3], t[2]]
    assert await ids(client, alice, to=at[t[2]]) == [t[1], t[0]]
    assert await ids(client, alice, **{"from": at[t[1]], "to": at[t[3]]}) == [t[2], t[1]]
    assert await ids(client, alice, **{"from": at[t[3]], "to": at[t[1]]}) == []
    # Other offsets mean the same instant.
    assert await ids(client, alice, **{"from": "2000-01-01T01:00:00+01:00"}) == await ids(
        client, alice
    )
    assert await ids(client, alice, to="2000-01-01T00:00:00Z") == []


async def test_pages_have_no_gaps_or_duplicates(
    client: httpx.AsyncClient, story: dict[str, Any]
) -> None:
    alice, t = story["alice"], story["t"]
    everything = [t[6], t[5], t[3], t[2], t[1], t[0]]
    for limit in (1, 2, 4, 5, 6, 100):
        pages = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            data, cursor = await history(client, alice, **params)
            assert len(data) <= limit
            pages.append([x["id"] for x in data])
            if cursor is None:
                break
        assert [i for page in pages for i in page] == everything, limit
        assert all(pages), f"an empty page with limit {limit}: {pages}"
    # The cursor keeps the filter's place: sent only, two at a time.
    assert await ids(client, alice, direction="sent", limit=2) == [t[6], t[5], t[3], t[2], t[0]]
    # A transfer made while paging shows up on a fresh first page, not as a duplicate.
    data, cursor = await history(client, alice, limit=3)
    await send_ok(client, alice, 1, story["bob"])
    rest, _ = await history(client, alice, limit=100, cursor=cursor)
    assert [x["id"] for x in data + rest] == everything


@pytest.mark.parametrize(
    ("params", "code", "where"),
    [
        ({"limit": 0}, "validation_failed", "limit"),
        ({"limit": 101}, "validation_failed", "limit"),
        ({"limit": -1}, "validation_failed", "limit"),
        ({"limit": "ten"}, "validation_failed", "limit"),
        ({"cursor": "!!!"}, "invalid_cursor", "cursor"),
        ({"cursor": "x" * 401}, "validation_failed", "cursor"),
        ({"status": "done"}, "validation_failed", "status"),
        ({"direction": "both"}, "validation_failed", "direction"),
        ({"direction": "SENT"}, "validation_failed", "direction"),
        ({"currency": "usd"}, "validation_failed", "currency"),
        ({"currency": "ZZZ"}, "validation_failed", "currency"),
        ({"amount_min": -1}, "validation_failed", "amount_min"),
        ({"amount_max": "1.5"}, "validation_failed", "amount_max"),
        ({"amount_min": 2**63}, "validation_failed", "amount_min"),
        ({"amount_max": 10**30}, "validation_failed", "amount_max"),
        ({"from": "yesterday"}, "validation_failed", "from"),
        ({"to": "2024-13-01T00:00:00Z"}, "validation_failed", "to"),
        ({"from": "2024-01-01T00:00:00"}, "validation_failed", "from"),
        ({"counterparty": "bob"}, "validation_failed", "counterparty"),
        ({"counterparty": "usr_\x00"}, "validation_failed", "counterparty"),
        ({"counterparty": "x" * 65}, "validation_failed", "counterparty"),
    ],
)
async def test_bad_parameters_are_422(
    client: httpx.AsyncClient, alice: SignedIn, params: Any, code: str, where: str
) -> None:
    r = await client.get("/v1/transfers", params=params, headers=alice.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == code
    assert where in [e.get("parameter") for e in problem["errors"]], problem


async def test_history_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/transfers")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
