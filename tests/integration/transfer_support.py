"""Helpers shared by the wallet and transfer tests: sending, reading balances, rows, postings
and outbox events, snapshots, admins, risk swaps (`p2p_contact_support` adds the contact ones).

Reads go straight to PostgreSQL (the ledger's public face for balances, SQL for the rest) so a
test checks what was stored, not what an endpoint says was stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text

from billfold import ledger
from billfold.p2p import RiskCheck, RiskDecision, TransferRisk
from tests.conftest import SignedIn, idem
from tests.conftest import make_admin as make_admin  # re-exported for the transfer tests

P2P_EVENT = "billfold.p2p.%"


async def send(
    client: httpx.AsyncClient,
    sender: SignedIn,
    amount: Any,
    currency: str = "USD",
    *,
    note: str | None = None,
    headers: dict[str, str] | None = None,
    **recipient: Any,
) -> httpx.Response:
    """POST /v1/transfers with a fresh Idempotency-Key (unless `headers` brings one)."""
    body: dict[str, Any] = {"recipient": recipient, "amount": amount, "currency": currency}
    if note is not None:
        body["note"] = note
    return await client.post(
        "/v1/transfers", json=body, headers={**idem(**sender.headers), **(headers or {})}
    )


async def send_ok(
    client: httpx.AsyncClient, sender: SignedIn, amount: int, to: SignedIn, currency: str = "USD"
) -> dict[str, Any]:
    r = await send(client, sender, amount, currency, user_id=to.user["id"])
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Balance:
    posted: int
    held: int

    @property
    def available(self) -> int:
        return self.posted - self.held


async def balance(
    app: Any, who: SignedIn | str, currency: str = "USD", *, kind: str = "wallet"
) -> Balance:
    """The posted and held balance of `who`'s account of `kind` (their wallet unless said; a
    system account with `ledger.SYSTEM`) in `currency`, read through the ledger's face; zero
    if it was never opened."""
    owner_id = who if isinstance(who, str) else who.user["id"]
    async with app.state.resources.engine.connect() as conn:
        for b in await ledger.balances(conn, owner_id, kind=kind):
            if b.currency == currency:
                return Balance(b.posted, b.held)
    return Balance(0, 0)


async def available(app: Any, who: SignedIn | str, currency: str = "USD") -> int:
    return (await balance(app, who, currency)).available


async def sql(app: Any, query: str, **params: Any) -> list[Any]:
    async with app.state.resources.engine.begin() as conn:
        result = await conn.execute(text(query), params)
        return list(result.all()) if result.returns_rows else []


async def snapshot(app: Any, *users: SignedIn) -> dict[str, Any]:
    """Everything a transfer may change: the users' and the system's ledger accounts, postings
    and holds, the users' limit usage and transfers, and the p2p events in the outbox. An error
    must leave all of it exactly as it was."""
    ids = [u.user["id"] for u in users]
    return {
        "accounts": await sql(
            app,
            "SELECT owner_id, kind, currency, posted, held FROM ledger.accounts"
            " WHERE owner_id = ANY(:ids) OR owner_id = :system ORDER BY id",
            ids=ids,
            system=ledger.SYSTEM,
        ),
        "postings": await sql(app, "SELECT count(*) FROM ledger.postings"),
        "holds": await sql(app, "SELECT id, status, remaining FROM ledger.holds ORDER BY id"),
        "limits": await sql(
            app,
            "SELECT user_id, currency, used_today, usage_day, used_this_month, usage_month,"
            " per_transfer_limit, daily_limit, monthly_limit"
            " FROM p2p.transfer_limits WHERE user_id = ANY(:ids) ORDER BY user_id, currency",
            ids=ids,
        ),
        "transfers": await sql(
            app,
            "SELECT id, status, amount, posting_id, hold_id FROM p2p.transfers"
            " WHERE sender_id = ANY(:ids) OR recipient_id = ANY(:ids) ORDER BY id",
            ids=ids,
        ),
        "events": await sql(
            app, "SELECT count(*) FROM platform.outbox WHERE type LIKE :t", t=P2P_EVENT
        ),
    }


async def transfer_row(app: Any, transfer_id: str) -> Any:
    (row,) = await sql(app, "SELECT * FROM p2p.transfers WHERE id = :id", id=transfer_id)
    return row


async def postings(app: Any, reference: str, kind: str) -> int:
    """How many ledger postings of `kind` name `reference` (a transfer id, say)."""
    rows = await sql(
        app,
        "SELECT count(*) AS n FROM ledger.postings WHERE reference = :r AND kind = :k",
        r=reference,
        k=kind,
    )
    return int(rows[0].n)


async def outbox_envelopes(
    app: Any, subjects: list[str], event_type: str | None = None
) -> list[dict[str, Any]]:
    """The outbox events about `subjects` (of `event_type` when given), oldest first, as the
    relay hands them to a sink (CloudEvents envelopes)."""
    rows = await sql(
        app,
        "SELECT id, type, source, subject, time, data FROM platform.outbox "
        "WHERE subject = ANY(:s) AND (CAST(:t AS text) IS NULL OR type = :t) ORDER BY seq",
        s=subjects,
        t=event_type,
    )
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


async def outbox_events(app: Any, event_type: str, subject: str) -> list[dict[str, Any]]:
    """The events of `event_type` about `subject`, oldest first (`outbox_envelopes`)."""
    return await outbox_envelopes(app, [subject], event_type)


async def events(app: Any, type_: str, transfer_id: str) -> list[dict[str, Any]]:
    """The data of the outbox events of one type about one transfer, oldest first."""
    return [dict(e["data"]) for e in await outbox_events(app, type_, transfer_id)]


async def all_events(app: Any, transfer_id: str) -> list[str]:
    rows = await sql(
        app, "SELECT type FROM platform.outbox WHERE subject = :s ORDER BY seq", s=transfer_id
    )
    return [r.type for r in rows]


async def usage(app: Any, who: SignedIn, currency: str = "USD") -> Any:
    rows = await sql(
        app,
        "SELECT * FROM p2p.transfer_limits WHERE user_id = :u AND currency = :c",
        u=who.user["id"],
        c=currency,
    )
    return rows[0] if rows else None


async def set_status(app: Any, who: SignedIn, status: str) -> None:
    await sql(app, "UPDATE users.users SET status = :s WHERE id = :u", s=status, u=who.user["id"])


async def patch_me(client: httpx.AsyncClient, who: SignedIn, **fields: Any) -> dict[str, Any]:
    r = await client.patch("/v1/me", json=fields, headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@contextlib.contextmanager
def risk(app: Any, check: RiskCheck) -> Iterator[list[TransferRisk]]:
    """Put `check` in front of every transfer for the block, then restore the app's own (the
    app is shared by the whole session). Yields the transfers the check was asked about."""
    seen: list[TransferRisk] = []

    class Recording:
        async def assess(self, conn: Any, transfer: TransferRisk) -> RiskDecision:
            seen.append(transfer)
            return await check.assess(conn, transfer)

    runtime = app.state.p2p
    original = runtime.risk
    runtime.risk = Recording()
    try:
        yield seen
    finally:
        runtime.risk = original


class Always:
    """A risk check that answers the same decision for every transfer."""

    def __init__(self, action: str, score: int = 0, reasons: tuple[str, ...] = ()) -> None:
        self.decision = RiskDecision(action, score, reasons)  # type: ignore[arg-type]

    async def assess(self, conn: Any, transfer: TransferRisk) -> RiskDecision:
        return self.decision


class ChallengeUnlessSteppedUp:
    """What a fraud service naturally does: ask for step-up, and let a stepped-up sender through."""

    async def assess(self, conn: Any, transfer: TransferRisk) -> RiskDecision:
        return RiskDecision("allow" if transfer.stepped_up else "challenge", 600)
