"""Hot-path statements sent on asyncpg's own connection, inside SQLAlchemy's transaction.

SQLAlchemy's text execution costs ~0.3-0.5 ms of CPU per statement on this machine class
(greenlet hop, cursor, parameter processing, result wrapping). A statement on a check's or a
payment's critical path that returns nothing can skip those layers: the same connection, the
same transaction, asyncpg's own prepared-statement cache. Errors come back as SQLAlchemy's
`DBAPIError` with the driver's error as `orig` (its `sqlstate` intact), as the rest of the code
and the gateway's `transient_problem` expect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import asyncpg
from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

_DIALECT = asyncpg_dialect.dialect()


class DriverStatement:
    """A `text()` statement compiled once to asyncpg's positional form (`$1`, `$2`, …)."""

    __slots__ = ("clause", "names", "sql")

    def __init__(self, clause: TextClause) -> None:
        compiled = clause.compile(dialect=_DIALECT)
        self.clause = clause
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())

    async def execute(self, conn: AsyncConnection, params: dict[str, Any]) -> None:
        """Run the statement with `params` in `conn`'s transaction, its result discarded.

        On the driver's connection when the transaction has begun there (SQLAlchemy sends BEGIN
        with a transaction's first statement) or `conn` is in autocommit; through SQLAlchemy
        otherwise, which begins the transaction."""
        driver = await _driver(conn)
        if driver is None:
            await conn.execute(self.clause, params)
            return
        await self._on_driver(conn, driver, driver.execute, params)

    async def fetchrow(
        self, conn: AsyncConnection, params: dict[str, Any]
    ) -> Mapping[str, Any] | None:
        """The statement's first row (a mapping of column to value, as the driver decodes it:
        jsonb through the engine's codec), or None; on the connection `execute` would use."""
        driver = await _driver(conn)
        if driver is None:
            row = (await conn.execute(self.clause, params)).first()
            return cast(Mapping[str, Any], row._mapping) if row is not None else None
        result: Mapping[str, Any] | None = await self._on_driver(
            conn, driver, driver.fetchrow, params
        )
        return result

    async def _on_driver(
        self,
        conn: AsyncConnection,
        driver: Any,
        call: Callable[..., Awaitable[Any]],
        params: dict[str, Any],
    ) -> Any:
        args = [params[n] for n in self.names]
        try:
            return await call(self.sql, *args)
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
        ) as exc:
            # InternalClientError: the protocol's state is unknown (seen right after the server
            # ended the session): the connection cannot be trusted with another statement.
            lost = isinstance(exc, OSError | asyncpg.InternalClientError) or driver.is_closed()
            if lost:
                # SQLAlchemy did not see this failure: without this the pool would hand the
                # dead connection to its next user (autocommit connections are not reset).
                await conn.invalidate(exc)
            # Parameters stay out of the error (they may hold personal data), as the engine's
            # `hide_parameters` keeps them out of SQLAlchemy's own.
            raise DBAPIError(
                self.sql, None, exc, hide_parameters=True, connection_invalidated=lost
            ) from exc


async def _driver(conn: AsyncConnection) -> Any:
    """asyncpg's connection under `conn` if a statement sent on it directly stays where
    SQLAlchemy would run it: inside the begun transaction, or on an autocommit connection."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    if driver is None:
        return None
    if driver.is_in_transaction() or getattr(raw.dbapi_connection, "autocommit", False):
        return driver
    return None
