"""HTTP routes of the User Service."""

from fastapi import APIRouter

from billfold.users.api import accounts, admin, auth, devices, kyc, mfa, passkeys

router = APIRouter()
router.include_router(accounts.router)
router.include_router(auth.router)
router.include_router(devices.router)
router.include_router(mfa.router)
router.include_router(passkeys.router)
router.include_router(kyc.router)
router.include_router(admin.router)
