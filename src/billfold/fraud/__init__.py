"""Fraud Detection Service: real-time features, rules as data, a trained model, and decisions
(allow, challenge, review, block) with a case queue for reviewers.

The app builds a `FraudRuntime` and plugs its risk check into payments and transfers."""

from billfold.fraud.models import (
    FEATURE_NAMES,
    FEATURES,
    MODEL_FEATURES,
    Action,
    Assessment,
    Features,
    FeaturesUnavailable,
    ModelScore,
    RiskSubject,
    RuleHit,
    Thresholds,
)
from billfold.fraud.runtime import FixedRules, FraudRuntime
from billfold.fraud.scoring import combine
from billfold.fraud.service import FraudRiskCheck
from billfold.fraud.setup import build_runtime, consumers

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "MODEL_FEATURES",
    "Action",
    "Assessment",
    "Features",
    "FeaturesUnavailable",
    "FixedRules",
    "FraudRiskCheck",
    "FraudRuntime",
    "ModelScore",
    "RiskSubject",
    "RuleHit",
    "Thresholds",
    "build_runtime",
    "combine",
    "consumers",
]
