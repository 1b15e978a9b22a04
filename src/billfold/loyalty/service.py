"""The loyalty rules: earning on captures, proportional reversal on refunds, FIFO lots that
expire, tiers by rolling 12-month net spend, redemption into the wallet.

Every change to a user's points runs under their member row lock (taken first, before any
ledger account), in the caller's one transaction with its ledger postings, rows and events.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger
from billfold.config import LoyaltyTier
from billfold.loyalty import events, store
from billfold.loyalty.models import (
    ActivityLine,
    Capture,
    EarnRule,
    EarnRuleChange,
    ExpiringSoon,
    InsufficientPoints,
    InvalidRedemptionAmount,
    LoyaltyAccount,
    LoyaltyRuntime,
    NewEarnRule,
    NewRedemption,
    Redemption,
    RedemptionCurrencyNotSupported,
    RuleConflict,
    TierProgress,
)
from billfold.platform.clock import rfc3339
from billfold.platform.db import unit_of_work
from billfold.platform.errors import FieldError, NotFound, Unprocessable
from billfold.platform.ids import new_id
from billfold.platform.money import POINTS, Money, minor_units

# Who issues and takes back points, and pays for redemptions.
LOYALTY = (ledger.SYSTEM, "loyalty")
POINTS_ACCOUNT = "points"
# Ledger posting kinds (what a statement line says moved the points).
POSTING_EARN = "loyalty_earn"
POSTING_REVERSAL = "loyalty_reversal"
POSTING_EXPIRY = "loyalty_expiry"
POSTING_REDEMPTION = "loyalty_redemption"
SPEND_WINDOW = timedelta(days=365)


# --- points -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Earned:
    """How many points a capture earns and which rules gave them."""

    base_points: int
    bonus_points: int
    base_rule: EarnRule | None
    bonus_rule: EarnRule | None

    @property
    def points(self) -> int:
        return self.base_points + self.bonus_points

    @property
    def rule_ids(self) -> list[str]:
        return [r.id for r in (self.base_rule, self.bonus_rule) if r is not None]


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def _matches(rule: EarnRule, capture: Capture) -> bool:
    conditions = (
        (rule.currency, capture.currency),
        (rule.mcc, capture.mcc),
        (rule.category, capture.category),
        (rule.merchant_id, capture.merchant_id),
        (rule.channel, capture.channel),
    )
    return all(wanted is None or wanted == actual for wanted, actual in conditions)


def points_for(capture: Capture, rules: Sequence[EarnRule], tier_multiplier: Decimal) -> Earned:
    """Points of one capture before the monthly cap: floor(units * base rate * tier) standard
    points, and a bonus rule's extra floor(… * rule multiplier) - standard, capped per
    transaction. `rules` come best first (priority, then multiplier): the first match wins."""
    base = next((r for r in rules if r.kind == "base" and r.currency == capture.currency), None)
    if base is None or base.points_per_unit is None or capture.amount <= 0:
        return Earned(0, 0, base, None)
    units = Decimal(capture.amount) / (Decimal(10) ** minor_units(capture.currency))
    standard = units * base.points_per_unit * tier_multiplier
    base_points = _floor(standard)
    bonus = next((r for r in rules if r.kind == "bonus" and _matches(r, capture)), None)
    if bonus is None or bonus.multiplier is None:
        return Earned(base_points, 0, base, None)
    extra = _floor(standard * bonus.multiplier) - base_points
    if bonus.cap_per_transaction is not None:
        extra = min(extra, bonus.cap_per_transaction)
    return Earned(base_points, max(extra, 0), base, bonus)


def _month(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(now.year, now.month)[1]
    return start, start + timedelta(days=days)


async def _points_balance(conn: AsyncConnection, user_id: str) -> int:
    for balance in await ledger.balances(conn, user_id, kind=POINTS_ACCOUNT):
        if balance.currency == POINTS:
            return balance.posted
    return 0


def _take_fifo(lots: Sequence[Row[Any]], points: int) -> list[tuple[int, int]]:
    """(lot id, points taken) from `lots` in order until `points` are taken or lots run out."""
    taken: list[tuple[int, int]] = []
    for lot in lots:
        if points <= 0:
            break
        n = min(int(lot.remaining), points)
        taken.append((int(lot.id), n))
        points -= n
    return taken


# --- earn ---------------------------------------------------------------------------------------


async def earn(conn: AsyncConnection, rt: LoyaltyRuntime, capture: Capture) -> int:
    """Credit the points of one capture (at most once per capture id); returns the points."""
    now = rt.clock()
    member = await store.join_and_lock(conn, capture.user_id, rt.tiers[0].name, now)
    if await store.earned(conn, capture.capture_id):
        return 0
    tier = rt.tier(member.tier)
    earned = points_for(capture, await store.active_rules(conn), tier.multiplier)
    bonus_points = earned.bonus_points
    if earned.bonus_rule is not None and earned.bonus_rule.cap_per_month is not None:
        start, end = _month(now)
        used = await store.bonus_this_month(conn, capture.user_id, earned.bonus_rule.id, start, end)
        bonus_points = max(0, min(bonus_points, earned.bonus_rule.cap_per_month - used))
    points = earned.base_points + bonus_points
    # The rules that gave points: a bonus capped to nothing this month gave none.
    rule_ids = earned.rule_ids if bonus_points else earned.rule_ids[:1]
    posting = None
    if points > 0:
        posting = await ledger.move(
            conn,
            Money(points, POINTS),
            debit=LOYALTY,
            credit=(capture.user_id, POINTS_ACCOUNT),
            kind=POSTING_EARN,
            reference=capture.capture_id,
            memo=f"Points for payment {capture.transaction_id}",
        )
    earning_id = await store.insert_earning(
        conn,
        capture,
        tier=tier.name,
        base_points=earned.base_points,
        bonus_points=bonus_points,
        rule_ids=rule_ids,
        bonus_rule_id=earned.bonus_rule.id if earned.bonus_rule and bonus_points else None,
        posting_id=posting.id if posting else None,
        now=now,
    )
    if earning_id is None:  # impossible under the member lock: never post points unrecorded
        raise RuntimeError(f"capture {capture.capture_id} was earned by another transaction")
    if posting is not None:
        balance = posting.balance_of(capture.user_id, POINTS_ACCOUNT).posted
        # Points that pay back a clawback debt (balance below zero) start no lot.
        in_lot = max(0, min(points, balance))
        expires_at = now + timedelta(days=rt.settings.loyalty_points_ttl_days)
        if in_lot:
            await store.insert_lot(
                conn,
                user_id=capture.user_id,
                earning_id=earning_id,
                transaction_id=capture.transaction_id,
                points=in_lot,
                now=now,
                expires_at=expires_at,
            )
        await store.add_activity(conn, capture.user_id, "earned", points, capture.capture_id, now)
        await events.publish(
            conn,
            events.POINTS_EARNED,
            capture.user_id,
            {
                "user_id": capture.user_id,
                "transaction_id": capture.transaction_id,
                "capture_id": capture.capture_id,
                "points": points,
                "spend_amount": capture.amount,
                "currency": capture.currency,
                "rule_ids": rule_ids,
                "tier": tier.name,
                "balance": balance,
                "expires_at": rfc3339(expires_at),
            },
        )
    if await store.refunded_before(conn, capture.transaction_id):
        # Refunds of this payment were handled before this capture (a late replay): what
        # they refunded takes its share of these points back now.
        await _take_back(
            conn,
            user_id=capture.user_id,
            transaction_id=capture.transaction_id,
            reversal_key=f"late:{capture.capture_id}",
            refund_id=None,
            capture_id=capture.capture_id,
            refund_amount=0,
            currency=capture.currency,
            now=now,
        )
    await evaluate_tier(conn, rt, capture.user_id, member.tier, now)
    return points


# --- reverse on refund --------------------------------------------------------------------------


async def reverse_refund(
    conn: AsyncConnection,
    rt: LoyaltyRuntime,
    *,
    user_id: str,
    transaction_id: str,
    refund_id: str,
    refund_amount: int,
    currency: str,
) -> int:
    """Take back the points of a succeeded refund (at most once per refund id): after it, the
    payment has lost floor(earned * refunded / captured) points in all, so rounding never
    drifts over several partial refunds and a full refund takes back exactly what was earned.
    The payment's own lot gives first, then the oldest; what the lots no longer hold (points
    already redeemed) leaves the balance below zero. A refund of a payment that earned nothing
    (yet) is recorded too: a capture handled after it (a dead letter replayed late) takes its
    share back at once. Returns the points taken back."""
    now = rt.clock()
    member = await store.join_and_lock(conn, user_id, rt.tiers[0].name, now)
    if await store.reversed_refund(conn, refund_id):
        return 0  # this refund was handled
    points = await _take_back(
        conn,
        user_id=user_id,
        transaction_id=transaction_id,
        reversal_key=refund_id,
        refund_id=refund_id,
        capture_id=None,
        refund_amount=refund_amount,
        currency=currency,
        now=now,
    )
    await evaluate_tier(conn, rt, user_id, member.tier, now)
    return points


async def _take_back(
    conn: AsyncConnection,
    *,
    user_id: str,
    transaction_id: str,
    reversal_key: str,
    refund_id: str | None,
    capture_id: str | None,
    refund_amount: int,
    currency: str,
    now: datetime,
) -> int:
    """Bring the payment's reversed points up to floor(earned * refunded / captured), counting
    `refund_amount` as refunded now, but never past what did not expire: expired points went
    back to the system once already, and taking them again would take another payment's points.
    One reversal row (UNIQUE `reversal_key`) either way."""
    totals = await store.transaction_totals(conn, transaction_id)
    captured, earned = int(totals.captured), int(totals.earned)
    refunded = min(int(totals.refunded) + refund_amount, captured)
    target = earned * refunded // captured if captured > 0 else 0
    points = max(0, min(target, earned - int(totals.expired)) - int(totals.reversed))
    if points == 0 and refund_amount == 0:
        return 0  # a late capture whose share was taken back already: nothing to record
    reference = refund_id or capture_id or reversal_key
    posting = None
    if points > 0:
        posting = await ledger.move(
            conn,
            Money(points, POINTS),
            debit=(user_id, POINTS_ACCOUNT),
            credit=LOYALTY,
            kind=POSTING_REVERSAL,
            reference=reference,
            memo=f"Points of refunded payment {transaction_id}",
        )
        lots = await store.open_lots(conn, user_id, first=transaction_id)
        await store.take_from_lots(conn, _take_fifo(lots, points))
    await store.insert_reversal(
        conn,
        refund_id=reversal_key,
        transaction_id=transaction_id,
        user_id=user_id,
        refund_amount=refund_amount,
        currency=currency,
        points=points,
        posting_id=posting.id if posting else None,
        now=now,
    )
    if posting is not None:
        balance = posting.balance_of(user_id, POINTS_ACCOUNT).posted
        await store.add_activity(conn, user_id, "reversed", -points, reference, now)
        data = {
            "user_id": user_id,
            "transaction_id": transaction_id,
            "refund_id": refund_id,
            "refund_amount": refund_amount,
            "currency": currency,
            "points": points,
            "balance": balance,
        }
        if capture_id is not None:
            data["capture_id"] = capture_id
        await events.publish(conn, events.POINTS_REVERSED, user_id, data)
    return points


# --- tiers --------------------------------------------------------------------------------------


def tier_for(tiers: Sequence[LoyaltyTier], spend: dict[str, int]) -> LoyaltyTier:
    """The highest tier whose threshold the net spend reaches in any one currency (the first
    tier is everyone's)."""
    for tier in reversed(tiers[1:]):
        if any(spend.get(c, 0) >= minimum for c, minimum in tier.min_spend.items()):
            return tier
    return tiers[0]


async def evaluate_tier(
    conn: AsyncConnection, rt: LoyaltyRuntime, user_id: str, current: str, now: datetime
) -> str:
    """Move the (locked) member to the tier their rolling 12-month net spend earns, with a
    `tier.changed` event when it changes."""
    spend = await store.net_spend(conn, user_id, now - SPEND_WINDOW, now)
    tier = tier_for(rt.tiers, spend)
    if tier.name != current:
        await store.set_tier(conn, user_id, tier.name, now)
        await events.publish(
            conn,
            events.TIER_CHANGED,
            user_id,
            {
                "user_id": user_id,
                "from_tier": current,
                "to_tier": tier.name,
                "multiplier": float(tier.multiplier),
            },
        )
    return tier.name


async def reevaluate_tiers(engine: AsyncEngine, rt: LoyaltyRuntime, *, batch: int = 200) -> int:
    """The scheduled job: re-evaluate every member above the lowest tier (spend that rolled out
    of the 12-month window downgrades them), one member per transaction; members busy with
    another loyalty change are skipped (that change re-evaluates them). Returns the changes."""
    lowest = rt.tiers[0].name
    changed, after = 0, ""
    while True:
        async with engine.connect() as conn:
            user_ids = await store.members_above(conn, lowest, after, batch)
            await conn.rollback()
        for user_id in user_ids:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                member = await store.lock_member(conn, user_id, skip_locked=True)
                if member is None:
                    continue
                tier = await evaluate_tier(conn, rt, user_id, member.tier, rt.clock())
                changed += tier != member.tier
        if len(user_ids) < batch:
            return changed
        after = user_ids[-1]


# --- expiry -------------------------------------------------------------------------------------


async def _expire_member(
    conn: AsyncConnection, rt: LoyaltyRuntime, user_id: str, now: datetime
) -> int:
    """Expire the (locked) member's lots past their expiry: what they hold goes back to the
    system account with one posting and one event."""
    lots = await store.due_lots(conn, user_id, now)
    points = sum(int(lot.remaining) for lot in lots)
    if points == 0:
        return 0
    await store.expire_lots(conn, [int(lot.id) for lot in lots], now)
    posting = await ledger.move(
        conn,
        Money(points, POINTS),
        debit=(user_id, POINTS_ACCOUNT),
        credit=LOYALTY,
        kind=POSTING_EXPIRY,
        reference=f"expiry:{user_id}",
        memo="Points expired",
    )
    for lot in lots:
        await store.add_activity(
            conn, user_id, "expired", -int(lot.remaining), lot.transaction_id, now
        )
    await events.publish(
        conn,
        events.POINTS_EXPIRED,
        user_id,
        {
            "user_id": user_id,
            "points": points,
            "lots": [
                {
                    "transaction_id": lot.transaction_id,
                    "points": int(lot.remaining),
                    "expires_at": rfc3339(lot.expires_at),
                }
                for lot in lots
            ],
            "balance": posting.balance_of(user_id, POINTS_ACCOUNT).posted,
        },
    )
    return points


async def expire_points(
    engine: AsyncEngine,
    rt: LoyaltyRuntime,
    *,
    batch: int = 200,
    budget_seconds: float = 60.0,
) -> int:
    """The scheduled job: expire lots past their expiry, one member per transaction, batch
    after batch (the members of the `batch` lots due first) until none is due or the run has
    used `budget_seconds` (the next run goes on), so the job keeps up with any volume. Member
    rows another transaction holds are skipped (SKIP LOCKED) until the next run. Returns the
    points expired."""
    now = rt.clock()
    deadline = time.monotonic() + budget_seconds
    expired = 0
    busy: list[str] = []  # members locked by another transaction: left for the next run
    while True:
        async with engine.connect() as conn:
            user_ids = await store.due_users(conn, now, batch, skip=busy)
            await conn.rollback()
        for user_id in user_ids:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                if await store.lock_member(conn, user_id, skip_locked=True) is None:
                    busy.append(user_id)
                    continue
                expired += await _expire_member(conn, rt, user_id, now)
        if not user_ids or time.monotonic() >= deadline:
            return expired


# --- redemption ---------------------------------------------------------------------------------


async def redeem(
    conn: AsyncConnection,
    rt: LoyaltyRuntime,
    user_id: str,
    body: NewRedemption,
    *,
    idempotency_key: str,
) -> Redemption:
    """Turn points into wallet money at the currency's configured rate, in the caller's one
    transaction: the member lock, FIFO lot consumption, the PTS posting (points → system), the
    money posting (system rewards → wallet), the redemption row and its event."""
    rate = rt.settings.loyalty_redemption_rates.get(body.currency)
    if rate is None or body.currency == POINTS:
        raise RedemptionCurrencyNotSupported(
            f"Points cannot be redeemed into {body.currency}",
            errors=[FieldError(pointer="#/currency", detail="not offered for redemptions")],
            extra={"currencies": sorted(rt.settings.loyalty_redemption_rates)},
        )
    if body.points < rate.minimum or body.points % rate.step:
        raise InvalidRedemptionAmount(
            f"Redeem at least {rate.minimum} points, in steps of {rate.step}",
            errors=[FieldError(pointer="#/points", detail="below the minimum or off the step")],
            extra={"minimum": rate.minimum, "step": rate.step},
        )
    amount = body.points // rate.points * rate.amount
    now = rt.clock()
    member = await store.lock_member(conn, user_id)
    if member is None:
        raise InsufficientPoints("You have no points yet", extra={"balance": 0})
    existing = await store.redemption_by_key(conn, user_id, idempotency_key)
    if existing is not None:  # a retry after the edge's record of the answer lapsed
        # The body is points and currency only, so comparing them is comparing the request.
        if (existing.points, existing.currency) != (body.points, body.currency):
            raise Unprocessable(
                "This Idempotency-Key was used with a different request",
                code="idempotency_key_reuse",
            )
        return Redemption(
            id=existing.id,
            points=existing.points,
            amount=existing.amount,
            currency=existing.currency,
            balance=await _points_balance(conn, user_id),
            created_at=existing.created_at,
        )
    # Points past their expiry are not spent: they expire now, in this transaction.
    await _expire_member(conn, rt, user_id, now)
    lots = await store.open_lots(conn, user_id)
    spendable = min(sum(int(lot.remaining) for lot in lots), await _points_balance(conn, user_id))
    if spendable < body.points:
        raise InsufficientPoints(
            f"You have {max(spendable, 0)} points to redeem",
            extra={"balance": max(spendable, 0)},
        )
    await store.take_from_lots(conn, _take_fifo(lots, body.points))
    redemption_id = new_id("rdm")
    spent = await ledger.move(
        conn,
        Money(body.points, POINTS),
        debit=(user_id, POINTS_ACCOUNT),
        credit=LOYALTY,
        kind=POSTING_REDEMPTION,
        reference=redemption_id,
        memo="Points redeemed",
    )
    paid = await ledger.move(
        conn,
        Money(amount, body.currency),
        debit=LOYALTY,
        credit=(user_id, "wallet"),
        kind=POSTING_REDEMPTION,
        reference=redemption_id,
        memo="Loyalty points redeemed",
    )
    await store.insert_redemption(
        conn,
        id=redemption_id,
        user_id=user_id,
        idempotency_key=idempotency_key,
        points=body.points,
        amount=amount,
        currency=body.currency,
        points_posting_id=spent.id,
        money_posting_id=paid.id,
        now=now,
    )
    await store.add_activity(conn, user_id, "redeemed", -body.points, redemption_id, now)
    balance = spent.balance_of(user_id, POINTS_ACCOUNT).posted
    await events.publish(
        conn,
        events.POINTS_REDEEMED,
        user_id,
        {
            "user_id": user_id,
            "redemption_id": redemption_id,
            "points": body.points,
            "amount": amount,
            "currency": body.currency,
            "balance": balance,
        },
    )
    return Redemption(
        id=redemption_id,
        points=body.points,
        amount=amount,
        currency=body.currency,
        balance=balance,
        created_at=now,
    )


# --- reads --------------------------------------------------------------------------------------


def _progress(rt: LoyaltyRuntime, current: str, spend: dict[str, int]) -> TierProgress:
    names = [t.name for t in rt.tiers]
    index = names.index(current) if current in names else 0
    if index + 1 >= len(rt.tiers):
        top = max(spend, key=lambda c: spend[c], default=None)
        currency = top or next(iter(rt.tiers[index].min_spend), "USD")
        return TierProgress(
            next_tier=None, currency=currency, spend=spend.get(currency, 0), needed=0
        )
    target = rt.tiers[index + 1]
    if not target.min_spend:
        return TierProgress(next_tier=target.name, currency="USD", spend=0, needed=0)
    # The currency the member is closest to the next tier in.
    currency = max(target.min_spend, key=lambda c: spend.get(c, 0) / target.min_spend[c])
    have = spend.get(currency, 0)
    return TierProgress(
        next_tier=target.name,
        currency=currency,
        spend=have,
        needed=max(0, target.min_spend[currency] - have),
    )


async def account(conn: AsyncConnection, rt: LoyaltyRuntime, user_id: str) -> LoyaltyAccount:
    """The balance, tier, progress to the next tier and points expiring soon."""
    now = rt.clock()
    member = await store.member(conn, user_id)
    tier = rt.tier(member.tier) if member is not None else rt.tiers[0]
    spend = await store.net_spend(conn, user_id, now - SPEND_WINDOW, now)
    window = rt.settings.loyalty_expiring_soon_days
    soon = await store.expiring(conn, user_id, now + timedelta(days=window))
    return LoyaltyAccount(
        balance=await _points_balance(conn, user_id),
        tier=tier.name,
        multiplier=float(tier.multiplier),
        progress=_progress(rt, tier.name, spend),
        expiring_soon=ExpiringSoon(
            points=int(soon.points), expires_at=soon.first, window_days=window
        ),
    )


async def activity(
    conn: AsyncConnection, user_id: str, *, after: int | None, limit: int
) -> list[ActivityLine]:
    """The user's activity, newest first (`limit` + 1 rows for the page's next cursor)."""
    rows = await store.activity(conn, user_id, after=after, limit=limit)
    return [
        ActivityLine(
            id=str(r.id),
            type=r.type,
            points=r.points,
            reference=r.reference,
            created_at=r.created_at,
        )
        for r in rows
    ]


# --- earn rules (administrators) ----------------------------------------------------------------


def _base_rule_exists(currency: str | None) -> RuleConflict:
    return RuleConflict(
        f"{currency or 'This currency'} has an active base rate already; deactivate it first"
    )


async def list_rules(conn: AsyncConnection) -> list[EarnRule]:
    return await store.all_rules(conn)


async def create_rule(conn: AsyncConnection, body: NewEarnRule) -> EarnRule:
    """Add a base rate or a bonus rule; it applies to captures from the next one on."""
    if body.currency == POINTS:
        raise Unprocessable(
            "Points earn no points",
            code="currency_not_supported",
            errors=[FieldError(pointer="#/currency", detail="not a currency that earns")],
        )
    try:
        rule = await store.insert_rule(conn, body.model_dump())
    except store.ActiveBaseRuleExists:
        raise _base_rule_exists(body.currency) from None
    if rule is None:
        raise RuleConflict(f"A rule {body.id} exists already")
    return rule


async def change_rule(conn: AsyncConnection, rule_id: str, body: EarnRuleChange) -> EarnRule:
    """Change a rule's rate, caps, priority, name or whether it is active."""
    rule = await store.get_rule(conn, rule_id)
    if rule is None:
        raise NotFound("No such earn rule", code="earn_rule_not_found")
    wrong = "multiplier" if rule.kind == "base" else "points_per_unit"
    if getattr(body, wrong) is not None:
        raise Unprocessable(
            f"A {rule.kind} rule has no {wrong}",
            errors=[FieldError(pointer=f"#/{wrong}", detail=f"not part of a {rule.kind} rule")],
        )
    try:
        changed = await store.update_rule(conn, rule_id, body.model_dump())
    except store.ActiveBaseRuleExists:
        raise _base_rule_exists(rule.currency) from None
    if changed is None:  # deleted since it was read (rules are never deleted by the API)
        raise NotFound("No such earn rule", code="earn_rule_not_found")
    return changed
