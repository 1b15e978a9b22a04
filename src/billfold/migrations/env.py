from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from billfold.platform.db import async_url

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        version_table="alembic_version",
        version_table_schema="platform",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = create_async_engine(async_url(config.attributes["database_url"]))
    async with engine.connect() as conn:
        # Serialise concurrent migrators (several API replicas starting at once).
        await conn.execute(text("SELECT pg_advisory_lock(727274)"))
        await conn.execute(text("CREATE SCHEMA IF NOT EXISTS platform"))
        await conn.commit()
        await conn.run_sync(_run)
        await conn.commit()
        await conn.execute(text("SELECT pg_advisory_unlock(727274)"))
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `billfold migrate`")
asyncio.run(_main())
