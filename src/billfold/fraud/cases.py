"""The review queue: a `review` decision opens a case (the money is held by the payment or the
transfer); a reviewer takes it, comments, and decides: `release` completes what was held,
`confirm_fraud` refuses it (void / return to sender) and labels the decision `fraud` for
training. Every step is in the case's audit trail and published as an event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import p2p, transactions, users
from billfold.fraud import events
from billfold.fraud.rules import MULTILINE, PRINTABLE
from billfold.fraud.runtime import FraudRuntime
from billfold.fraud.store import cases as store
from billfold.fraud.store import decisions
from billfold.platform.bus.consumers import Consumer
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Conflict, FieldError, NotFound, ProblemError, Unprocessable
from billfold.platform.events import record_event

CaseStatus = Literal["open", "assigned", "decided"]
Outcome = Literal["release", "confirm_fraud"]
# What each outcome teaches the model about the decision that opened the case.
LABELS: dict[str, str] = {"release": "legit", "confirm_fraud": "fraud"}
# The failure reason a refused transfer carries (its parties see `declined_after_review`).
FRAUD_CONFIRMED = "fraud_confirmed"


class CaseNotFound(NotFound):
    code = "case_not_found"


class CaseDecided(Conflict):
    code, title = "case_decided", "The case is already decided"


class CaseExpired(Conflict):
    code, title = "case_expired", "The review hold of this case expired"


# A decision being applied: what `subject_status` of an undecided case says between the
# committed claim of an outcome and the committed case (`decide`).
APPLYING: dict[str, str] = {"release": "releasing", "confirm_fraud": "refusing"}
# `subject_status` of an undecided case whose payment/transfer is no longer held (its review
# hold expired and the money went back): it can no longer be released.
EXPIRED = "expired"
# `subject_status` of a case decided `confirm_fraud` whose payment/transfer was no longer held.
NOT_PENDING = "not_pending"


# --- views and requests -----------------------------------------------------------------------


class CaseView(BaseModel):
    id: str
    status: CaseStatus
    subject_kind: Literal["payment", "transfer"]
    subject_id: str
    user_id: str
    amount: int
    currency: str
    score: int
    reasons: list[str]
    assignee_id: str | None = None
    outcome: Outcome | None = None
    subject_status: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class DecisionView(BaseModel):
    id: str
    action: Literal["allow", "challenge", "review", "block"]
    score: int
    reasons: list[str]
    explanations: list[str]
    hits: list[dict[str, Any]]
    features: dict[str, Any]
    rule_version: str | None = None
    model_version: str | None = None
    model_probability: float | None = None
    model_anomaly: float | None = None
    challenger: dict[str, Any] | None = None
    degraded: bool
    fallback: str | None = None
    stepped_up: bool
    label: Literal["fraud", "legit"] | None = None
    created_at: datetime


class CommentView(BaseModel):
    id: int
    author_id: str
    body: str
    created_at: datetime


class AuditEntry(BaseModel):
    id: int
    actor_id: str | None = None
    action: str
    detail: dict[str, Any]
    created_at: datetime


class CaseDetail(CaseView):
    """A case with what a reviewer needs: the decision (features, hits, model), every decision
    on the same payment/transfer, the comments, the audit trail, and whether the user's account
    is locked (`account_status`: a release may unlock it)."""

    account_status: Literal["active", "locked", "closed"] | None = None
    decision: DecisionView
    decisions: list[DecisionView]
    comments: list[CommentView]
    audit: list[AuditEntry]


class AssignCase(BaseModel):
    # Default: the caller takes the case.
    assignee_id: str | None = Field(default=None, max_length=64, pattern=PRINTABLE)


class NewComment(BaseModel):
    body: str = Field(min_length=1, max_length=4000, pattern=MULTILINE)


class CaseDecisionRequest(BaseModel):
    # A misspelt field (`"unlock": true`) is refused, not ignored: the reviewer would believe it
    # took effect. A strict bool: "yes" or 1 is not a decision to unlock.
    model_config = ConfigDict(extra="forbid")

    decision: Outcome
    note: str | None = Field(default=None, max_length=2000, pattern=MULTILINE)
    # With `release` only: the reviewer also unlocks the user's account (locked by the fraud
    # lock policy or an administrator). Never implied: a release alone leaves a lock in place.
    unlock_account: StrictBool = False

    @model_validator(mode="after")
    def _unlock_only_on_release(self) -> CaseDecisionRequest:
        if self.unlock_account and self.decision != "release":
            raise ValueError("unlock_account is only allowed with the decision release")
        return self


# --- use cases --------------------------------------------------------------------------------


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def case_view(row: Row[Any]) -> CaseView:
    return CaseView.model_validate(dict(row._mapping))


def decision_view(row: Row[Any]) -> DecisionView:
    m = dict(row._mapping)
    for k in ("explanations", "hits", "features", "challenger"):
        m[k] = _json(m[k])
    return DecisionView.model_validate(m)


async def list_cases(
    conn: AsyncConnection,
    *,
    status: str | None,
    assignee_id: str | None,
    user_id: str | None,
    subject_kind: str | None,
    limit: int,
    after: str | None,
) -> list[CaseView]:
    rows = await store.page(
        conn,
        status=status,
        assignee_id=assignee_id,
        user_id=user_id,
        subject_kind=subject_kind,
        limit=limit,
        after=after,
    )
    return [case_view(r) for r in rows]


async def _locked(conn: AsyncConnection, case_id: str) -> Row[Any]:
    row = await store.get(conn, case_id, for_update=True)
    if row is None:
        raise CaseNotFound("No such case")
    return row


async def get_case(conn: AsyncConnection, case_id: str) -> CaseDetail:
    row = await store.get(conn, case_id)
    if row is None:
        raise CaseNotFound("No such case")
    decision = await decisions.get(conn, row.decision_id)
    assert decision is not None  # a foreign key
    history = await decisions.for_subject(conn, row.subject_id)
    return CaseDetail(
        **case_view(row).model_dump(),
        account_status=await users.account_status(conn, row.user_id),  # type: ignore[arg-type]
        decision=decision_view(decision),
        decisions=[decision_view(d) for d in history],
        comments=[
            CommentView.model_validate(dict(c._mapping))
            for c in await store.comments(conn, case_id)
        ],
        audit=[
            AuditEntry.model_validate({**dict(a._mapping), "detail": _json(a.detail)})
            for a in await store.audit_trail(conn, case_id)
        ],
    )


async def assign(
    conn: AsyncConnection, case_id: str, actor_id: str, body: AssignCase
) -> CaseDetail:
    """Give the case to a reviewer (the caller by default); a decided case is 409."""
    row = await _locked(conn, case_id)
    if row.status == "decided":
        raise CaseDecided("This case is already decided")
    assignee = body.assignee_id or actor_id
    if assignee != actor_id and not await users.is_admin(conn, assignee):
        raise Unprocessable(
            "A case can only be assigned to an administrator",
            code="invalid_assignee",
            errors=[FieldError(pointer="#/assignee_id", detail="not an active administrator")],
        )
    if row.assignee_id != assignee or row.status != "assigned":
        await store.update(conn, case_id, {"status": "assigned", "assignee_id": assignee})
        await store.audit(
            conn, case_id, actor_id, "assigned", {"from": row.assignee_id, "to": assignee}
        )
        await record_event(
            conn,
            events.event(
                events.CASE_ASSIGNED,
                case_id,
                {"case_id": case_id, "assignee_id": assignee, "by": actor_id},
            ),
        )
    return await get_case(conn, case_id)


async def comment(
    conn: AsyncConnection, case_id: str, actor_id: str, body: NewComment
) -> CommentView:
    """A reviewer's note (also on a decided case: what was learnt later)."""
    await _locked(conn, case_id)
    row = await store.add_comment(conn, case_id, actor_id, body.body)
    await store.audit(conn, case_id, actor_id, "commented", {"comment_id": row.id})
    await record_event(
        conn,
        events.event(
            events.CASE_COMMENTED,
            case_id,
            {"case_id": case_id, "comment_id": row.id, "author_id": actor_id},
        ),
    )
    return CommentView.model_validate(dict(row._mapping))


