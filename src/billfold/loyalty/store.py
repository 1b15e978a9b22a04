"""The loyalty schema's SQL; nothing else writes these tables, and no rule is decided here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.loyalty.models import Capture, EarnRule

# --- members: the per-user lock -----------------------------------------------------------------

_JOIN = text(
    """
    INSERT INTO loyalty.members (user_id, tier, tier_changed_at) VALUES (:user_id, :tier, :now)
    ON CONFLICT (user_id) DO NOTHING
    """
)
_LOCK_MEMBER = text(
    "SELECT user_id, tier, tier_changed_at FROM loyalty.members WHERE user_id = :user_id FOR UPDATE"
)
_TRY_LOCK_MEMBER = text(
    "SELECT user_id, tier, tier_changed_at FROM loyalty.members WHERE user_id = :user_id "
    "FOR UPDATE SKIP LOCKED"
)
_MEMBER = text("SELECT user_id, tier, tier_changed_at FROM loyalty.members WHERE user_id = :u")
_SET_TIER = text(
    "UPDATE loyalty.members SET tier = :tier, tier_changed_at = :now WHERE user_id = :user_id"
)
_MEMBERS_ABOVE = text(
    """
    SELECT user_id FROM loyalty.members
    WHERE tier <> :lowest AND user_id > :after ORDER BY user_id LIMIT :limit
    """
)


async def join_and_lock(conn: AsyncConnection, user_id: str, tier: str, now: datetime) -> Row[Any]:
    """The user's member row, created at `tier` if new, locked for this transaction."""
    await conn.execute(_JOIN, {"user_id": user_id, "tier": tier, "now": now})
    return (await conn.execute(_LOCK_MEMBER, {"user_id": user_id})).one()


async def lock_member(
    conn: AsyncConnection, user_id: str, *, skip_locked: bool = False
) -> Row[Any] | None:
    query = _TRY_LOCK_MEMBER if skip_locked else _LOCK_MEMBER
    return (await conn.execute(query, {"user_id": user_id})).first()


async def member(conn: AsyncConnection, user_id: str) -> Row[Any] | None:
    return (await conn.execute(_MEMBER, {"u": user_id})).first()


async def set_tier(conn: AsyncConnection, user_id: str, tier: str, now: datetime) -> None:
    await conn.execute(_SET_TIER, {"user_id": user_id, "tier": tier, "now": now})


async def members_above(conn: AsyncConnection, lowest: str, after: str, limit: int) -> list[str]:
    rows = await conn.execute(_MEMBERS_ABOVE, {"lowest": lowest, "after": after, "limit": limit})
    return [r.user_id for r in rows]


# --- earn rules ---------------------------------------------------------------------------------

_RULES = text(
    """
    SELECT id, name, kind, currency, points_per_unit, mcc, category, merchant_id, channel,
           multiplier, cap_per_transaction, cap_per_month, priority, active
    FROM loyalty.earn_rules WHERE active ORDER BY priority DESC, multiplier DESC NULLS LAST, id
    """
)
_BONUS_THIS_MONTH = text(
    """
    SELECT coalesce(sum(bonus_points), 0) FROM loyalty.earnings
    WHERE user_id = :user_id AND bonus_rule_id = :rule_id
      AND earned_at >= :month_start AND earned_at < :month_end
    """
)


async def active_rules(conn: AsyncConnection) -> list[EarnRule]:
    return [EarnRule(**r._mapping) for r in await conn.execute(_RULES)]


async def bonus_this_month(
    conn: AsyncConnection, user_id: str, rule_id: str, month_start: datetime, month_end: datetime
) -> int:
    params = {
        "user_id": user_id,
        "rule_id": rule_id,
        "month_start": month_start,
        "month_end": month_end,
    }
    return int((await conn.execute(_BONUS_THIS_MONTH, params)).scalar_one())


# --- earnings and lots --------------------------------------------------------------------------

_INSERT_EARNING = text(
    """
    INSERT INTO loyalty.earnings
        (capture_id, transaction_id, user_id, spend_amount, currency, category, mcc,
         merchant_id, channel, tier, base_points, bonus_points, points, rule_ids, bonus_rule_id,
         posting_id, earned_at)
    VALUES (:capture_id, :transaction_id, :user_id, :amount, :currency, :category, :mcc,
            :merchant_id, :channel, :tier, :base_points, :bonus_points, :points,
            CAST(:rule_ids AS text[]), :bonus_rule_id, :posting_id, :now)
    ON CONFLICT (capture_id) DO NOTHING
    RETURNING id
    """
)
_EARNED = text("SELECT 1 FROM loyalty.earnings WHERE capture_id = :capture_id")
_INSERT_LOT = text(
    """
    INSERT INTO loyalty.lots
        (user_id, earning_id, transaction_id, points, remaining, earned_at, expires_at)
    VALUES (:user_id, :earning_id, :transaction_id, :points, :points, :now, :expires_at)
    """
)


