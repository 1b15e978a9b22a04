"""Wallet top-ups and withdrawals: money entering and leaving billfold.

Independent of HTTP: the wallet routes call these today with the request's connection, and
Payment Methods will call them when a card or bank transfer funds (or receives) the money. The
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
    Posting,
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


def _check(money: Money, max_amount: int | None) -> None:
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
    _check(money, max_amount)
    posting = await service.move(
        conn,
        money,
        debit=FUNDING,
        credit=(user_id, "wallet"),
        kind=POSTING_TOPUP,
        reference=reference or user_id,
        memo=memo,
    )
    return await _record(conn, "topup", events.WALLET_TOPPED_UP, user_id, money, posting)


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
    _check(money, max_amount)
    posting = await service.move(
        conn,
        money,
        debit=(user_id, "wallet"),
        credit=FUNDING,
        kind=POSTING_WITHDRAWAL,
        reference=reference or user_id,
        memo=memo,
    )
    return await _record(conn, "withdrawal", events.WALLET_WITHDRAWN, user_id, money, posting)


async def _record(
    conn: AsyncConnection,
    type_: WalletMovementType,
    event_type: str,
    user_id: str,
    money: Money,
    posting: Posting,
) -> Movement:
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
