"""The Fraud Service's shared vocabulary: what is checked (`RiskSubject`), what is known about it
(`Features`, named in `FEATURES`), what rules and models say (`RuleHit`, `ModelScore`), and what
is decided (`Assessment`). Features, rules, model and decisions are built against these shapes
only, so each can change without the others."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

Action = Literal["allow", "challenge", "review", "block"]
# Severity order: a rule's direct action is a floor, the most severe one wins.
SEVERITY: dict[Action, int] = {"allow": 0, "challenge": 1, "review": 2, "block": 3}

SubjectKind = Literal["payment", "transfer"]


@dataclass(frozen=True, slots=True)
class RiskSubject:
    """A payment or a transfer about to be made, in one shape (built from the payments'
    `PaymentRisk` or the transfers' `TransferRisk`)."""

    kind: SubjectKind
    subject_id: str  # the transaction id or the transfer id
    user_id: str
    amount: int  # minor units
    currency: str  # ISO 4217
    at: datetime  # when the check runs (timezone-aware, UTC)
    device_id: str | None = None
    ip: str | None = None
    stepped_up: bool = False
    # Payments.
    source: str | None = None  # card | wallet
    payment_method_id: str | None = None
    card_fingerprint: str | None = None  # the funding card's (HMAC) fingerprint, never a PAN
    merchant_id: str | None = None
    merchant_name: str | None = None
    mcc: str | None = None
    category: str | None = None
    merchant_country: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    channel: str | None = None  # contactless | in_app | e_commerce
    # Transfers.
    recipient_id: str | None = None  # a user id, or None for an e-mail/phone not resolved yet
    recipient_key: str | None = None  # who receives: user id, or the contact's keyed hash
    # The normalised e-mail / E.164 phone a transfer is addressed to (matched by the recipient
    # lists only; the features never see it).
    recipient_contact: str | None = None


# Feature values are plain JSON scalars so a snapshot can be stored (jsonb), replayed in a
# backtest and fed to a model in the order of `MODEL_FEATURES`.
FeatureValue = float | int | bool | str | None
Features = Mapping[str, FeatureValue]


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    kind: Literal["int", "float", "bool", "str"]
    description: str
    model: bool = True  # an input of the model (numeric/bool only)


# The catalogue. Windows are sliding and end at `subject.at`; counts and sums include the
# attempt being checked (it is recorded by the check itself, so a burst is seen at once, not
# after the outbox relay catches up). Amounts are minor units of the subject's currency.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("kind", "str", "payment or transfer", model=False),
    FeatureSpec("is_payment", "bool", "1 for a card/wallet payment, 0 for a transfer"),
    FeatureSpec("amount", "int", "the amount in minor units"),
    FeatureSpec("currency", "str", "ISO 4217 code", model=False),
    FeatureSpec("channel", "str", "contactless | in_app | e_commerce | p2p", model=False),
    FeatureSpec("is_ecommerce", "bool", "card-not-present channel"),
    FeatureSpec("mcc", "str", "merchant category code, '' for transfers", model=False),
    FeatureSpec("mcc_risk", "float", "0..1 risk of the merchant category (gambling, crypto…)"),
    FeatureSpec("merchant_country", "str", "ISO 3166 alpha-2, '' if unknown", model=False),
    # Velocity: this user.
    FeatureSpec("user_count_1m", "int", "this user's attempts in the last minute"),
    FeatureSpec("user_count_1h", "int", "this user's attempts in the last hour"),
    FeatureSpec("user_count_24h", "int", "this user's attempts in the last 24 hours"),
    FeatureSpec("user_sum_1h", "int", "sum of this user's attempted amounts, last hour"),
    FeatureSpec("user_sum_24h", "int", "sum of this user's attempted amounts, last 24 hours"),
    FeatureSpec("user_declines_24h", "int", "this user's declined/blocked attempts, 24 hours"),
    # Velocity: device, card, IP, recipient.
    FeatureSpec("device_count_1h", "int", "attempts from this device, last hour"),
    FeatureSpec("device_users_24h", "int", "distinct users on this device, 24 hours"),
    FeatureSpec("card_count_1m", "int", "attempts on this card fingerprint, last minute"),
    FeatureSpec("card_count_1h", "int", "attempts on this card fingerprint, last hour"),
    FeatureSpec("card_declines_1h", "int", "declines on this card fingerprint, last hour"),
    FeatureSpec("ip_count_1h", "int", "attempts from this IP, last hour"),
    FeatureSpec("ip_users_24h", "int", "distinct users from this IP, 24 hours"),
    FeatureSpec("recipient_count_24h", "int", "transfers to this recipient from anyone, 24 h"),
    FeatureSpec("recipient_senders_24h", "int", "distinct senders to this recipient, 24 h"),
    FeatureSpec("user_recipients_24h", "int", "distinct recipients of this sender, 24 h"),
    # Amount against the user's own history (completed payments and transfers).
    FeatureSpec("history_count", "int", "this user's completed payments/transfers, all time"),
    FeatureSpec("amount_mean", "float", "mean of those amounts (0 without history)"),
    FeatureSpec("amount_std", "float", "their standard deviation (0 without history)"),
    FeatureSpec("amount_zscore", "float", "(amount - mean) / max(std, 1); 0 without history"),
    FeatureSpec("amount_to_max", "float", "amount / the largest earlier amount (1 if none)"),
    # Geography (payments with a location).
    FeatureSpec("has_location", "bool", "the payment carries latitude/longitude"),
    FeatureSpec("km_from_last", "float", "distance from the last seen location, km (0 if none)"),
    FeatureSpec("speed_kmh", "float", "implied travel speed from the last location (0 if none)"),
    FeatureSpec("country_mismatch", "bool", "merchant country differs from the profile country"),
    FeatureSpec("new_country", "bool", "a merchant country this user never paid in before"),
    # Who and when.
    FeatureSpec("new_device", "bool", "device never used by this user before (or none given)"),
    FeatureSpec("device_age_hours", "float", "hours since this user first used the device"),
    FeatureSpec("new_recipient", "bool", "a recipient this sender never paid before"),
    FeatureSpec("account_age_days", "float", "days since the user registered"),
    FeatureSpec("kyc_tier", "int", "0 unverified, 1 basic, 2 full"),
    FeatureSpec("hour_of_day", "int", "local hour of the attempt in the user's time zone"),
    FeatureSpec("hour_habit_share", "float", "share of the user's history within ±1 h of now"),
    FeatureSpec("stepped_up", "bool", "the user passed a step-up for this very attempt"),
    FeatureSpec("degraded", "bool", "features came from the fallback (Redis unavailable)"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
MODEL_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.model and f.kind != "str")

# The `mcc_risk` feature: one table for the live features and the synthetic training data, so
# the model learns the very numbers it is fed (the same values as `fraud.features.MCC_RISK`).
# Gambling, quasi-cash, money transfer, crypto and digital goods are where stolen cards are
# cashed out; any other category is `MCC_RISK_DEFAULT`.
MCC_RISK: dict[str, float] = {
    "7995": 0.9,  # betting, casino gambling
    "7800": 0.8,  # government lotteries
    "7801": 0.8,  # online gambling
    "7802": 0.8,  # horse/dog racing
    "6051": 0.8,  # quasi-cash, crypto
    "4829": 0.8,  # money transfer
    "6540": 0.7,  # stored value card load
    "5967": 0.7,  # direct marketing, inbound teleservices
    "6012": 0.6,  # financial institutions, merchandise
    "5966": 0.6,  # outbound telemarketing
    "6011": 0.5,  # ATM cash
    "6010": 0.5,  # manual cash
    "5816": 0.5,  # digital games
    "5944": 0.5,  # jewellery, watches
    "5732": 0.4,  # electronics
    "5947": 0.4,  # gift shops (gift cards)
    "5818": 0.4,  # digital goods, large merchants
    "5817": 0.3,  # digital applications
    "5815": 0.3,  # digital media
    "4722": 0.3,  # travel agencies
    "5999": 0.3,  # miscellaneous retail
}
MCC_RISK_DEFAULT = 0.1


def mcc_risk(mcc: str | None) -> float:
    """The merchant category's risk, 0..1 (0 without an MCC, as for a transfer)."""
    if not mcc:
        return 0.0
    return MCC_RISK.get(mcc, MCC_RISK_DEFAULT)


class FeatureSource(Protocol):
    async def snapshot(
        self, conn: AsyncConnection, subject: RiskSubject
    ) -> dict[str, FeatureValue]:
        """Every name of `FEATURE_NAMES`, for `subject`, recording the attempt in the velocity
        windows (idempotent by `subject.subject_id`). Raises `FeaturesUnavailable` when its
        store cannot answer (the caller falls back)."""
        ...


class FeaturesUnavailable(Exception):
    """The feature store cannot answer now (Redis down or too slow)."""


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A rule whose expression held. `action` is a direct action (a floor) or None; `score` adds
    to the risk score. Shadow hits are recorded and reported, never enforced."""

    rule_id: str
    version: int
    reason_code: str  # stable, e.g. "card_testing_burst"
    description: str  # words a support agent can read
    score: int = 0
    action: Action | None = None
    shadow: bool = False


class RuleEvaluator(Protocol):
    version: str  # identifies the rule set evaluated (stored with every decision)

    def evaluate(self, features: Features) -> list[RuleHit]: ...


@dataclass(frozen=True, slots=True)
class Contribution:
    feature: str
    value: FeatureValue
    weight: float  # signed contribution to the fraud log-odds (or the anomaly score)


@dataclass(frozen=True, slots=True)
class ModelScore:
    """What the model says: probability of fraud, an anomaly score (0..1, 1 = most unusual),
    the version that said it and the features that weighed most."""

    probability: float
    anomaly: float
    version: str
    contributions: tuple[Contribution, ...] = ()
    challenger: ModelScore | None = None  # scored in shadow beside the champion


class Scorer(Protocol):
    version: str

    def score(self, features: Features) -> ModelScore: ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score bands (0-1000) for the actions; `degraded_shift` lowers every band when features
    come from the fallback, so a blind check is stricter."""

    challenge: int = 500
    review: int = 700
    block: int = 900
    degraded_shift: int = 150


@dataclass(frozen=True, slots=True)
class Assessment:
    """The decision: action, 0-1000 score, explanations in words, and what it was based on."""

    action: Action
    score: int
    reasons: tuple[str, ...]  # stable reason codes (rule reason codes, "model_score", ...)
    explanations: tuple[str, ...]  # sentences for a support agent
    hits: tuple[RuleHit, ...] = ()
    model: ModelScore | None = None
    rule_version: str | None = None
    features: Mapping[str, FeatureValue] = field(default_factory=dict)
    degraded: bool = False
