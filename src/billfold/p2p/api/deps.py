"""Dependencies shared by the P2P routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from billfold.gateway import Principal, require_scopes
from billfold.p2p.runtime import P2PRuntime


# `async def` without I/O on purpose: a plain `def` dependency costs a thread-pool hop.
async def p2p_runtime(request: Request) -> P2PRuntime:
    return request.app.state.p2p  # type: ignore[no-any-return]


Runtime = Annotated[P2PRuntime, Depends(p2p_runtime)]
# Moving money between people needs the `wallet` scope (watches hold only `pay`).
Me = Annotated[Principal, Depends(require_scopes("wallet"))]
# A step-up token for `transfer`, when a risk check asked for one (403 `step_up_required`).
StepUpHeader = Annotated[str | None, Header(alias="X-Step-Up-Token", max_length=4096)]
