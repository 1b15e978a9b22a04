"""The ledger's SQL: calls to its PL/pgSQL functions (one round trip per posting) and reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

from sqlalchemy import Result, TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.ledger.models import (
    AccountBalance,
    AlreadyReversed,
    Entry,
    Hold,
    HoldAmountExceeded,
    HoldExpired,
    HoldNotActive,
    InsufficientFunds,
    Leg,
)
from billfold.platform.ids import new_id

_POST = text(
    """
    SELECT account_id, owner_id, kind, amount, posted, held FROM ledger.post(
        :posting_id, :kind, :reference, :memo, :currency,
        CAST(:owners AS text[]), CAST(:kinds AS text[]), CAST(:amounts AS bigint[]),
        CAST(:new_ids AS text[]), :reverses)
    """
)
_COMMIT_HOLD = text(
    """
    SELECT account_id, owner_id, kind, amount, posted, held FROM ledger.commit_hold(
        :hold_id, :amount, :final, :posting_id, :kind, :memo, :to_owner, :to_kind, :new_id)
    """
)
_RELEASE_HOLD = text("SELECT ledger.release_hold(:hold_id, :status)")
_PLACE_HOLD = text(
    """
    WITH account AS (
        UPDATE ledger.accounts SET held = held + :amount, updated_at = now()
        WHERE owner_id = :owner_id AND kind = :kind AND currency = :currency
        RETURNING id, owner_id, currency
    )
    INSERT INTO ledger.holds (id, account_id, amount, remaining, status, reference, expires_at)
    SELECT :hold_id, account.id, :amount, :amount, 'active', :reference, :expires_at FROM account
    RETURNING id
    """
)
_HOLD = text(
    """
    SELECT h.id, h.account_id, a.owner_id, a.currency, h.amount, h.remaining, h.status,
           h.reference, h.expires_at, h.created_at
    FROM ledger.holds h JOIN ledger.accounts a ON a.id = h.account_id
    WHERE h.id = :hold_id
    """
)
_POSTING_LEGS = text(
    """
    SELECT p.kind, p.reference, p.currency, a.owner_id, a.kind AS account_kind, e.amount,
           EXISTS (SELECT 1 FROM ledger.postings r WHERE r.reverses = p.id) AS reversed
    FROM ledger.postings p
    JOIN ledger.entries e ON e.posting_id = p.id
    JOIN ledger.accounts a ON a.id = e.account_id
    WHERE p.id = :posting_id
    ORDER BY e.seq
    """
)
_POSTING_CREATED_AT = text("SELECT created_at FROM ledger.postings WHERE id = :posting_id")
_BALANCES = text(
    """
    SELECT id AS account_id, owner_id, kind, currency, posted, held FROM ledger.accounts
    WHERE owner_id = :owner_id AND kind = :kind ORDER BY currency
    """
)
_BALANCES_AS_OF = text(
    """
    SELECT a.id AS account_id, a.owner_id, a.kind, a.currency,
           coalesce((SELECT e.balance_after FROM ledger.entries e
                     WHERE e.account_id = a.id AND e.created_at <= :as_of
                     ORDER BY e.seq DESC LIMIT 1), 0) AS posted,
           0::bigint AS held
    FROM ledger.accounts a
    WHERE a.owner_id = :owner_id AND a.kind = :kind AND a.created_at <= :as_of
    ORDER BY a.currency
    """
)
_STATEMENT = """
    SELECT e.seq, e.posting_id, p.kind AS posting_kind, p.reference, p.memo, a.currency,
           e.amount, e.balance_after, e.created_at
    FROM ledger.entries e
    JOIN ledger.accounts a ON a.id = e.account_id
    JOIN ledger.postings p ON p.id = e.posting_id
    WHERE a.owner_id = :owner_id AND a.kind = :kind
      AND (CAST(:currency AS text) IS NULL OR a.currency = :currency)
      AND (CAST(:after AS bigint) IS NULL OR e.seq < :after)
    ORDER BY e.seq DESC
    LIMIT :limit
"""
# The earliest expiry first, one at a time, skipping holds another sweeper (worker replica) has
# taken: see service.expire_holds for why a transaction releases one hold only.
_NEXT_EXPIRED_HOLD = text(
    """
    SELECT id FROM ledger.holds WHERE status = 'active' AND expires_at <= now()
    ORDER BY expires_at LIMIT 1 FOR UPDATE SKIP LOCKED
    """
)

# SQLSTATEs raised by the ledger functions (migration 0002), and the problem each one is.
_ERRORS: dict[str, type[Exception]] = {
    "BF001": InsufficientFunds,
    "BF003": HoldNotActive,
    "BF004": HoldAmountExceeded,
    "BF005": HoldExpired,
}


def _raise_mapped(exc: DBAPIError) -> NoReturn:
    state = getattr(exc.orig, "sqlstate", None)
    if state == "23514" and "accounts_available" in str(exc.orig):
        raise InsufficientFunds("The available balance is too low for this amount") from None
    if state == "23505" and "postings_reverses_key" in str(exc.orig):
        raise AlreadyReversed("This posting has already been reversed") from None
    mapped = _ERRORS.get(state or "")
    if mapped is not None:
        raise mapped() from None
    raise exc


async def _call(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any]
) -> Result[Any]:
    """Run a statement that may trip a ledger rule, raising that rule's problem."""
    try:
        return await conn.execute(statement, params)
    except DBAPIError as exc:
        _raise_mapped(exc)


