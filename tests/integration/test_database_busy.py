"""Contention is a 503 `database_busy` with Retry-After, never a 500, and it changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from billfold.app import create_app
from billfold.config import Settings
from billfold.gateway.errors import transient_problem
from billfold.platform.db import async_url
from tests.conftest import fund, idem, make_settings, sign_up
from tests.integration.transfer_support import available


@pytest.fixture
async def impatient(settings: Settings, data_dir: Path) -> AsyncIterator[Any]:
    """The API with a 300 ms lock timeout (the default is 10 s), on the test database."""
    # The same secret key: the signing keys in the shared test database are sealed under it.
    quick = make_settings(
        settings.database_url,
        settings.redis_url,
        data_dir,
        secret_key=settings.secret_key,
        db_lock_timeout_ms=300,
    )
    application = create_app(quick)
    async with LifespanManager(application):
        yield application


async def test_a_transfer_that_waits_too_long_for_a_lock_is_503_and_can_be_retried(
    impatient: Any,
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        alice = await sign_up(client, name="Alice Waits")
        bob = await sign_up(client, name="Bob Waits")
        await fund(impatient, alice.user["id"], 1_000)
        body = {"recipient": {"user_id": bob.user["id"]}, "amount": 250, "currency": "USD"}
        headers = idem(**alice.headers)

        engine = impatient.state.resources.engine
        async with engine.connect() as blocker:
            # Someone else holds Alice's wallet row (a long posting, a support tool...).
            await blocker.execute(
                text(
                    "SELECT 1 FROM ledger.accounts WHERE owner_id = :u AND kind = 'wallet' "
                    "FOR UPDATE"
                ),
                {"u": alice.user["id"]},
            )
            r = await client.post("/v1/transfers", json=body, headers=headers)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers["retry-after"] == "1"
            problem = r.json()
            assert (problem["code"], problem["reason"]) == ("database_busy", "lock_not_available")
            assert "Traceback" not in r.text and "SELECT" not in r.text
            await blocker.rollback()

        assert await available(impatient, alice.user["id"]) == 1_000  # nothing changed
        retried = await client.post("/v1/transfers", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        assert await available(impatient, alice.user["id"]) == 750


async def test_no_connection_slot_left_at_the_server_is_database_busy(settings: Settings) -> None:
    """PostgreSQL refusing a connection (no slot left) is a 503 to retry, not a 500."""
    role = "bf_no_slots"
    admin = create_async_engine(async_url(settings.database_url))
    try:
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
            await conn.execute(text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        url = make_url(async_url(settings.database_url)).set(username=role, password=None)
        refused = create_async_engine(url)
        try:
            with pytest.raises(DBAPIError) as caught:
                async with refused.connect():
                    pass
        finally:
            await refused.dispose()
        problem = transient_problem(caught.value)
        assert problem is not None
        assert (problem.status, problem.code) == (503, "database_busy")
        assert problem.extra == {"reason": "too_many_connections"}
        assert problem.headers == {"Retry-After": "1"}
    finally:
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        await admin.dispose()
