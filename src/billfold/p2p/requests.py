"""Money requests: ask someone for money; they accept (a transfer), decline, or it expires."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine


async def expire_requests(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Expire pending requests past their deadline (worker job)."""
    raise NotImplementedError
