"""Transaction history: list, filters, cursor, typo-tolerant search, one transaction, CSV export,
monthly summary. Rows are written as the payment flow stores them (`history_support`); the
flow itself has its own tests, and the receipt tests run it end to end."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import text

from billfold.platform.ids import new_id
from billfold.platform.pagination import encode_cursor
from tests.conftest import SignedIn, sign_up
from tests.integration.history_support import add_transaction

LIST = "/v1/transactions"


async def _all_pages(
    client: httpx.AsyncClient, who: SignedIn, params: dict[str, Any]
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        r = await client.get(
            LIST, params={**params, **({"cursor": cursor} if cursor else {})}, headers=who.headers
        )
        assert r.status_code == 200, r.text
        items += r.json()["data"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("paging did not end")


async def _ids(client: httpx.AsyncClient, who: SignedIn, **params: Any) -> list[str]:
    return [t["id"] for t in await _all_pages(client, who, params)]


async def test_list_is_newest_first_and_only_yours(app: Any, client: httpx.AsyncClient) -> None:
    me, other = await sign_up(client), await sign_up(client)
    mine = [await add_transaction(app, me.user["id"], merchant=f"Shop {i}") for i in range(3)]
    theirs = await add_transaction(app, other.user["id"], merchant="Shop 0")
    r = await client.get(LIST, headers=me.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["id"] for t in body["data"]] == mine[::-1]
    assert body["next_cursor"] is None
    first = body["data"][-1]
    assert first["merchant"] == {
        "id": "m-shop-0",
        "name": "Shop 0",
        "mcc": "5411",
        "category": "groceries",
        "category_label": "Groceries",
        "country": "US",
        "city": "Seattle",
    }
    assert first["card"] == {"brand": "visa", "last4": "4242"}
    assert first["amount"] == 1250 and first["currency"] == "USD"
    assert first["captured_amount"] == 1250 and first["score"] is None
    assert theirs not in await _ids(client, me)


async def test_cursor_paging_is_stable_under_inserts(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    made = [await add_transaction(app, me.user["id"], merchant=f"M{i}") for i in range(7)]
    r = await client.get(LIST, params={"limit": 3}, headers=me.headers)
    page1 = r.json()
    assert [t["id"] for t in page1["data"]] == made[::-1][:3]
    # Payments made while the user pages: they belong on a first page, never inside later ones.
    newer = [await add_transaction(app, me.user["id"], merchant=f"New{i}") for i in range(2)]
    rest: list[str] = []
    cursor = page1["next_cursor"]
    while cursor:
        r = await client.get(LIST, params={"limit": 3, "cursor": cursor}, headers=me.headers)
        assert r.status_code == 200, r.text
        rest += [t["id"] for t in r.json()["data"]]
        cursor = r.json()["next_cursor"]
    assert rest == made[::-1][3:]
    assert set(newer).isdisjoint(rest)
    assert (await _ids(client, me))[:2] == newer[::-1]


async def test_bad_cursor_and_parameters_are_422(client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    for params in (
        {"cursor": "not-a-cursor!"},
        {"cursor": "dHhuX2p1bms"},  # "txn_junk"
        {"limit": 0},
        {"limit": 101},
        {"amount_min": -1},
        {"amount_max": "12.5"},
        {"status": "paid"},
        {"from": "2026-01-01T00:00:00"},  # no offset: ambiguous
        {"currency": "usd"},
        {"payment_method_id": "pm_x"},
        {"q": "x" * 201},
        {"order": "oldest"},
    ):
        r = await client.get(LIST, params=params, headers=me.headers)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] in ("validation_failed", "invalid_cursor"), params


async def test_filters(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    uid = me.user["id"]
    t0 = datetime(2026, 3, 10, 12, tzinfo=UTC)
    grocery = await add_transaction(app, uid, merchant="Fresh Market", mcc="5411", created_at=t0)
    dinner = await add_transaction(
        app,
        uid,
        merchant="Luigi's",
        mcc="5812",
        amount=8000,
        created_at=t0 + timedelta(days=1),
    )
    wallet = await add_transaction(
        app, uid, merchant="Kiosk", mcc="5994", amount=300, card=None, created_at=t0
    )
    declined = await add_transaction(
        app,
        uid,
        merchant="Fresh Market",
        status="declined",
        decline_code="insufficient_funds",
        created_at=t0 + timedelta(days=2),
    )
    euros = await add_transaction(app, uid, merchant="Bäckerei", currency="EUR", created_at=t0)

    assert set(await _ids(client, me, category="restaurants")) == {dinner}
    (refused,) = await _all_pages(client, me, {"status": "declined"})
    assert refused["id"] == declined and refused["decline_code"] == "insufficient_funds"
    assert refused["decline_reason"] and "money" in refused["decline_reason"]
    assert set(await _ids(client, me, merchant="fresh market")) == {grocery, declined}
    assert set(await _ids(client, me, merchant_id="m-kiosk")) == {wallet}
    assert set(await _ids(client, me, amount_min=1000, amount_max=8000)) == {
        grocery,
        dinner,
        declined,
        euros,
    }
    assert set(await _ids(client, me, amount_max=300)) == {wallet}
    assert set(await _ids(client, me, currency="EUR")) == {euros}
    assert set(await _ids(client, me, source="wallet")) == {wallet}
    day2 = (t0 + timedelta(days=1)).replace(hour=0)
    assert set(
        await _ids(
            client, me, **{"from": day2.isoformat(), "to": (day2 + timedelta(days=1)).isoformat()}
        )
    ) == {dinner}
    # `to` is exclusive and offsets are honoured: 14:00+02:00 is 12:00Z, exactly t0.
    assert grocery not in await _ids(client, me, to="2026-03-10T14:00:00+02:00")
    assert grocery in await _ids(client, me, to="2026-03-10T14:00:01+02:00")
    rows = await _all_pages(client, me, {"status": "captured", "category": "groceries"})
    method = next(t["payment_method_id"] for t in rows if t["id"] == grocery)
    assert set(await _ids(client, me, payment_method_id=method)) == {grocery}
    # Filters combine with AND.
    assert await _ids(client, me, category="restaurants", currency="EUR") == []


async def test_typo_tolerant_search(app: Any, client: httpx.AsyncClient) -> None:
    me, other = await sign_up(client), await sign_up(client)
    uid = me.user["id"]
    starbucks = await add_transaction(app, uid, merchant="Starbucks", mcc="5814")
    corner = await add_transaction(app, uid, merchant="Coffee Corner", mcc="5814")
    cafe = await add_transaction(app, uid, merchant="Café Zürich", mcc="5814")
    steam = await add_transaction(app, uid, merchant="Steam Games", mcc="5816")
    noted = await add_transaction(
        app, uid, merchant="ACME Corp", note="office lunch", description="Order 4711"
    )
    not_mine = await add_transaction(app, other.user["id"], merchant="Starbucks", mcc="5814")

    async def search(q: str, **params: Any) -> list[dict[str, Any]]:
        return await _all_pages(client, me, {"q": q, **params})

    hits = await search("starbuks")
    assert [h["id"] for h in hits] == [starbucks]  # one letter missing; others' never
    assert hits[0]["score"] > 0
    assert [h["id"] for h in await search("STARBUCKS")] == [starbucks]
    assert [h["id"] for h in await search("strbucks")] == [starbucks]
    assert [h["id"] for h in await search("coffe")] == [corner]  # a prefix
    assert [h["id"] for h in await search("cornr")] == [corner]
    assert [h["id"] for h in await search("cafe zurich")] == [cafe]  # accents folded
    assert [h["id"] for h in await search("Café")] == [cafe]
    assert [h["id"] for h in await search("\uff23\uff41\uff46\uff45")] == [cafe]  # full width
    assert [h["id"] for h in await search("lunch")] == [noted]  # the note
    assert [h["id"] for h in await search("4711")] == [noted]  # the description
    assert await search("tea") == []  # not a typo of "steam"
    assert await search("zzzz") == []
    # Query syntax is only text: tsquery operators and SQL quotes are words or nothing.
    for q in ("!&|:*()", "' OR 1=1 --", "star:* | x", "\\", "%_"):
        r = await client.get(LIST, params={"q": q}, headers=me.headers)
        assert r.status_code == 200, (q, r.text)
        assert not_mine not in [t["id"] for t in r.json()["data"]]
    assert [h["id"] for h in await search("steam")] == [steam]
    # Search combines with the filters.
    assert await search("starbucks", category="groceries") == []
    assert not_mine not in [h["id"] for h in await search("starbucks")]


async def test_search_ranks_and_pages(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    uid = me.user["id"]
    exact = await add_transaction(app, uid, merchant="Starbucks", mcc="5814")
    fuzzy = await add_transaction(app, uid, merchant="Starbuks Cafe", mcc="5814")
    many = [await add_transaction(app, uid, merchant="Starbucks", mcc="5814") for _ in range(4)]
    hits = await _all_pages(client, me, {"q": "starbucks", "limit": 2})
    ids = [h["id"] for h in hits]
    assert sorted(ids) == sorted([exact, fuzzy, *many])  # every hit once across pages
    assert ids[-1] == fuzzy  # the exact name ranks above the near one
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    newest = await _ids(client, me, q="starbucks", order="newest", limit=2)
    assert newest == [*many[::-1], fuzzy, exact]
    # A relevance cursor is not a newest-first cursor.
    r = await client.get(LIST, params={"q": "starbucks", "limit": 2}, headers=me.headers)
    cursor = r.json()["next_cursor"]
    r = await client.get(
        LIST,
        params={"q": "starbucks", "order": "newest", "cursor": cursor},
        headers=me.headers,
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor"
    # Crafted relevance cursors are refused, never a database error.
    for score in ("NaN", "Infinity", "1e999999999", "-1.000000", "0.5"):
        crafted = encode_cursor(f"{score}|{exact}")
        r = await client.get(LIST, params={"q": "starbucks", "cursor": crafted}, headers=me.headers)
        assert r.status_code == 422 and r.json()["code"] == "invalid_cursor", score


async def test_one_transaction_owner_only(app: Any, client: httpx.AsyncClient) -> None:
    me, other = await sign_up(client), await sign_up(client)
    txn = await add_transaction(app, me.user["id"], amount=5000, refunded=1500)
    r = await client.get(f"{LIST}/{txn}", headers=me.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == txn and body["refunded_amount"] == 1500
    assert [c["amount"] for c in body["captures"]] == [5000]
    assert [(x["amount"], x["status"]) for x in body["refunds"]] == [(1500, "succeeded")]
    for who, path in (
        (other, f"{LIST}/{txn}"),
        (me, f"{LIST}/txn_00000000000000000000000000"),
        (me, f"{LIST}/junk"),
        (me, f"{LIST}/{txn.upper()}"),
        (other, f"{LIST}/{txn}/receipt"),
    ):
        r = await client.get(path, headers=who.headers)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["code"] == "transaction_not_found"


async def test_history_needs_a_token(client: httpx.AsyncClient) -> None:
    for path in (LIST, f"{LIST}/export.csv", f"{LIST}/summary"):
        assert (await client.get(path)).status_code == 401


# --- CSV ---------------------------------------------------------------------------------------


async def _csv(client: httpx.AsyncClient, who: SignedIn, **params: Any) -> list[dict[str, str]]:
    r = await client.get(f"{LIST}/export.csv", params=params, headers=who.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    return list(csv.DictReader(io.StringIO(r.text)))


async def test_csv_export(app: Any, client: httpx.AsyncClient) -> None:
    me, other = await sign_up(client), await sign_up(client)
    uid = me.user["id"]
    usd = await add_transaction(app, uid, merchant="Starbucks", amount=1234, refunded=34)
    yen = await add_transaction(app, uid, merchant="Lawson", amount=1234, currency="JPY")
    dinar = await add_transaction(app, uid, merchant="Souq", amount=1234, currency="BHD")
    wallet = await add_transaction(app, uid, merchant="Kiosk", amount=5, card=None)
    await add_transaction(app, other.user["id"], merchant="Starbucks")
    rows = await _csv(client, me)
    assert [r["id"] for r in rows] == [wallet, dinar, yen, usd]
    by_id = {r["id"]: r for r in rows}
    assert by_id[usd]["amount"] == "12.34" and by_id[usd]["refunded"] == "0.34"
    assert by_id[usd]["currency"] == "USD" and by_id[usd]["payment"] == "visa ending 4242"
    assert by_id[yen]["amount"] == "1234"
    assert by_id[dinar]["amount"] == "1.234"
    assert by_id[wallet]["amount"] == "0.05" and by_id[wallet]["payment"] == "wallet balance"
    assert by_id[usd]["created_at"].endswith("Z")
    # The same filters and search as the list.
    assert [r["id"] for r in await _csv(client, me, q="starbuks")] == [usd]
    assert [r["id"] for r in await _csv(client, me, currency="JPY")] == [yen]


async def test_csv_cells_never_run_as_formulas(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    evil = [
        '=HYPERLINK("http://x","y")',
        "+1+1",
        "-2+3",
        "@SUM(A1)",
        "\tTab",
        "%0A",
        "|calc",
    ]
    for text_ in evil:
        await add_transaction(app, me.user["id"], merchant=text_, note=text_, description=text_)
    rows = await _csv(client, me)
    assert len(rows) == len(evil)
    for row in rows:
        for column in ("merchant", "note", "description"):
            assert row[column].startswith("'"), row[column]
            assert row[column][1:] in evil
    # A plain name is left alone.
    await add_transaction(app, me.user["id"], merchant='Plain, "quoted" name')
    assert (await _csv(client, me))[0]["merchant"] == 'Plain, "quoted" name'


async def test_csv_streams_many_rows(app: Any, client: httpx.AsyncClient) -> None:
    """More rows than one export batch (500): every row once, in order."""

    me = await sign_up(client)
    first = await add_transaction(app, me.user["id"], merchant="Seed")
    copies = [new_id("txn") for _ in range(1100)]  # later ids: newer than the seed
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO transactions.transactions (
                    id, user_id, source, payment_method_id, status, amount, currency,
                    authorized_amount, captured_amount, refunded_amount, merchant_id,
                    merchant_name, mcc, category, channel, idempotency_key, request_hash,
                    created_at, updated_at)
                SELECT c.id, user_id, source, payment_method_id, status,
                       amount, currency, authorized_amount, captured_amount, refunded_amount,
                       merchant_id, merchant_name || ' ' || c.n, mcc, category, channel,
                       idempotency_key || c.n, request_hash, created_at, updated_at
                FROM transactions.transactions t,
                     unnest(CAST(:ids AS text[])) WITH ORDINALITY AS c(id, n)
                WHERE t.id = :id
                """
            ),
            {"id": first, "ids": copies},
        )
    rows = await _csv(client, me)
    assert len(rows) == 1101
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 1101


