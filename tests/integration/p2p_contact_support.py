"""Helpers for the tests of claims and money requests: contacts, verification, consumers run on
the real outbox rows through the worker's own sink (`jobs.event_sink`), ledger reads in SQL."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import text

from billfold import jobs, ledger
from tests.conftest import SignedIn, idem

EMAIL_DOMAIN = "example.com"


def unregistered_email() -> str:
    # Same shape as the addresses sign_up makes, so masked hints compare alike.
    return f"user-{uuid.uuid4().hex[:10]}@{EMAIL_DOMAIN}"


async def available(app: Any, user_id: str, currency: str = "USD") -> int:
    async with app.state.resources.engine.connect() as conn:
        for b in await ledger.balances(conn, user_id):
            if b.currency == currency:
                return b.available
    return 0


async def escrow(app: Any, currency: str = "USD") -> int:
    async with app.state.resources.engine.connect() as conn:
        posted = await conn.scalar(
            text(
                "SELECT posted FROM ledger.accounts "
                "WHERE owner_id = :system AND kind = 'escrow' AND currency = :c"
            ),
            {"system": ledger.SYSTEM, "c": currency},
        )
    return int(posted or 0)


async def assert_escrow_conserved(app: Any) -> None:
    """Every escrow account holds exactly the money of the transfers waiting for a claim."""
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
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
                    """
                ),
                {"system": ledger.SYSTEM},
            )
        ).all()
    for r in rows:
        assert (r.posted, r.held) == (r.waiting, 0), r


async def transfer_row(app: Any, transfer_id: str) -> Any:
    async with app.state.resources.engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT * FROM p2p.transfers WHERE id = :id"), {"id": transfer_id}
            )
        ).one()


async def postings(app: Any, reference: str, kind: str) -> int:
    async with app.state.resources.engine.connect() as conn:
        return int(
            await conn.scalar(
                text("SELECT count(*) FROM ledger.postings WHERE reference = :r AND kind = :k"),
                {"r": reference, "k": kind},
            )
        )


async def outbox_events(app: Any, event_type: str, subject: str) -> list[dict[str, Any]]:
    """The events of `event_type` about `subject`, as the relay hands them to a sink."""
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT id, type, source, subject, time, data FROM platform.outbox "
                    "WHERE type = :t AND subject = :s ORDER BY seq"
                ),
                {"t": event_type, "s": subject},
            )
        ).all()
    return [
        {
            "specversion": "1.0",
            "id": r.id,
            "type": r.type,
            "source": r.source,
            "subject": r.subject,
            "time": r.time.isoformat(),
            "datacontenttype": "application/json",
            "data": r.data,
        }
        for r in rows
    ]


async def deliver(app: Any, event_type: str, subject: str, *, times: int = 1) -> int:
    """Run the worker's consumers on the matching outbox events (`times` over: redelivery)."""
    engine = app.state.resources.engine
    sink = jobs.event_sink(engine, app.state.p2p)
    found = await outbox_events(app, event_type, subject)
    for _ in range(times):
        for event in found:
            await sink(event)
    async with engine.connect() as conn:
        dead = await conn.scalar(
            text("SELECT count(*) FROM platform.dead_letters WHERE event_id = ANY(:ids)"),
            {"ids": [e["id"] for e in found]},
        )
    assert dead == 0, "a consumer failed on these events"
    return len(found)


async def verify_contact(client: httpx.AsyncClient, app: Any, user: SignedIn, channel: str) -> None:
    """Verify the user's e-mail or phone with the code the outbox carries."""
    r = await client.post("/v1/me/verifications", json={"channel": channel}, headers=user.headers)
    assert r.status_code == 201, r.text
    async with app.state.resources.engine.connect() as conn:
        code = await conn.scalar(
            text(
                "SELECT data->>'code' FROM platform.outbox WHERE subject = :u "
                "AND type = 'billfold.users.verification.requested' ORDER BY seq DESC LIMIT 1"
            ),
            {"u": user.user["id"]},
        )
    ok = await client.post(
        f"/v1/me/verifications/{r.json()['id']}/confirm", json={"code": code}, headers=user.headers
    )
    assert ok.status_code == 200, ok.text


async def send(
    client: httpx.AsyncClient, sender: SignedIn, recipient: dict[str, str], amount: int
) -> httpx.Response:
    return await client.post(
        "/v1/transfers",
        json={"recipient": recipient, "amount": amount, "currency": "USD"},
        headers=idem(**sender.headers),
    )
