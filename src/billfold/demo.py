"""Demo data for `billfold up` and `billfold seed`: the demo users, with money in their wallets,
a verified card and a verified bank account each."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold import ledger
from billfold.app import network_client
from billfold.gateway import Principal
from billfold.payment_methods import PaymentMethodsRuntime, micro_deposit_amounts
from billfold.payment_methods import service as methods
from billfold.payment_methods.models import (
    BillingAddress,
    NewBankAccount,
    NewCard,
    NewPaymentMethod,
)
from billfold.platform.db import unit_of_work
from billfold.platform.money import Money
from billfold.users.runtime import UsersRuntime
from billfold.users.seed import DemoUser, seed_demo_users
from billfold.vault.connect import vault_client

# What a newly seeded demo user (not the administrator) finds in the wallet.
DEMO_BALANCES = (Money(100_000, "USD"), Money(25_000, "EUR"))
# Their card (processor test numbers the network simulator approves) and US bank account.
DEMO_CARDS = {"alice": "4242424242424242", "bob": "5555555555554444"}
DEMO_ACCOUNTS = {"alice": "000123456789", "bob": "000987654321"}
DEMO_ROUTING = "021000021"
DEMO_ADDRESS = BillingAddress(
    line1="1 Market St", city="San Francisco", region="CA", postal_code="94105", country="US"
)


async def seed_demo(
    engine: AsyncEngine,
    rt: UsersRuntime,
    *,
    allow_production: bool = False,
    payment_methods: PaymentMethodsRuntime | None = None,
) -> list[tuple[DemoUser, str, bool]]:
    """Create the demo users that do not exist yet, fund their wallets and give them a verified
    card and bank account, once (idempotent: a user that already existed is left as it is).
    Without `payment_methods`, the vault is reached the way the API reaches it (over HTTP when
    `BILLFOLD_VAULT_URL` is set, in this process otherwise)."""
    result = await seed_demo_users(engine, rt, allow_production=allow_production)
    created = [(demo, uid) for demo, uid, new in result if new and demo.role != "admin"]
    if not created:
        return result
    own = payment_methods is None
    card_network = network_client(rt.settings)
    methods_rt = payment_methods or PaymentMethodsRuntime(
        rt.settings, vault_client(rt.settings), card_network, rt.sealed
    )
    try:
        for demo, user_id in created:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                for money in DEMO_BALANCES:
                    await ledger.top_up(
                        conn,
                        user_id,
                        money,
                        max_amount=None,
                        reference="demo-seed",
                        memo="Demo money",
                    )
            await _demo_methods(engine, methods_rt, demo, user_id)
    finally:
        if own:
            await methods_rt.vault.aclose()
        await card_network.aclose()
    return result


async def _demo_methods(
    engine: AsyncEngine, rt: PaymentMethodsRuntime, demo: DemoUser, user_id: str
) -> None:
    """A verified card (through the vault and the payment network, like any card) and a US
    bank account whose micro-deposits the seed confirms, as its owner would."""
    pan, account = DEMO_CARDS.get(demo.handle), DEMO_ACCOUNTS.get(demo.handle)
    if pan is None or account is None:
        return
    seeder = Principal(user_id=user_id, session_id="demo-seed", scopes=frozenset({"wallet"}))
    card = NewCard(
        pan=pan,
        expiry_month=12,
        expiry_year=2031,
        cvv="123",
        cardholder_name=demo.name,
        billing_address=DEMO_ADDRESS,
    )
    bank = NewBankAccount(
        routing_number=DEMO_ROUTING, account_number=account, account_type="checking"
    )
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        await methods.add(conn, rt, seeder, NewPaymentMethod(card=card, nickname="Everyday card"))
        row = await methods.add(
            conn, rt, seeder, NewPaymentMethod(bank_account=bank, nickname="Checking")
        )
        method_id = row.id
    async with unit_of_work(engine) as uow:
        amounts = await micro_deposit_amounts(await uow.connection(), method_id, user_id)
    assert amounts is not None
    async with unit_of_work(engine) as uow:
        await methods.verify_micro_deposits(uow, user_id, method_id, list(amounts))
