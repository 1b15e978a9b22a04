"""Demo users for `billfold up` and `billfold seed`: idempotent, verified, with known passwords."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.users.models import RegisterUser
from billfold.users.runtime import UsersRuntime
from billfold.users.service import register_user
from billfold.users.store import accounts as store

DEMO_PASSWORD = "billfold-demo-pass"


class SeedRefused(RuntimeError):
    """The demo users (an admin among them, with a published password) are not for production."""


def check_seed_allowed(environment: str, *, allow_production: bool = False) -> None:
    if environment == "production" and not allow_production:
        raise SeedRefused(
            "refusing to create the demo users in production: they include an administrator "
            f"whose password ({DEMO_PASSWORD!r}) is published; pass --allow-production if you "
            "really mean it"
        )


@dataclass(frozen=True)
class DemoUser:
    email: str
    phone: str
    name: str
    handle: str
    role: str = "user"


DEMO_USERS = (
    DemoUser("alice@demo.billfold.dev", "+14155550132", "Alice Demo", "alice"),
    DemoUser("bob@demo.billfold.dev", "+14155550133", "Bob Demo", "bob"),
    DemoUser("admin@demo.billfold.dev", "+14155550134", "Ada Admin", "admin_ada", role="admin"),
)


async def seed_demo_users(
    engine: AsyncEngine, rt: UsersRuntime, *, allow_production: bool = False
) -> list[tuple[DemoUser, str, bool]]:
    """Create the demo users that do not exist yet; returns (user, user id, created) triples.

    Refused (`SeedRefused`) in production unless `allow_production`."""
    check_seed_allowed(rt.settings.environment, allow_production=allow_production)
    out: list[tuple[DemoUser, str, bool]] = []
    for demo in DEMO_USERS:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            existing = await store.find_user_by_email(conn, demo.email)
            if existing is not None:
                out.append((demo, existing.id, False))
                continue
            user = await register_user(
                uow,
                rt,
                RegisterUser(
                    email=demo.email,
                    phone=demo.phone,
                    password=DEMO_PASSWORD,
                    name=demo.name,
                    date_of_birth=date(1990, 1, 1),
                    country="US",
                    handle=demo.handle,
                ),
                role=demo.role,
            )
            now = utcnow()
            await store.update_user(
                conn,
                user.id,
                {
                    "email_verified_at": now,
                    "phone_verified_at": now,
                    "kyc_status": "verified",
                    "kyc_tier": 2,
                },
                now,
            )
            out.append((demo, user.id, True))
    return out