async def decide(
    uow: UnitOfWork,
    rt: FraudRuntime,
    case_id: str,
    actor_id: str,
    body: CaseDecisionRequest,
) -> CaseDetail:
    """Release or confirm fraud: the held payment/transfer completes or is refused, the
    decision is labelled, the audit trail and an event record it. A decided case is 409
    `case_decided`, one whose hold expired 409 `case_expired`.

    A payment's review decision commits in the payments' own transaction (a card void talks to
    the network after it), so the case cannot commit with it. The outcome is claimed first, in
    a transaction of its own (`subject_status` `releasing`/`refusing`): from then on the case
    can only end that way. A crash after the money moved leaves the claim; deciding the same
    again finishes the case (the payments' review decisions do nothing to a payment no longer
    in review), the other outcome is 409. Two reviewers at once: one claims, both may apply
    the same idempotent effect, exactly one marks the case decided, the other gets 409."""
    outcome = body.decision
    claimed = await _claim(uow.engine, case_id, outcome)
    if claimed.subject_kind == "payment":
        # Before the case's row lock is taken: the payments' transaction is another connection.
        subject_status = await _apply_to_payment(uow.engine, rt, claimed.subject_id, outcome)
        conn = await uow.connection()
        row = await _locked(conn, case_id)
        if row.status == "decided":
            raise CaseDecided("This case is already decided", extra={"outcome": row.outcome})
    else:
        # A transfer's money moves in the case's own transaction: no claim (one that the money
        # then failed to move would outlive the rollback and refuse the other outcome), only
        # the case's row lock, and the checks again under it.
        conn = await uow.connection()
        row = await _locked(conn, case_id)
        _refuse_undecidable(row, outcome)
        subject_status = await _apply_to_transfer(conn, rt, row, outcome)
    if subject_status is None and outcome == "release":
        # Nothing is held any more: a release would move no money while the reviewer believes
        # it did. The case says so, and stays open for a `confirm_fraud` label if it was fraud.
        await uow.rollback()  # the case's row lock; an error answer writes nothing anyway
        await _expire(uow.engine, case_id, actor_id)
        raise CaseExpired(
            "The review hold of this case expired and the money went back to the customer: "
            "there is nothing to release",
            extra={"subject_status": EXPIRED},
        )
    if subject_status is None:
        # Refusing what is no longer held: the money is back already; the label still counts.
        subject_status = NOT_PENDING
    label = LABELS[outcome]
    await decisions.set_label(conn, row.decision_id, label)
    await store.update(
        conn,
        case_id,
        {
            "status": "decided",
            "outcome": outcome,
            "subject_status": subject_status,
            "decided_by": actor_id,
            "decided_at": utcnow(),
        },
    )
    detail: dict[str, Any] = {"outcome": outcome, "label": label, "subject_status": subject_status}
    if body.note:
        detail["note"] = body.note
    if body.unlock_account:
        change = await users.unlock_account(
            conn, row.user_id, reason=f"fraud case {case_id} released", by=actor_id
        )
        detail["account_unlocked"] = change.changed
    await store.audit(conn, case_id, actor_id, "decided", detail)
    await record_event(
        conn,
        events.event(
            events.CASE_DECIDED,
            case_id,
            {
                "case_id": case_id,
                "decision_id": row.decision_id,
                "subject_kind": row.subject_kind,
                "subject_id": row.subject_id,
                "user_id": row.user_id,
                "outcome": outcome,
                "label": label,
                "subject_status": subject_status,
                "decided_by": actor_id,
            },
        ),
    )
    return await get_case(conn, case_id)


