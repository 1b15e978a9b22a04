"""Demo data for `billfold up` and `billfold seed`: the demo users, with money in their wallets."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold import ledger
from billfold.platform.db import unit_of_work
from billfold.platform.money import Money
from billfold.users.runtime import UsersRuntime
from billfold.users.seed import DemoUser, seed_demo_users

# What a newly seeded demo user (not the administrator) finds in the wallet.
DEMO_BALANCES = (Money(100_000, "USD"), Money(25_000, "EUR"))


async def seed_demo(
    engine: AsyncEngine, rt: UsersRuntime, *, allow_production: bool = False
) -> list[tuple[DemoUser, str, bool]]:
    """Create the demo users that do not exist yet and fund their wallets once (idempotent:
    a user that already existed is left as it is)."""
    result = await seed_demo_users(engine, rt, allow_production=allow_production)
    for demo, user_id, created in result:
        if not created or demo.role == "admin":
            continue
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            for money in DEMO_BALANCES:
                await ledger.top_up(
                    conn, user_id, money, max_amount=None, reference="demo-seed", memo="Demo money"
                )
    return result
