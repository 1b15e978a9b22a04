"""The wallet over HTTP on real PostgreSQL: balances, statement, top-ups and withdrawals (from a
verified card or bank account, and to a verified bank account: the Payment Methods issue made
naming one part of every top-up and withdrawal)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from billfold import ledger
from billfold.platform.pagination import encode_cursor
from tests.conftest import SignedIn, fund, idem, sign_up
from tests.integration import payment_methods_support as methods
from tests.integration.transfer_support import balance

pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")

_funding: list[methods.Funding] = []


@pytest.fixture(autouse=True)
def _funding_methods(client: httpx.AsyncClient, app: Any) -> None:
    """Top-ups come from a verified card, withdrawals go to a verified bank account (made once
    per user on first use)."""
    if not _funding:
        _funding.append(methods.Funding(client, app))


async def card_of(who: SignedIn) -> str:
    return await _funding[0].card(who)


async def bank_of(who: SignedIn, currency: str = "USD") -> str:
    return await _funding[0].bank(who, currency)


async def wallet(client: httpx.AsyncClient, who: SignedIn, **params: str) -> dict[str, Any]:
    r = await client.get("/v1/wallet", params=params, headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def usd(client: httpx.AsyncClient, who: SignedIn) -> dict[str, Any] | None:
    for b in (await wallet(client, who))["balances"]:
        if b["currency"] == "USD":
            return b  # type: ignore[no-any-return]
    return None


async def entries(client: httpx.AsyncClient, who: SignedIn, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/wallet/entries", params=params, headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def topup(
    client: httpx.AsyncClient, who: SignedIn, amount: Any, currency: str = "USD"
) -> httpx.Response:
    return await methods.topup(client, who, await card_of(who), amount, currency)


async def withdraw(
    client: httpx.AsyncClient, who: SignedIn, amount: Any, currency: str = "USD"
) -> httpx.Response:
    return await methods.withdraw(client, who, await bank_of(who, currency), amount, currency)


async def method_for(path: str, who: SignedIn) -> str:
    return await (card_of(who) if path.endswith("topups") else bank_of(who))


async def outbox(app: Any, subject: str) -> list[Any]:
    async with app.state.resources.engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT type, subject, aggregate_id, data FROM platform.outbox WHERE subject = :s"
            ),
            {"s": subject},
        )
        return list(result.all())


async def funding_posted(app: Any, currency: str = "USD") -> int:
    return (await balance(app, ledger.SYSTEM, currency, kind="funding")).posted


async def postings_of(app: Any, who: SignedIn) -> int:
    async with app.state.resources.engine.connect() as conn:
        value = await conn.execute(
            text(
                "SELECT count(DISTINCT e.posting_id) FROM ledger.entries e "
                "JOIN ledger.accounts a ON a.id = e.account_id WHERE a.owner_id = :u"
            ),
            {"u": who.user["id"]},
        )
        return int(value.scalar_one())


async def pay_only(client: httpx.AsyncClient, who: SignedIn) -> dict[str, str]:
    """Headers with a token of the `pay` scope only (what a watch holds)."""
    r = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": who.email,
            "password": who.password,
            "scope": "pay",
        },
    )
    assert r.status_code == 200 and r.json()["scope"] == "pay", r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


# --- balances ---------------------------------------------------------------------------------


async def test_a_new_wallet_has_no_balances(client: httpx.AsyncClient, alice: SignedIn) -> None:
    assert await wallet(client, alice) == {"balances": []}
    assert await entries(client, alice) == {"data": [], "next_cursor": None}


async def test_balances_show_posted_held_and_available_per_currency(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    from billfold import ledger
    from billfold.platform.clock import utcnow
    from billfold.platform.db import unit_of_work
    from billfold.platform.money import Money

    await fund(app, alice.user["id"], 10_000)
    await fund(app, alice.user["id"], 2_000, "EUR")
    async with unit_of_work(app.state.resources.engine) as uow:
        await ledger.place_hold(
            await uow.connection(),
            alice.user["id"],
            Money(2_500, "USD"),
            reference="card-auth",
            expires_at=utcnow() + timedelta(hours=1),
        )
    assert await wallet(client, alice) == {
        "balances": [
            {"currency": "EUR", "available": 2_000, "posted": 2_000, "held": 0},
            {"currency": "USD", "available": 7_500, "posted": 10_000, "held": 2_500},
        ]
    }


async def test_the_wallet_needs_a_token_with_the_wallet_scope(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    assert (await client.get("/v1/wallet")).json()["code"] == "unauthorized"
    headers = await pay_only(client, alice)
    for method, path in (
        ("GET", "/v1/wallet"),
        ("GET", "/v1/wallet/entries"),
        ("POST", "/v1/wallet/topups"),
        ("POST", "/v1/wallet/withdrawals"),
    ):
        r = await client.request(
            method, path, json={"amount": 100, "currency": "USD"}, headers=idem(**headers)
        )
        assert r.status_code == 403, (path, r.text)
        assert r.json()["code"] == "insufficient_scope"
    assert await wallet(client, alice) == {"balances": []}


async def test_balance_as_of_a_past_instant_is_the_running_balance_then(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    assert (await topup(client, alice, 1_000)).status_code == 201
    second = await topup(client, alice, 250)
    assert second.status_code == 201
    third = await withdraw(client, alice, 100)
    assert third.status_code == 201

    at_second = second.json()["created_at"]
    past = await wallet(client, alice, as_of=at_second)
    assert past["balances"] == [{"currency": "USD", "posted": 1_250}]
    assert datetime.fromisoformat(past["as_of"]) == datetime.fromisoformat(at_second)
    # The same instant written with another offset is the same instant.
    shifted = datetime.fromisoformat(at_second).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert (await wallet(client, alice, as_of=shifted.isoformat()))["balances"] == past["balances"]
    assert (await wallet(client, alice, as_of=third.json()["created_at"]))["balances"] == [
        {"currency": "USD", "posted": 1_150}
    ]
    # Before the wallet existed: nothing.
    assert (await wallet(client, alice, as_of="2001-01-01T00:00:00Z")) == {
        "as_of": "2001-01-01T00:00:00Z",
        "balances": [],
    }


BAD_AS_OF = [
    ("2024-01-01T10:00:00", "offset"),  # naive: whose 10 o'clock?
    ("2024-01-01", "offset"),
    ("yesterday", "RFC 3339"),
    ("1700000000", "RFC 3339"),  # a Unix time is not an RFC 3339 date-time
    ("2024-01-01T10:00:00 01:00", "RFC 3339"),  # an unencoded '+' became a space
]


async def test_a_bad_as_of_is_refused_with_a_clear_code(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    for as_of, why in [*BAD_AS_OF, (future, "future")]:
        r = await client.get("/v1/wallet", params={"as_of": as_of}, headers=alice.headers)
        assert r.status_code == 422, (as_of, r.text)
        body = r.json()
        assert body["code"] == "invalid_as_of", as_of
        assert why in body["detail"], (as_of, body["detail"])
        assert body["errors"][0]["parameter"] == "as_of"


# --- top-ups and withdrawals ------------------------------------------------------------------


async def test_a_topup_credits_the_wallet_with_its_event_in_the_same_transaction(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    funding_before = await funding_posted(app)
    r = await topup(client, alice, 12_345)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("top_") and body["posting_id"].startswith("pst_")
    assert body["type"] == "topup" and body["rail"] == "card"
    assert body["payment_method_id"] == await card_of(alice)
    assert (body["amount"], body["currency"], body["status"]) == (12_345, "USD", "completed")
    assert body["balance"] == {"currency": "USD", "available": 12_345, "posted": 12_345, "held": 0}
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert await usd(client, alice) == body["balance"]
    assert await funding_posted(app) == funding_before - 12_345

    (event,) = await outbox(app, body["posting_id"])
    assert event.type == "billfold.ledger.wallet.topped_up"
    assert event.data["reference"] == body["id"]
    assert event.aggregate_id == alice.user["id"]
    assert event.data["user_id"] == alice.user["id"]
    assert (event.data["amount"], event.data["currency"]) == (12_345, "USD")
    assert event.data["balance"]["available"] == 12_345

    (funded,) = await outbox(app, body["id"])
    assert funded.type == "billfold.payment_methods.topup.completed"
    assert funded.data["posting_id"] == body["posting_id"]

    (line,) = (await entries(client, alice))["data"]
    assert (line["posting_id"], line["reference"]) == (body["posting_id"], body["id"])
    assert (line["kind"], line["direction"], line["amount"], line["balance_after"]) == (
        "wallet_topup",
        "credit",
        12_345,
        12_345,
    )
    assert line["created_at"] == body["created_at"]


async def test_a_withdrawal_debits_the_available_balance(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    funding_before = await funding_posted(app)
    r = await withdraw(client, alice, 1_200)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["type"] == "withdrawal" and body["status"] == "completed"
    assert body["rail"] == "ach" and body["payment_method_id"] == await bank_of(alice)
    assert body["balance"] == {"currency": "USD", "available": 3_800, "posted": 3_800, "held": 0}
    assert await funding_posted(app) == funding_before + 1_200
    (event,) = await outbox(app, body["posting_id"])
    assert event.type == "billfold.ledger.wallet.withdrawn"
    (funded,) = await outbox(app, body["id"])
    assert funded.type == "billfold.payment_methods.withdrawal.completed"
    newest = (await entries(client, alice))["data"][0]
    assert (newest["kind"], newest["direction"], newest["amount"], newest["balance_after"]) == (
        "wallet_withdrawal",
        "debit",
        -1_200,
        3_800,
    )


async def test_an_overdrawing_withdrawal_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    from billfold import ledger
    from billfold.platform.clock import utcnow
    from billfold.platform.db import unit_of_work
    from billfold.platform.money import Money

    await fund(app, alice.user["id"], 1_000)
    async with unit_of_work(app.state.resources.engine) as uow:
        await ledger.place_hold(
            await uow.connection(),
            alice.user["id"],
            Money(300, "USD"),
            reference="card-auth",
            expires_at=utcnow() + timedelta(hours=1),
        )
    before = await usd(client, alice)
    funding_before = await funding_posted(app)
    postings_before = await postings_of(app, alice)
    # 800 > 700 available (1,000 posted, 300 held), although posted would cover it.
    r = await withdraw(client, alice, 800)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "insufficient_funds"
    assert await usd(client, alice) == before
    assert await funding_posted(app) == funding_before
    assert await postings_of(app, alice) == postings_before
    # A wallet that never existed is not opened by a refused withdrawal either.
    newcomer = await sign_up(client)
    assert (await withdraw(client, newcomer, 1)).json()["code"] == "insufficient_funds"
    assert await wallet(client, newcomer) == {"balances": []}
    assert (await withdraw(client, alice, 700)).status_code == 201


INVALID_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"amount": "12.34", "currency": "USD"}, "validation_failed"),
    ({"amount": 12.34, "currency": "USD"}, "validation_failed"),
    ({"amount": 12.0, "currency": "USD"}, "validation_failed"),
    ({"amount": "100", "currency": "USD"}, "validation_failed"),
    ({"amount": True, "currency": "USD"}, "validation_failed"),
    ({"amount": None, "currency": "USD"}, "validation_failed"),
    ({"amount": 100}, "validation_failed"),
    ({"amount": 100, "currency": "usd"}, "validation_failed"),
    ({"amount": 100, "currency": "XYZ"}, "validation_failed"),
    ({"amount": 100, "currency": "USD", "extra": 1}, "validation_failed"),
    ({"amount": 0, "currency": "USD"}, "invalid_amount"),
    ({"amount": -500, "currency": "USD"}, "invalid_amount"),
    ({"amount": 1_000_001, "currency": "USD"}, "amount_too_large"),
    ({"amount": 2**70, "currency": "USD"}, "amount_too_large"),
    ({"amount": 100, "currency": "PTS"}, "currency_not_supported"),
]


@pytest.mark.parametrize("path", ["/v1/wallet/topups", "/v1/wallet/withdrawals"])
async def test_invalid_amounts_are_refused_and_change_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, path: str
) -> None:
    await fund(app, alice.user["id"], 5_000_000)
    method_id = await method_for(path, alice)
    for body, code in INVALID_BODIES:
        body = {"payment_method_id": method_id, **body}
        r = await client.post(path, json=body, headers=idem(**alice.headers))
        assert r.status_code == 422, (body, r.text)
        assert r.json()["code"] == code, (body, r.text)
        if code == "amount_too_large":
            assert r.json()["maximum"] == 1_000_000
    assert await usd(client, alice) == {
        "currency": "USD",
        "available": 5_000_000,
        "posted": 5_000_000,
        "held": 0,
    }
    assert await postings_of(app, alice) == 1


async def test_the_largest_allowed_amount_is_accepted(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    assert (await topup(client, alice, 1_000_000)).status_code == 201
    assert (await withdraw(client, alice, 1_000_000)).status_code == 201
    assert (await usd(client, alice)) == {"currency": "USD", "available": 0, "posted": 0, "held": 0}


@pytest.mark.parametrize("path", ["/v1/wallet/topups", "/v1/wallet/withdrawals"])
async def test_moving_money_needs_an_idempotency_key(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, path: str
) -> None:
    await fund(app, alice.user["id"], 1_000)
    body = {"payment_method_id": await method_for(path, alice), "amount": 100, "currency": "USD"}
    r = await client.post(path, json=body, headers=alice.headers)
    assert r.status_code == 428, r.text
    assert r.json()["code"] == "idempotency_key_required"
    assert (await usd(client, alice))["posted"] == 1_000  # type: ignore[index]


@pytest.mark.parametrize("path", ["/v1/wallet/topups", "/v1/wallet/withdrawals"])
async def test_a_retry_with_the_same_key_replays_and_moves_money_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, path: str
) -> None:
    await fund(app, alice.user["id"], 1_000)
    headers = idem(**alice.headers)
    method_id = await method_for(path, alice)
    body = {"payment_method_id": method_id, "amount": 300, "currency": "USD"}
    first = await client.post(path, json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = await client.post(path, json=body, headers=headers)
    assert again.status_code == 201
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    expected = 1_300 if path.endswith("topups") else 700
    assert (await usd(client, alice))["posted"] == expected  # type: ignore[index]
    assert len(await outbox(app, first.json()["id"])) == 1
    assert len(await outbox(app, first.json()["posting_id"])) == 1
    # The same key for another amount is a mistake, not a new request.
    other = await client.post(path, json={**body, "amount": 301}, headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reuse"
    assert (await usd(client, alice))["posted"] == expected  # type: ignore[index]
    assert await postings_of(app, alice) == 2


@pytest.mark.parametrize("path", ["/v1/wallet/topups", "/v1/wallet/withdrawals"])
async def test_concurrent_duplicates_move_money_exactly_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, path: str
) -> None:
    await fund(app, alice.user["id"], 1_000)
    headers = idem(**alice.headers)
    body = {"payment_method_id": await method_for(path, alice), "amount": 400, "currency": "USD"}
    answers = await asyncio.gather(
        *(client.post(path, json=body, headers=headers) for _ in range(8))
    )
    created = [r for r in answers if r.status_code == 201]
    assert created, [r.text for r in answers]
    assert len({r.json()["id"] for r in created}) == 1
    assert len([r for r in created if r.headers.get("idempotent-replayed") != "true"]) == 1
    for r in answers:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["code"] == "idempotency_request_in_progress"
    expected = 1_400 if path.endswith("topups") else 600
    assert (await usd(client, alice))["posted"] == expected  # type: ignore[index]
    assert await postings_of(app, alice) == 2


async def test_concurrent_withdrawals_never_overdraw(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    answers = await asyncio.gather(*(withdraw(client, alice, 300) for _ in range(6)))
    assert sorted(r.status_code for r in answers) == [201, 201, 201, 422, 422, 422]
    assert all(r.json()["code"] == "insufficient_funds" for r in answers if r.status_code == 422)
    assert await usd(client, alice) == {
        "currency": "USD",
        "available": 100,
        "posted": 100,
        "held": 0,
    }


# --- statement --------------------------------------------------------------------------------


async def test_the_statement_pages_newest_first_with_running_balances(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    for amount in (100, 200, 300, 400, 500):
        assert (await topup(client, alice, amount)).status_code == 201
    assert (await withdraw(client, alice, 50)).status_code == 201
    assert (await topup(client, alice, 70, "EUR")).status_code == 201

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "currency": "USD"}
        if cursor:
            params["cursor"] = cursor
        page = await entries(client, alice, **params)
        assert len(page["data"]) <= 2
        seen += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [(e["amount"], e["balance_after"]) for e in seen] == [
        (-50, 1_450),
        (500, 1_500),
        (400, 1_000),
        (300, 600),
        (200, 300),
        (100, 100),
    ]
    assert [e["direction"] for e in seen] == ["debit"] + ["credit"] * 5
    assert {e["currency"] for e in seen} == {"USD"}
    assert set(seen[0]) == {
        "posting_id",
        "kind",
        "reference",
        "memo",
        "direction",
        "amount",
        "currency",
        "balance_after",
        "created_at",
    }
    everything = await entries(client, alice, limit=100)
    assert [e["currency"] for e in everything["data"]][:1] == ["EUR"]
    assert len(everything["data"]) == 7 and everything["next_cursor"] is None


async def test_the_statement_shows_only_your_own_entries(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    alices = await entries(client, alice)
    assert len(alices["data"]) == 1
    assert await entries(client, bob) == {"data": [], "next_cursor": None}
    # Another user's cursor only narrows your own list; it never shows their entries.
    for _ in range(3):
        await fund(app, bob.user["id"], 10)
    page = await entries(client, bob, limit=1)
    bob_cursor = page["next_cursor"]
    assert bob_cursor is not None
    assert (await entries(client, alice, cursor=bob_cursor))["data"] == alices["data"]


BAD_CURSORS = [
    "not-base64!",
    encode_cursor("abc"),
    encode_cursor("-5"),
    encode_cursor("0"),
    encode_cursor("9" * 30),
    encode_cursor("\u0661\u0662"),  # Arabic-Indic digits: isdigit() but not a seq
]


async def test_bad_statement_parameters_are_refused(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    for cursor in BAD_CURSORS:
        r = await client.get("/v1/wallet/entries", params={"cursor": cursor}, headers=alice.headers)
        assert r.status_code == 422, (cursor, r.text)
        assert r.json()["code"] == "invalid_cursor"
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"currency": "XYZ"}):
        r = await client.get("/v1/wallet/entries", params=params, headers=alice.headers)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["code"] == "validation_failed"
