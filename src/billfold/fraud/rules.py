"""Fraud rules as data: CEL expressions over the feature catalogue, stored in PostgreSQL with
every edit a new version, evaluated in process.

A rule version says *when* (a CEL boolean expression over `FEATURE_NAMES`), *how much* (a score
contribution, 0-1000) and/or *what at least* (a direct action: challenge, review, block, allow),
and *why* (a stable reason code and a sentence for a support agent). Each version is `active`
(enforced), `shadow` (evaluated and reported with `shadow=True`, never enforced) or `disabled`;
at most one version of a rule is active and at most one in shadow, so a new version can be
watched in shadow beside the one in force, then promoted, and rolled back.

Expressions are compiled once by the `cel` library (a Rust CEL implementation: no Python `eval`,
no attribute access, no I/O; the parser bounds nesting) and cached by their text. A rule whose
expression fails at run time (a division by zero, a missing feature, a type clash) is a non-hit,
counted and logged once per compiled set, never an exception in a payment.

`RuleBook` keeps the compiled set of a process and reloads it when `fraud.rule_set` says rules
or lists changed (checked every `refresh_seconds`, one single-row read). Lists (`lists.py`) are
plugged in as a `SubjectMatcher` so both are evaluated in one call:
`(await book.current(conn)).evaluate(features, subject=subject)`.

`DEFAULT_RULES` and `compile_rules` work without a database (backtests, `billfold fraud evaluate`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, Protocol

import cel
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as Counter_
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.fraud.models import (
    FEATURE_NAMES,
    FEATURES,
    Action,
    Features,
    FeatureValue,
    RiskSubject,
    RuleHit,
)
from billfold.fraud.store import rules as store
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Conflict, FieldError, NotFound, ProblemError
from billfold.platform.events import Event, record_event
from billfold.platform.observability import get_logger

log = get_logger("billfold.fraud.rules")

RuleState = Literal["shadow", "active", "disabled"]
RULE_ID_PATTERN = r"^[a-z][a-z0-9_]{2,63}$"
REASON_CODE_PATTERN = r"^[a-z][a-z0-9_]{2,63}$"
MAX_EXPRESSION = 2000
# Reason codes of list hits (`lists.py`); `combine` treats `allow_list*` as an override, so a
# rule may not borrow them.
RESERVED_REASON_PREFIXES = ("block_list", "allow_list")
# How many past decisions one backtest may replay, and how many hit ids it returns.
BACKTEST_MAX = 50_000
BACKTEST_SAMPLE = 20

SOURCE = "/billfold/fraud"
RULE_CREATED = "billfold.fraud.rule.created"
RULE_VERSION_CREATED = "billfold.fraud.rule.version_created"
RULE_STATE_CHANGED = "billfold.fraud.rule.state_changed"

_KINDS: dict[str, str] = {f.name: f.kind for f in FEATURES}
_NAMES = frozenset(FEATURE_NAMES)
# A neutral value per feature, for the trial evaluation of a new expression and for the test
# endpoint's features that the caller leaves out.
_NEUTRAL_BY_KIND: dict[str, FeatureValue] = {"int": 0, "float": 0.0, "bool": False, "str": ""}
NEUTRAL: dict[str, FeatureValue] = {f.name: _NEUTRAL_BY_KIND[f.kind] for f in FEATURES}


# --- expressions --------------------------------------------------------------------------------


class InvalidRuleExpression(ProblemError):
    status, code, title = 422, "invalid_rule_expression", "Invalid rule expression"


def _invalid(message: str, pointer: str = "#/expression") -> InvalidRuleExpression:
    # The compiler's message quotes the caller's own expression: useful, and not a secret.
    message = message.strip()[:500]
    return InvalidRuleExpression(message, errors=[FieldError(pointer=pointer, detail=message)])


_ALWAYS_FAILS = ("Undefined variable or function", "not a valid regex")


@lru_cache(maxsize=4096)
def _compile(expression: str) -> cel.Program:
    return cel.compile(expression)


def compile_expression(expression: str, pointer: str = "#/expression") -> cel.Program:
    """Compile and check an expression: it parses, names only catalogue features, and on neutral
    features (zeros, false, '') yields true or false. Raises `InvalidRuleExpression`. A run-time
    error on neutral values that real values may avoid (a division by zero) is accepted."""
    if not expression.strip():
        raise _invalid("The expression is empty", pointer)
    if len(expression) > MAX_EXPRESSION:
        raise _invalid(f"The expression is longer than {MAX_EXPRESSION} characters", pointer)
    try:
        program = _compile(expression)
    except (ValueError, RuntimeError) as exc:
        raise _invalid(str(exc), pointer) from None
    unknown = sorted(set(program.variables()) - _NAMES)
    if unknown:
        raise _invalid(
            f"Unknown feature(s): {', '.join(unknown)}; see GET /v1/admin/fraud/rules/features",
            pointer,
        )
    try:
        result = program.execute(cel.Context(NEUTRAL))
    except TypeError as exc:
        raise _invalid(str(exc), pointer) from None
    except RuntimeError as exc:
        # An unknown function or a malformed constant regex fails whatever the values; a
        # conversion such as int(mcc) may fail on neutral values only.
        if any(words in str(exc) for words in _ALWAYS_FAILS):
            raise _invalid(str(exc), pointer) from None
        return program
    except Exception:  # a division by zero, an index: may hold on real values
        return program
    if not isinstance(result, bool):
        raise _invalid(
            f"The expression must be true or false, not {type(result).__name__}", pointer
        )
    return program


def typed(features: Features) -> dict[str, Any]:
    """Feature values in the catalogue's kinds (a float feature is a CEL double even when it came
    as 3, so `amount_zscore > 3.0` and `amount_zscore + 1.5` work). Unknown names pass as they
    are; a value that cannot be converted stays as it is (the rule then errs, a non-hit)."""
    out: dict[str, Any] = {}
    for name, value in features.items():
        kind = _KINDS.get(name)
        if value is None or kind is None:
            out[name] = value
            continue
        try:
            if kind == "float":
                out[name] = float(value)
            elif kind == "int":
                out[name] = int(value)
            elif kind == "bool":
                out[name] = bool(value)
            else:
                out[name] = str(value)
        except (TypeError, ValueError, OverflowError):  # inf to int, say
            out[name] = value
    return out


def _context(features: Features) -> cel.Context:
    """The CEL variables; a value CEL cannot hold (not a JSON scalar) is left out, so only the
    rules that use it miss."""
    values = typed(features)
    try:
        return cel.Context(values)
    except Exception:
        context = cel.Context()
        for name, value in values.items():
            try:
                context.add_variable(name, value)
            except Exception:
                log.warning("fraud_feature_unusable", feature=name, kind=type(value).__name__)
        return context


# --- the compiled set ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule version as data (`DEFAULT_RULES`, a row of `fraud.rule_versions`)."""

    rule_id: str
    expression: str
    reason_code: str
    description: str
    score: int = 0
    action: Action | None = None
    state: RuleState = "active"
    version: int = 1


