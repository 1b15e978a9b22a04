"""The ledger's rules: balanced postings, holds, reversals, balances and statements.

Callers pass their request's connection, so a posting commits or rolls back together with the
caller's business row and outbox event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.ledger import events, store
from billfold.ledger.models import (
    AccountBalance,
    Entry,
    Hold,
    HoldNotActive,
    InsufficientFunds,
    Leg,
    Posting,
)
from billfold.platform.db import unit_of_work
from billfold.platform.ids import new_id
from billfold.platform.money import Money


async def post(
    conn: AsyncConnection,
    *,
    kind: str,
    reference: str,
    currency: str,
    legs: Sequence[Leg],
    memo: str | None = None,
) -> Posting:
    """Write one balanced posting (legs sum to zero) in one round trip; accounts that do not
    exist yet are opened. Raises `InsufficientFunds` if an account without overdraft would go
    below its available balance; nothing is written then."""
    if sum(leg.amount for leg in legs) != 0:
        raise ValueError("a posting must balance")
    return await _write(conn, kind, reference, currency, legs, memo)


async def _write(
    conn: AsyncConnection,
    kind: str,
    reference: str,
    currency: str,
    legs: Sequence[Leg],
    memo: str | None,
    reverses: str | None = None,
) -> Posting:
    """Write a balanced posting under a new id; the accounts' balances come back with it."""
    posting_id = new_id("pst")
    accounts = await store.post(
        conn,
        posting_id=posting_id,
        kind=kind,
        reference=reference,
        currency=currency,
        legs=legs,
        memo=memo,
        reverses=reverses,
    )
    return Posting(posting_id, kind, reference, currency, accounts)


async def move(
    conn: AsyncConnection,
    money: Money,
    *,
    debit: tuple[str, str],
    credit: tuple[str, str],
    kind: str,
    reference: str,
    memo: str | None = None,
) -> Posting:
    """Move `money` from the (owner, kind) account `debit` to `credit`."""
    if money.amount <= 0:
        raise ValueError("amount must be positive")
    legs = [
        Leg(debit[0], debit[1], -money.amount),  # type: ignore[arg-type]
        Leg(credit[0], credit[1], money.amount),  # type: ignore[arg-type]
    ]
    return await post(
        conn, kind=kind, reference=reference, currency=money.currency, legs=legs, memo=memo
    )


async def reverse(
    conn: AsyncConnection, posting_id: str, *, kind: str = "reversal", memo: str | None = None
) -> Posting:
    """Undo a posting with its mirror image (never an update); each posting is reversed once."""
    rows = await store.posting_legs(conn, posting_id)
    if not rows:
        raise KeyError(posting_id)
    legs = [Leg(r.owner_id, r.account_kind, -r.amount) for r in rows]
    return await _write(
        conn, kind, rows[0].reference, rows[0].currency, legs, memo, reverses=posting_id
    )


async def place_hold(
    conn: AsyncConnection,
    owner_id: str,
    money: Money,
    *,
    reference: str,
    expires_at: datetime,
    kind: str = "wallet",
) -> Hold:
    """Reserve `money` of the account's available balance until committed, voided or expired."""
    if money.amount <= 0:
        raise ValueError("amount must be positive")
    hold_id = new_id("hold")
    placed = await store.place_hold(
        conn,
        hold_id=hold_id,
        owner_id=owner_id,
        kind=kind,
        currency=money.currency,
        amount=money.amount,
        reference=reference,
        expires_at=expires_at,
    )
    if not placed:
        raise InsufficientFunds("The available balance is too low for this amount")
    hold = await store.get_hold(conn, hold_id)
    assert hold is not None
    return hold


async def commit_hold(
    conn: AsyncConnection,
    hold_id: str,
    amount: int,
    *,
    credit: tuple[str, str],
    kind: str,
    final: bool = True,
    memo: str | None = None,
) -> Posting:
    """Post `amount` of a hold to `credit`; `final` releases what remains of the hold."""
    hold = await store.get_hold(conn, hold_id)
    if hold is None:
        raise HoldNotActive()
    posting_id = new_id("pst")
    accounts = await store.commit_hold(
        conn,
        hold_id=hold_id,
        amount=amount,
        final=final,
        posting_id=posting_id,
        kind=kind,
        memo=memo,
        to_owner=credit[0],
        to_kind=credit[1],
        currency=hold.currency,
    )
    return Posting(posting_id, kind, hold.reference, hold.currency, accounts)


async def void_hold(conn: AsyncConnection, hold_id: str) -> int:
    """Release what remains of an active hold; returns the amount released."""
    return await store.release_hold(conn, hold_id, "voided")


async def get_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    return await store.get_hold(conn, hold_id)


async def balances(
    conn: AsyncConnection, owner_id: str, *, kind: str = "wallet", as_of: datetime | None = None
) -> list[AccountBalance]:
    """Posted and held per currency; at a past instant `as_of`, the posted balance then."""
    if as_of is None:
        return await store.balances(conn, owner_id, kind)
    return await store.balances_as_of(conn, owner_id, kind, as_of)


async def statement(
    conn: AsyncConnection,
    owner_id: str,
    *,
    currency: str | None = None,
    kind: str = "wallet",
    limit: int = 20,
    after: int | None = None,
) -> list[Entry]:
    """The account's entries, newest first, each with the running balance after it."""
    return await store.statement(conn, owner_id, kind, currency, limit=limit, after=after)


async def expire_holds(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Release up to `batch` holds past their expiry (the worker's job), each in its own
    transaction with its `hold.expired` event.

    One hold, so one account, per transaction: the sweeper never holds one account while it
    waits for another. A batch in one transaction locked many accounts in id order, while a
    claim locks escrow and wallet currency by currency: a claimant whose own holds expired as
    they claimed in two currencies deadlocked with it (PostgreSQL aborted one of the two)."""
    expired = 0
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            hold_id = await store.next_expired_hold(conn)
            if hold_id is None:
                break
            hold = await store.get_hold(conn, hold_id)
            assert hold is not None
            released = await store.release_hold(conn, hold_id, "expired")
            await events.publish(
                conn,
                events.HOLD_EXPIRED,
                hold_id,
                {
                    "hold_id": hold_id,
                    "owner_id": hold.owner_id,
                    "reference": hold.reference,
                    "currency": hold.currency,
                    "released": released,
                },
            )
        expired += 1
    return expired
