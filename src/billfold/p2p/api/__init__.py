"""HTTP routes of the P2P Transfer Service."""

from fastapi import APIRouter

from billfold.p2p.api import transfers

router = APIRouter()
router.include_router(transfers.router)
