"""SQL of p2p.transfer_limits and p2p.tier_limits: usage counted atomically with the transfer."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

# Adds the amount to today's and this month's usage (restarting a window that has rolled over)
# and returns the effective limits: the user's override, else the tier's default; all null when
# the tier does not offer the currency, whatever the overrides say. The row stays locked until
# commit, so concurrent transfers of one user are counted one after the other.
# A window restarts only when the local day (month) moves past the stored one, never back: a
# time zone change to one behind must not start a fresh day (flipping between UTC+14 and UTC-11
# did, over and over, and with it the daily limit).
_USE = text(
    """
    WITH tier AS (
        SELECT per_transfer, daily, monthly FROM p2p.tier_limits
        WHERE kyc_tier = :tier AND currency = :currency
    )
    INSERT INTO p2p.transfer_limits AS l
        (user_id, currency, used_today, usage_day, used_this_month, usage_month)
    VALUES (:user_id, :currency, :amount, :day, :amount, :month)
    ON CONFLICT (user_id, currency) DO UPDATE SET
        used_today = CASE WHEN l.usage_day >= EXCLUDED.usage_day THEN l.used_today ELSE 0 END
                     + EXCLUDED.used_today,
        usage_day = greatest(l.usage_day, EXCLUDED.usage_day),
        used_this_month = CASE WHEN l.usage_month >= EXCLUDED.usage_month
                               THEN l.used_this_month ELSE 0 END + EXCLUDED.used_this_month,
        usage_month = greatest(l.usage_month, EXCLUDED.usage_month),
        updated_at = now()
    RETURNING l.used_today, l.used_this_month, l.usage_day, l.usage_month,
        (SELECT coalesce(l.per_transfer_limit, per_transfer) FROM tier) AS per_transfer,
        (SELECT coalesce(l.daily_limit, daily) FROM tier) AS daily,
        (SELECT coalesce(l.monthly_limit, monthly) FROM tier) AS monthly
    """
)
_VIEW = text(
    """
    SELECT t.currency, coalesce(l.per_transfer_limit, t.per_transfer) AS per_transfer,
           coalesce(l.daily_limit, t.daily) AS daily,
           coalesce(l.monthly_limit, t.monthly) AS monthly,
           CASE WHEN l.usage_day >= :day THEN l.used_today ELSE 0 END AS used_today,
           CASE WHEN l.usage_month >= :month THEN l.used_this_month ELSE 0 END
               AS used_this_month,
           l.usage_day, l.usage_month
    FROM p2p.tier_limits t
    LEFT JOIN p2p.transfer_limits l ON l.user_id = :user_id AND l.currency = t.currency
    WHERE t.kyc_tier = :tier
    ORDER BY t.currency
    """
)
_OFFERED = text("SELECT EXISTS (SELECT 1 FROM p2p.tier_limits WHERE currency = :currency)")
_OVERRIDE = text(
    """
    INSERT INTO p2p.transfer_limits AS l
        (user_id, currency, per_transfer_limit, daily_limit, monthly_limit)
    VALUES (:user_id, :currency, :per_transfer, :daily, :monthly)
    ON CONFLICT (user_id, currency) DO UPDATE SET
        per_transfer_limit = EXCLUDED.per_transfer_limit,
        daily_limit = EXCLUDED.daily_limit,
        monthly_limit = EXCLUDED.monthly_limit,
        updated_at = now()
    """
)


async def use(
    conn: AsyncConnection,
    *,
    user_id: str,
    tier: int,
    currency: str,
    amount: int,
    day: date,
    month: date,
) -> Row[Any]:
    params = {
        "user_id": user_id,
        "tier": tier,
        "currency": currency,
        "amount": amount,
        "day": day,
        "month": month,
    }
    return (await conn.execute(_USE, params)).one()


async def view(
    conn: AsyncConnection, *, user_id: str, tier: int, day: date, month: date
) -> list[Row[Any]]:
    params = {"user_id": user_id, "tier": tier, "day": day, "month": month}
    return list((await conn.execute(_VIEW, params)).all())


async def set_override(
    conn: AsyncConnection,
    *,
    user_id: str,
    currency: str,
    per_transfer: int | None,
    daily: int | None,
    monthly: int | None,
) -> None:
    params = {
        "user_id": user_id,
        "currency": currency,
        "per_transfer": per_transfer,
        "daily": daily,
        "monthly": monthly,
    }
    await conn.execute(_OVERRIDE, params)


async def offered(conn: AsyncConnection, currency: str) -> bool:
    """Whether transfers in `currency` are offered at any KYC tier."""
    return bool((await conn.execute(_OFFERED, {"currency": currency})).scalar_one())


_GIVE_BACK = text(
    """
    UPDATE p2p.transfer_limits SET
        used_today = CASE WHEN usage_day = :day THEN greatest(used_today - :amount, 0)
                          ELSE used_today END,
        used_this_month = CASE WHEN usage_month = :month
                               THEN greatest(used_this_month - :amount, 0)
                               ELSE used_this_month END,
        updated_at = now()
    WHERE user_id = :user_id AND currency = :currency
      AND (usage_day = :day OR usage_month = :month)
    """
)


async def give_back(
    conn: AsyncConnection, *, user_id: str, currency: str, amount: int, day: date, month: date
) -> None:
    """Subtract `amount` from the windows that are still the ones it was counted in."""
    params = {
        "user_id": user_id,
        "currency": currency,
        "amount": amount,
        "day": day,
        "month": month,
    }
    await conn.execute(_GIVE_BACK, params)
