"""The review queue: a `review` decision opens a case (the money is held by the payment or the
transfer); a reviewer takes it, comments, and decides: `release` completes what was held,
`confirm_fraud` refuses it (void / return to sender) and labels the decision `fraud` for
training. Every step is in the case's audit trail and published as an event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import p2p, transactions
from billfold.fraud import events
from billfold.fraud.rules import MULTILINE, PRINTABLE
from billfold.fraud.runtime import FraudRuntime
from billfold.fraud.store import cases as store
from billfold.fraud.store import decisions
from billfold.platform.clock import utcnow
from billfold.platform.errors import Conflict, NotFound, ProblemError
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
    on the same payment/transfer, the comments and the audit trail."""

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
    decision: Outcome
    note: str | None = Field(default=None, max_length=2000, pattern=MULTILINE)


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
    conn: AsyncConnection,
    rt: FraudRuntime,
    case_id: str,
    actor_id: str,
    body: CaseDecisionRequest,
) -> CaseDetail:
    """Release or confirm fraud: the held payment/transfer completes or is refused, the
    decision is labelled, the audit trail and an event record it. A decided case is 409."""
    row = await _locked(conn, case_id)
    if row.status == "decided":
        raise CaseDecided("This case is already decided", extra={"outcome": row.outcome})
    subject_status = await _apply(conn, rt, row, body.decision)
    label = LABELS[body.decision]
    await decisions.set_label(conn, row.decision_id, label)
    await store.update(
        conn,
        case_id,
        {
            "status": "decided",
            "outcome": body.decision,
            "subject_status": subject_status,
            "decided_by": actor_id,
            "decided_at": utcnow(),
        },
    )
    detail = {"outcome": body.decision, "label": label, "subject_status": subject_status}
    if body.note:
        detail["note"] = body.note
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
                "outcome": body.decision,
                "label": label,
                "subject_status": subject_status,
                "decided_by": actor_id,
            },
        ),
    )
    return await get_case(conn, case_id)


async def _apply(conn: AsyncConnection, rt: FraudRuntime, case: Row[Any], outcome: str) -> str:
    """Complete or refuse what the case holds; the subject's status afterwards. One no longer
    held (its review expired, or a card authorization was declined) is left as it is."""
    if case.subject_kind == "transfer":
        assert rt.p2p is not None, "the app gives the fraud runtime the transfers' runtime"
        try:
            if outcome == "release":
                row = await p2p.release_pending(conn, rt.p2p, case.subject_id)
            else:
                row = await p2p.fail_pending(conn, case.subject_id, FRAUD_CONFIRMED)
        except ProblemError as e:
            if e.status != 404:
                raise
            return "not_pending"
        return str(row.status)
    assert rt.transactions is not None, "the app gives the fraud runtime the payments' runtime"
    # The payments' review decisions run in their own transaction (a card void talks to the
    # network after it commits); both are idempotent, so a retry after a failure here is safe.
    engine = conn.engine
    if outcome == "release":
        payment = await transactions.approve_review(engine, case.subject_id)
    else:
        payment = await transactions.reject_review(engine, rt.transactions, case.subject_id)
    return str(payment.status)