def _balances(rows: Sequence[Any], currency: str) -> tuple[AccountBalance, ...]:
    return tuple(
        AccountBalance(r.account_id, r.owner_id, r.kind, currency, r.posted, r.held) for r in rows
    )


async def post(
    conn: AsyncConnection,
    *,
    posting_id: str,
    kind: str,
    reference: str,
    currency: str,
    legs: Sequence[Leg],
    memo: str | None,
    reverses: str | None = None,
) -> tuple[AccountBalance, ...]:
    params = {
        "posting_id": posting_id,
        "kind": kind,
        "reference": reference,
        "memo": memo,
        "currency": currency,
        "owners": [leg.owner_id for leg in legs],
        "kinds": [leg.kind for leg in legs],
        "amounts": [leg.amount for leg in legs],
        "new_ids": [new_id("acct") for _ in legs],
        "reverses": reverses,
    }
    rows = (await _call(conn, _POST, params)).all()
    return _balances(rows, currency)


async def place_hold(
    conn: AsyncConnection,
    *,
    hold_id: str,
    owner_id: str,
    kind: str,
    currency: str,
    amount: int,
    reference: str,
    expires_at: datetime,
) -> bool:
    """False when the account does not exist (nothing to hold)."""
    params = {
        "hold_id": hold_id,
        "owner_id": owner_id,
        "kind": kind,
        "currency": currency,
        "amount": amount,
        "reference": reference,
        "expires_at": expires_at,
    }
    return (await _call(conn, _PLACE_HOLD, params)).first() is not None


async def commit_hold(
    conn: AsyncConnection,
    *,
    hold_id: str,
    amount: int,
    final: bool,
    posting_id: str,
    kind: str,
    memo: str | None,
    to_owner: str,
    to_kind: str,
    currency: str,
) -> tuple[AccountBalance, ...]:
    params = {
        "hold_id": hold_id,
        "amount": amount,
        "final": final,
        "posting_id": posting_id,
        "kind": kind,
        "memo": memo,
        "to_owner": to_owner,
        "to_kind": to_kind,
        "new_id": new_id("acct"),
    }
    rows = (await _call(conn, _COMMIT_HOLD, params)).all()
    return _balances(rows, currency)


async def release_hold(conn: AsyncConnection, hold_id: str, status: str) -> int:
    result = await _call(conn, _RELEASE_HOLD, {"hold_id": hold_id, "status": status})
    return int(result.scalar_one())


async def get_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    row = (await conn.execute(_HOLD, {"hold_id": hold_id})).first()
    return Hold(**row._mapping) if row is not None else None


async def posting_legs(conn: AsyncConnection, posting_id: str) -> list[Any]:
    return list((await conn.execute(_POSTING_LEGS, {"posting_id": posting_id})).all())


async def posting_created_at(conn: AsyncConnection, posting_id: str) -> datetime:
    result = await conn.execute(_POSTING_CREATED_AT, {"posting_id": posting_id})
    return result.scalar_one()  # type: ignore[no-any-return]


async def balances(conn: AsyncConnection, owner_id: str, kind: str) -> list[AccountBalance]:
    rows = (await conn.execute(_BALANCES, {"owner_id": owner_id, "kind": kind})).all()
    return [AccountBalance(**r._mapping) for r in rows]


async def balances_as_of(
    conn: AsyncConnection, owner_id: str, kind: str, as_of: datetime
) -> list[AccountBalance]:
    params = {"owner_id": owner_id, "kind": kind, "as_of": as_of}
    rows = (await conn.execute(_BALANCES_AS_OF, params)).all()
    return [AccountBalance(**r._mapping) for r in rows]


async def statement(
    conn: AsyncConnection,
    owner_id: str,
    kind: str,
    currency: str | None,
    *,
    limit: int,
    after: int | None,
) -> list[Entry]:
    params = {
        "owner_id": owner_id,
        "kind": kind,
        "currency": currency,
        "after": after,
        "limit": limit,
    }
    rows = (await conn.execute(text(_STATEMENT), params)).all()
    return [Entry(**r._mapping) for r in rows]


async def next_expired_hold(conn: AsyncConnection) -> str | None:
    """The active hold longest past its expiry that no other transaction holds, locked."""
    return (await conn.execute(_NEXT_EXPIRED_HOLD)).scalar_one_or_none()  # type: ignore[no-any-return]