async def earned(conn: AsyncConnection, capture_id: str) -> bool:
    return (await conn.execute(_EARNED, {"capture_id": capture_id})).first() is not None


async def insert_earning(
    conn: AsyncConnection,
    capture: Capture,
    *,
    tier: str,
    base_points: int,
    bonus_points: int,
    rule_ids: Sequence[str],
    bonus_rule_id: str | None,
    posting_id: str | None,
    now: datetime,
) -> int | None:
    """The earning's id, or None when this capture has one already."""
    row = (
        await conn.execute(
            _INSERT_EARNING,
            {
                "capture_id": capture.capture_id,
                "transaction_id": capture.transaction_id,
                "user_id": capture.user_id,
                "amount": capture.amount,
                "currency": capture.currency,
                "category": capture.category,
                "mcc": capture.mcc,
                "merchant_id": capture.merchant_id,
                "channel": capture.channel,
                "tier": tier,
                "base_points": base_points,
                "bonus_points": bonus_points,
                "points": base_points + bonus_points,
                "rule_ids": list(rule_ids),
                "bonus_rule_id": bonus_rule_id,
                "posting_id": posting_id,
                "now": now,
            },
        )
    ).first()
    return None if row is None else int(row.id)


async def insert_lot(
    conn: AsyncConnection,
    *,
    user_id: str,
    earning_id: int,
    transaction_id: str,
    points: int,
    now: datetime,
    expires_at: datetime,
) -> None:
    await conn.execute(
        _INSERT_LOT,
        {
            "user_id": user_id,
            "earning_id": earning_id,
            "transaction_id": transaction_id,
            "points": points,
            "now": now,
            "expires_at": expires_at,
        },
    )


# Lots with points left, locked: the transaction's own first (a reversal), then oldest expiry
# first (FIFO). The member row lock is already held, so nothing else waits here.
_OPEN_LOTS = text(
    """
    SELECT id, transaction_id, remaining, expires_at FROM loyalty.lots
    WHERE user_id = :user_id AND remaining > 0
    ORDER BY (transaction_id = CAST(:first AS text)) IS TRUE DESC, expires_at, id
    FOR UPDATE
    """
)
_TAKE = text(
    """
    UPDATE loyalty.lots l SET remaining = l.remaining - t.taken
    FROM unnest(CAST(:ids AS bigint[]), CAST(:taken AS bigint[])) AS t (id, taken)
    WHERE l.id = t.id
    """
)


async def open_lots(
    conn: AsyncConnection, user_id: str, *, first: str | None = None
) -> list[Row[Any]]:
    return list(await conn.execute(_OPEN_LOTS, {"user_id": user_id, "first": first}))


async def take_from_lots(conn: AsyncConnection, taken: Sequence[tuple[int, int]]) -> None:
    if taken:
        await conn.execute(
            _TAKE, {"ids": [lot for lot, _ in taken], "taken": [n for _, n in taken]}
        )


# --- refunds ------------------------------------------------------------------------------------

_TRANSACTION_TOTALS = text(
    """
    SELECT
      (SELECT coalesce(sum(points), 0) FROM loyalty.earnings WHERE transaction_id = :t) AS earned,
      (SELECT coalesce(sum(spend_amount), 0) FROM loyalty.earnings
       WHERE transaction_id = :t) AS captured,
      (SELECT coalesce(sum(refund_amount), 0) FROM loyalty.reversals
       WHERE transaction_id = :t) AS refunded,
      (SELECT coalesce(sum(points), 0) FROM loyalty.reversals WHERE transaction_id = :t)
        AS reversed,
      (SELECT coalesce(sum(expired_points), 0) FROM loyalty.lots WHERE transaction_id = :t)
        AS expired
    """
)
_REVERSED = text("SELECT 1 FROM loyalty.reversals WHERE refund_id = :refund_id")
_INSERT_REVERSAL = text(
    """
    INSERT INTO loyalty.reversals
        (refund_id, transaction_id, user_id, refund_amount, currency, points, posting_id,
         created_at)
    VALUES (:refund_id, :transaction_id, :user_id, :refund_amount, :currency, :points,
            :posting_id, :now)
    ON CONFLICT (refund_id) DO NOTHING
    RETURNING id
    """
)


async def transaction_totals(conn: AsyncConnection, transaction_id: str) -> Row[Any]:
    """Points earned and amount captured on a payment, what its refunds took back, and what of
    its points expired (went back to the system already)."""
    return (await conn.execute(_TRANSACTION_TOTALS, {"t": transaction_id})).one()