# --- monthly summary ---------------------------------------------------------------------------


async def test_monthly_summary_by_category_currency_and_time_zone(
    app: Any, client: httpx.AsyncClient
) -> None:
    me, other = await sign_up(client), await sign_up(client)
    r = await client.patch("/v1/me", json={"timezone": "Europe/Berlin"}, headers=me.headers)
    assert r.status_code == 200, r.text
    uid = me.user["id"]
    # 23:30 UTC on 31 March is 01:30 on 1 April in Berlin (CEST, +02:00): April spending.
    late = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)
    march = datetime(2026, 3, 15, 12, tzinfo=UTC)
    await add_transaction(app, uid, merchant="Rewe", mcc="5411", amount=4000, created_at=march)
    await add_transaction(app, uid, merchant="Edeka", mcc="5411", amount=1000, created_at=march)
    await add_transaction(
        app, uid, merchant="Pizza", mcc="5812", amount=3000, refunded=500, created_at=march
    )
    await add_transaction(app, uid, merchant="Bar", mcc="5813", amount=700, created_at=late)
    await add_transaction(
        app, uid, merchant="Yen", mcc="5411", amount=900, currency="JPY", created_at=march
    )
    # Nothing spent: declined, only authorized, fully refunded.
    await add_transaction(app, uid, status="declined", amount=9999, created_at=march)
    await add_transaction(app, uid, status="authorized", amount=9999, created_at=march)
    await add_transaction(app, uid, status="refunded", amount=9999, refunded=9999, created_at=march)
    # A card refund still waiting for the network is not spending given back yet.
    await add_transaction(
        app,
        uid,
        merchant="Pending",
        mcc="5411",
        amount=600,
        refunded=600,
        refund_status="pending",
        created_at=march,
    )
    await add_transaction(app, other.user["id"], amount=12345, created_at=march)

    r = await client.get(f"{LIST}/summary", params={"month": "2026-03"}, headers=me.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["month"] == "2026-03" and body["time_zone"] == "Europe/Berlin"
    assert body["start"] == "2026-02-28T23:00:00Z"  # CET, +01:00
    assert body["end"] == "2026-03-31T22:00:00Z"  # CEST, +02:00
    assert body["currencies"] == [
        {
            "currency": "JPY",
            "total": 900,
            "categories": [
                {"category": "groceries", "label": "Groceries", "amount": 900, "count": 1}
            ],
        },
        {
            "currency": "USD",
            "total": 8100,
            "categories": [
                {"category": "groceries", "label": "Groceries", "amount": 5600, "count": 3},
                {"category": "restaurants", "label": "Restaurants", "amount": 2500, "count": 1},
            ],
        },
    ]
    april = (await client.get(f"{LIST}/summary?month=2026-04", headers=me.headers)).json()
    assert april["currencies"] == [
        {
            "currency": "USD",
            "total": 700,
            "categories": [
                {"category": "restaurants", "label": "Restaurants", "amount": 700, "count": 1}
            ],
        }
    ]
    current = (await client.get(f"{LIST}/summary", headers=me.headers)).json()
    assert current["month"] == datetime.now(ZoneInfo("Europe/Berlin")).strftime("%Y-%m")
    for bad in ("2026-13", "2026-3", "March", "0000-01"):
        r = await client.get(f"{LIST}/summary", params={"month": bad}, headers=me.headers)
        assert r.status_code == 422, (bad, r.text)


async def test_every_word_of_a_search_must_match(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    uid = me.user["id"]
    coffee = await add_transaction(app, uid, merchant="Coffee Corner", mcc="5814")
    shop = await add_transaction(app, uid, merchant="Corner Shop")
    beans = await add_transaction(app, uid, merchant="Coffee Beans Online")
    assert set(await _ids(client, me, q="corner")) == {coffee, shop}
    assert set(await _ids(client, me, q="coffe")) == {coffee, beans}
    assert await _ids(client, me, q="cornr coffe") == [coffee]  # each word, typos and all
    assert await _ids(client, me, q="cornr shop") == [shop]
    assert await _ids(client, me, q="coffee shop") == []


async def test_csv_export_leaves_the_edge_in_chunks(app: Any, client: httpx.AsyncClient) -> None:
    """The export is streamed: the edge passes each chunk on as it comes (it buffers a body
    only while a request's transaction is open, and the export has none)."""
    me = await sign_up(client)
    await add_transaction(app, me.user["id"], merchant="Chunky")
    token = me.tokens["access_token"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/transactions/export.csv",
        "raw_path": b"/v1/transactions/export.csv",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    requested, done = False, asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # the client stays connected until the body is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await asyncio.wait_for(app(scope, receive, send), 30)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    chunks = [m for m in sent[1:] if m.get("body")]
    assert len(chunks) >= 2  # the header row, then the rows, as separate messages
    assert chunks[0]["body"].startswith(b"id,created_at,") and chunks[0]["more_body"] is True
    assert b"Chunky" in chunks[1]["body"]


async def test_the_app_searches_through_its_search_index(
    app: Any, client: httpx.AsyncClient
) -> None:
    """Routes ask `app.state.search_index` (another adapter plugs in there); here the same
    PostgreSQL index with a stricter typo threshold: one letter off no longer finds the name."""
    from billfold.transactions.search import PostgresSearchIndex

    me = await sign_up(client)
    starbucks = await add_transaction(app, me.user["id"], merchant="Starbucks")
    assert await _ids(client, me, q="starbuks") == [starbucks]
    app.state.search_index = PostgresSearchIndex(threshold=0.9)
    try:
        assert await _ids(client, me, q="starbuks") == []
        assert await _ids(client, me, q="starbucks") == [starbucks]
    finally:
        del app.state.search_index
    assert await _ids(client, me, q="starbuks") == [starbucks]
