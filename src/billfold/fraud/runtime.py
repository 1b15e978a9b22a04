"""What the Fraud Service needs at run time, built once per process by the app (and the bench):
where features come from (live and fallback), the rule set, the model, the score bands, and the
runtimes of the payments and transfers whose reviews it decides."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import p2p, transactions
from billfold.config import Settings
from billfold.fraud.models import (
    Features,
    FeatureSource,
    RiskSubject,
    RuleHit,
    Scorer,
    Thresholds,
)


class RuleSet(Protocol):
    """A `RuleEvaluator` that may also check the subject itself (the block/allow lists)."""

    version: str

    def evaluate(self, features: Features, subject: RiskSubject | None = None) -> list[RuleHit]: ...


class RuleSource(Protocol):
    """Where the current rule set comes from (the rules' `RuleBook`: cached, refreshed when the
    stored set changes, possibly reading with the check's connection)."""

    async def current(self, conn: AsyncConnection) -> RuleSet: ...


@dataclass(frozen=True)
class FixedRules:
    """A `RuleSource` that always answers one rule set (offline evaluation, tests, bench)."""

    rules: RuleSet

    async def current(self, conn: AsyncConnection) -> RuleSet:
        return self.rules


class FraudMetrics:
    """Check latency by outcome and fallbacks by reason, on the app's registry (`/metrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Histogram(
            "billfold_fraud_check_duration_seconds",
            "Time of one risk check (features, rules, model, decision write) by outcome",
            ["outcome"],
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.fallbacks = Counter(
            "billfold_fraud_fallbacks_total",
            "Risk checks that took a fallback: features (Redis), model, error",
            ["reason"],
            registry=registry,
        )


def thresholds_from(settings: Settings) -> Thresholds:
    """The score bands configured in `settings`."""
    return Thresholds(
        challenge=settings.fraud_threshold_challenge,
        review=settings.fraud_threshold_review,
        block=settings.fraud_threshold_block,
        degraded_shift=settings.fraud_degraded_shift,
    )


def shifted(thresholds: Thresholds, points: int) -> Thresholds:
    """Every band `points` lower (never below 0): a stricter check."""
    return replace(
        thresholds,
        challenge=max(0, thresholds.challenge - points),
        review=max(0, thresholds.review - points),
        block=max(0, thresholds.block - points),
    )


@dataclass
class FraudRuntime:
    settings: Settings
    features: FeatureSource  # live features (Redis), raising FeaturesUnavailable past the budget
    fallback: FeatureSource  # PostgreSQL-derived features (degraded)
    rules: RuleSource  # the current rule set (cached and refreshed by its owner)
    scorer: Scorer | None  # None: not loaded; rules only with stricter bands
    thresholds: Thresholds
    # Case decisions complete or refuse what was held: the transfers' and the payments' runtimes.
    p2p: p2p.P2PRuntime | None = None
    transactions: transactions.TransactionsRuntime | None = None
    metrics: FraudMetrics | None = None
