"""The demo users get a verified card and a verified bank account, once, through the same vault,
network and micro-deposit path as anyone."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from billfold.demo import DEMO_CARDS, seed_demo
from billfold.users.seed import DEMO_PASSWORD
from tests.integration.transfer_support import sql

pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")


async def test_demo_users_have_a_verified_card_and_bank_account(
    client: httpx.AsyncClient, app: Any
) -> None:
    engine = app.state.resources.engine
    first = await seed_demo(engine, app.state.users)
    again = await seed_demo(engine, app.state.users)  # idempotent: nothing added twice
    assert [created for _, _, created in again] == [False, False, False]
    assert [created for _, _, created in first] == [True, True, True]
    for demo, user_id, created in first:
        if not created or demo.role == "admin":
            continue
        t = await client.post(
            "/v1/auth/token",
            data={"grant_type": "password", "username": demo.email, "password": DEMO_PASSWORD},
        )
        assert t.status_code == 200, t.text
        headers = {"Authorization": f"Bearer {t.json()['access_token']}"}
        listed = (await client.get("/v1/payment-methods", headers=headers)).json()["data"]
        kinds = sorted((m["type"], m["status"]) for m in listed)
        assert kinds == [("bank_account", "verified"), ("card", "verified")], listed
        (card,) = [m for m in listed if m["type"] == "card"]
        assert card["card"]["last4"] == DEMO_CARDS[demo.handle][-4:]
        assert card["is_default"] is True and card["card"]["token_id"]
        rows = await sql(
            app, "SELECT count(*) AS n FROM payment_methods.methods WHERE user_id = :u", u=user_id
        )
        assert rows[0].n == 2
