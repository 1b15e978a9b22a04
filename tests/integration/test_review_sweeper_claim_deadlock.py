"""The hold sweeper and a claim at the same moment: both finish, neither is a deadlock's victim.

The sweeper released a batch of expired holds in one transaction, locking their accounts in id
order; a claim locks one currency's escrow and wallet at a time (currency order). A claimant
whose own review holds expire while they claim in two currencies could then hold one wallet and
wait for the other while the sweeper did the opposite.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import text

from billfold import ledger
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.money import Money
from tests.conftest import fund, idem, sign_up
from tests.integration.p2p_contact_support import assert_escrow_conserved, verify_contact
from tests.integration.test_review_claim_deadlock import _account_id, _until_waiting
from tests.integration.transfer_support import Always, available, risk


async def test_the_hold_sweeper_and_a_two_currency_claim_do_not_deadlock(
    client: httpx.AsyncClient, app: Any
) -> None:
    alice = await sign_up(client, name="Alice Sender")
    bob = await sign_up(client, name="Bob Payee")
    claimant = await sign_up(client, name="Rita Claimant")
    await verify_contact(client, app, claimant, "email")
    await fund(app, alice.user["id"], 1_000, "USD")
    await fund(app, alice.user["id"], 1_000, "EUR")

    async def send(sender: Any, recipient: dict[str, str], currency: str) -> dict[str, Any]:
        body = {"recipient": recipient, "amount": 100, "currency": currency}
        r = await client.post("/v1/transfers", json=body, headers=idem(**sender.headers))
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    # The USD escrow exists before the claimant's USD wallet, which opens before their EUR one.
    await send(alice, {"email": claimant.email}, "USD")
    await fund(app, claimant.user["id"], 1_000, "USD")
    await fund(app, claimant.user["id"], 1_000, "EUR")
    await send(alice, {"email": claimant.email}, "EUR")
    escrow_usd = await _account_id(app, ledger.SYSTEM, "escrow", "USD")
    wallet_usd = await _account_id(app, claimant.user["id"], "wallet", "USD")
    wallet_eur = await _account_id(app, claimant.user["id"], "wallet", "EUR")
    assert escrow_usd < wallet_usd < wallet_eur

    # The claimant's own transfers held for review, in both currencies; their holds run out.
    with risk(app, Always("review")):
        held = [await send(claimant, {"user_id": bob.user["id"]}, c) for c in ("USD", "EUR")]
    engine = app.state.resources.engine
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE ledger.holds SET expires_at = now() - interval '1 second' "
                "WHERE reference = ANY(:refs)"
            ),
            {"refs": [t["id"] for t in held]},
        )

    blocker = await engine.connect()
    tx = await blocker.begin()
    try:
        await blocker.execute(
            text("SELECT 1 FROM ledger.accounts WHERE id = :id FOR UPDATE"), {"id": escrow_usd}
        )
        # The claim posts EUR (its wallet locked), then waits for the USD escrow.
        claim = asyncio.create_task(client.post("/v1/transfers/claims", headers=claimant.headers))
        await _until_waiting(app, 1)
        # The sweeper locks the USD wallet, then wants the EUR one.
        sweep = asyncio.create_task(ledger.expire_holds(engine))
        await _until_waiting(app, 2)
    finally:
        await tx.commit()
        await blocker.close()
    claimed, swept = await asyncio.gather(claim, sweep, return_exceptions=True)

    assert not isinstance(swept, BaseException), swept
    assert isinstance(claimed, httpx.Response) and claimed.status_code == 200, claimed
    assert len(claimed.json()["data"]) == 2
    assert swept >= 2
    for currency in ("USD", "EUR"):
        # 1,000 funded, 100 held then released, 100 claimed.
        assert await available(app, claimant, currency) == 1_100
    await assert_escrow_conserved(app)


async def test_two_sweepers_release_every_expired_hold_once(app: Any) -> None:
    """Worker replicas sweep side by side: each hold is released once, with one event."""
    engine = app.state.resources.engine
    owners = [f"sweep-{i}-{idem()['Idempotency-Key'][:8]}" for i in range(4)]
    holds: list[str] = []
    for owner in owners:
        for currency in ("USD", "EUR"):
            await fund(app, owner, 1_000, currency)
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                for _ in range(5):
                    hold = await ledger.place_hold(
                        conn,
                        owner,
                        Money(10, currency),
                        reference=f"test:{owner}",
                        expires_at=utcnow() - timedelta(seconds=1),
                    )
                    holds.append(hold.id)

    results = await asyncio.gather(*(ledger.expire_holds(engine) for _ in range(2)))

    assert sum(results) >= len(holds)
    async with engine.connect() as conn:
        statuses = (
            await conn.execute(
                text("SELECT status, count(*) FROM ledger.holds WHERE id = ANY(:h) GROUP BY 1"),
                {"h": holds},
            )
        ).all()
        events = await conn.scalar(
            text(
                "SELECT count(*) FROM platform.outbox "
                "WHERE type = 'billfold.ledger.hold.expired' AND subject = ANY(:h)"
            ),
            {"h": holds},
        )
        held = await conn.scalar(
            text("SELECT sum(held) FROM ledger.accounts WHERE owner_id = ANY(:o)"), {"o": owners}
        )
    assert dict(statuses) == {"expired": len(holds)}
    assert events == len(holds)
    assert held == 0
