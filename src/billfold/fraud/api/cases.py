"""The review queue for administrators: list, read, assign, comment, decide."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request

from billfold.fraud import cases
from billfold.fraud.cases import (
    AssignCase,
    CaseDecisionRequest,
    CaseDetail,
    CaseView,
    CommentView,
    NewComment,
)
from billfold.fraud.rules import PRINTABLE
from billfold.fraud.runtime import FraudRuntime
from billfold.gateway import IdempotencyRequired, Principal, Uow, require_admin
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params

router = APIRouter(tags=["fraud"])
Admin = Annotated[Principal, Depends(require_admin)]
Pages = Annotated[PageParams, Depends(page_params)]
CaseId = Annotated[str, Path(max_length=64, pattern=PRINTABLE)]


def fraud_runtime(request: Request) -> FraudRuntime:
    return request.app.state.fraud  # type: ignore[no-any-return]


Runtime = Annotated[FraudRuntime, Depends(fraud_runtime)]


@router.get(
    "/v1/admin/fraud/cases",
    response_model=Page[CaseView],
    summary="The fraud review queue, oldest first",
    responses=problem_responses(401, 403, 422),
)
async def list_cases(
    admin: Admin,
    uow: Uow,
    page: Pages,
    status: Annotated[Literal["open", "assigned", "decided"] | None, Query()] = None,
    assignee_id: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    user_id: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    subject_kind: Annotated[Literal["payment", "transfer"] | None, Query()] = None,
) -> Page[CaseView]:
    """Filters: `status`, `assignee_id`, `user_id`, `subject_kind`; `?limit=` and `?cursor=`."""
    items = await cases.list_cases(
        await uow.connection(),
        status=status,
        assignee_id=assignee_id,
        user_id=user_id,
        subject_kind=subject_kind,
        limit=page.limit + 1,
        after=page.after,
    )
    return make_page(items, page.limit, "id")


@router.get(
    "/v1/admin/fraud/cases/{case_id}",
    response_model=CaseDetail,
    summary="A case with its decision, features, comments and audit trail",
    responses=problem_responses(401, 403, 404),
)
async def get_case(case_id: CaseId, admin: Admin, uow: Uow) -> CaseDetail:
    return await cases.get_case(await uow.connection(), case_id)


@router.post(
    "/v1/admin/fraud/cases/{case_id}/assign",
    response_model=CaseDetail,
    summary="Assign a case (to yourself by default)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def assign(case_id: CaseId, body: AssignCase, admin: Admin, uow: Uow) -> CaseDetail:
    """`409 case_decided` once decided; `422 invalid_assignee` unless the assignee is an
    active administrator."""
    return await cases.assign(await uow.connection(), case_id, admin.user_id, body)


@router.post(
    "/v1/admin/fraud/cases/{case_id}/comments",
    response_model=CommentView,
    status_code=201,
    summary="Comment on a case",
    responses=problem_responses(401, 403, 404, 422),
)
async def comment(case_id: CaseId, body: NewComment, admin: Admin, uow: Uow) -> CommentView:
    return await cases.comment(await uow.connection(), case_id, admin.user_id, body)


@router.post(
    "/v1/admin/fraud/cases/{case_id}/decision",
    response_model=CaseDetail,
    summary="Decide a case: release (the payment/transfer completes) or confirm fraud",
    responses=problem_responses(401, 403, 404, 409, 422, 428),
)
async def decide(
    case_id: CaseId,
    body: CaseDecisionRequest,
    admin: Admin,
    # It moves money (completes, captures, voids, returns): a retry must replay, not decide
    # again. After `admin`, so a caller who is not one hears 401/403 first. The edge's
    # idempotency holds the request's connection while `decide` uses two more (the claim's,
    # and the payments' transaction with a card void at the network): acceptable for an
    # administrator's rare request, unlike the payments' hot path (`_OWN_IDEMPOTENCY`).
    _idempotency_key: Annotated[str, IdempotencyRequired],
    uow: Uow,
    rt: Runtime,
) -> CaseDetail:
    """`release`: the held payment is authorized / the transfer completes; `confirm_fraud`: the
    payment is voided / the transfer returns to its sender, and the decision is labelled
    `fraud` for training (`release` labels it `legit`). `409 case_decided` once decided (or
    while another outcome is being applied), `409 case_expired` when the review hold expired.
    `"unlock_account": true` (with `release` only) also unlocks the user's account. Requires an
    `Idempotency-Key` (428 `idempotency_key_required` without)."""
    return await cases.decide(uow, rt, case_id, admin.user_id, body)
