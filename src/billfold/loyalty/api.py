"""Loyalty routes: the points account, its activity, and redeeming points into the wallet."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status

from billfold.gateway import (
    Principal,
    Uow,
    require_admin,
    require_idempotency_key,
    require_scopes,
)
from billfold.loyalty import service
from billfold.loyalty.models import (
    ActivityLine,
    EarnRuleChange,
    EarnRuleView,
    LoyaltyAccount,
    LoyaltyRuntime,
    NewEarnRule,
    NewRedemption,
    Redemption,
)
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import (
    Page,
    PageParams,
    bigint_cursor,
    make_page,
    page_params,
)

router = APIRouter(tags=["loyalty"])

# Points turn into wallet money: the same scope as the wallet.
Me = Annotated[Principal, Depends(require_scopes("wallet"))]
IdempotencyKey = Annotated[str, Depends(require_idempotency_key)]


def _runtime(request: Request) -> LoyaltyRuntime:
    return request.app.state.loyalty  # type: ignore[no-any-return]


Runtime = Annotated[LoyaltyRuntime, Depends(_runtime)]


@router.get(
    "/v1/loyalty",
    response_model=LoyaltyAccount,
    summary="Your points, tier and what expires soon",
    responses=problem_responses(401, 403),
)
async def get_account(me: Me, uow: Uow, rt: Runtime) -> LoyaltyAccount:
    """The points balance (PTS), your tier and its multiplier, the progress to the next tier
    (net spend of the last 365 days in the currency you are closest in) and the points that
    expire within the configured window."""
    return await service.account(await uow.connection(), rt, me.user_id)


@router.get(
    "/v1/loyalty/activity",
    response_model=Page[ActivityLine],
    summary="Points earned, reversed, redeemed and expired, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_activity(
    me: Me, uow: Uow, page: Annotated[PageParams, Depends(page_params)]
) -> Page[ActivityLine]:
    lines = await service.activity(
        await uow.connection(), me.user_id, after=bigint_cursor(page.after), limit=page.limit + 1
    )
    return make_page(lines, page.limit, "id")


@router.post(
    "/v1/loyalty/redemptions",
    status_code=status.HTTP_201_CREATED,
    response_model=Redemption,
    summary="Redeem points into your wallet",
    responses=problem_responses(401, 403, 409, 422, 428),
)
async def redeem(
    body: NewRedemption, me: Me, uow: Uow, rt: Runtime, idempotency_key: IdempotencyKey
) -> Redemption:
    """Turn `points` into `currency` in your wallet at the configured rate (by default USD only,
    1 point = 1 US cent; a minimum and a step per currency). Points, money, the redemption and its event
    commit together or not at all. Requires `Idempotency-Key`: a retry answers the first
    result. Not enough points is a 422 `insufficient_points`."""
    return await service.redeem(
        await uow.connection(), rt, me.user_id, body, idempotency_key=idempotency_key
    )


# --- earn rules (administrators) ----------------------------------------------------------------

admin_router = APIRouter(tags=["loyalty"])
Admin = Annotated[Principal, Depends(require_admin)]
RulePath = Annotated[str, Path(max_length=64)]


@admin_router.get(
    "/v1/admin/loyalty/earn-rules",
    response_model=list[EarnRuleView],
    summary="Every earn rule, active or not",
    responses=problem_responses(401, 403),
)
async def list_rules(admin: Admin, uow: Uow) -> list[EarnRuleView]:
    return [EarnRuleView.of(r) for r in await service.list_rules(await uow.connection())]


@admin_router.post(
    "/v1/admin/loyalty/earn-rules",
    status_code=status.HTTP_201_CREATED,
    response_model=EarnRuleView,
    summary="Add a base rate or a bonus rule",
    responses=problem_responses(401, 403, 409, 422),
)
async def create_rule(body: NewEarnRule, admin: Admin, uow: Uow) -> EarnRuleView:
    """A base rate (points per unit of one currency; one active per currency) or a bonus: a
    multiplier for captures matching every condition given (MCC, category, merchant id,
    channel, currency), with optional caps on its extra points per capture and per month; the
    matching rule of highest `priority` (then multiplier) applies."""
    return EarnRuleView.of(await service.create_rule(await uow.connection(), body))


@admin_router.patch(
    "/v1/admin/loyalty/earn-rules/{rule_id}",
    response_model=EarnRuleView,
    summary="Change a rule's rate, caps, priority or state",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def change_rule(
    rule_id: RulePath, body: EarnRuleChange, admin: Admin, uow: Uow
) -> EarnRuleView:
    return EarnRuleView.of(await service.change_rule(await uow.connection(), rule_id, body))