class SubjectMatcher(Protocol):
    """Checks of the subject itself rather than its features (the block/allow lists)."""

    digest: str

    def match(self, subject: RiskSubject) -> list[RuleHit]: ...


@dataclass(frozen=True, slots=True)
class _Rule:
    spec: RuleSpec
    program: cel.Program


class CompiledRules:
    """A `RuleEvaluator`: the live rule versions compiled, plus the lists. `version` is a digest
    of everything evaluated (same rules and lists, same version, in every process)."""

    def __init__(self, specs: Iterable[RuleSpec], lists: SubjectMatcher | None = None) -> None:
        live = sorted(
            (s for s in specs if s.state != "disabled"), key=lambda s: (s.rule_id, s.version)
        )
        self._rules = tuple(
            _Rule(s, compile_expression(s.expression, f"#/rules/{s.rule_id}/{s.version}"))
            for s in live
        )
        self.lists = lists
        self._used = frozenset().union(*(r.program.variables() for r in self._rules))
        canonical = [
            [s.rule_id, s.version, s.state, s.expression, s.score, s.action, s.reason_code]
            for s in live
        ]
        digest = hashlib.sha256(
            json.dumps([canonical, lists.digest if lists else None]).encode()
        ).hexdigest()
        self.version = f"rs_{digest[:16]}"
        # Run-time errors by rule id (a non-hit each); logged once per rule version.
        self.errors: Counter[str] = Counter()
        self._logged: set[tuple[str, int]] = set()
        self.on_error: Callable[[str], None] | None = None

    @property
    def specs(self) -> tuple[RuleSpec, ...]:
        return tuple(r.spec for r in self._rules)

    def evaluate(self, features: Features, subject: RiskSubject | None = None) -> list[RuleHit]:
        """The hits of every live rule on `features` (shadow ones with `shadow=True`), then, when
        `subject` is given, the block/allow list hits. Never raises for a rule's sake."""
        # Only the features some rule names: CEL copies each variable into its context (about
        # 1.5 µs apiece), and the rules use about half of the catalogue.
        context = _context({k: features[k] for k in self._used if k in features})
        hits: list[RuleHit] = []
        for rule in self._rules:
            spec = rule.spec
            try:
                result = rule.program.execute(context)
            except Exception as exc:  # a broken rule must never break a payment
                self._error(spec, exc)
                continue
            if result is True:
                hits.append(
                    RuleHit(
                        rule_id=spec.rule_id,
                        version=spec.version,
                        reason_code=spec.reason_code,
                        description=spec.description,
                        score=spec.score,
                        action=spec.action,
                        shadow=spec.state == "shadow",
                    )
                )
            elif result is not False:
                self._error(spec, TypeError(f"result is {type(result).__name__}, not a bool"))
        if subject is not None and self.lists is not None:
            try:
                hits.extend(self.lists.match(subject))
            except Exception as exc:  # same promise for the lists
                self.errors["lists"] += 1
                log.error("fraud_lists_error", error=type(exc).__name__)
        return hits

    def _error(self, spec: RuleSpec, exc: Exception) -> None:
        self.errors[spec.rule_id] += 1
        if self.on_error is not None:
            self.on_error(spec.rule_id)
        if (spec.rule_id, spec.version) not in self._logged:
            self._logged.add((spec.rule_id, spec.version))
            log.warning(
                "fraud_rule_error",
                rule_id=spec.rule_id,
                version=spec.version,
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )


def compile_rules(specs: Iterable[RuleSpec], lists: SubjectMatcher | None = None) -> CompiledRules:
    """Compile rule versions (disabled ones are left out) and optionally the lists into an
    evaluator. Raises `InvalidRuleExpression` for a bad expression."""
    return CompiledRules(specs, lists)


def spec_from_row(row: Row[Any]) -> RuleSpec:
    return RuleSpec(
        rule_id=row.rule_id,
        version=row.version,
        expression=row.expression,
        reason_code=row.reason_code,
        description=row.description,
        score=row.score,
        action=row.action,
        state=row.state,
    )


ListLoader = Callable[[AsyncConnection], Awaitable[SubjectMatcher]]


def error_counter(registry: CollectorRegistry) -> Callable[[str], None]:
    """An `on_error` hook for `RuleBook`: counts rule run-time errors by rule id on `registry`
    (`billfold_fraud_rule_errors_total`), so a rule that silently never hits shows up."""
    counter = Counter_(
        "billfold_fraud_rule_errors_total",
        "Fraud rule evaluations that failed at run time (each a non-hit), by rule",
        ["rule_id"],
        registry=registry,
    )
    return lambda rule_id: counter.labels(rule_id).inc()


class RuleBook:
    """The process's compiled rules (and lists), refreshed when they change.

    `current(conn)` is the hot path and costs no I/O while traffic flows: once the set is half
    `refresh_seconds` old, a background task (on a connection of its own) reads the change
    counters (one single-row read) and reloads only when a counter moved, while the checks
    keep using the set they have. A set that has grown `refresh_seconds` old all the same (no
    check came in the second half, or the refresh failed) is checked by the caller before it is
    used, on the caller's connection, inside its transaction, as is the first load and the one
    after `invalidate`. So a change is in force at most `refresh_seconds` after it committed,
    and a steady stream of checks never waits for it."""

    def __init__(
        self,
        *,
        lists: ListLoader | None = None,
        refresh_seconds: float = 1.0,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load_lists = lists
        self.refresh_seconds = refresh_seconds
        self._on_error = on_error
        self._clock = clock
        self._rules: CompiledRules | None = None
        self._specs: tuple[RuleSpec, ...] = ()
        self._matcher: SubjectMatcher | None = None
        self._counters: tuple[int, int] | None = None
        self._checked = -math.inf
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    def invalidate(self) -> None:
        """Check the counters on the next `current` call, whatever the age of the set."""
        self._checked = -math.inf

    async def current(self, conn: AsyncConnection) -> CompiledRules:
        rules = self._rules
        if rules is not None:
            age = self._clock() - self._checked
            if age < self.refresh_seconds / 2:
                return rules
            if age < self.refresh_seconds:
                if not self._lock.locked():
                    self._refresh_in_background(conn.engine)
                return rules
            # Past its full age the set is not used unchecked, not even while a refresh is in
            # flight (a slow one may have read the counters before the change committed): wait
            # for it, then check again below.
        async with self._lock:
            if self._rules is not None and self._clock() - self._checked < self.refresh_seconds:
                return self._rules
            return await self._refresh(conn)

    def _refresh_in_background(self, engine: AsyncEngine) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(
                self._refresh_own(engine), name="fraud-rule-book-refresh"
            )

    async def _refresh_own(self, engine: AsyncEngine) -> None:
        try:
            # The connection first: the lock is not held while the pool is waited for.
            async with engine.connect() as conn, self._lock:
                if self._clock() - self._checked >= self.refresh_seconds / 2:
                    await self._refresh(conn)
        except Exception:  # the checks go on with the set they have; the next one tries again
            log.exception("fraud_rules_refresh_failed")

    async def settled(self) -> None:
        """Wait for a background refresh in flight, if any (tests, an orderly shutdown)."""
        if self._background is not None:
            await asyncio.shield(self._background)

    async def _refresh(self, conn: AsyncConnection) -> CompiledRules:
        # The time before the read: the counters are as of (at least) then, not when they arrive.
        asked = self._clock()
        counters = await store.counters(conn)
        self._checked = asked
        if self._rules is not None and counters == self._counters:
            return self._rules
        old = self._counters
        if old is None or counters[0] != old[0]:
            specs: list[RuleSpec] = []
            for row in await store.live_versions(conn):
                try:
                    compile_expression(row.expression)
                except InvalidRuleExpression:
                    # Checked when written; a catalogue change may orphan one. Skip, say so.
                    log.error("fraud_rule_uncompilable", rule_id=row.rule_id, version=row.version)
                    continue
                specs.append(spec_from_row(row))
            self._specs = tuple(specs)
        if self._load_lists is not None and (old is None or counters[1] != old[1]):
            self._matcher = await self._load_lists(conn)
        rules = CompiledRules(self._specs, self._matcher)
        rules.on_error = self._on_error
        self._rules, self._counters = rules, counters
        log.info("fraud_rules_loaded", version=rules.version, rules=len(self._specs))
        return rules


# --- the shipped defaults (a frozen copy is seeded by migration 0007) ---------------------------

DEFAULT_RULES: tuple[RuleSpec, ...] = (
    # Card testing: stolen numbers tried in bursts of tiny online attempts, many declined.
    RuleSpec(
        "card_testing_burst",
        "is_ecommerce && card_count_1m >= 5 && amount <= 1000",
        "card_testing_burst",
        "Five or more small online attempts on this card within a minute: the pattern of "
        "testing stolen card numbers",
        score=900,
        action="block",
    ),
    RuleSpec(
        "card_repeated_declines",
        "card_declines_1h >= 3 && card_count_1h >= 4",
        "card_repeated_declines",
        "This card was declined three or more times in the last hour and is being tried again",
        score=800,
        action="block",
    ),
    # Velocity: points only, so a busy but honest user is not stopped by one of them alone.
    RuleSpec(
        "velocity_user_minute",
        "user_count_1m >= 10",
        "velocity_user_minute",
        "Ten or more payments or transfers by this user within a minute",
        score=150,
    ),
    RuleSpec(
        "velocity_user_hour",
        "user_count_1h >= 30",
        "velocity_user_hour",
        "Thirty or more payments or transfers by this user within an hour",
        score=150,
    ),
    RuleSpec(
        "velocity_amount_day",
        "user_sum_24h >= 1000000",
        "velocity_amount_day",
        "This user moved 10,000 or more (in minor units: 1,000,000) within 24 hours",
        score=150,
    ),
    # Amount against the user's own history.
    RuleSpec(
        "amount_anomaly",
        "history_count >= 5 && amount_zscore >= 4.0 && amount_to_max >= 3.0",
        "amount_anomaly",
        "The amount is far above anything this user has paid before (over 4 standard "
        "deviations and 3 times their largest)",
        score=350,
    ),
    # Geography.
    RuleSpec(
        "impossible_travel",
        "has_location && km_from_last > 300.0 && speed_kmh > 900.0",
        "impossible_travel",
        "The payment is too far from the last one for the time between them (faster than an "
        "airliner)",
        score=450,
        action="challenge",
    ),
    # Account takeover: a new device, a new place, a bigger amount than ever.
    RuleSpec(
        "new_device_large_amount",
        "new_device && history_count >= 3 && amount >= 50000 && amount_to_max >= 2.0",
        "new_device_large_amount",
        "A large amount, at least twice this user's largest, from a device they have not used "
        "before",
        score=350,
        action="challenge",
    ),
    RuleSpec(
        "account_takeover_pattern",
        "is_payment && new_device && new_country && country_mismatch && history_count >= 3 "
        "&& amount_to_max >= 2.0",
        "account_takeover_pattern",
        "A new device paying in a new country, away from the user's own, more than twice their "
        "largest amount",
        score=450,
        action="challenge",
    ),
    # Money mules: one sender to many new people, or many senders to one person.
    RuleSpec(
        "mule_fan_out",
        "!is_payment && new_recipient && user_recipients_24h >= 10",
        "mule_fan_out",
        "This sender paid ten or more different people within 24 hours, this one for the "
        "first time",
        score=500,
        action="review",
    ),
    RuleSpec(
        "mule_fan_in",
        "!is_payment && recipient_senders_24h >= 10",
        "mule_fan_in",
        "The recipient received money from ten or more different people within 24 hours",
        score=450,
        action="review",
    ),
    # Merchants and accounts.
    RuleSpec(
        "high_risk_merchant",
        "mcc_risk >= 0.8 && amount >= 50000",
        "high_risk_merchant",
        "A large payment to a high-risk kind of merchant (gambling, crypto, money transfer)",
        score=250,
    ),
    RuleSpec(
        "high_risk_merchant_new_account",
        "mcc_risk >= 0.8 && account_age_days < 7.0",
        "high_risk_merchant_new_account",
        "A payment to a high-risk kind of merchant from an account less than a week old",
        score=200,
    ),
    RuleSpec(
        "young_account_large_amount",
        "account_age_days < 1.0 && kyc_tier == 0 && amount >= 50000",
        "young_account_large_amount",
        "A large amount from an unverified account opened less than a day ago",
        score=150,
    ),
    RuleSpec(
        "unusual_time",
        "history_count >= 20 && hour_habit_share < 0.02 && amount_zscore >= 2.0",
        "unusual_time",
        "An unusually large amount at an hour this user is almost never active",
        score=150,
    ),
    RuleSpec(
        "shared_device",
        "device_users_24h >= 4",
        "shared_device",
        "Four or more different users were on this device within 24 hours",
        score=250,
    ),
    # Shipped in shadow: offices and carrier NAT put many honest users behind one IP.
    RuleSpec(
        "shared_ip",
        "ip_users_24h >= 20",
        "shared_ip",
        "Twenty or more different users came from this IP address within 24 hours",
        score=150,
        state="shadow",
    ),
)


# --- the admin API's shapes ---------------------------------------------------------------------

# Admin input that is stored or used as a filter: no control characters (U+0000-U+001F,
# U+007F), as in payments; PostgreSQL refuses NUL outright (a 500 before this). Multi-line free
# text (comments, notes) may keep tabs and line breaks.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
MULTILINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def _to_utc(value: datetime) -> datetime:
    # An offset at the edge of the calendar (0001-01-01T00:00+14:00, 9999-12-31T23:59-14:00)
    # overflows when converted to UTC, which the database driver does: refuse it here.
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date out of range once converted to UTC") from None


UtcDateTime = Annotated[datetime, AfterValidator(_to_utc)]
RuleId = Annotated[str, StringConstraints(pattern=RULE_ID_PATTERN)]
ReasonCode = Annotated[str, StringConstraints(pattern=REASON_CODE_PATTERN)]
Expression = Annotated[str, StringConstraints(min_length=1, max_length=MAX_EXPRESSION)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
Note = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]


def _check_reason(value: str | None) -> str | None:
    if value is not None and value.startswith(RESERVED_REASON_PREFIXES):
        raise ValueError("reason codes starting block_list/allow_list belong to the lists")
    return value


class CreateRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: RuleId = Field(description="The rule's name, e.g. `gift_card_burst`")
    expression: Expression = Field(
        description="CEL over the feature names, true when the rule hits, e.g. "
        "`card_count_1m >= 5 && amount <= 1000`"
    )
    score: int = Field(0, ge=0, le=1000, description="Points added to the 0-1000 risk score")
    action: Action | None = Field(
        None, description="A direct action: the decision is at least this severe"
    )
    reason_code: ReasonCode
    description: Description = Field(description="What the hit means, for a support agent")
    state: RuleState = Field("shadow", description="Start in shadow (default), active or disabled")
    note: Note | None = Field(default=None, description="Why (kept with the version)")

    _reason = field_validator("reason_code")(_check_reason)


class UpdateRule(BaseModel):
    """A new version: the fields given replace the latest version's, the rest are kept."""

    model_config = ConfigDict(extra="forbid")

    expression: Expression | None = None
    score: int | None = Field(default=None, ge=0, le=1000)
    action: Action | Literal["none"] | None = Field(
        None, description="A direct action, or `none` to remove the latest version's"
    )
    reason_code: ReasonCode | None = None
    description: Description | None = None
    state: RuleState = Field(
        "shadow",
        description="`shadow` (default): evaluated beside the version in force until promoted; "
        "`active`: replaces it at once; `disabled`: stored only",
    )
    note: Note | None = None

    _reason = field_validator("reason_code")(_check_reason)


class VersionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, description="Which version (see each route)")
    note: Note | None = None


