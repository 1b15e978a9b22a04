"""Two claims in two currencies at once: both complete, neither is a deadlock's victim."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import text

from billfold import ledger
from tests.conftest import SignedIn, fund, idem, sign_up
from tests.integration.p2p_contact_support import (
    assert_escrow_conserved,
    available,
    verify_contact,
)


async def _lock_waiters(app: Any) -> int:
    async with app.state.resources.engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        )


async def _until_waiting(app: Any, n: int) -> None:
    for _ in range(400):
        if await _lock_waiters(app) >= n:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"expected {n} transactions waiting for a lock")


async def _account_id(app: Any, owner: str, kind: str, currency: str) -> str:
    async with app.state.resources.engine.connect() as conn:
        return str(
            await conn.scalar(
                text(
                    "SELECT id FROM ledger.accounts "
                    "WHERE owner_id = :o AND kind = :k AND currency = :c"
                ),
                {"o": owner, "k": kind, "c": currency},
            )
        )


async def test_two_claims_in_two_currencies_do_not_deadlock(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    """Each claim posts escrow → wallet per transfer. In transfer id order, R1's claim took the
    USD escrow and then wanted the EUR one while R2's held the EUR escrow and wanted the USD one:
    PostgreSQL killed one of them (a 500). A third transaction holds R2's EUR wallet so that the
    interleaving happens every time, not by chance."""
    r1 = await sign_up(client, name="Claimant One")
    r2 = await sign_up(client, name="Claimant Two")
    for who in (r1, r2):
        await verify_contact(client, app, who, "email")
    await fund(app, alice.user["id"], 1_000, "USD")
    await fund(app, alice.user["id"], 1_000, "EUR")

    # R1's transfers: USD then EUR; R2's: EUR then USD (ids sort by time).
    for email, currency in (
        (r1.email, "USD"),
        (r2.email, "EUR"),
        (r1.email, "EUR"),
        (r2.email, "USD"),
    ):
        body = {"recipient": {"email": email}, "amount": 100, "currency": currency}
        sent = await client.post("/v1/transfers", json=body, headers=idem(**alice.headers))
        assert sent.status_code == 201, sent.text
    # R2's EUR wallet opens after the EUR escrow, so a posting between them locks the escrow
    # first (accounts are locked in id order).
    await fund(app, r2.user["id"], 1, "EUR")
    escrow_eur = await _account_id(app, ledger.SYSTEM, "escrow", "EUR")
    r2_eur = await _account_id(app, r2.user["id"], "wallet", "EUR")
    assert escrow_eur < r2_eur

    engine = app.state.resources.engine
    blocker = await engine.connect()
    tx = await blocker.begin()
    try:
        await blocker.execute(
            text("SELECT 1 FROM ledger.accounts WHERE id = :id FOR UPDATE"), {"id": r2_eur}
        )
        second = asyncio.create_task(client.post("/v1/transfers/claims", headers=r2.headers))
        await _until_waiting(app, 1)  # R2's claim holds the EUR escrow, waits for its wallet
        first = asyncio.create_task(client.post("/v1/transfers/claims", headers=r1.headers))
        await _until_waiting(app, 2)  # R1's claim waits behind it
    finally:
        await tx.commit()
        await blocker.close()
    answers = await asyncio.gather(first, second)

    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    for answer in answers:
        claimed = answer.json()["data"]
        assert [t["currency"] for t in claimed] in (["USD", "EUR"], ["EUR", "USD"])
        assert [t["id"] for t in claimed] == sorted(t["id"] for t in claimed)  # oldest first
    assert await available(app, r1.user["id"], "USD") == 100
    assert await available(app, r1.user["id"], "EUR") == 100
    assert await available(app, r2.user["id"], "USD") == 100
    assert await available(app, r2.user["id"], "EUR") == 101
    await assert_escrow_conserved(app)