async def _claim(engine: AsyncEngine, case_id: str, outcome: str) -> Row[Any]:
    """Commit the claim of `outcome` on a payment's case (or find it claimed already for the
    same outcome: a retry); anything else already decided, claimed or expired is 409. A
    transfer's case is checked, not claimed (its money moves with the case)."""
    async with engine.begin() as conn:
        row = await _locked(conn, case_id)
        claimed = _refuse_undecidable(row, outcome)
        if claimed is None and row.subject_kind == "payment":
            await store.update(conn, case_id, {"subject_status": APPLYING[outcome]})
        return row


def _refuse_undecidable(row: Row[Any], outcome: str) -> str | None:
    """409 for a case already decided, expired (for a release) or claimed for the other
    outcome; the outcome claimed already (a retry), if any."""
    if row.status == "decided":
        raise CaseDecided("This case is already decided", extra={"outcome": row.outcome})
    if row.subject_status == EXPIRED and outcome == "release":
        raise CaseExpired(
            "The review hold of this case expired and the money went back to the customer: "
            "there is nothing to release",
            extra={"subject_status": EXPIRED},
        )
    claimed = next((o for o, s in APPLYING.items() if s == row.subject_status), None)
    if claimed is not None and claimed != outcome:
        raise CaseDecided(
            "Another decision on this case is being applied", extra={"outcome": claimed}
        )
    return claimed


