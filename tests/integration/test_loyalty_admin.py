"""Earn rules by administrators: list, add (base or bonus), change; a new rule applies to the
next capture; users cannot touch them; hostile bodies are problems that change nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import SignedIn, fund
from tests.integration.test_loyalty import Points, captured_wallet_payment, loyalty_account, shop

RULES = "/v1/admin/loyalty/earn-rules"


def rule_id() -> str:
    return f"adm-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
async def _remove_added_rules(app: Any) -> AsyncIterator[None]:
    """The session database is shared: rules a test added (active or not) go with it."""
    yield
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(text("DELETE FROM loyalty.earn_rules WHERE id LIKE 'adm-%'"))


async def rules(client: httpx.AsyncClient, admin: SignedIn) -> dict[str, dict[str, Any]]:
    r = await client.get(RULES, headers=admin.headers)
    assert r.status_code == 200, r.text
    return {rule["id"]: rule for rule in r.json()}


async def test_an_added_bonus_applies_to_the_next_capture_and_can_be_switched_off(
    client: httpx.AsyncClient, app: Any, admin: SignedIn, alice: SignedIn
) -> None:
    points = Points(app)
    merchant_id = f"mch_{uuid.uuid4().hex[:12]}"
    new = rule_id()
    body = {
        "id": new,
        "name": "Five times at the test shop",
        "kind": "bonus",
        "merchant_id": merchant_id,
        "multiplier": 5,
        "cap_per_transaction": 1_000,
        "priority": 500,
    }
    r = await client.post(RULES, json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    assert r.json()["multiplier"] == 5.0 and r.json()["active"] is True
    assert (await client.post(RULES, json=body, headers=admin.headers)).status_code == 409
    assert new in await rules(client, admin)

    await fund(app, alice.user["id"], 100_000)
    await points.deliver(await captured_wallet_payment(client, alice, 2_000, shop(id=merchant_id)))
    assert (await loyalty_account(client, alice))["balance"] == 100  # 20 x 5

    r = await client.patch(f"{RULES}/{new}", json={"active": False}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["active"] is False, r.text
    await points.deliver(await captured_wallet_payment(client, alice, 2_000, shop(id=merchant_id)))
    assert (await loyalty_account(client, alice))["balance"] == 120  # base only


async def test_one_active_base_rate_per_currency(
    client: httpx.AsyncClient, admin: SignedIn
) -> None:
    base = {"id": rule_id(), "name": "2 per dollar", "kind": "base", "currency": "USD"}
    r = await client.post(RULES, json={**base, "points_per_unit": 2}, headers=admin.headers)
    assert r.status_code == 409 and r.json()["code"] == "earn_rule_conflict", r.text
    r = await client.post(
        RULES, json={**base, "points_per_unit": 2, "active": False}, headers=admin.headers
    )
    assert r.status_code == 201, r.text
    r = await client.patch(f"{RULES}/{base['id']}", json={"active": True}, headers=admin.headers)
    assert r.status_code == 409 and r.json()["code"] == "earn_rule_conflict", r.text
    assert (await rules(client, admin))[base["id"]]["active"] is False
    assert (await rules(client, admin))["base-usd"]["active"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"id": "Bad Id", "name": "x", "kind": "bonus", "multiplier": 2},
        {"id": "ok-id", "name": "x", "kind": "bonus"},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 0.5},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": "2"},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 2, "points_per_unit": 1},
        {"id": "ok-id", "name": "x", "kind": "base", "currency": "USD"},
        {"id": "ok-id", "name": "x", "kind": "base", "currency": "PTS", "points_per_unit": 1},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 2, "mcc": "58"},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 2, "channel": "a\u0000"},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 2, "cap_per_month": -1},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 2, "extra": 1},
        {"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 1.0005},
        {"id": "ok-id", "name": "", "kind": "bonus", "multiplier": 2},
    ],
)
async def test_hostile_rules_are_problems_that_add_nothing(
    client: httpx.AsyncClient, admin: SignedIn, body: dict[str, Any]
) -> None:
    before = await rules(client, admin)
    r = await client.post(RULES, json=body, headers=admin.headers)
    assert r.status_code == 422, r.text
    # NaN and infinities are not numbers of JSON either.
    raw = b'{"id": "ok-id", "name": "x", "kind": "bonus", "multiplier": 1e400}'
    r2 = await client.post(
        RULES, content=raw, headers={**admin.headers, "Content-Type": "application/json"}
    )
    assert r2.status_code == 422, r2.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert await rules(client, admin) == before


async def test_rules_are_for_administrators_only(
    client: httpx.AsyncClient, admin: SignedIn, alice: SignedIn
) -> None:
    body = {"id": rule_id(), "name": "mine", "kind": "bonus", "multiplier": 10}
    assert (await client.get(RULES, headers=alice.headers)).status_code == 403
    assert (await client.post(RULES, json=body, headers=alice.headers)).status_code == 403
    r = await client.patch(f"{RULES}/base-usd", json={"active": False}, headers=alice.headers)
    assert r.status_code == 403
    assert (await client.get(RULES)).status_code == 401
    r = await client.patch(f"{RULES}/no-such-rule", json={"active": False}, headers=admin.headers)
    assert r.status_code == 404 and r.json()["code"] == "earn_rule_not_found"
    r = await client.patch(f"{RULES}/base-usd", json={"multiplier": 3}, headers=admin.headers)
    assert r.status_code == 422
    assert (await rules(client, admin))["base-usd"]["multiplier"] is None