class RuleVersionView(BaseModel):
    rule_id: str
    version: int
    expression: str
    score: int
    action: Action | None
    reason_code: str
    description: str
    state: RuleState
    note: str | None
    based_on: int | None
    created_by: str | None
    created_at: datetime
    state_changed_by: str | None
    state_changed_at: datetime
    activated_at: datetime | None


class RuleView(BaseModel):
    id: str
    state: RuleState = Field(
        description="`active` if a version is enforced, else `shadow` if one is in shadow, "
        "else `disabled`"
    )
    active_version: int | None
    shadow_version: int | None
    latest_version: int
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    versions: list[RuleVersionView]


class ExpressionTrial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: Expression
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Feature values by name; those left out are neutral (0, false, '')",
    )

    @field_validator("features")
    @classmethod
    def _known(cls, value: dict[str, FeatureValue]) -> dict[str, FeatureValue]:
        unknown = sorted(set(value) - _NAMES)
        if unknown:
            raise ValueError(f"unknown feature(s): {', '.join(unknown[:10])}")
        return value


class TrialResult(BaseModel):
    matched: bool
    error: str | None = Field(default=None, description="The run-time error that made it a non-hit")
    features_used: dict[str, FeatureValue]


class BacktestRequest(BaseModel):
    """Replay a rule over stored decisions' feature snapshots: an `expression` (a draft) or a
    stored rule (`rule_id`, optional `version`; default the version in shadow, else in force,
    else the latest)."""

    model_config = ConfigDict(extra="forbid")

    expression: Expression | None = None
    rule_id: RuleId | None = None
    version: int | None = Field(default=None, ge=1)
    since: UtcDateTime | None = None
    until: UtcDateTime | None = None
    limit: int = Field(10_000, ge=1, le=BACKTEST_MAX, description="Newest decisions replayed")


