"""HTTP routes of the P2P Transfer Service."""

from fastapi import APIRouter

from billfold.p2p.api import claims, requests, transfers

router = APIRouter()
# Claims first: `/v1/transfers/claims` is a fixed path beside `/v1/transfers/{transfer_id}…`.
router.include_router(claims.router)
router.include_router(transfers.router)
router.include_router(requests.router)
