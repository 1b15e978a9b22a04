"""Administrators lock and unlock accounts (the audit record is the account's event, which names
the administrator and the reason)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from billfold.gateway import Principal, Uow, require_admin
from billfold.platform.errors import Conflict, problem_responses
from billfold.users import locks
from billfold.users.api.deps import Runtime

router = APIRouter(tags=["users"])
Admin = Annotated[Principal, Depends(require_admin)]
UserId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_]+$")]


class AccountLockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored
    # Printable text only: it goes into an event and a support agent's screen.
    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")


class AccountLockState(BaseModel):
    user_id: str
    status: Literal["active", "locked", "closed"]
    changed: bool
    revoked_sessions: int = 0


def _state(change: locks.LockChange) -> AccountLockState:
    return AccountLockState(
        user_id=change.user_id,
        status=change.status,  # type: ignore[arg-type]
        changed=change.changed,
        revoked_sessions=len(change.revoked_sessions),
    )


@router.post(
    "/v1/admin/users/{user_id}/lock",
    response_model=AccountLockState,
    summary="Lock an account: no sign-in, every session revoked, live access tokens denied",
    responses=problem_responses(401, 403, 404, 409, 422),
)
async def lock(
    user_id: UserId, body: AccountLockRequest, admin: Admin, uow: Uow, rt: Runtime
) -> AccountLockState:
    """Idempotent: an account already locked answers `changed: false`. An administrator cannot
    lock their own account (409 `cannot_lock_self`): nobody would be left signed in to undo it."""
    if user_id == admin.user_id:
        raise Conflict("You cannot lock your own account", code="cannot_lock_self")
    change = await locks.lock_account(
        await uow.connection(), user_id, reason=body.reason, by=admin.user_id
    )

    async def deny() -> None:
        await rt.tokens.revoke_sessions(list(change.revoked_sessions))

    uow.after_commit(deny)
    return _state(change)


@router.post(
    "/v1/admin/users/{user_id}/unlock",
    response_model=AccountLockState,
    summary="Unlock a locked account (its owner signs in again)",
    responses=problem_responses(401, 403, 404, 422),
)
async def unlock(
    user_id: UserId, body: AccountLockRequest, admin: Admin, uow: Uow
) -> AccountLockState:
    """Idempotent: an account that is not locked answers `changed: false`."""
    change = await locks.unlock_account(
        await uow.connection(), user_id, reason=body.reason, by=admin.user_id
    )
    return _state(change)
