"""Database engine and the unit of work: one transaction per request or command."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncTransaction,
    create_async_engine,
)

from billfold.platform.events import outbox_written, wake_relay
from billfold.platform.observability import get_logger

log = get_logger("billfold.platform.db")


def async_url(url: str) -> str:
    """Accept `postgresql://` URLs (also pgserver's `?host=` socket form) and use asyncpg."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, lock_timeout_ms: int = 10_000
) -> AsyncEngine:
    """An asyncpg engine. Size the pool to the requests one process has in flight: a checkout
    beyond `pool_size` opens a connection that is closed again on check-in."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=False,
        # Errors are logged with their statement; bound values (password hashes, personal
        # data, codes in outbox events) must not be in those log lines.
        hide_parameters=True,
        json_serializer=lambda v: json.dumps(v, separators=(",", ":"), default=str),
        connect_args={
            "server_settings": {
                "application_name": "billfold",
                # A lock wait or a forgotten transaction fails loudly instead of hanging.
                "lock_timeout": f"{lock_timeout_ms}ms",
                "idle_in_transaction_session_timeout": "60s",
            }
        },
    )


class UnitOfWork:
    """Owns one connection and one transaction; begun lazily, committed or rolled back once.

    Services receive the connection; only the owner (request middleware or command)
    decides commit or rollback, so everything a request writes commits together.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._tx: AsyncTransaction | None = None
        self._after_commit: list[Any] = []

    @property
    def engine(self) -> AsyncEngine:
        """For the rare write that must persist even if this request fails (attempt counters)."""
        return self._engine

    @property
    def active(self) -> bool:
        return self._tx is not None

    async def connection(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._engine.connect()
            self._tx = await self._conn.begin()
        return self._conn

    def after_commit(self, callback: Any) -> None:
        """Run an async callable once the transaction has committed (e.g. wake the relay).

        Best effort: the commit has happened, so a failing callback is logged, never raised
        (the caller must not report a committed change as failed)."""
        self._after_commit.append(callback)

    async def commit(self) -> None:
        events = self._conn is not None and outbox_written(self._conn)
        if self._tx is not None:
            await self._tx.commit()
        await self._close()
        if events:
            wake_relay(self._engine)
        callbacks, self._after_commit = self._after_commit, []
        for cb in callbacks:
            try:
                await cb()
            except Exception:
                log.exception("after-commit callback failed", callback=getattr(cb, "__name__", ""))

    async def rollback(self) -> None:
        if self._conn is not None:
            outbox_written(self._conn)  # nothing to announce
        if self._tx is not None and self._tx.is_active:
            await self._tx.rollback()
        self._after_commit = []
        await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None
        self._tx = None


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine) -> AsyncIterator[UnitOfWork]:
    """For commands and jobs: commit on success, roll back on any exception."""
    uow = UnitOfWork(engine)
    try:
        yield uow
    except BaseException:
        await uow.rollback()
        raise
    else:
        await uow.commit()
