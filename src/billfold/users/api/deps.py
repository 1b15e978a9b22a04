"""Dependencies shared by the User Service routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from billfold.gateway import client_ip, user_agent
from billfold.users.auth import ClientContext
from billfold.users.runtime import UsersRuntime


# `async def` without I/O on purpose: a plain `def` dependency costs a thread-pool hop.
async def users_runtime(request: Request) -> UsersRuntime:
    return request.app.state.users  # type: ignore[no-any-return]


Runtime = Annotated[UsersRuntime, Depends(users_runtime)]


async def client_context(request: Request) -> ClientContext:
    return ClientContext(ip=client_ip(request), user_agent=user_agent(request))


# A step-up token for `sensitive_change` (from /v1/auth/step-up/challenges/{id}/verify).
StepUpHeader = Annotated[str | None, Header(alias="X-Step-Up-Token", max_length=4096)]