class LabelStats(BaseModel):
    total: int
    hits: int


class BacktestResult(BaseModel):
    rule_id: str | None
    version: int | None
    expression: str
    evaluated: int
    hits: int
    hit_rate: float
    errors: int
    by_action: dict[str, LabelStats] = Field(description="By the action decided at the time")
    fraud: LabelStats = Field(description="Decisions an analyst labelled fraud")
    legit: LabelStats = Field(description="Decisions an analyst labelled legit")
    precision: float | None = Field(description="Labelled fraud among labelled hits")
    recall: float | None = Field(description="Labelled fraud the rule would catch")
    sample_hits: list[str] = Field(description="Ids of some decisions it hits, newest first")


class FeatureInfo(BaseModel):
    name: str
    kind: str
    description: str


# --- use cases ----------------------------------------------------------------------------------


def _version_view(row: Row[Any]) -> RuleVersionView:
    return RuleVersionView.model_validate(row._asdict())


def _rule_view(rule: Row[Any], versions: Sequence[Row[Any]]) -> RuleView:
    views = [_version_view(v) for v in versions]
    active = next((v.version for v in views if v.state == "active"), None)
    shadow = next((v.version for v in views if v.state == "shadow"), None)
    state: RuleState = "active" if active else "shadow" if shadow else "disabled"
    return RuleView(
        id=rule.id,
        state=state,
        active_version=active,
        shadow_version=shadow,
        latest_version=rule.latest_version,
        created_by=rule.created_by,
        created_at=rule.created_at,
        updated_at=rule.updated_at,
        versions=views,
    )


