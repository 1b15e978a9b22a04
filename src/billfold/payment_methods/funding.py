"""Wallet funding: top-ups from a verified card or bank account, withdrawals to a bank account.

The funding row, the ledger posting (`ledger.top_up` / `ledger.withdraw`, referencing the row)
and both events commit in the caller's one transaction. A card is charged through the payment
network before anything is written; a decline is a 402 and nothing is posted. Bank accounts move
money by a simulated ACH debit or credit that settles at once (a real ACH file would settle in
one to three days; the ledger posting would then wait for the return window).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import ledger
from billfold.payment_methods import events, store
from billfold.payment_methods.models import (
    BankAccountRequired,
    CurrencyMismatch,
    Funding,
    FundingBalance,
    FundingView,
    PaymentDeclined,
    PaymentMethodNotFound,
    PaymentMethodNotVerified,
)
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.payment_methods.service import label
from billfold.platform.clock import rfc3339
from billfold.platform.errors import FieldError
from billfold.platform.ids import new_id
from billfold.platform.money import Money

POINTER = "#/payment_method_id"


async def _verified_method(conn: AsyncConnection, user_id: str, method_id: str) -> Row[Any]:
    row = await store.get(conn, method_id, user_id)
    if row is None:
        raise PaymentMethodNotFound(
            "No such payment method",
            errors=[FieldError(pointer=POINTER, detail="not one of your payment methods")],
        )
    if row.status != "verified":
        raise PaymentMethodNotVerified(
            "Verify this payment method before moving money with it",
            extra={"payment_method_status": row.status},
        )
    return row


def _same_currency(row: Row[Any], money: Money) -> None:
    if row.currency != money.currency:
        raise CurrencyMismatch(
            f"This bank account holds {row.currency}",
            errors=[FieldError(pointer="#/currency", detail=f"must be {row.currency}")],
        )


async def top_up(
    conn: AsyncConnection, rt: PaymentMethodsRuntime, user_id: str, body: Funding
) -> tuple[Row[Any], ledger.Movement]:
    """Charge the card (or debit the bank account) and credit the wallet."""
    money = Money(body.amount, body.currency)
    limit = rt.settings.wallet_max_topup
    # Refused amounts must be refused before the card is charged, not after.
    ledger.check_amount(money, limit)
    method = await _verified_method(conn, user_id, body.payment_method_id)
    funding_id = new_id("top")
    network: dict[str, Any] = {
        "response_code": None,
        "authorization_code": None,
        "network_reference": None,
    }
    if method.type == "card":
        secret = await rt.vault.detokenize(
            card_id=method.vault_card_id,
            requester=f"payment_methods:{user_id}",
            purpose="authorization",
        )
        charge = await rt.network.charge(
            secret, amount=money.amount, currency=money.currency, reference=funding_id
        )
        del secret
        if not charge.approved:
            raise PaymentDeclined(
                f"The card issuer declined the payment ({charge.response_code}: {charge.reason}); "
                "nothing was charged or credited",
                extra={"decline_code": charge.response_code, "decline_reason": charge.reason},
            )
        network = {
            "response_code": charge.response_code,
            "authorization_code": charge.authorization_code,
            "network_reference": charge.network_reference,
        }
        rail = "card"
    else:
        _same_currency(method, money)
        rail = "ach"
    movement = await ledger.top_up(
        conn,
        user_id,
        money,
        max_amount=limit,
        reference=funding_id,
        memo=f"Top-up from {label(method)}",
    )
    row = await _record(conn, funding_id, user_id, method, "topup", rail, movement, network)
    return row, movement


async def withdraw(
    conn: AsyncConnection, rt: PaymentMethodsRuntime, user_id: str, body: Funding
) -> tuple[Row[Any], ledger.Movement]:
    """Debit the wallet's available balance and credit the bank account (simulated ACH)."""
    money = Money(body.amount, body.currency)
    limit = rt.settings.wallet_max_topup
    ledger.check_amount(money, limit)
    method = await _verified_method(conn, user_id, body.payment_method_id)
    if method.type != "bank_account":
        raise BankAccountRequired(
            "Money leaves the wallet only to a verified bank account, not to a card",
            errors=[FieldError(pointer=POINTER, detail="must be a bank account")],
        )
    _same_currency(method, money)
    funding_id = new_id("wdl")
    movement = await ledger.withdraw(
        conn,
        user_id,
        money,
        max_amount=limit,
        reference=funding_id,
        memo=f"Withdrawal to {label(method)}",
    )
    empty = {"response_code": None, "authorization_code": None, "network_reference": None}
    row = await _record(conn, funding_id, user_id, method, "withdrawal", "ach", movement, empty)
    return row, movement


async def _record(
    conn: AsyncConnection,
    funding_id: str,
    user_id: str,
    method: Row[Any],
    type_: str,
    rail: str,
    movement: ledger.Movement,
    network: dict[str, Any],
) -> Row[Any]:
    row = await store.insert_funding(
        conn,
        {
            "id": funding_id,
            "user_id": user_id,
            "payment_method_id": method.id,
            "type": type_,
            "rail": rail,
            "amount": movement.money.amount,
            "currency": movement.money.currency,
            "posting_id": movement.id,
            "created_at": movement.created_at,
            **network,
        },
    )
    await events.publish(
        conn,
        events.TOPUP_COMPLETED if type_ == "topup" else events.WITHDRAWAL_COMPLETED,
        funding_id,
        user_id,
        {
            "funding_id": funding_id,
            "payment_method_id": method.id,
            "type": method.type,
            "brand": method.brand,
            "last4": method.last4,
            "rail": rail,
            "amount": movement.money.amount,
            "currency": movement.money.currency,
            "posting_id": movement.id,
            "created_at": rfc3339(movement.created_at),
        },
    )
    return row


def view(row: Row[Any], movement: ledger.Movement) -> FundingView:
    b = movement.balance
    return FundingView(
        id=row.id,
        type=row.type,
        payment_method_id=row.payment_method_id,
        rail=row.rail,
        amount=row.amount,
        currency=row.currency,
        posting_id=row.posting_id,
        authorization_code=row.authorization_code,
        balance=FundingBalance(
            currency=b.currency, available=b.available, posted=b.posted, held=b.held
        ),
        created_at=row.created_at,
    )
