"""Building the Fraud Service for a process: live features on Redis with the PostgreSQL
fallback, the rule book (rules and lists, refreshed when they change), the model, the bands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from billfold import p2p, transactions
from billfold.config import Settings
from billfold.fraud.cases import expiry_consumer
from billfold.fraud.events import lock_consumer
from billfold.fraud.features import PostgresFeatures, RedisFeatures, feature_consumers
from billfold.fraud.lists import load_lists
from billfold.fraud.rules import RuleBook
from billfold.fraud.runtime import FraudMetrics, FraudRuntime, thresholds_from
from billfold.platform.bus.consumers import Consumer
from billfold.platform.observability import get_logger

if TYPE_CHECKING:
    from billfold.fraud.model.scorer import LightGBMScorer

log = get_logger(__name__)


def load_model(settings: Settings) -> LightGBMScorer | None:
    """The champion (and challenger) of the deployment's registry, else the shipped champion;
    None when none loads: the checks then decide on rules alone with stricter bands."""
    # Imported here, not with the package: LightGBM, scikit-learn and ONNX Runtime take seconds
    # to import, and every process that imports billfold.app (the network simulator, the vault,
    # the CLI) would pay for a model only the API's checks use.
    from billfold.fraud.model.registry import load_scorer, model_dir
    from billfold.fraud.model.scorer import ModelUnavailable

    try:
        return load_scorer(model_dir(settings))
    except (ModelUnavailable, OSError, ValueError) as exc:
        # No traceback: its frames' locals would print the settings (secrets among them).
        log.warning(
            "fraud model unavailable; rules alone, stricter thresholds",
            error=type(exc).__name__,
            detail=str(exc)[:200],
        )
        return None


def build_runtime(
    settings: Settings,
    redis: Redis,
    *,
    p2p_runtime: p2p.P2PRuntime | None = None,
    transactions_runtime: transactions.TransactionsRuntime | None = None,
    registry: CollectorRegistry | None = None,
) -> FraudRuntime:
    """The process's fraud runtime; connects to nothing until the first check."""
    return FraudRuntime(
        settings=settings,
        features=RedisFeatures.from_settings(redis, settings),
        fallback=PostgresFeatures(),
        rules=RuleBook(lists=load_lists),
        scorer=load_model(settings),
        thresholds=thresholds_from(settings),
        p2p=p2p_runtime,
        transactions=transactions_runtime,
        metrics=FraudMetrics(registry) if registry is not None else None,
    )


def consumers(redis: Redis, settings: Settings) -> list[Consumer]:
    """The fraud consumers of the worker: the live features' outcome updates, the lock
    policy's account locks, and cases whose review hold expired."""
    return [*feature_consumers(redis, settings), lock_consumer(redis, settings), expiry_consumer()]
