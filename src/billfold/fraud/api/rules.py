"""Admin routes for fraud rules and block/allow lists (`/v1/admin/fraud/rules`, `.../lists`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, status

from billfold.fraud import lists, rules
from billfold.gateway import Principal, Uow, require_admin
from billfold.platform.errors import problem_responses
from billfold.platform.pagination import Page, PageParams, make_page, page_params

rules_router = APIRouter(tags=["fraud rules"])
Admin = Annotated[Principal, Depends(require_admin)]
Pages = Annotated[PageParams, Depends(page_params)]
RuleIdPath = Annotated[str, Path(max_length=64, pattern=rules.PRINTABLE)]
EntryIdPath = Annotated[str, Path(max_length=64, pattern=rules.PRINTABLE)]
_ADMIN = (401, 403)


# Fixed paths before `/rules/{rule_id}`.
@rules_router.get(
    "/v1/admin/fraud/rules/features",
    response_model=list[rules.FeatureInfo],
    summary="The features a rule expression may use",
    responses=problem_responses(*_ADMIN),
)
async def features(admin: Admin) -> list[rules.FeatureInfo]:
    return rules.feature_catalogue()


@rules_router.post(
    "/v1/admin/fraud/rules/test",
    response_model=rules.TrialResult,
    summary="Evaluate an expression on given feature values",
    responses=problem_responses(*_ADMIN, 422),
)
async def try_expression(body: rules.ExpressionTrial, admin: Admin) -> rules.TrialResult:
    """Features left out are neutral (0, false, ''). A run-time error (say, a division by zero)
    is a non-hit, as on the live path, with the error in `error`; an expression that does not
    compile is `422 invalid_rule_expression`."""
    return rules.try_expression(body)


@rules_router.post(
    "/v1/admin/fraud/rules/backtest",
    response_model=rules.BacktestResult,
    summary="Replay a rule or an expression over past decisions",
    responses=problem_responses(*_ADMIN, 404, 422),
)
async def backtest(body: rules.BacktestRequest, admin: Admin, uow: Uow) -> rules.BacktestResult:
    """Runs on the feature snapshots stored with each decision: hits by the action taken then,
    and precision/recall against the decisions analysts labelled `fraud` or `legit`."""
    return await rules.backtest(await uow.connection(), body)


@rules_router.post(
    "/v1/admin/fraud/rules",
    status_code=status.HTTP_201_CREATED,
    response_model=rules.RuleView,
    summary="Create a rule (in shadow unless told otherwise)",
    responses=problem_responses(*_ADMIN, 409, 422),
)
async def create_rule(body: rules.CreateRule, admin: Admin, uow: Uow) -> rules.RuleView:
    """`422 invalid_rule_expression` for an expression that does not compile, names an unknown
    feature or is not true/false; `409 rule_exists` for a taken id."""
    return await rules.create_rule(uow, admin.user_id, body)


@rules_router.get(
    "/v1/admin/fraud/rules",
    response_model=Page[rules.RuleView],
    summary="Rules with their versions, by id",
    responses=problem_responses(*_ADMIN, 422),
)
async def list_rules(
    admin: Admin,
    uow: Uow,
    page: Pages,
    state: Annotated[rules.RuleState | None, Query()] = None,
) -> Page[rules.RuleView]:
    items = await rules.list_rules(
        await uow.connection(), state=state, limit=page.limit + 1, after=page.after
    )
    return make_page(items, page.limit, "id")


@rules_router.get(
    "/v1/admin/fraud/rules/{rule_id}",
    response_model=rules.RuleView,
    summary="A rule with every version",
    responses=problem_responses(*_ADMIN, 404),
)
async def get_rule(rule_id: RuleIdPath, admin: Admin, uow: Uow) -> rules.RuleView:
    return await rules.get_rule(await uow.connection(), rule_id)


@rules_router.patch(
    "/v1/admin/fraud/rules/{rule_id}",
    response_model=rules.RuleView,
    summary="Edit a rule: a new version (in shadow unless told otherwise)",
    responses=problem_responses(*_ADMIN, 404, 422),
)
async def update_rule(
    rule_id: RuleIdPath, body: rules.UpdateRule, admin: Admin, uow: Uow
) -> rules.RuleView:
    """The fields given replace the latest version's. With `state: shadow` (the default) the new
    version is evaluated beside the one in force until promoted."""
    return await rules.update_rule(uow, admin.user_id, rule_id, body)


@rules_router.post(
    "/v1/admin/fraud/rules/{rule_id}/shadow",
    response_model=rules.RuleView,
    summary="Evaluate a version without enforcing it",
    responses=problem_responses(*_ADMIN, 404, 409, 422),
)
async def shadow(
    rule_id: RuleIdPath, admin: Admin, uow: Uow, body: rules.VersionChoice | None = None
) -> rules.RuleView:
    """`version` defaults to the latest. Putting the version in force in shadow stops enforcing
    the rule."""
    return await rules.change_state(
        uow, admin.user_id, rule_id, "shadow", body or rules.VersionChoice()
    )


@rules_router.post(
    "/v1/admin/fraud/rules/{rule_id}/promote",
    response_model=rules.RuleView,
    summary="Enforce a version (default: the one in shadow)",
    responses=problem_responses(*_ADMIN, 404, 409, 422),
)
async def promote(
    rule_id: RuleIdPath, admin: Admin, uow: Uow, body: rules.VersionChoice | None = None
) -> rules.RuleView:
    """The version in force before is disabled. `409 no_such_version` when nothing is in
    shadow and no version is named."""
    return await rules.change_state(
        uow, admin.user_id, rule_id, "promote", body or rules.VersionChoice()
    )


@rules_router.post(
    "/v1/admin/fraud/rules/{rule_id}/rollback",
    response_model=rules.RuleView,
    summary="Enforce an earlier version again (default: the one in force before)",
    responses=problem_responses(*_ADMIN, 404, 409, 422),
)
async def rollback(
    rule_id: RuleIdPath, admin: Admin, uow: Uow, body: rules.VersionChoice | None = None
) -> rules.RuleView:
    return await rules.change_state(
        uow, admin.user_id, rule_id, "rollback", body or rules.VersionChoice()
    )


@rules_router.post(
    "/v1/admin/fraud/rules/{rule_id}/disable",
    response_model=rules.RuleView,
    summary="Stop evaluating every version of a rule",
    responses=problem_responses(*_ADMIN, 404, 422),
)
async def disable(
    rule_id: RuleIdPath, admin: Admin, uow: Uow, body: rules.VersionChoice | None = None
) -> rules.RuleView:
    return await rules.change_state(
        uow, admin.user_id, rule_id, "disable", body or rules.VersionChoice()
    )


# --- lists ----------------------------------------------------------------------------------------


@rules_router.post(
    "/v1/admin/fraud/lists",
    status_code=status.HTTP_201_CREATED,
    response_model=lists.ListEntryView,
    summary="Put a device, IP, card, recipient, merchant or country on a block or allow list",
    responses=problem_responses(*_ADMIN, 409, 422),
)
async def add_entry(body: lists.AddEntry, admin: Admin, uow: Uow) -> lists.ListEntryView:
    """`409 list_entry_exists` (with `entry_id`) when the value is on that list already."""
    return await lists.add_entry(uow, admin.user_id, body)


@rules_router.get(
    "/v1/admin/fraud/lists",
    response_model=Page[lists.ListEntryView],
    summary="List entries, newest first",
    responses=problem_responses(*_ADMIN, 422),
)
async def list_entries(
    admin: Admin,
    uow: Uow,
    page: Pages,
    list: Annotated[lists.ListName | None, Query()] = None,
    kind: Annotated[lists.ListKind | None, Query()] = None,
    value: Annotated[str | None, Query(max_length=200, pattern=rules.PRINTABLE)] = None,
    include_removed: bool = False,
) -> Page[lists.ListEntryView]:
    items = await lists.list_entries(
        await uow.connection(),
        list_name=list,
        kind=kind,
        value=value,
        include_removed=include_removed,
        limit=page.limit + 1,
        after=page.after,
    )
    return make_page(items, page.limit, "id")


@rules_router.get(
    "/v1/admin/fraud/lists/{entry_id}",
    response_model=lists.ListEntryView,
    summary="One list entry",
    responses=problem_responses(*_ADMIN, 404),
)
async def get_entry(entry_id: EntryIdPath, admin: Admin, uow: Uow) -> lists.ListEntryView:
    return await lists.get_entry(await uow.connection(), entry_id)


@rules_router.delete(
    "/v1/admin/fraud/lists/{entry_id}",
    response_model=lists.ListEntryView,
    summary="Take an entry off its list (kept, marked removed)",
    responses=problem_responses(*_ADMIN, 404),
)
async def remove_entry(entry_id: EntryIdPath, admin: Admin, uow: Uow) -> lists.ListEntryView:
    return await lists.remove_entry(uow, admin.user_id, entry_id, lists.RemoveEntry())
