"""What the Loyalty Service holds and answers: earn rules, the balance view, activity lines,
redemptions, and its problems."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictInt, model_validator

from billfold.config import LoyaltyTier, Settings
from billfold.platform.clock import utcnow
from billfold.platform.errors import Conflict, ProblemError, Unprocessable
from billfold.platform.money import POINTS, is_currency
from billfold.platform.validation import Strict

ActivityType = Literal["earned", "reversed", "redeemed", "expired"]

# The largest integer every JSON parser keeps exact.
MAX_POINTS = 2**53 - 1


@dataclass
class LoyaltyRuntime:
    """The service's settings and its clock (a test moves the clock to expire points or let
    spend roll out of the 12-month window)."""

    settings: Settings
    clock: Callable[[], datetime] = field(default=utcnow)

    def __post_init__(self) -> None:
        # Settings checked the codes against ISO 4217; the wallet holds fewer (no gold, no test
        # codes), and a redemption into one it refuses would fail at request time.
        configured = set(self.settings.loyalty_redemption_rates)
        for tier in self.settings.loyalty_tiers:
            configured |= set(tier.min_spend)
        refused = sorted(c for c in configured if not is_currency(c) or c == POINTS)
        if refused:
            raise ValueError(f"loyalty settings name currencies a wallet cannot hold: {refused}")

    @property
    def tiers(self) -> list[LoyaltyTier]:
        return self.settings.loyalty_tiers

    def tier(self, name: str) -> LoyaltyTier:
        """The named tier's settings; a tier no longer configured counts as the lowest."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return self.tiers[0]


@dataclass(frozen=True, slots=True)
class EarnRule:
    """A base rate (`kind` base: points per currency unit) or a bonus (`kind` bonus: a
    multiplier for captures matching every condition that is set, with caps on its extra
    points)."""

    id: str
    name: str
    kind: Literal["base", "bonus"]
    currency: str | None
    points_per_unit: Decimal | None
    mcc: str | None
    category: str | None
    merchant_id: str | None
    channel: str | None
    multiplier: Decimal | None
    cap_per_transaction: int | None
    cap_per_month: int | None
    priority: int
    active: bool


@dataclass(frozen=True, slots=True)
class Capture:
    """What the loyalty service reads from a `payment.captured` event."""

    user_id: str
    transaction_id: str
    capture_id: str
    amount: int
    currency: str
    category: str | None
    mcc: str | None
    merchant_id: str | None
    channel: str | None


# --- HTTP shapes ------------------------------------------------------------------------------


class TierProgress(BaseModel):
    """How far the rolling 12-month net spend is from the next tier, in one currency."""

    next_tier: str | None = Field(description="null at the highest tier")
    currency: str
    spend: int = Field(description="Net spend (captures - refunds) of the last 365 days")
    needed: int = Field(description="Minor units still to spend for the next tier (0 at the top)")


class ExpiringSoon(BaseModel):
    points: int = Field(description="Points that expire within the window, if not spent")
    expires_at: datetime | None = Field(description="When the earliest of them expire")
    window_days: int


class LoyaltyAccount(BaseModel):
    """`GET /v1/loyalty`: the points balance, tier and what is coming."""

    balance: int = Field(description="Points (PTS); negative only after a refund's clawback")
    tier: str
    multiplier: float = Field(description="The tier's earn multiplier")
    progress: TierProgress
    expiring_soon: ExpiringSoon


class ActivityLine(BaseModel):
    id: str
    type: ActivityType
    points: int = Field(description="Signed: positive for earned, negative otherwise")
    reference: str = Field(description="The capture, refund, redemption or payment behind it")
    created_at: datetime


class NewRedemption(Strict):
    points: StrictInt = Field(gt=0, le=MAX_POINTS)
    currency: str = Field(min_length=3, max_length=3)


class Redemption(BaseModel):
    id: str
    points: int
    amount: int = Field(description="Minor units credited to the wallet")
    currency: str
    balance: int = Field(description="Points left after the redemption")
    created_at: datetime


# --- problems ---------------------------------------------------------------------------------


class InsufficientPoints(ProblemError):
    status, code, title = 422, "insufficient_points", "Not enough points"


class RedemptionCurrencyNotSupported(Unprocessable):
    code, title = "currency_not_supported", "Currency not supported for redemptions"


class InvalidRedemptionAmount(Unprocessable):
    code, title = "invalid_points", "Invalid number of points"


class RuleConflict(Conflict):
    code, title = "earn_rule_conflict", "Earn rule conflict"


# --- earn rules (administrators) ----------------------------------------------------------------

RuleId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Condition = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


def _json_number(value: object) -> object:
    # A rate is a JSON number, as amounts are integers: "2" or true is a 422, never coerced.
    if isinstance(value, (str, bool)):
        raise ValueError("must be a number")
    return value


Multiplier = Annotated[
    Decimal,
    BeforeValidator(_json_number),
    Field(ge=1, le=100, max_digits=8, decimal_places=3),
]
PointsPerUnit = Annotated[
    Decimal,
    BeforeValidator(_json_number),
    Field(ge=0, le=10_000, max_digits=12, decimal_places=4),
]
Cap = Annotated[StrictInt, Field(ge=0, le=MAX_POINTS)]
Priority = Annotated[StrictInt, Field(ge=-1000, le=1000)]


class EarnRuleView(BaseModel):
    id: str
    name: str
    kind: Literal["base", "bonus"]
    currency: str | None
    points_per_unit: float | None = Field(description="base: points per currency unit")
    mcc: str | None
    category: str | None
    merchant_id: str | None
    channel: str | None
    multiplier: float | None = Field(description="bonus: the multiplier of the standard points")
    cap_per_transaction: int | None = Field(description="bonus: most extra points a capture")
    cap_per_month: int | None = Field(description="bonus: most extra points a calendar month")
    priority: int
    active: bool

    @classmethod
    def of(cls, rule: EarnRule) -> EarnRuleView:
        values = {k: getattr(rule, k) for k in EarnRule.__slots__}
        return cls.model_validate(values)


class NewEarnRule(Strict):
    """A base rate (`kind` base: `currency` and `points_per_unit`) or a bonus (`kind` bonus:
    `multiplier`, optional conditions and caps)."""

    id: RuleId
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    kind: Literal["base", "bonus"]
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    points_per_unit: PointsPerUnit | None = None
    mcc: str | None = Field(default=None, pattern=r"^[0-9]{4}$")
    category: Condition | None = None
    merchant_id: Condition | None = None
    channel: Condition | None = None
    multiplier: Multiplier | None = None
    cap_per_transaction: Cap | None = None
    cap_per_month: Cap | None = None
    priority: Priority = 0
    active: StrictBool = True

    @model_validator(mode="after")
    def _shape(self) -> NewEarnRule:
        if self.kind == "base" and (
            self.currency is None or self.points_per_unit is None or self.multiplier is not None
        ):
            raise ValueError("a base rule has a currency and points_per_unit, no multiplier")
        if self.kind == "bonus" and (self.multiplier is None or self.points_per_unit is not None):
            raise ValueError("a bonus rule has a multiplier, no points_per_unit")
        return self


class EarnRuleChange(Strict):
    """What an administrator may change of a rule (its conditions are its identity: add a new
    rule and deactivate the old one instead)."""

    name: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    points_per_unit: PointsPerUnit | None = None
    multiplier: Multiplier | None = None
    cap_per_transaction: Cap | None = None
    cap_per_month: Cap | None = None
    priority: Priority | None = None
    active: StrictBool | None = None
