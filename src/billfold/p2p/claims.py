"""Unclaimed transfers: claimed by the owner of the verified contact, or returned on expiry."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.platform.bus.consumers import Consumer


async def expire_claims(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Return unclaimed transfers past their deadline to their senders (worker job)."""
    raise NotImplementedError


def consumers() -> list[Consumer]:
    """The event consumers that claim transfers for newly verified contacts."""
    raise NotImplementedError
