"""Claim route: take the money that waits for your verified e-mail address or phone number."""

from __future__ import annotations

from fastapi import APIRouter

from billfold.gateway import Uow
from billfold.p2p import claims, transfers
from billfold.p2p.api.deps import Me, Runtime
from billfold.p2p.models import ClaimedTransfers
from billfold.platform.errors import problem_responses

router = APIRouter(tags=["transfers"])


@router.post(
    "/v1/transfers/claims",
    response_model=ClaimedTransfers,
    summary="Claim transfers sent to your verified e-mail or phone",
    responses=problem_responses(401, 403),
)
async def claim_transfers(me: Me, uow: Uow, rt: Runtime) -> ClaimedTransfers:
    """Money sent to an e-mail address or phone number is yours once you have verified it;
    this happens by itself when you verify, and this call does it now. The answer lists the
    transfers that moved to your wallet (`completed`), or none. `Idempotency-Key` accepted."""
    rows = await claims.claim_for_user(await uow.connection(), rt, me.user_id)
    return ClaimedTransfers(data=[transfers.view(r, me.user_id) for r in rows])
