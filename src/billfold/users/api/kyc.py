"""KYC routes: submit and follow your own verification; administrators decide reviews."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status

from billfold.gateway import Principal, Uow, require_admin, require_scopes
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params
from billfold.users import kyc
from billfold.users.api.deps import Runtime
from billfold.users.models import (
    AdminKycSubmission,
    KycDecisionRequest,
    KycState,
    KycSubmission,
    SubmitKyc,
)

router = APIRouter(tags=["kyc"])
Me = Annotated[Principal, Depends(require_scopes("profile"))]
Admin = Annotated[Principal, Depends(require_admin)]
Pages = Annotated[PageParams, Depends(page_params)]
SubmissionId = Annotated[str, Path(max_length=64)]


def kyc_provider(request: Request) -> kyc.KycProvider:
    """`app.state.kyc_provider` when a deployment plugs one in, else the built-in provider."""
    provider = getattr(request.app.state, "kyc_provider", None)
    if provider is None:
        provider = kyc.default_provider(request.app.state.users.settings)
    return provider  # type: ignore[no-any-return]


Provider = Annotated[kyc.KycProvider, Depends(kyc_provider)]


@router.post(
    "/v1/me/kyc",
    status_code=status.HTTP_201_CREATED,
    response_model=KycSubmission,
    summary="Submit your identity for verification",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def submit_kyc(
    body: SubmitKyc, me: Me, uow: Uow, rt: Runtime, provider: Provider
) -> KycSubmission:
    """Checked at once: the answer is `verified`, `rejected` or `review` (a person decides).
    `409 already_verified` once verified; `409 kyc_pending` / `kyc_in_review` while a
    submission is open. After `rejected` you may submit again (at most 5 times a day)."""
    return await kyc.submit(uow, rt, provider, me.user_id, body)


@router.get(
    "/v1/me/kyc",
    response_model=KycState,
    summary="Your KYC status, tier and latest submission",
    responses=problem_responses(401, 403),
)
async def get_kyc(me: Me, uow: Uow) -> KycState:
    return await kyc.get_state(await uow.connection(), me.user_id)


@router.get(
    "/v1/me/kyc/submissions",
    response_model=Page[KycSubmission],
    summary="Your KYC submissions, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_my_submissions(me: Me, uow: Uow, page: Pages) -> Page[KycSubmission]:
    items = await kyc.list_submissions(
        await uow.connection(), me.user_id, page.limit + 1, page.after
    )
    return make_page(items, page.limit, "id")


@router.get(
    "/v1/me/kyc/submissions/{submission_id}",
    response_model=KycSubmission,
    summary="One of your KYC submissions",
    responses=problem_responses(401, 403, 404),
)
async def get_my_submission(submission_id: SubmissionId, me: Me, uow: Uow) -> KycSubmission:
    return await kyc.get_submission(await uow.connection(), me.user_id, submission_id)


@router.get(
    "/v1/admin/kyc/reviews",
    response_model=Page[AdminKycSubmission],
    summary="Submissions waiting for a reviewer, oldest first",
    responses=problem_responses(401, 403, 422),
)
async def review_queue(admin: Admin, uow: Uow, page: Pages) -> Page[AdminKycSubmission]:
    items = await kyc.review_queue(await uow.connection(), page.limit + 1, page.after)
    return make_page(items, page.limit, "id")


@router.get(
    "/v1/admin/kyc/submissions/{submission_id}",
    response_model=AdminKycSubmission,
    summary="A KYC submission with its checks and history",
    responses=problem_responses(401, 403, 404),
)
async def get_submission(submission_id: SubmissionId, admin: Admin, uow: Uow) -> AdminKycSubmission:
    return await kyc.get_submission_for_admin(await uow.connection(), submission_id)


@router.post(
    "/v1/admin/kyc/submissions/{submission_id}/decision",
    response_model=AdminKycSubmission,
    summary="Decide a submission in review",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def decide(
    submission_id: SubmissionId, body: KycDecisionRequest, admin: Admin, uow: Uow
) -> AdminKycSubmission:
    """Only a submission in `review` (`409 not_in_review` otherwise); never your own
    (`403 self_review_forbidden`). The reason is kept in the audit trail."""
    return await kyc.decide(uow, admin.user_id, submission_id, body.decision, body.reason)
