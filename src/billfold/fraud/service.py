"""The risk check: features (live, or the PostgreSQL fallback), rules, model, `combine`, and the
decision stored with its snapshot and versions, in the payment's/transfer's own transaction.

Fallback policy (docs/fraud.md, "Decisions, cases and fallback"):
- Redis unavailable or past `fraud_check_budget_ms`: features from PostgreSQL, `degraded`, every
  score band `fraud_degraded_shift` lower.
- Model not loaded or failing: rules only, every band `fraud_model_missing_shift` lower.
- Anything else unexpected: `fraud_error_action` (default `challenge`), never an exception to the
  payment or transfer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import p2p, transactions
from billfold.fraud import events
from billfold.fraud.models import (
    FEATURE_NAMES,
    Assessment,
    FeaturesUnavailable,
    FeatureValue,
    ModelScore,
    RiskSubject,
)
from billfold.fraud.runtime import FraudRuntime, shifted
from billfold.fraud.scoring import combine
from billfold.fraud.store import cases as case_store
from billfold.fraud.store import decisions as store
from billfold.platform.clock import utcnow
from billfold.platform.events import record_event
from billfold.platform.ids import new_id
from billfold.platform.observability import get_logger

log = get_logger(__name__)

ERROR_REASON = "fraud_check_error"
MODEL_UNAVAILABLE = "model_unavailable"

# Called with a stage's name as it ends (`features`, `rules`, `model`, `combine`, `store`): how
# `bench/fraud.py --stages` times the check's own code path rather than a copy of it.
StageMark = Callable[[str], None]


def _unmarked(stage: str) -> None:
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """A stored check: its id, the assessment, and the case it opened (review)."""

    id: str
    assessment: Assessment
    case_id: str | None = None
    fallback: str | None = None


def payment_subject(payment: transactions.PaymentRisk) -> RiskSubject:
    """A payment about to be authorized, as the fraud service sees it."""
    return RiskSubject(
        kind="payment",
        subject_id=payment.transaction_id,
        user_id=payment.user_id,
        amount=payment.money.amount,
        currency=payment.money.currency,
        at=utcnow(),
        device_id=payment.device_id or payment.session_device_id,
        ip=payment.ip,
        stepped_up=payment.stepped_up,
        source=payment.source,
        payment_method_id=payment.payment_method_id,
        # `PaymentRisk` carries no card fingerprint: the features key the card windows by the
        # payment method (one user's card) until it does.
        card_fingerprint=None,
        merchant_id=payment.merchant_id,
        merchant_name=payment.merchant_name,
        mcc=payment.mcc,
        category=payment.category,
        merchant_country=payment.merchant_country,
        latitude=payment.latitude,
        longitude=payment.longitude,
        channel=payment.channel,
    )


def transfer_subject(transfer: p2p.TransferRisk) -> RiskSubject:
    """A transfer about to be made, as the fraud service sees it."""
    return RiskSubject(
        kind="transfer",
        subject_id=transfer.transfer_id,
        user_id=transfer.sender_id,
        amount=transfer.money.amount,
        currency=transfer.money.currency,
        at=utcnow(),
        device_id=transfer.device_id,
        ip=transfer.ip,
        stepped_up=transfer.stepped_up,
        channel="p2p",
        recipient_id=transfer.recipient_id,
        recipient_key=transfer.recipient_id,
        recipient_contact=transfer.recipient_contact,
    )


async def check(
    rt: FraudRuntime,
    conn: AsyncConnection,
    subject: RiskSubject,
    *,
    out_of_band: frozenset[str] = frozenset(),
    mark: StageMark = _unmarked,
) -> Decision:
    """Assess `subject` and store the decision with `conn`, atomic with the payment/transfer;
    an action in `out_of_band` (one its caller answers with an error, rolling `conn` back) is
    stored in its own transaction instead. A failure gives the documented fallback decision;
    only a database error that aborted `conn`'s transaction while storing is raised (see
    `_store`). `mark` is told each stage's end (a benchmark's clock)."""
    started = time.perf_counter()
    fallback: str | None = None
    features: dict[str, FeatureValue] = {}
    try:
        features, degraded = await _features(rt, conn, subject)
        fallback = "features" if degraded else None
        mark("features")
        rules = await rt.rules.current(conn)
        hits = rules.evaluate(features, subject)
        mark("rules")
        model = _score(rt, features)
        mark("model")
        thresholds = rt.thresholds
        if model is None:
            thresholds = shifted(thresholds, rt.settings.fraud_model_missing_shift)
            fallback = fallback or "model"
        assessment = combine(
            hits,
            model,
            thresholds,
            features=features,
            rule_version=rules.version,
            degraded=degraded,
        )
        if model is None:
            assessment = dataclasses.replace(
                assessment,
                reasons=(*assessment.reasons, MODEL_UNAVAILABLE),
                explanations=(
                    *assessment.explanations,
                    "The model was unavailable; rules alone decided, with stricter thresholds",
                ),
            )
        mark("combine")
    except Exception:
        log.exception("fraud check failed; fallback action", subject_id=subject.subject_id)
        fallback = "error"
        action = rt.settings.fraud_error_action
        assessment = Assessment(
            action=action,
            score=0,
            reasons=(ERROR_REASON,),
            explanations=(f"The risk check failed; the fallback action ({action}) applied",),
            features={**features, "kind": subject.kind, "amount": subject.amount},
            degraded=True,
        )
    decision = Decision(new_id("dec"), assessment, fallback=fallback)
    own = assessment.action in out_of_band
    decision = await _store(rt, conn, subject, decision, started, out_of_band=own)
    mark("store")
    if rt.metrics is not None:
        rt.metrics.checks.labels(assessment.action).observe(time.perf_counter() - started)
        if fallback is not None:
            rt.metrics.fallbacks.labels(fallback).inc()
    return decision


async def _features(
    rt: FraudRuntime, conn: AsyncConnection, subject: RiskSubject
) -> tuple[dict[str, FeatureValue], bool]:
    """The live features, or the fallback's (True) when the live store cannot answer in time.
    The live source enforces its own budget (it must never be cancelled while it uses `conn`)."""
    try:
        return await rt.features.snapshot(conn, subject), False
    except FeaturesUnavailable:
        pass
    except Exception:
        log.exception("live features failed; using the fallback", subject_id=subject.subject_id)
    # A savepoint: a failing fallback query must not abort the payment's transaction.
    async with conn.begin_nested():
        features = await rt.fallback.snapshot(conn, subject)
    return {**features, "degraded": True}, True


def _score(rt: FraudRuntime, features: dict[str, FeatureValue]) -> ModelScore | None:
    if rt.scorer is None:
        return None
    try:
        return rt.scorer.score(features)
    except Exception:
        log.exception("model scoring failed; rules only")
        return None


def _model(m: ModelScore) -> dict[str, Any]:
    return {
        "version": m.version,
        "probability": m.probability,
        "anomaly": m.anomaly,
        "contributions": [
            {"feature": c.feature, "value": c.value, "weight": c.weight} for c in m.contributions
        ],
    }


def _row(subject: RiskSubject, decision: Decision, duration_ms: float) -> dict[str, Any]:
    a = decision.assessment
    model = a.model
    snapshot = {k: a.features[k] for k in FEATURE_NAMES if k in a.features}
    return {
        "id": decision.id,
        "subject_kind": subject.kind,
        "subject_id": subject.subject_id,
        "user_id": subject.user_id,
        "amount": subject.amount,
        "currency": subject.currency,
        "action": a.action,
        "score": a.score,
        "reasons": list(a.reasons),
        "explanations": list(a.explanations),
        "hits": [dataclasses.asdict(h) for h in a.hits],
        "features": snapshot,
        "rule_version": a.rule_version,
        "model_version": model.version if model else None,
        "model_probability": model.probability if model else None,
        "model_anomaly": model.anomaly if model else None,
        "challenger": _model(model.challenger) if model and model.challenger else None,
        "degraded": a.degraded,
        "fallback": decision.fallback,
        "stepped_up": subject.stepped_up,
        "duration_ms": round(duration_ms, 3),
    }


# What `billfold.fraud.decision.made` carries of the decision's row (the snapshot and the
# model's details stay in the table).
_EVENT_FIELDS = (
    "subject_kind",
    "subject_id",
    "user_id",
    "amount",
    "currency",
    "action",
    "score",
    "reasons",
    "rule_version",
    "model_version",
    "degraded",
    "fallback",
    "stepped_up",
)


def _event_data(row: dict[str, Any]) -> dict[str, Any]:
    # Fitted like the row: the event rides in the same statement.
    return store.fit({"decision_id": row["id"]} | {k: row[k] for k in _EVENT_FIELDS})


async def _store(
    rt: FraudRuntime,
    conn: AsyncConnection,
    subject: RiskSubject,
    decision: Decision,
    started: float,
    *,
    out_of_band: bool,
) -> Decision:
    """Write the decision, its event, and (review) a case; (block) apply the lock policy.

    In the caller's transaction there is no savepoint (it cost two of the check's round trips):
    the values are fitted to their columns before sending (`store.insert`), so the write cannot
    fail on what it carries, and a value that cannot fit fails before anything is sent (logged,
    the decision returned unstored). What is left is the database failing — a deadlock, a lock or
    statement timeout (the lock policy's advisory lock), a lost connection — and that has aborted
    the caller's transaction: the error is raised as it is, so the payment fails with it (the
    gateway answers a transient one `503 database_busy`, retried with the same key) instead of
    on its next statement with "current transaction is aborted" (a 500 naming the wrong cause).
    An out-of-band write failing leaves the caller's transaction alone: logged, not raised."""
    duration_ms = (time.perf_counter() - started) * 1000
    try:
        if out_of_band:
            async with conn.engine.begin() as own:
                return await _write(rt, own, subject, decision, duration_ms)
        return await _write(rt, conn, subject, decision, duration_ms)
    except DBAPIError:
        if not out_of_band:
            raise
        log.exception("fraud decision not stored", subject_id=subject.subject_id)
        return decision
    except Exception:
        log.exception("fraud decision not stored", subject_id=subject.subject_id)
        return decision


