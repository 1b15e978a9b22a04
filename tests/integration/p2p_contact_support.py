"""Helpers for the tests of claims and money requests: contacts, verification, consumers run on
the real outbox rows through the worker's own sink (`jobs.event_sink`), the escrow. The generic
readers (balances, rows, postings, outbox events) and `send` are in `transfer_support`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from billfold import jobs, ledger
from tests.conftest import SignedIn
from tests.integration.transfer_support import available as available  # re-exported
from tests.integration.transfer_support import balance, outbox_events, sql
from tests.support.one_time_codes import reveal_code

EMAIL_DOMAIN = "example.com"


def unregistered_email() -> str:
    # Same shape as the addresses sign_up makes, so masked hints compare alike.
    return f"user-{uuid.uuid4().hex[:10]}@{EMAIL_DOMAIN}"


async def escrow(app: Any, currency: str = "USD") -> int:
    """What the system's escrow account holds: the money of transfers waiting for a claim."""
    return (await balance(app, ledger.SYSTEM, currency, kind="escrow")).posted


async def assert_escrow_conserved(app: Any) -> None:
    """Every escrow account holds exactly the money of the transfers waiting for a claim."""
    rows = await sql(
        app,
        """
        WITH waiting AS (
            SELECT currency, sum(amount) AS amount FROM p2p.transfers
            WHERE status = 'pending_claim' GROUP BY currency
        ), escrow AS (
            SELECT currency, posted, held FROM ledger.accounts
            WHERE owner_id = :system AND kind = 'escrow'
        )
        SELECT coalesce(e.currency, w.currency) AS currency,
               coalesce(e.posted, 0) AS posted, coalesce(e.held, 0) AS held,
               coalesce(w.amount, 0) AS waiting
        FROM escrow e FULL JOIN waiting w ON w.currency = e.currency
        """,
        system=ledger.SYSTEM,
    )
    for r in rows:
        assert (r.posted, r.held) == (r.waiting, 0), r


async def deliver(app: Any, event_type: str, subject: str, *, times: int = 1) -> int:
    """Run the worker's consumers on the matching outbox events (`times` over: redelivery)."""
    engine = app.state.resources.engine
    sink = jobs.event_sink(engine, app.state.p2p)
    found = await outbox_events(app, event_type, subject)
    for _ in range(times):
        for event in found:
            await sink(event)
    dead = await sql(
        app,
        "SELECT event_id FROM platform.dead_letters WHERE event_id = ANY(:ids)",
        ids=[e["id"] for e in found],
    )
    assert dead == [], "a consumer failed on these events"
    return len(found)


async def verify_contact(client: httpx.AsyncClient, app: Any, user: SignedIn, channel: str) -> None:
    """Verify the user's e-mail or phone with the code the outbox carries."""
    r = await client.post("/v1/me/verifications", json={"channel": channel}, headers=user.headers)
    assert r.status_code == 201, r.text
    (sent,) = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE subject = :u "
        "AND type = 'billfold.users.verification.requested' ORDER BY seq DESC LIMIT 1",
        u=user.user["id"],
    )
    code = reveal_code(app, "billfold.users.verification.requested", sent.data)
    ok = await client.post(
        f"/v1/me/verifications/{r.json()['id']}/confirm", json={"code": code}, headers=user.headers
    )
    assert ok.status_code == 200, ok.text
