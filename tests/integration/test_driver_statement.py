"""`DriverStatement`: a hot-path statement sent on asyncpg's connection must stay inside the
caller's SQLAlchemy transaction (committed and rolled back with it, whether or not BEGIN has been
sent yet) and fail as SQLAlchemy's `DBAPIError`, its SQLSTATE intact, no value echoed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.gateway.errors import transient_problem
from billfold.platform.db import create_engine
from billfold.platform.driver import DriverStatement

SECRET = "4111111111111111"


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(database_url, pool_size=2)
    yield e
    await e.dispose()


@pytest.fixture
async def table(engine: AsyncEngine) -> AsyncIterator[str]:
    name = f"driver_statement_{uuid.uuid4().hex[:10]}"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {name} (id text PRIMARY KEY, doc jsonb)"))
    yield name
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE {name}"))


def insert(table: str) -> DriverStatement:
    return DriverStatement(
        text(f"INSERT INTO {table} (id, doc) VALUES (:id, CAST(:doc AS jsonb)) RETURNING id")
    )


async def ids(engine: AsyncEngine, table: str) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(f"SELECT id FROM {table} ORDER BY id"))).scalars())


def test_it_compiles_named_parameters_to_positional_ones() -> None:
    stmt = insert("t")
    assert stmt.names == ("id", "doc")
    assert "$1" in stmt.sql and "$2" in stmt.sql and ":id" not in stmt.sql


@pytest.mark.parametrize("begun", [True, False], ids=["after-a-statement", "first-statement"])
async def test_it_rolls_back_and_commits_with_the_callers_transaction(
    engine: AsyncEngine, table: str, begun: bool
) -> None:
    stmt = insert(table)
    async with engine.connect() as conn:
        await conn.begin()
        if begun:  # BEGIN sent: the statement goes on the driver's connection
            await conn.execute(text("SELECT 1"))
        await stmt.execute(conn, {"id": "a", "doc": '{"n": 1}'})
        seen = (await conn.execute(text(f"SELECT doc FROM {table}"))).scalar_one()
        assert seen == {"n": 1}
        await conn.rollback()
    assert await ids(engine, table) == []

    async with engine.connect() as conn:
        await conn.begin()
        if begun:
            await conn.execute(text("SELECT 1"))
        await stmt.execute(conn, {"id": "b", "doc": "[]"})
        await stmt.execute(conn, {"id": "c", "doc": "null"})
        await conn.commit()
    assert await ids(engine, table) == ["b", "c"]


async def test_a_database_error_is_a_dbapi_error_with_its_sqlstate_and_no_values(
    engine: AsyncEngine, table: str
) -> None:
    stmt = insert(table)
    async with engine.connect() as conn:
        await conn.begin()
        await conn.execute(text("SELECT 1"))
        doc = f'{{"pan": "{SECRET}"}}'  # a bound value, not in PostgreSQL's own DETAIL
        await stmt.execute(conn, {"id": "dup", "doc": doc})
        with pytest.raises(DBAPIError) as raised:
            await stmt.execute(conn, {"id": "dup", "doc": doc})
        await conn.rollback()
    assert getattr(raised.value.orig, "sqlstate", None) == "23505"
    assert SECRET not in str(raised.value)
    assert transient_problem(raised.value) is None  # a bug's error stays a bug's (500)


async def test_a_lock_timeout_is_the_gateways_busy_database(
    engine: AsyncEngine, table: str
) -> None:
    stmt = insert(table)
    async with engine.connect() as holder:
        await holder.begin()
        await holder.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        async with engine.connect() as conn:
            await conn.begin()
            await conn.execute(text("SET LOCAL lock_timeout = '100ms'"))
            with pytest.raises(DBAPIError) as raised:
                await stmt.execute(conn, {"id": "x", "doc": "{}"})
            await conn.rollback()
        await holder.rollback()
    problem = transient_problem(raised.value)
    assert problem is not None and problem.status == 503 and problem.code == "database_busy"


async def test_fetchrow_answers_the_row_in_the_transaction_or_on_an_autocommit_connection(
    engine: AsyncEngine, table: str
) -> None:
    stmt = insert(table)
    read = DriverStatement(text(f"SELECT id, doc FROM {table} WHERE id = :id"))
    async with engine.connect() as conn:
        await conn.begin()
        await stmt.execute(conn, {"id": "a", "doc": '{"n": 2}'})  # through SQLAlchemy: BEGIN
        row = await read.fetchrow(conn, {"id": "a"})
        assert row is not None and dict(row) == {"id": "a", "doc": {"n": 2}}
        assert await read.fetchrow(conn, {"id": "nobody"}) is None
        await conn.rollback()
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with autocommit.connect() as conn:
        # Each statement commits on its own: nothing to roll back afterwards.
        await stmt.execute(conn, {"id": "b", "doc": "[]"})
        row = await read.fetchrow(conn, {"id": "b"})
        assert row is not None and row["doc"] == []
    assert await ids(engine, table) == ["b"]


async def test_a_connection_lost_under_a_statement_never_goes_back_to_the_pool(
    database_url: str, engine: AsyncEngine, table: str
) -> None:
    """SQLAlchemy does not see a failure on the driver's connection: a dead autocommit
    connection (no rollback on check-in) would otherwise fail its pool's next user too."""
    one = create_engine(database_url, pool_size=1, max_overflow=0)
    autocommit = one.execution_options(isolation_level="AUTOCOMMIT")
    stmt = insert(table)
    try:
        async with autocommit.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            async with engine.connect() as other:
                await other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            with pytest.raises(DBAPIError) as raised:
                await stmt.execute(conn, {"id": "lost", "doc": "{}"})
            assert raised.value.connection_invalidated
        async with autocommit.connect() as conn:  # the pool's one slot: a new connection
            await stmt.execute(conn, {"id": "after", "doc": "{}"})
    finally:
        await one.dispose()
    assert await ids(engine, table) == ["after"]