async def _write(
    rt: FraudRuntime,
    conn: AsyncConnection,
    subject: RiskSubject,
    decision: Decision,
    duration_ms: float,
) -> Decision:
    a = decision.assessment
    row = _row(subject, decision, duration_ms)
    await store.insert(
        conn,
        row,
        # Keyed by the decision: the payment's/transfer's own events stay theirs alone.
        events.event(events.DECISION_MADE, decision.id, _event_data(row)),
    )
    if a.action == "review":
        case_id = new_id("case")
        values = {
            "id": case_id,
            "decision_id": decision.id,
            "subject_kind": subject.kind,
            "subject_id": subject.subject_id,
            "user_id": subject.user_id,
            "amount": subject.amount,
            "currency": subject.currency,
            "score": a.score,
            "reasons": list(a.reasons),
        }
        # Fitted like the decision (already written in this transaction, without a savepoint).
        values = store.fit(values)
        data = {k: v for k, v in values.items() if k != "id"} | {"case_id": case_id}
        if await case_store.open_case(
            conn, values, events.event(events.CASE_OPENED, case_id, data)
        ):
            decision = dataclasses.replace(decision, case_id=case_id)
    elif a.action == "block":
        await _lock_policy(rt, conn, subject)
    return decision


async def _lock_policy(rt: FraudRuntime, conn: AsyncConnection, subject: RiskSubject) -> None:
    """N blocked checks within the window, and after the last request, request a lock of the
    account (the fraud consumer `fraud.lock-accounts` locks it: `billfold.fraud.events`)."""
    limit = rt.settings.fraud_lock_after_blocks
    if limit <= 0:
        return
    # One user's blocks are counted one transaction at a time: two concurrent checks that each
    # count only their own uncommitted row would both miss the limit (or both hit it). The lock
    # is held to the end of the payment's/transfer's transaction, and only by blocks.
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
        {"k": f"fraud.lock_policy:{subject.user_id}"},
    )
    since = utcnow() - timedelta(seconds=rt.settings.fraud_lock_window_seconds)
    # Counted after the last request, not only within the window: after a lock and an unlock the
    # same day, N more blocks must request a lock again.
    last_request = await store.lock_count_start(conn, subject.user_id)
    if last_request is not None and last_request > since:
        since = last_request
    blocks = await store.blocks_since(conn, subject.user_id, since)
    if blocks >= limit:
        await store.restart_lock_count(conn, subject.user_id)
        await record_event(
            conn,
            events.event(
                events.USER_LOCK_REQUESTED,
                subject.user_id,
                store.fit(
                    {
                        "user_id": subject.user_id,
                        "blocks": blocks,
                        "window_seconds": rt.settings.fraud_lock_window_seconds,
                        "last_subject_id": subject.subject_id,
                    }
                ),
            ),
        )