async def _expire(engine: AsyncEngine, case_id: str, actor_id: str | None) -> None:
    async with engine.begin() as conn:
        await _mark_expired(conn, await _locked(conn, case_id), actor_id)


async def _mark_expired(conn: AsyncConnection, row: Row[Any], actor_id: str | None) -> None:
    """The case's payment/transfer is no longer held (its review hold expired): the case stays
    undecided, unlabelled, and says so (`subject_status` `expired`). `row` is locked."""
    if row.status == "decided" or row.subject_status == EXPIRED:
        return
    await store.update(conn, row.id, {"subject_status": EXPIRED})
    await store.audit(conn, row.id, actor_id, "expired", {"subject_id": row.subject_id})


# A payment lapsed (its review outlived the authorization) / a transfer failed: the events that
# end a held subject without a case decision (a case's own refusal of a transfer commits with
# the decided case, so it is never seen on an undecided one).
PAYMENT_EXPIRED = "billfold.transactions.payment.expired"
TRANSFER_FAILED = "billfold.p2p.transfer.failed"


def expiry_consumer() -> Consumer:
    """`fraud.case-expiry`: a held payment or transfer whose review hold ran out marks its
    undecided case `expired` at once (instead of at the next release attempt), so the queue
    shows what can no longer be released. Idempotent (inbox, and an expired case stays so)."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        subject_id = data.get(
            "transaction_id" if event["type"] == PAYMENT_EXPIRED else "transfer_id"
        )
        if not isinstance(subject_id, str):
            return
        case = await store.by_subject(conn, subject_id)
        if case is None or case.status == "decided":
            return
        row = await _locked(conn, case.id)
        if row.subject_status in APPLYING.values():
            # A decision was claimed and may have moved the money before a crash (an approved
            # payment that later lapsed uncaptured): its retry finds out and ends the case;
            # marking it expired here would refuse that retry for a release that happened.
            return
        await _mark_expired(conn, row, None)

    return Consumer("fraud.case-expiry", frozenset({PAYMENT_EXPIRED, TRANSFER_FAILED}), handle)


async def _apply_to_transfer(
    conn: AsyncConnection, rt: FraudRuntime, case: Row[Any], outcome: str
) -> str | None:
    """Complete or refuse the held transfer in the case's own transaction; None when it is no
    longer pending or its hold no longer holds (the review hold lapsed, or the sweeper already
    released it, before the transfers' own expiry ran: the sender has the money back)."""
    assert rt.p2p is not None, "the app gives the fraud runtime the transfers' runtime"
    try:
        # A savepoint: what the transfers wrote before finding the hold gone is undone, and the
        # case's transaction goes on (to label a confirmed fraud).
        async with conn.begin_nested():
            if outcome == "release":
                row = await p2p.release_pending(conn, rt.p2p, case.subject_id)
            else:
                row = await p2p.fail_pending(conn, case.subject_id, FRAUD_CONFIRMED)
    except ProblemError as e:
        if e.status != 404 and e.code not in _HOLD_GONE:
            raise
        return None
    return str(row.status)


# The ledger's answers for a review hold that lapsed (`hold_expired`) or was already released
# by the sweeper (`hold_not_active`): nothing is held any more.
_HOLD_GONE = frozenset({"hold_expired", "hold_not_active"})


async def _apply_to_payment(
    engine: AsyncEngine, rt: FraudRuntime, payment_id: str, outcome: str
) -> str | None:
    """Approve or refuse the payment held for review (its own transaction; idempotent: a
    payment no longer in review is left as it is). None for a release of one whose review
    lapsed (`expired`: nothing to release)."""
    assert rt.transactions is not None, "the app gives the fraud runtime the payments' runtime"
    try:
        if outcome == "release":
            payment = await transactions.approve_review(engine, payment_id)
        else:
            payment = await transactions.reject_review(engine, rt.transactions, payment_id)
    except ProblemError as e:
        if e.status != 404:
            raise
        return None
    if payment.status == "expired" and outcome == "release":
        return None
    return str(payment.status)
