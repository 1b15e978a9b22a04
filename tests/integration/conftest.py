"""Fixtures of the integration tests that are not the whole suite's: the vault process and the
`vault` fixture that runs a test on each `VaultClient` (tests/integration/vault_support.py), and
the check that every event the tests wrote matches its schema in docs/events/."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from tests.integration.vault_support import vault, vault_process

__all__ = ["outbox_events_match_their_schemas", "vault", "vault_process"]


async def _outbox_envelopes(database_url: str) -> list[dict[str, Any]]:
    from billfold.platform.bus.postgres import envelope
    from billfold.platform.db import create_engine

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT id, type, source, subject, time, data FROM platform.outbox ORDER BY seq"
                )
            )
            return [envelope(row) for row in rows]
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def outbox_events_match_their_schemas(database_url: str) -> Iterator[None]:
    """After the session: every event in this worker's outbox (everything its tests recorded)
    validates against docs/events/<type>.json. With BILLFOLD_EVENT_SAMPLES=<path> the envelopes
    are also appended to <path>.<worker> for tests/support/event_schemas.py to generate from."""
    from tests.support.event_schemas import SCHEMA_DIR, problems

    yield
    envelopes = asyncio.run(_outbox_envelopes(database_url))
    samples = os.environ.get("BILLFOLD_EVENT_SAMPLES")
    if samples:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{samples}.{worker}", "a") as f:
            f.writelines(json.dumps(e, default=str) + "\n" for e in envelopes)
    if not SCHEMA_DIR.is_dir():
        return
    found: dict[str, str] = {}
    for e in envelopes:
        for problem in problems(e):
            # One line per kind of problem, not per event: the id is the example.
            found.setdefault(problem.replace(f" {e['id']}:", ":"), problem)
    if found:
        pytest.fail(
            f"{len(found)} kind(s) of event do not match docs/events/:\n"
            + "\n".join(sorted(found.values())[:60]),
            pytrace=False,
        )
