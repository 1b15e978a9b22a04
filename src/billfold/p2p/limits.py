"""Transfer limits by KYC tier with per-user overrides, counted in the sender's local day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import users
from billfold.p2p.models import (
    CurrencyNotSupported,
    LimitExceeded,
    LimitOverride,
    LimitsView,
    LimitWindow,
    TransferLimits,
)
from billfold.p2p.store import limits as store
from billfold.platform.clock import utcnow
from billfold.platform.money import Money


@dataclass(frozen=True, slots=True)
class LocalCalendar:
    """The user's current day and month, and when each rolls over (as UTC instants)."""

    day: date
    month: date
    day_ends: datetime
    month_ends: datetime


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _start_of(d: date, timezone: str) -> datetime:
    """Local midnight that begins `d` in `timezone`, as a UTC instant."""
    return datetime.combine(d, time(), tzinfo=_zone(timezone)).astimezone(UTC)


def _next_month(month: date) -> date:
    return (month + timedelta(days=32)).replace(day=1)


def local_calendar(timezone: str, now: datetime | None = None) -> LocalCalendar:
    local = (now or utcnow()).astimezone(_zone(timezone))
    day = local.date()
    month = day.replace(day=1)
    return LocalCalendar(
        day,
        month,
        _start_of(day + timedelta(days=1), timezone),
        _start_of(_next_month(month), timezone),
    )


@dataclass(frozen=True, slots=True)
class CountedIn:
    """The local day and month whose usage a transfer was added to."""

    day: date
    month: date


async def count_transfer(conn: AsyncConnection, sender: users.Party, money: Money) -> CountedIn:
    """Add `money` to the sender's usage, or raise if a limit would be exceeded (the caller's
    transaction then rolls back, usage included). Returns the windows it was counted in, for
    `give_back`: not always today here (after a move to a time zone behind, usage keeps
    counting in the day that is still ahead)."""
    cal = local_calendar(sender.timezone)
    row = await store.use(
        conn,
        user_id=sender.user_id,
        tier=sender.kyc_tier,
        currency=money.currency,
        amount=money.amount,
        day=cal.day,
        month=cal.month,
    )
    if row.per_transfer is None:
        raise CurrencyNotSupported(f"Transfers in {money.currency} are not available")
    if money.amount > row.per_transfer:
        raise LimitExceeded(
            f"The most you can send in one transfer is {Money(row.per_transfer, money.currency).display()}",
            extra={"limit": "per_transfer", "remaining": row.per_transfer},
        )
    for window, used, limit in (
        ("daily", row.used_today, row.daily),
        ("monthly", row.used_this_month, row.monthly),
    ):
        if used > limit:
            remaining = max(0, limit - (used - money.amount))
            raise LimitExceeded(
                f"This transfer would exceed your {window} limit; "
                f"{Money(remaining, money.currency).display()} is left",
                extra={"limit": window, "remaining": remaining},
            )
    return CountedIn(row.usage_day, row.usage_month)


async def view(conn: AsyncConnection, party: users.Party) -> LimitsView:
    cal = local_calendar(party.timezone)
    rows = await store.view(
        conn, user_id=party.user_id, tier=party.kyc_tier, day=cal.day, month=cal.month
    )
    return LimitsView(
        kyc_tier=party.kyc_tier,
        timezone=party.timezone,
        data=[
            TransferLimits(
                currency=r.currency,
                per_transfer=r.per_transfer,
                daily=LimitWindow(
                    limit=r.daily,
                    used=r.used_today,
                    remaining=max(0, r.daily - r.used_today),
                    # Usage counted in a day that is still ahead here (the user moved to a time
                    # zone behind) lasts until that day is over here too.
                    resets_at=(
                        _start_of(r.usage_day + timedelta(days=1), party.timezone)
                        if r.usage_day is not None and r.usage_day > cal.day
                        else cal.day_ends
                    ),
                ),
                monthly=LimitWindow(
                    limit=r.monthly,
                    used=r.used_this_month,
                    remaining=max(0, r.monthly - r.used_this_month),
                    resets_at=(
                        _start_of(_next_month(r.usage_month), party.timezone)
                        if r.usage_month is not None and r.usage_month > cal.month
                        else cal.month_ends
                    ),
                ),
            )
            for r in rows
        ],
    )


async def override(
    conn: AsyncConnection, party: users.Party, currency: str, limits: LimitOverride
) -> None:
    """Set (or, with nulls, clear) the user's own limits in `currency`; an override cannot
    offer a currency that transfers are not offered in (loyalty points, for one)."""
    await check_offered(conn, currency)
    await store.set_override(
        conn,
        user_id=party.user_id,
        currency=currency,
        per_transfer=limits.per_transfer,
        daily=limits.daily,
        monthly=limits.monthly,
    )


async def check_offered(conn: AsyncConnection, currency: str) -> None:
    """Refuse (`currency_not_supported`) a currency that transfers are not offered in at any
    KYC tier (loyalty points, for one)."""
    if not await store.offered(conn, currency):
        raise CurrencyNotSupported(f"Transfers in {currency} are not available")


async def give_back(
    conn: AsyncConnection, sender_id: str, money: Money, counted_in: CountedIn
) -> None:
    """A transfer that never reached anyone (cancelled, refused, unclaimed) stops counting:
    its amount leaves the daily/monthly usage it was counted in (`count_transfer`'s answer),
    if that window is still the current one. A reversed transfer keeps counting: it was paid."""
    await store.give_back(
        conn,
        user_id=sender_id,
        currency=money.currency,
        amount=money.amount,
        day=counted_in.day,
        month=counted_in.month,
    )
