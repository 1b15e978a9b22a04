"""The risk check's decisions on real PostgreSQL: stored with their snapshot and versions and an
event in the caller's transaction, a case opened on review, the lock policy on repeated blocks,
and the fallbacks (features, model, anything else) that never raise.

Features, rules and model are stand-ins implementing the contracts of `billfold.fraud.models`
(their own suites test the real ones); what is tested here is what the decision layer does with
what they answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billfold import p2p, transactions
from billfold.config import Settings
from billfold.fraud import FEATURE_NAMES, FeaturesUnavailable, ModelScore, RiskSubject, RuleHit
from billfold.fraud.runtime import FixedRules, FraudRuntime, thresholds_from
from billfold.fraud.service import FraudRiskCheck
from billfold.gateway.errors import transient_problem
from billfold.platform.ids import new_id
from billfold.platform.money import Money

SOMEONE = new_id("usr")  # a transfer recipient


@dataclass
class StaticFeatures:
    """Answers every feature name; raises `error` instead when set."""

    values: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None
    asked: list[RiskSubject] = field(default_factory=list)

    async def snapshot(self, conn: Any, subject: RiskSubject) -> dict[str, Any]:
        self.asked.append(subject)
        if self.error is not None:
            raise self.error
        base: dict[str, Any] = dict.fromkeys(FEATURE_NAMES, 0)
        base.update(kind=subject.kind, amount=subject.amount, currency=subject.currency)
        base.update(stepped_up=subject.stepped_up, degraded=False)
        return base | self.values


@dataclass
class Rules:
    """Hits when the amount reaches `at` (score and/or direct action)."""

    at: int = 10**9
    score: int = 0
    action: str | None = None
    shadow: bool = False
    version: str = "rules-test-1"

    def evaluate(self, features: Any, subject: Any = None) -> list[RuleHit]:
        if int(features["amount"]) < self.at:
            return []
        return [
            RuleHit(
                "rule_big",
                3,
                "big_amount",
                "The amount is far above this user's usual",
                score=self.score,
                action=self.action,  # type: ignore[arg-type]
                shadow=self.shadow,
            )
        ]


@dataclass
class Model:
    probability: float = 0.01
    fail: bool = False
    version: str = "model-test-7"

    def score(self, features: Any) -> ModelScore:
        if self.fail:
            raise RuntimeError("model file missing")
        challenger = ModelScore(0.02, 0.1, "model-test-8")
        return ModelScore(self.probability, 0.0, self.version, challenger=challenger)


def make_runtime(
    settings: Settings,
    app: Any,
    *,
    features: StaticFeatures | None = None,
    fallback: StaticFeatures | None = None,
    rules: Rules | None = None,
    model: Model | None = None,
    no_model: bool = False,
    **overrides: Any,
) -> FraudRuntime:
    s = settings.model_copy(update=overrides)
    return FraudRuntime(
        settings=s,
        features=features or StaticFeatures(),
        fallback=fallback or StaticFeatures(),
        rules=FixedRules(rules or Rules()),
        scorer=None if no_model else (model or Model()),
        thresholds=thresholds_from(s),
        p2p=app.state.p2p,
        transactions=app.state.transactions,
    )


def payment(user_id: str, amount: int = 1_500, **kw: Any) -> transactions.PaymentRisk:
    values: dict[str, Any] = {
        "transaction_id": new_id("txn"),
        "user_id": user_id,
        "source": "wallet",
        "payment_method_id": None,
        "money": Money(amount, "USD"),
        "merchant_id": "mch_test",
        "merchant_name": "Test Shop",
        "mcc": "5411",
        "category": "groceries",
        "merchant_country": "US",
        "merchant_city": "Oakland",
        "latitude": 37.8,
        "longitude": -122.27,
        "channel": "in_app",
        "device_id": None,
        "session_device_id": None,
        "ip": "203.0.113.9",
    }
    values.update(kw)
    return transactions.PaymentRisk(**values)


def transfer(user_id: str, amount: int = 1_500, **kw: Any) -> p2p.TransferRisk:
    values: dict[str, Any] = {
        "transfer_id": new_id("p2p"),
        "sender_id": user_id,
        "recipient_id": SOMEONE,
        "recipient_kind": "user_id",
        "money": Money(amount, "USD"),
        "device_id": None,
        "ip": None,
    }
    values.update(kw)
    return p2p.TransferRisk(**values)


@pytest.fixture
async def engine(app: Any) -> AsyncIterator[Any]:
    yield app.state.resources.engine


def user() -> str:
    # Well-formed ids: the suite checks every event it wrote against docs/events/.
    return new_id("usr")


async def rows(engine: Any, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def test_allow_is_stored_with_snapshot_versions_and_event(
    app: Any, settings: Settings, engine: Any
) -> None:
    check = FraudRiskCheck(make_runtime(settings, app))
    who = user()
    p = payment(who)
    async with engine.begin() as conn:
        decision = await check.payments.assess(conn, p)
    assert decision.action == "allow"
    assert decision.score == 10  # the model's 1 % on 0-1000
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert row.action == "allow" and row.user_id == who and row.subject_kind == "payment"
    assert row.rule_version == "rules-test-1" and row.model_version == "model-test-7"
    assert row.challenger["version"] == "model-test-8"
    assert set(row.features) == set(FEATURE_NAMES)
    assert row.features["amount"] == 1_500
    assert row.label is None and row.fallback is None and not row.degraded
    assert row.duration_ms is not None and row.duration_ms >= 0
    (event,) = await rows(
        engine,
        "SELECT data FROM platform.outbox WHERE type = 'billfold.fraud.decision.made' "
        "AND data->>'subject_id' = :s",
        s=p.transaction_id,
    )
    assert event.data["decision_id"] == row.id and event.data["action"] == "allow"
    assert event.data["rule_version"] == "rules-test-1"


async def test_decision_rolls_back_with_its_payment(
    app: Any, settings: Settings, engine: Any
) -> None:
    check = FraudRiskCheck(make_runtime(settings, app))
    p = payment(user())
    async with engine.connect() as conn:
        await conn.begin()
        await check.payments.assess(conn, p)
        await conn.rollback()
    assert (
        await rows(
            engine, "SELECT 1 FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
        )
        == []
    )
    assert (
        await rows(
            engine,
            "SELECT 1 FROM platform.outbox WHERE data->>'subject_id' = :s",
            s=p.transaction_id,
        )
        == []
    )


async def test_review_opens_one_case(app: Any, settings: Settings, engine: Any) -> None:
    check = FraudRiskCheck(make_runtime(settings, app, rules=Rules(at=5_000, score=750)))
    p = payment(user(), 9_000)
    async with engine.begin() as conn:
        decision = await check.payments.assess(conn, p)
    assert (decision.action, decision.score) == ("review", 750)
    assert "big_amount" in decision.reasons
    (case,) = await rows(
        engine, "SELECT * FROM fraud.cases WHERE subject_id = :s", s=p.transaction_id
    )
    assert case.status == "open" and case.amount == 9_000 and case.score == 750
    (d,) = await rows(
        engine, "SELECT id, hits FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert case.decision_id == d.id
    assert d.hits[0]["reason_code"] == "big_amount"
    opened = await rows(
        engine,
        "SELECT data FROM platform.outbox WHERE type = 'billfold.fraud.case.opened' AND subject = :c",
        c=case.id,
    )
    assert opened[0].data["subject_id"] == p.transaction_id
    (audit,) = await rows(
        engine, "SELECT action FROM fraud.case_audit WHERE case_id = :c", c=case.id
    )
    assert audit.action == "opened"


async def test_values_postgresql_refuses_are_fitted_and_the_payment_goes_on(
    app: Any, settings: Settings, engine: Any
) -> None:
    # The decision is written without a savepoint: what it carries must never abort the
    # payment's transaction. NUL (text and jsonb refuse it), an unpaired surrogate (UTF-8
    # cannot encode it) and NaN/infinity (not JSON) reach it from features and rule texts.
    class HostileRules(Rules):
        def evaluate(self, features: Any, subject: Any = None) -> list[RuleHit]:
            return [RuleHit("rule_odd", 1, "odd\x00code", "Says \x00 and \ud800", score=10)]

    features = StaticFeatures(
        values={"mcc": "54\x0011", "channel": "app\udc80", "amount_zscore": float("nan")}
        | {"speed_kmh": float("inf")}
    )
    rt = make_runtime(settings, app, features=features, rules=HostileRules())
    p = payment(user())
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, p)
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert decision.action == "allow"
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert row.features["mcc"] == "54\ufffd11" and row.features["channel"] == "app?"
    assert row.features["amount_zscore"] is None and row.features["speed_kmh"] is None
    assert row.hits[0]["description"] == "Says \ufffd and ?"
    assert row.reasons == ["odd\ufffdcode"]
    (event,) = await rows(
        engine,
        "SELECT data FROM platform.outbox WHERE type = 'billfold.fraud.decision.made' "
        "AND data->>'subject_id' = :s",
        s=p.transaction_id,
    )
    assert event.data["reasons"] == ["odd\ufffdcode"]


async def test_a_decision_that_cannot_fit_is_refused_before_anything_is_sent(
    app: Any, settings: Settings, engine: Any
) -> None:
    p = payment(user(), amount=2**63)  # past bigint: the payment's own row would refuse it too
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(make_runtime(settings, app)).payments.assess(conn, p)
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert decision.action == "allow"
    assert (
        await rows(
            engine, "SELECT 1 FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
        )
        == []
    )


async def test_shadow_hit_is_recorded_not_enforced(
    app: Any, settings: Settings, engine: Any
) -> None:
    check = FraudRiskCheck(
        make_runtime(settings, app, rules=Rules(at=0, action="block", shadow=True))
    )
    p = payment(user())
    async with engine.begin() as conn:
        decision = await check.payments.assess(conn, p)
    assert decision.action == "allow"
    (row,) = await rows(
        engine,
        "SELECT hits, reasons FROM fraud.decisions WHERE subject_id = :s",
        s=p.transaction_id,
    )
    assert row.hits[0]["shadow"] is True and row.hits[0]["action"] == "block"
    assert "big_amount" not in row.reasons


async def test_redis_unavailable_falls_back_to_postgres_features_stricter(
    app: Any, settings: Settings, engine: Any
) -> None:
    fallback = StaticFeatures()
    rt = make_runtime(
        settings,
        app,
        features=StaticFeatures(error=FeaturesUnavailable("redis down")),
        fallback=fallback,
        rules=Rules(at=0, score=400),  # below challenge (500), above challenge - shift (350)
    )
    p = payment(user())
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, p)
    assert decision.action == "challenge"
    assert "degraded_features" in decision.reasons
    assert len(fallback.asked) == 1
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert row.degraded and row.fallback == "features" and row.features["degraded"] is True


async def test_same_score_with_live_features_is_allowed(
    app: Any, settings: Settings, engine: Any
) -> None:
    rt = make_runtime(settings, app, rules=Rules(at=0, score=400))
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, payment(user()))
    assert decision.action == "allow"


@pytest.mark.parametrize("no_model", [True, False])
async def test_model_unavailable_rules_only_stricter(
    app: Any, settings: Settings, engine: Any, no_model: bool
) -> None:
    rt = make_runtime(
        settings, app, rules=Rules(at=0, score=450), model=Model(fail=True), no_model=no_model
    )
    p = payment(user())
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, p)
    assert decision.action == "challenge"  # 450 >= 500 - 100
    assert "model_unavailable" in decision.reasons
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert row.fallback == "model" and row.model_version is None


async def test_everything_failing_gives_the_error_action_and_keeps_the_transaction(
    app: Any, settings: Settings, engine: Any
) -> None:
    boom = RuntimeError("unexpected")
    rt = make_runtime(
        settings,
        app,
        features=StaticFeatures(error=boom),
        fallback=StaticFeatures(error=boom),
    )
    p = payment(user())
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, p)
        # The payment's transaction is still usable.
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert decision.action == "challenge" and decision.reasons == ("fraud_check_error",)
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=p.transaction_id
    )
    assert row.fallback == "error" and row.action == "challenge"


async def test_failing_fallback_query_does_not_abort_the_payment(
    app: Any, settings: Settings, engine: Any
) -> None:
    class BadSql:
        async def snapshot(self, conn: Any, subject: RiskSubject) -> dict[str, Any]:
            await conn.execute(text("SELECT * FROM fraud.no_such_table"))
            raise AssertionError("unreachable")

    rt = make_runtime(settings, app, features=StaticFeatures(error=FeaturesUnavailable()))
    rt.fallback = BadSql()
    rt.settings = rt.settings.model_copy(update={"fraud_error_action": "review"})
    p = payment(user())
    async with engine.begin() as conn:
        decision = await FraudRiskCheck(rt).payments.assess(conn, p)
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert decision.action == "review"
    (case,) = await rows(
        engine, "SELECT status FROM fraud.cases WHERE subject_id = :s", s=p.transaction_id
    )
    assert case.status == "open"


async def test_transfer_block_is_stored_although_the_transfer_rolls_back(
    app: Any, settings: Settings, engine: Any
) -> None:
    rt = make_runtime(settings, app, rules=Rules(at=0, action="block"))
    t = transfer(user())
    async with engine.connect() as conn:
        await conn.begin()
        decision = await FraudRiskCheck(rt).transfers.assess(conn, t)
        await conn.rollback()  # what the transfer does when it answers 403
    assert decision.action == "block"
    (row,) = await rows(
        engine, "SELECT * FROM fraud.decisions WHERE subject_id = :s", s=t.transfer_id
    )
    assert row.action == "block" and row.subject_kind == "transfer"


async def test_transfer_allow_after_step_up_stays_in_the_transfer(
    app: Any, settings: Settings, engine: Any
) -> None:
    rt = make_runtime(settings, app, rules=Rules(at=0, action="challenge"))
    t = transfer(user(), stepped_up=True)
    async with engine.connect() as conn:
        await conn.begin()
        decision = await FraudRiskCheck(rt).transfers.assess(conn, t)
        await conn.rollback()
    # combine lets a stepped-up sender through; that decision belongs to the transfer's own
    # transaction (rolled back here), not written on its own.
    assert decision.action == "allow"
    assert (
        await rows(engine, "SELECT 1 FROM fraud.decisions WHERE subject_id = :s", s=t.transfer_id)
        == []
    )


async def test_lock_policy_requests_a_lock_once_at_n_blocks(
    app: Any, settings: Settings, engine: Any
) -> None:
    rt = make_runtime(settings, app, rules=Rules(at=0, action="block"), fraud_lock_after_blocks=3)
    check = FraudRiskCheck(rt)
    who = user()
    for _ in range(4):
        async with engine.begin() as conn:
            assert (await check.payments.assess(conn, payment(who))).action == "block"
    requested = await rows(
        engine,
        "SELECT data FROM platform.outbox WHERE type = 'billfold.fraud.user.lock_requested' "
        "AND subject = :u",
        u=who,
    )
    assert [r.data["blocks"] for r in requested] == [3]


async def test_subject_carries_what_features_need(
    app: Any, settings: Settings, engine: Any
) -> None:
    features = StaticFeatures()
    check = FraudRiskCheck(make_runtime(settings, app, features=features))
    p = payment(
        user(),
        source="card",
        payment_method_id="pm_x",
        session_device_id="dev_1",
        channel="e_commerce",
    )
    t = transfer(user(), device_id="dev_2", ip="198.51.100.1")
    async with engine.begin() as conn:
        await check.payments.assess(conn, p)
        await check.transfers.assess(conn, t)
    ps, ts = features.asked
    assert (ps.kind, ps.subject_id, ps.device_id, ps.payment_method_id) == (
        "payment",
        p.transaction_id,
        "dev_1",
        "pm_x",
    )
    assert (ps.mcc, ps.merchant_country, ps.latitude, ps.channel) == (
        "5411",
        "US",
        37.8,
        "e_commerce",
    )
    assert (ts.kind, ts.user_id, ts.recipient_id, ts.device_id, ts.ip) == (
        "transfer",
        t.sender_id,
        SOMEONE,
        "dev_2",
        "198.51.100.1",
    )
    assert ps.at.tzinfo is not None


def test_the_app_plugs_the_check_in_when_fraud_is_enabled(settings: Settings) -> None:
    """Production wiring (`fraud_enabled`, on by default): both hooks are the fraud service's,
    and the shipped model is loaded; off, the payments' and transfers' own allow-all."""
    from billfold.app import create_app

    assert Settings.model_fields["fraud_enabled"].default is True
    on = create_app(settings.model_copy(update={"fraud_enabled": True}))
    assert type(on.state.p2p.risk).__name__ == "TransferRiskCheck"
    assert type(on.state.transactions.risk).__name__ == "PaymentRiskCheck"
    assert on.state.p2p.risk.rt is on.state.fraud
    assert on.state.fraud.scorer is not None
    off = create_app(settings.model_copy(update={"fraud_enabled": False}))
    assert type(off.state.p2p.risk).__name__ == "AllowAll"
    assert type(off.state.transactions.risk).__name__ == "AllowAll"


async def test_a_lock_timeout_in_the_lock_policy_fails_the_payment_as_a_busy_database(
    app: Any, settings: Settings, engine: Any
) -> None:
    """The decision is written in the payment's transaction without a savepoint: a lock timeout
    on the lock policy's lock aborts that transaction. It must surface as what it is (the
    gateway's retryable 503 `database_busy`), not be swallowed so that the payment's next
    statement fails with "current transaction is aborted" (a 500)."""
    user_id = user()
    rt = make_runtime(settings, app, rules=Rules(at=1, action="block"))
    async with engine.connect() as other:
        held = await other.begin()
        await other.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"fraud.lock_policy:{user_id}"},
        )
        async with engine.connect() as conn:
            await conn.begin()
            await conn.execute(text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(DBAPIError) as raised:
                await FraudRiskCheck(rt).payments.assess(conn, payment(user_id))
            await conn.rollback()
        await held.rollback()
    problem = transient_problem(raised.value)
    assert problem is not None and problem.status == 503 and problem.code == "database_busy"
