"""Wallet top-ups and withdrawals: money entering and leaving billfold.

Independent of HTTP: Payment Methods calls these (its wallet funding routes) with the request's
connection when a card or bank transfer funds (or receives) the money. The
posting and its event are written on the caller's connection, so they commit together with the
caller's own rows, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.ledger import events, service, store
from billfold.ledger.models import (
    SYSTEM,
    AccountBalance,
    AmountTooLarge,
    CurrencyNotSupported,
    InvalidAmount,
    WalletMovementType,
)
from billfold.platform.clock import rfc3339
from billfold.platform.money import POINTS, Money

# The system account money comes from on a top-up and goes back to on a withdrawal. It may go
# negative: its balance is what billfold owes its wallet holders in total.
FUNDING = (SYSTEM, "funding")

# Ledger posting kinds of wallet movements (what a statement line shows as `kind`).
POSTING_TOPUP = "wallet_topup"
POSTING_WITHDRAWAL = "wallet_withdrawal"

_POSTING_AND_EVENT: dict[WalletMovementType, tuple[str, str]] = {
    "topup": (POSTING_TOPUP, events.WALLET_TOPPED_UP),
    "withdrawal": (POSTING_WITHDRAWAL, events.WALLET_WITHDRAWN),
}


@dataclass(frozen=True, slots=True)
class Movement:
    """A completed top-up or withdrawal: its posting and the wallet's balance right after."""

    id: str  # the ledger posting
    type: WalletMovementType
    user_id: str
    money: Money
    reference: str
    balance: AccountBalance
    created_at: datetime


def check_amount(money: Money, max_amount: int | None) -> None:
    """What `top_up` and `withdraw` refuse (`invalid_amount`, `currency_not_supported`,
    `amount_too_large`), for callers that must know before they charge a card."""
    if money.amount <= 0:
        raise InvalidAmount("The amount must be a positive number of minor units")
    if money.currency == POINTS:
        # Loyalty points share the ledger but are earned, never bought or cashed out here.
        raise CurrencyNotSupported("Loyalty points cannot be topped up or withdrawn")
    if max_amount is not None and money.amount > max_amount:
        raise AmountTooLarge(
            f"The most you can top up or withdraw at once is {max_amount} minor units",
            extra={"maximum": max_amount},
        )


async def top_up(
    conn: AsyncConnection,
    user_id: str,
    money: Money,
    *,
    max_amount: int | None,
    reference: str | None = None,
    memo: str | None = None,
) -> Movement:
    """Credit `money` to the user's wallet from the funding account, with its
    `billfold.ledger.wallet.topped_up` event. `max_amount` is the largest single amount (None:
    no limit, for callers that apply their own); `reference` names the business object that
    brought the money in (a card payment, a bank transfer), by default the user."""
    return await _move(conn, "topup", user_id, money, max_amount, reference, memo)


async def withdraw(
    conn: AsyncConnection,
    user_id: str,
    money: Money,
    *,
    max_amount: int | None,
    reference: str | None = None,
    memo: str | None = None,
) -> Movement:
    """Debit `money` from the user's wallet to the funding account, with its
    `billfold.ledger.wallet.withdrawn` event. Raises `InsufficientFunds` (from the database,
    which aborts the transaction: the caller must roll back) when the available balance is too
    low; nothing is written then."""
    return await _move(conn, "withdrawal", user_id, money, max_amount, reference, memo)


async def _move(
    conn: AsyncConnection,
    type_: WalletMovementType,
    user_id: str,
    money: Money,
    max_amount: int | None,
    reference: str | None,
    memo: str | None,
) -> Movement:
    """Post a top-up (funding to wallet) or a withdrawal (wallet to funding) and its event."""
    check_amount(money, max_amount)
    wallet = (user_id, "wallet")
    debit, credit = (FUNDING, wallet) if type_ == "topup" else (wallet, FUNDING)
    kind, event_type = _POSTING_AND_EVENT[type_]
    posting = await service.move(
        conn,
        money,
        debit=debit,
        credit=credit,
        kind=kind,
        reference=reference or user_id,
        memo=memo,
    )
    balance = posting.balance_of(user_id, "wallet")
    movement = Movement(
        id=posting.id,
        type=type_,
        user_id=user_id,
        money=money,
        reference=posting.reference,
        balance=balance,
        created_at=await store.posting_created_at(conn, posting.id),
    )
    await events.publish(
        conn,
        event_type,
        movement.id,
        {
            "posting_id": movement.id,
            "user_id": user_id,
            "amount": money.amount,
            "currency": money.currency,
            "reference": movement.reference,
            "balance": {
                "posted": balance.posted,
                "held": balance.held,
                "available": balance.available,
            },
            "created_at": rfc3339(movement.created_at),
        },
        aggregate_id=user_id,
    )
    return movement