def _not_found() -> NotFound:
    return NotFound("No such rule", code="rule_not_found")


async def get_rule(conn: AsyncConnection, rule_id: str) -> RuleView:
    rule = await store.get_rule(conn, rule_id)
    if rule is None:
        raise _not_found()
    return _rule_view(rule, await store.versions_of(conn, [rule_id]))


async def list_rules(
    conn: AsyncConnection, *, state: RuleState | None, limit: int, after: str | None
) -> list[RuleView]:
    rules = await store.list_rules(conn, state=state, limit=limit, after=after)
    versions = await store.versions_of(conn, [r.id for r in rules])
    by_rule: dict[str, list[Row[Any]]] = {}
    for v in versions:
        by_rule.setdefault(v.rule_id, []).append(v)
    return [_rule_view(r, by_rule.get(r.id, [])) for r in rules]


def _event(kind: str, rule_id: str, now: datetime, **data: Any) -> Event:
    return Event(
        type=kind,
        source=SOURCE,
        subject=f"rule/{rule_id}",
        aggregate_id=f"fraud_rule:{rule_id}",
        time=now,
        data={"rule_id": rule_id, **data},
    )


async def _place(
    conn: AsyncConnection, rule_id: str, version: int, state: RuleState, actor: str, now: datetime
) -> None:
    """Put `version` in `state`, retiring the version that held that state; a version moving out
    of active or shadow leaves that place empty."""
    if state != "disabled":
        await store.retire_state(conn, rule_id, state, actor, now, keep=version)
    await store.set_state(conn, rule_id, version, state, actor, now)


