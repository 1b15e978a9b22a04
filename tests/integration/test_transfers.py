"""P2P transfers over HTTP on real PostgreSQL: atomic, limited, owner-checked."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import SignedIn, fund, idem


async def balance(client: httpx.AsyncClient, who: SignedIn, app: Any, currency: str = "USD") -> int:
    from billfold import ledger

    async with app.state.resources.engine.connect() as conn:
        for b in await ledger.balances(conn, who.user["id"]):
            if b.currency == currency:
                return b.available
    return 0


async def test_send_to_user_moves_money_atomically(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    r = await client.post(
        "/v1/transfers",
        json={
            "recipient": {"user_id": bob.user["id"]},
            "amount": 2_500,
            "currency": "USD",
            "note": "lunch",
        },
        headers=idem(**alice.headers),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "completed"
    assert body["direction"] == "sent"
    assert body["recipient"]["user_id"] == bob.user["id"]
    assert await balance(client, alice, app) == 7_500
    assert await balance(client, bob, app) == 2_500
    seen = await client.get(f"/v1/transfers/{body['id']}", headers=bob.headers)
    assert seen.status_code == 200 and seen.json()["direction"] == "received"
