"""Contention is a 503 `database_busy` with Retry-After, never a 500, and it changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from billfold.app import create_app
from billfold.config import Settings
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