async def create_rule(uow: UnitOfWork, actor: str, body: CreateRule) -> RuleView:
    """A new rule at version 1 (default in shadow). `409 rule_exists` for a taken name."""
    compile_expression(body.expression)
    _require_effect(body.score, body.action)
    conn = await uow.connection()
    now = utcnow()
    await store.bump_rules(conn)
    if not await store.insert_rule(conn, body.id, actor, now):
        raise Conflict("A rule with this id exists; update it instead", code="rule_exists")
    await store.insert_version(
        conn,
        {
            "rule_id": body.id,
            "version": 1,
            "expression": body.expression,
            "score": body.score,
            "action": body.action,
            "reason_code": body.reason_code,
            "description": body.description,
            "state": body.state,
            "note": body.note,
            "based_on": None,
            "actor": actor,
            "now": now,
        },
    )
    await record_event(
        conn,
        _event(RULE_CREATED, body.id, now, version=1, state=body.state, actor=actor),
    )
    return await get_rule(conn, body.id)


def _require_effect(score: int, action: str | None) -> None:
    if score <= 0 and action is None:
        raise ProblemError(
            "A rule needs a score above 0 or a direct action",
            status=422,
            code="validation_failed",
            errors=[FieldError(pointer="#/score", detail="0 without an action has no effect")],
        )


async def update_rule(uow: UnitOfWork, actor: str, rule_id: str, body: UpdateRule) -> RuleView:
    """A new version from the latest one and the fields given, placed in `body.state`."""
    conn = await uow.connection()
    now = utcnow()
    await store.bump_rules(conn)
    rule = await store.get_rule(conn, rule_id, for_update=True)
    if rule is None:
        raise _not_found()
    latest = await store.get_version(conn, rule_id, rule.latest_version)
    assert latest is not None  # a rule is created with its first version
    expression = body.expression if body.expression is not None else latest.expression
    compile_expression(expression)
    score = body.score if body.score is not None else latest.score
    action = (
        latest.action if body.action is None else None if body.action == "none" else body.action
    )
    _require_effect(score, action)
    version = await store.next_version(conn, rule_id, now)
    if body.state != "disabled":
        await store.retire_state(conn, rule_id, body.state, actor, now)
    await store.insert_version(
        conn,
        {
            "rule_id": rule_id,
            "version": version,
            "expression": expression,
            "score": score,
            "action": action,
            "reason_code": body.reason_code or latest.reason_code,
            "description": body.description or latest.description,
            "state": body.state,
            "note": body.note,
            "based_on": latest.version,
            "actor": actor,
            "now": now,
        },
    )
    await record_event(
        conn,
        _event(
            RULE_VERSION_CREATED,
            rule_id,
            now,
            version=version,
            based_on=latest.version,
            state=body.state,
            actor=actor,
        ),
    )
    return await get_rule(conn, rule_id)


StateChange = Literal["shadow", "promote", "disable", "rollback"]


async def change_state(
    uow: UnitOfWork, actor: str, rule_id: str, change: StateChange, body: VersionChoice
) -> RuleView:
    """`shadow`: a version (default the latest) is evaluated but not enforced (if it was the
    active one, nothing of the rule is enforced any more). `promote`: a version (default the one
    in shadow) is enforced, replacing the one in force. `rollback`: a version (default the one
    in force before the current one) is enforced again. `disable`: nothing of the rule is
    evaluated. Each is recorded on the version and as an event."""
    conn = await uow.connection()
    now = utcnow()
    await store.bump_rules(conn)
    rule = await store.get_rule(conn, rule_id, for_update=True)
    if rule is None:
        raise _not_found()
    versions = await store.versions_of(conn, [rule_id])
    before = {v.version: v.state for v in versions}
    if change == "disable":
        await store.disable_all(conn, rule_id, actor, now)
        target = None
    else:
        target = body.version
        if target is None:
            target = _default_target(change, versions, rule.latest_version)
            if target is None and change == "rollback":
                earlier = await store.previously_active(conn, rule_id)
                target = earlier.version if earlier is not None else None
        if target is None:
            raise Conflict(_NOTHING[change], code="no_such_version")
        if target not in before:
            raise NotFound("The rule has no such version", code="rule_version_not_found")
        await _place(
            conn, rule_id, target, "shadow" if change == "shadow" else "active", actor, now
        )
    after = {v.version: v.state for v in await store.versions_of(conn, [rule_id])}
    await record_event(
        conn,
        _event(
            RULE_STATE_CHANGED,
            rule_id,
            now,
            change=change,
            version=target,
            changed={str(k): [before[k], after[k]] for k in after if before.get(k) != after[k]},
            note=body.note,
            actor=actor,
        ),
    )
    return await get_rule(conn, rule_id)