_BLOCK = frozenset({"block"})
_TRANSFER_ERRORS = frozenset({"block", "challenge"})


class PaymentRiskCheck:
    """The payments' `PaymentRiskCheck` on the fraud service."""

    def __init__(self, rt: FraudRuntime) -> None:
        self.rt = rt

    async def assess(
        self, conn: AsyncConnection, payment: transactions.PaymentRisk
    ) -> transactions.RiskDecision:
        # Every outcome of a payment's first transaction commits (a block is a declined row, a
        # challenge a `challenge_required` one): the decision goes with it.
        decision = await check(self.rt, conn, payment_subject(payment))
        a = decision.assessment
        return transactions.RiskDecision(a.action, a.score, a.reasons)


class TransferRiskCheck:
    """The transfers' `RiskCheck` on the fraud service."""

    def __init__(self, rt: FraudRuntime) -> None:
        self.rt = rt

    async def assess(self, conn: AsyncConnection, transfer: p2p.TransferRisk) -> p2p.RiskDecision:
        # The transfer answers a block (and a challenge before step-up) with an error, which
        # rolls its transaction back: those decisions are stored in their own transaction, so
        # every block and challenge stays on record.
        rolled_back = _TRANSFER_ERRORS if not transfer.stepped_up else _BLOCK
        decision = await check(self.rt, conn, transfer_subject(transfer), out_of_band=rolled_back)
        a = decision.assessment
        return p2p.RiskDecision(a.action, a.score, a.reasons)


class FraudRiskCheck:
    """Both hooks on one runtime: `payments` for `TransactionsRuntime.risk`, `transfers` for
    `P2PRuntime.risk`."""

    def __init__(self, rt: FraudRuntime) -> None:
        self.rt = rt
        self.payments = PaymentRiskCheck(rt)
        self.transfers = TransferRiskCheck(rt)
