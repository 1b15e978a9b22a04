"""Money requests: ask someone for money; they accept (a transfer), decline, or it expires.

A request names its payer like a transfer names its recipient. One addressed to an e-mail
address or phone number is accepted the same way whether or not anyone has that contact (so
asking tells nothing about who is registered); it reaches the user who has the contact verified,
and the requester learns who that is only once they answer it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import users
from billfold.gateway import Principal
from billfold.p2p import events, limits, parties, transfers
from billfold.p2p.claims import contact_consumer, verified_contact_hashes
from billfold.p2p.models import (
    CONTACT_KINDS,
    Counterparty,
    NewTransfer,
    NewTransferRequest,
    PartyView,
    RequestActionNotAllowed,
    RequestNotFound,
    RequestNotPending,
    SelfRequest,
    TransferRequest,
)
from billfold.p2p.runtime import P2PRuntime
from billfold.p2p.store import requests as store
from billfold.platform.bus.consumers import Consumer
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.errors import Forbidden
from billfold.platform.ids import is_valid_id, new_id

Role = Literal["requester", "payer"]

_EVENT_FOR_STATUS = {
    "pending": events.REQUEST_CREATED,
    "accepted": events.REQUEST_ACCEPTED,
    "declined": events.REQUEST_DECLINED,
    "cancelled": events.REQUEST_CANCELLED,
    "expired": events.REQUEST_EXPIRED,
}


async def publish(conn: AsyncConnection, row: Row[Any], **extra: Any) -> None:
    await events.publish(
        conn, _EVENT_FOR_STATUS[row.status], row.id, events.request_data(row, **extra)
    )


async def create(
    conn: AsyncConnection, rt: P2PRuntime, principal: Principal, body: NewTransferRequest
) -> Row[Any]:
    """Ask `body.payer` for money. To a user (id, handle) it is theirs at once; to an e-mail or
    phone it waits for whoever has that contact verified, and the answer is the same whether
    or not anyone has it today."""
    who = body.payer
    # By e-mail/phone the payer is None (even if verified): see the module docstring.
    requester, payer = await parties.resolve(
        conn,
        principal,
        who,
        body.amount,
        action="request money",
        role="payer",
        to_self=SelfRequest("You cannot request money from yourself"),
    )
    await limits.check_offered(conn, body.currency)

    row = await store.insert(
        conn,
        {
            "id": new_id("req"),
            "requester_id": requester.user_id,
            "requester_name": requester.name,
            "payer_id": payer.user_id if payer else None,
            "payer_name": payer.name if payer else None,
            "payer_kind": who.kind,
            "payer_contact_hash": rt.contact_hash(who.kind, who.value) if who.is_contact else None,
            "payer_hint": parties.hint(who.kind, who.value, payer),
            "amount": body.amount,
            "currency": body.currency,
            "note": body.note,
            "expires_at": utcnow() + timedelta(seconds=rt.settings.transfer_request_ttl_seconds),
        },
    )
    # Whoever delivers the invitation needs the address; only this event carries it.
    await publish(conn, row, **({"invitee": {who.kind: who.value}} if who.is_contact else {}))
    return row


def role_of(row: Row[Any], user_id: str, contact_hashes: list[bytes]) -> Role | None:
    """How `user_id` stands to the request; None: it is none of their business (404)."""
    if row.requester_id == user_id:
        return "requester"
    if row.payer_id == user_id:
        return "payer"
    if (
        row.payer_id is None
        and row.status == "pending"
        and row.payer_contact_hash is not None
        and bytes(row.payer_contact_hash) in contact_hashes
    ):
        return "payer"
    return None


async def viewer(
    conn: AsyncConnection, rt: P2PRuntime, user_id: str
) -> tuple[users.Party, list[bytes]]:
    """The caller and the hashes of their verified contacts (requests addressed to those are
    theirs to answer even before the consumer has written them down as the payer)."""
    party = await users.get_party(conn, user_id)
    if party is None:
        raise Forbidden("This account cannot use money requests", code="account_not_active")
    return party, verified_contact_hashes(rt, party)


async def _find(
    conn: AsyncConnection, rt: P2PRuntime, request_id: str, user_id: str, *, for_update: bool
) -> tuple[Row[Any], Role, users.Party]:
    """The request (locked `for_update`), how `user_id` stands to it, and the caller;
    RequestNotFound if it is none of their business."""
    if not is_valid_id(request_id, "req"):  # junk (even NUL bytes) never reaches SQL
        raise RequestNotFound("No such request")
    party, hashes = await viewer(conn, rt, user_id)
    row = await (store.get_for_update if for_update else store.get)(conn, request_id)
    role = role_of(row, user_id, hashes) if row is not None else None
    if row is None or role is None:
        raise RequestNotFound("No such request")
    return row, role, party


async def get(conn: AsyncConnection, rt: P2PRuntime, request_id: str, user_id: str) -> Row[Any]:
    """The request if `user_id` made it or is its payer; RequestNotFound otherwise."""
    row, _, _ = await _find(conn, rt, request_id, user_id, for_update=False)
    return row


async def _lock(
    conn: AsyncConnection, rt: P2PRuntime, request_id: str, user_id: str, allowed: Role, verb: str
) -> tuple[Row[Any], users.Party]:
    """Lock the request (first, before limits and accounts: one lock order for everyone) and
    check that `user_id` may `verb` it now."""
    row, role, party = await _find(conn, rt, request_id, user_id, for_update=True)
    if role != allowed:
        raise RequestActionNotAllowed(f"Only the {allowed} can {verb} this request")
    if row.status != "pending":
        raise RequestNotPending(
            f"This request was already {row.status}", extra={"status": row.status}
        )
    if row.expires_at <= utcnow():
        # The sweeper has not got to it yet; it is over all the same.
        raise RequestNotPending("This request has expired", extra={"status": "expired"})
    return row, party


async def accept(
    conn: AsyncConnection,
    rt: P2PRuntime,
    principal: Principal,
    request_id: str,
    *,
    ip: str | None = None,
    step_up_token: str | None = None,
) -> Row[Any]:
    """Pay the request: a transfer to the requester of its amount, currency and note, made
    in this transaction (limits, risk check, balance and step-up apply as to any transfer; if
    any refuses, nothing changes). A request is paid at most once: its row is locked first."""
    row, payer = await _lock(conn, rt, request_id, principal.user_id, "payer", "accept")
    transfer = await transfers.send(
        conn,
        rt,
        principal,
        NewTransfer(
            recipient=Counterparty(user_id=row.requester_id),
            amount=row.amount,
            currency=row.currency,
            note=row.note,
        ),
        ip=ip,
        step_up_token=step_up_token,
        request_id=row.id,
    )
    updated = await store.decide(
        conn,
        row.id,
        "accepted",
        payer_id=payer.user_id,
        payer_name=payer.name,
        transfer_id=transfer.id,
    )
    await publish(conn, updated)
    return updated


async def decline(conn: AsyncConnection, rt: P2PRuntime, request_id: str, user_id: str) -> Row[Any]:
    """The payer says no."""
    row, payer = await _lock(conn, rt, request_id, user_id, "payer", "decline")
    updated = await store.decide(
        conn, row.id, "declined", payer_id=payer.user_id, payer_name=payer.name
    )
    await publish(conn, updated)
    return updated


async def cancel(conn: AsyncConnection, rt: P2PRuntime, request_id: str, user_id: str) -> Row[Any]:
    """The requester withdraws the request."""
    row, _ = await _lock(conn, rt, request_id, user_id, "requester", "cancel")
    updated = await store.decide(conn, row.id, "cancelled")
    await publish(conn, updated)
    return updated


def view(row: Row[Any], viewer_id: str) -> TransferRequest:
    """The request as `viewer_id` (its requester or payer) sees it."""
    outgoing = row.requester_id == viewer_id
    by_contact = row.payer_kind in CONTACT_KINDS
    contact = row.payer_hint if by_contact else None
    # Who has an e-mail/phone is shown to the requester only once they answered: earlier, it
    # would tell the requester whether that contact belongs to a registered user.
    named = not outgoing or not by_contact or row.status in ("accepted", "declined")
    payer = (
        PartyView(
            user_id=row.payer_id,
            name=row.payer_name,
            handle=parties.handle_in(row.payer_hint, row.payer_name),
            contact=contact,
        )
        if named
        else PartyView(user_id=None, contact=contact)
    )
    return TransferRequest(
        id=row.id,
        status=row.status,
        direction="outgoing" if outgoing else "incoming",
        requester=PartyView(user_id=row.requester_id, name=row.requester_name),
        payer=payer,
        amount=row.amount,
        currency=row.currency,
        note=row.note,
        transfer_id=row.transfer_id,
        expires_at=row.expires_at,
        created_at=row.created_at,
        decided_at=row.decided_at,
        updated_at=row.updated_at,
    )


async def bind_payer(conn: AsyncConnection, rt: P2PRuntime, party: users.Party) -> list[str]:
    """Make `party` the payer of pending requests addressed to their verified contacts."""
    if not party.active:
        return []
    return await store.bind_payer(
        conn, party.user_id, party.name, verified_contact_hashes(rt, party)
    )


async def expire_requests(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Expire pending requests past their deadline (worker job): one transaction per batch,
    rows other workers hold are skipped, each expiry is an event."""
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        rows = await store.expire_due(conn, batch)
        for row in rows:
            await publish(conn, row)
    return len(rows)


def consumers(rt: P2PRuntime) -> list[Consumer]:
    """The event consumer that writes down who pays requests addressed to a contact."""
    return [
        contact_consumer(
            "p2p.bind-request-payers",
            events.REQUEST_CREATED,
            "requester_id",
            lambda conn, owner: bind_payer(conn, rt, owner),
        )
    ]