_REFUNDED_BEFORE = text(
    "SELECT 1 FROM loyalty.reversals WHERE transaction_id = :t AND refund_amount > 0 LIMIT 1"
)


async def refunded_before(conn: AsyncConnection, transaction_id: str) -> bool:
    return (await conn.execute(_REFUNDED_BEFORE, {"t": transaction_id})).first() is not None


async def reversed_refund(conn: AsyncConnection, refund_id: str) -> bool:
    return (await conn.execute(_REVERSED, {"refund_id": refund_id})).first() is not None


async def insert_reversal(conn: AsyncConnection, **values: Any) -> bool:
    return (await conn.execute(_INSERT_REVERSAL, values)).first() is not None


# --- tiers --------------------------------------------------------------------------------------

# Per payment: its captures inside the window less its refunds, at most down to 0, so a refund
# of spend that rolled out of the window (or was never counted: a payment from before loyalty)
# takes nothing off this window's spend (docs/loyalty.md, Tiers).
_NET_SPEND = text(
    """
    SELECT currency, sum(greatest(spend - refunded, 0)) AS spend FROM (
        SELECT e.currency, sum(e.spend_amount) AS spend,
               (SELECT coalesce(sum(r.refund_amount), 0) FROM loyalty.reversals r
                WHERE r.transaction_id = e.transaction_id AND r.created_at <= :now) AS refunded
        FROM loyalty.earnings e
        WHERE e.user_id = :user_id AND e.earned_at > :since AND e.earned_at <= :now
        GROUP BY e.transaction_id, e.currency
    ) payments GROUP BY currency
    """
)


async def net_spend(
    conn: AsyncConnection, user_id: str, since: datetime, now: datetime
) -> dict[str, int]:
    rows = await conn.execute(_NET_SPEND, {"user_id": user_id, "since": since, "now": now})
    return {r.currency: max(int(r.spend), 0) for r in rows}


# --- expiry -------------------------------------------------------------------------------------

# The members of the `limit` lots due first (the partial expiry index, never a scan of the whole
# backlog); `skip` are members found busy this run. Another sweeper's members are skipped at
# their member lock.
_DUE_USERS = text(
    """
    SELECT DISTINCT user_id FROM (
        SELECT user_id FROM loyalty.lots
        WHERE remaining > 0 AND expires_at <= :now AND user_id <> ALL(CAST(:skip AS text[]))
        ORDER BY expires_at LIMIT :limit
    ) due
    """
)
_DUE_LOTS = text(
    """
    SELECT id, transaction_id, remaining, expires_at FROM loyalty.lots
    WHERE user_id = :user_id AND remaining > 0 AND expires_at <= :now
    ORDER BY expires_at, id
    FOR UPDATE
    """
)
_EXPIRE = text(
    """
    UPDATE loyalty.lots SET expired_points = expired_points + remaining, remaining = 0,
                            expired_at = :now
    WHERE id = ANY(CAST(:ids AS bigint[]))
    """
)
_EXPIRING = text(
    """
    SELECT coalesce(sum(remaining), 0) AS points, min(expires_at) AS first
    FROM loyalty.lots
    WHERE user_id = :user_id AND remaining > 0 AND expires_at <= :until
    """
)


async def due_users(
    conn: AsyncConnection, now: datetime, limit: int, *, skip: Sequence[str] = ()
) -> list[str]:
    params = {"now": now, "limit": limit, "skip": list(skip)}
    return [r.user_id for r in await conn.execute(_DUE_USERS, params)]


async def due_lots(conn: AsyncConnection, user_id: str, now: datetime) -> list[Row[Any]]:
    return list(await conn.execute(_DUE_LOTS, {"user_id": user_id, "now": now}))


async def expire_lots(conn: AsyncConnection, ids: Sequence[int], now: datetime) -> None:
    await conn.execute(_EXPIRE, {"ids": list(ids), "now": now})


async def expiring(conn: AsyncConnection, user_id: str, until: datetime) -> Row[Any]:
    return (await conn.execute(_EXPIRING, {"user_id": user_id, "until": until})).one()


# --- redemptions --------------------------------------------------------------------------------

_INSERT_REDEMPTION = text(
    """
    INSERT INTO loyalty.redemptions
        (id, user_id, idempotency_key, points, amount, currency, points_posting_id,
         money_posting_id, created_at)
    VALUES (:id, :user_id, :idempotency_key, :points, :amount, :currency, :points_posting_id,
            :money_posting_id, :now)
    """
)
_REDEMPTION_BY_KEY = text(
    """
    SELECT id, points, amount, currency, created_at FROM loyalty.redemptions
    WHERE user_id = :user_id AND idempotency_key = :key
    """
)