_NOTHING = {
    "promote": "No version of this rule is in shadow; name the version to promote",
    "rollback": "No earlier version of this rule was ever in force; name the version",
    "shadow": "No version to put in shadow",
}


def _default_target(change: StateChange, versions: Sequence[Row[Any]], latest: int) -> int | None:
    if change == "shadow":
        return latest
    if change == "promote":
        return next((v.version for v in versions if v.state == "shadow"), None)
    return None  # rollback: found by the caller (needs the activation history)


def try_expression(body: ExpressionTrial) -> TrialResult:
    """Evaluate an expression once on the given features (the rest neutral)."""
    program = compile_expression(body.expression)
    features = {**NEUTRAL, **body.features}
    try:
        result = program.execute(_context(features))
    except Exception as exc:  # reported to the caller, as the live path counts it
        return TrialResult(matched=False, error=str(exc)[:300], features_used=features)
    if not isinstance(result, bool):
        return TrialResult(
            matched=False, error=f"result is {type(result).__name__}", features_used=features
        )
    return TrialResult(matched=result, features_used=features)


async def backtest(conn: AsyncConnection, body: BacktestRequest) -> BacktestResult:
    """Replay one expression over the newest stored decisions' feature snapshots: how often it
    hits, by the action taken then, and against analyst labels (precision, recall)."""
    rule_id, version, expression = await _backtest_subject(conn, body)
    program = compile_expression(expression)
    rows = await store.past_decisions(conn, since=body.since, until=body.until, limit=body.limit)
    hits = errors = 0
    by_action: dict[str, list[int]] = {}
    labels: dict[str, list[int]] = {"fraud": [0, 0], "legit": [0, 0]}
    sample: list[str] = []
    for row in rows:
        snapshot = row.features if isinstance(row.features, Mapping) else json.loads(row.features)
        try:
            hit = program.execute(_context(snapshot)) is True
        except Exception:  # a non-hit, as live
            hit = False
            errors += 1
        counts = by_action.setdefault(row.action, [0, 0])
        counts[0] += 1
        if row.label in labels:
            labels[row.label][0] += 1
        if hit:
            hits += 1
            counts[1] += 1
            if row.label in labels:
                labels[row.label][1] += 1
            if len(sample) < BACKTEST_SAMPLE:
                sample.append(row.id)
    fraud_total, fraud_hits = labels["fraud"]
    legit_hits = labels["legit"][1]
    labelled_hits = fraud_hits + legit_hits
    return BacktestResult(
        rule_id=rule_id,
        version=version,
        expression=expression,
        evaluated=len(rows),
        hits=hits,
        hit_rate=hits / len(rows) if rows else 0.0,
        errors=errors,
        by_action={a: LabelStats(total=c[0], hits=c[1]) for a, c in sorted(by_action.items())},
        fraud=LabelStats(total=fraud_total, hits=fraud_hits),
        legit=LabelStats(total=labels["legit"][0], hits=legit_hits),
        precision=fraud_hits / labelled_hits if labelled_hits else None,
        recall=fraud_hits / fraud_total if fraud_total else None,
        sample_hits=sample,
    )


async def _backtest_subject(
    conn: AsyncConnection, body: BacktestRequest
) -> tuple[str | None, int | None, str]:
    if (body.expression is None) == (body.rule_id is None):
        raise ProblemError(
            "Give either an expression or a rule_id",
            status=422,
            code="validation_failed",
            errors=[FieldError(pointer="#/expression", detail="expression xor rule_id")],
        )
    if body.expression is not None:
        return None, None, body.expression
    assert body.rule_id is not None
    view = await get_rule(conn, body.rule_id)
    version = body.version or view.shadow_version or view.active_version or view.latest_version
    chosen = next((v for v in view.versions if v.version == version), None)
    if chosen is None:
        raise NotFound("The rule has no such version", code="rule_version_not_found")
    return view.id, chosen.version, chosen.expression


def feature_catalogue() -> list[FeatureInfo]:
    """The names an expression may use, with their kinds and meaning."""
    return [FeatureInfo(name=f.name, kind=f.kind, description=f.description) for f in FEATURES]


__all__ = [
    "DEFAULT_RULES",
    "CompiledRules",
    "InvalidRuleExpression",
    "RuleBook",
    "RuleSpec",
    "SubjectMatcher",
    "compile_expression",
    "compile_rules",
]