async def insert_redemption(conn: AsyncConnection, **values: Any) -> None:
    await conn.execute(_INSERT_REDEMPTION, values)


async def redemption_by_key(conn: AsyncConnection, user_id: str, key: str) -> Row[Any] | None:
    return (await conn.execute(_REDEMPTION_BY_KEY, {"user_id": user_id, "key": key})).first()


# --- activity -----------------------------------------------------------------------------------

_INSERT_ACTIVITY = text(
    """
    INSERT INTO loyalty.activity (user_id, type, points, reference, created_at)
    VALUES (:user_id, :type, :points, :reference, :now)
    """
)
_ACTIVITY = text(
    """
    SELECT id, type, points, reference, created_at FROM loyalty.activity
    WHERE user_id = :user_id AND (CAST(:after AS bigint) IS NULL OR id < :after)
    ORDER BY id DESC LIMIT :limit
    """
)


async def add_activity(
    conn: AsyncConnection, user_id: str, type_: str, points: int, reference: str, now: datetime
) -> None:
    await conn.execute(
        _INSERT_ACTIVITY,
        {"user_id": user_id, "type": type_, "points": points, "reference": reference, "now": now},
    )


async def activity(
    conn: AsyncConnection, user_id: str, *, after: int | None, limit: int
) -> list[Row[Any]]:
    rows = await conn.execute(_ACTIVITY, {"user_id": user_id, "after": after, "limit": limit})
    return list(rows)


# --- earn rules (administrators) ----------------------------------------------------------------

_RULE_COLUMNS = (
    "id, name, kind, currency, points_per_unit, mcc, category, merchant_id, channel, "
    "multiplier, cap_per_transaction, cap_per_month, priority, active"
)
_ALL_RULES = text(f"SELECT {_RULE_COLUMNS} FROM loyalty.earn_rules ORDER BY kind, id")
_RULE = text(f"SELECT {_RULE_COLUMNS} FROM loyalty.earn_rules WHERE id = :id")
_INSERT_RULE = text(
    f"""
    INSERT INTO loyalty.earn_rules ({_RULE_COLUMNS})
    VALUES (:id, :name, :kind, :currency, :points_per_unit, :mcc, :category, :merchant_id,
            :channel, :multiplier, :cap_per_transaction, :cap_per_month, :priority, :active)
    ON CONFLICT (id) DO NOTHING
    RETURNING {_RULE_COLUMNS}
    """
)
# The columns an administrator may change (EarnRuleChange); a NULL leaves a value as it is.
_UPDATE_RULE = text(
    f"""
    UPDATE loyalty.earn_rules SET
        name = coalesce(:name, name),
        points_per_unit = coalesce(:points_per_unit, points_per_unit),
        multiplier = coalesce(:multiplier, multiplier),
        cap_per_transaction = coalesce(:cap_per_transaction, cap_per_transaction),
        cap_per_month = coalesce(:cap_per_month, cap_per_month),
        priority = coalesce(:priority, priority),
        active = coalesce(:active, active)
    WHERE id = :id
    RETURNING {_RULE_COLUMNS}
    """
)


class ActiveBaseRuleExists(Exception):
    """A currency has one active base rate at most (the partial unique index)."""


async def all_rules(conn: AsyncConnection) -> list[EarnRule]:
    return [EarnRule(**r._mapping) for r in await conn.execute(_ALL_RULES)]


async def get_rule(conn: AsyncConnection, rule_id: str) -> EarnRule | None:
    row = (await conn.execute(_RULE, {"id": rule_id})).first()
    return None if row is None else EarnRule(**row._mapping)


async def _write_rule(conn: AsyncConnection, query: Any, values: dict[str, Any]) -> Row[Any] | None:
    try:
        async with conn.begin_nested():
            return (await conn.execute(query, values)).first()
    except IntegrityError as exc:
        # The driver's error (asyncpg's, under SQLAlchemy's adapter) names the constraint.
        constraint = getattr(exc.orig.__cause__, "constraint_name", None) if exc.orig else None
        if constraint == "earn_rules_one_base":
            raise ActiveBaseRuleExists() from None
        raise


async def insert_rule(conn: AsyncConnection, values: dict[str, Any]) -> EarnRule | None:
    """The new rule, or None when a rule has this id already."""
    row = await _write_rule(conn, _INSERT_RULE, values)
    return None if row is None else EarnRule(**row._mapping)


async def update_rule(
    conn: AsyncConnection, rule_id: str, values: dict[str, Any]
) -> EarnRule | None:
    row = await _write_rule(conn, _UPDATE_RULE, {**values, "id": rule_id})
    return None if row is None else EarnRule(**row._mapping)
