"""Sending money: one atomic step of limit usage, ledger posting, transfer row and event."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import ledger, users
from billfold.gateway import Principal
from billfold.p2p import events, limits, parties
from billfold.p2p.models import (
    CONTACT_KINDS,
    NewTransfer,
    PartyView,
    SelfTransfer,
    Transfer,
    TransferBlocked,
    TransferNotCancellable,
    TransferNotFound,
)
from billfold.p2p.risk import TransferRisk
from billfold.p2p.runtime import P2PRuntime
from billfold.p2p.store import requests as requests_store
from billfold.p2p.store import transfers as store
from billfold.platform.bus.consumers import Consumer
from billfold.platform.clock import utcnow
from billfold.platform.events import Event, record_event
from billfold.platform.ids import new_id
from billfold.platform.money import Money

STEP_UP_PURPOSE = "transfer"
REVIEW_EXPIRED = "review_expired"

# Ledger posting kinds of the P2P service.
POSTING_TRANSFER = "p2p_transfer"
POSTING_ESCROW = "p2p_escrow"
POSTING_CLAIM = "p2p_claim"
POSTING_RETURN = "p2p_return"

ESCROW = (ledger.SYSTEM, "escrow")

_EVENT_FOR_STATUS = {
    "pending": events.TRANSFER_PENDING,
    "completed": events.TRANSFER_COMPLETED,
    "pending_claim": events.TRANSFER_PENDING_CLAIM,
    "failed": events.TRANSFER_FAILED,
    "cancelled": events.TRANSFER_CANCELLED,
    "expired": events.TRANSFER_EXPIRED,
    "reversed": events.TRANSFER_REVERSED,
}


def wallet(user_id: str) -> tuple[str, str]:
    return (user_id, "wallet")


def transfer_event(transfer: Mapping[Any, Any], **extra: Any) -> Event:
    """The `billfold.p2p.transfer.*` event of `transfer` (a row's mapping, or the values of one
    about to be inserted) in its current status."""
    data = {
        "transfer_id": transfer["id"],
        "status": transfer["status"],
        "sender_id": transfer["sender_id"],
        "recipient_id": transfer["recipient_id"],
        "amount": transfer["amount"],
        "currency": transfer["currency"],
        "request_id": transfer["request_id"],
        **extra,
    }
    return events.event(_EVENT_FOR_STATUS[transfer["status"]], transfer["id"], data)


async def publish(conn: AsyncConnection, row: Row[Any], **extra: Any) -> None:
    await record_event(conn, transfer_event(row._mapping, **extra))


def step_up_reference(body: NewTransfer) -> str:
    """What a step-up for a transfer authorises: this recipient, amount and currency only (the
    transfer has no id yet), so a token for 5.00 to Bob does not send 500.00 to someone else."""
    who = body.recipient
    digest = hashlib.sha256(
        f"{who.kind}\0{who.value}\0{body.amount}\0{body.currency}".encode()
    ).hexdigest()
    return f"transfer:{digest[:32]}"


async def send(
    conn: AsyncConnection,
    rt: P2PRuntime,
    principal: Principal,
    body: NewTransfer,
    *,
    ip: str | None = None,
    step_up_token: str | None = None,
    request_id: str | None = None,
) -> Row[Any]:
    """Make a transfer. To a user (id, handle) it completes at once; to an e-mail/phone the
    money waits in escrow until the owner of that verified contact claims it, whether or not
    they are registered today, so the answer never tells who has an account."""
    who = body.recipient
    sender, recipient = await parties.resolve(
        conn,
        principal,
        who,
        body.amount,
        action="send money",
        role="recipient",
        to_self=SelfTransfer("You cannot send money to yourself"),
    )
    money = Money(body.amount, body.currency)

    counted_in = await limits.count_transfer(conn, sender, money)
    # A step-up token counts only once verified (and spent): the risk check is told the sender
    # stepped up only then, or a junk header would pass any check that trusts `stepped_up`.
    stepped_up = False
    reference = step_up_reference(body)
    if step_up_token is not None:
        await users.verify_step_up(rt.users, step_up_token, principal, STEP_UP_PURPOSE, reference)
        stepped_up = True
    transfer_id = new_id("p2p")
    decision = await rt.risk.assess(
        conn,
        TransferRisk(
            transfer_id=transfer_id,
            sender_id=sender.user_id,
            recipient_id=recipient.user_id if recipient else None,
            recipient_kind=who.kind,
            money=money,
            device_id=principal.device_id,
            ip=ip,
            stepped_up=stepped_up,
            recipient_contact=who.value if who.is_contact else None,
        ),
    )
    if decision.action == "block":
        # The reasons stay with the risk decision: telling the sender which signal fired would
        # teach a fraudster how to get past it.
        raise TransferBlocked("This transfer was declined")
    if decision.action == "challenge" and not stepped_up:
        raise users.step_up_required(STEP_UP_PURPOSE, reference)

    posting_id = hold_id = None
    if decision.action == "review":
        hold = await ledger.place_hold(
            conn,
            sender.user_id,
            money,
            reference=transfer_id,
            expires_at=utcnow() + timedelta(seconds=rt.settings.p2p_review_hold_seconds),
        )
        status, hold_id = "pending", hold.id
    else:
        status = "completed" if recipient else "pending_claim"
        posting = await ledger.move(
            conn,
            money,
            debit=wallet(sender.user_id),
            credit=wallet(recipient.user_id) if recipient else ESCROW,
            kind=POSTING_TRANSFER if recipient else POSTING_ESCROW,
            reference=transfer_id,
            memo=body.note,
        )
        posting_id = posting.id

    contact_hash = rt.contact_hash(who.kind, who.value) if who.is_contact else None
    values: dict[str, Any] = {
        "id": transfer_id,
        "sender_id": sender.user_id,
        "sender_name": sender.name,
        "recipient_id": recipient.user_id if recipient else None,
        "recipient_name": recipient.name if recipient else None,
        "recipient_kind": who.kind,
        "recipient_contact_hash": contact_hash,
        "recipient_contact_sealed": (
            rt.seal_contact(transfer_id, who.kind, who.value) if who.is_contact else None
        ),
        "recipient_hint": parties.hint(who.kind, who.value, recipient),
        "amount": money.amount,
        "currency": money.currency,
        "note": body.note,
        "status": status,
        "request_id": request_id,
        "posting_id": posting_id,
        "hold_id": hold_id,
        "limit_day": counted_in.day,
        "limit_month": counted_in.month,
        "claim_expires_at": (
            utcnow() + timedelta(seconds=rt.settings.p2p_claim_ttl_seconds)
            if recipient is None
            else None
        ),
    }
    extra: dict[str, Any] = {}
    if status == "pending_claim":
        # Whoever delivers the invitation needs the address; only this event carries it (a
        # transfer held for review invites nobody until it is released).
        extra["invitee"] = {who.kind: who.value}
    if decision.action != "allow":
        extra["risk"] = {"action": decision.action, "score": decision.score}
    return await store.insert(conn, values, transfer_event(values, **extra))


# What the parties are told about a failed or reversed transfer: a stable code, never the
# reviewer's or support agent's own words (they may name a suspicion; they stay in the events).
_PUBLIC_REASONS = {"failed": "declined_after_review", "reversed": "reversed_by_support"}


def public_reason(row: Row[Any]) -> str | None:
    if row.failure_reason == REVIEW_EXPIRED:
        return REVIEW_EXPIRED
    return _PUBLIC_REASONS.get(row.status)


def view(row: Row[Any], viewer_id: str) -> Transfer:
    """The transfer as `viewer_id` (its sender or recipient) sees it."""
    unclaimed = row.recipient_id is None
    return Transfer(
        id=row.id,
        status=row.status,
        direction="sent" if row.sender_id == viewer_id else "received",
        sender=PartyView(user_id=row.sender_id, name=row.sender_name),
        recipient=PartyView(
            user_id=row.recipient_id,
            name=row.recipient_name,
            handle=parties.handle_in(row.recipient_hint, row.recipient_name),
            contact=row.recipient_hint if row.recipient_kind in CONTACT_KINDS else None,
        )
        if not unclaimed
        else PartyView(user_id=None, contact=row.recipient_hint),
        amount=row.amount,
        currency=row.currency,
        note=row.note,
        failure_reason=public_reason(row),
        request_id=row.request_id,
        claim_expires_at=row.claim_expires_at if row.status == "pending_claim" else None,
        created_at=row.created_at,
        completed_at=row.completed_at,
        updated_at=row.updated_at,
    )


async def get(conn: AsyncConnection, transfer_id: str, user_id: str) -> Row[Any]:
    row = await store.get_visible(conn, transfer_id, user_id)
    if row is None:
        raise TransferNotFound("No such transfer")
    return row


async def cancel(conn: AsyncConnection, transfer_id: str, user_id: str) -> Row[Any]:
    """The sender takes back a transfer nobody has received yet (escrow or under review)."""
    row = await store.get_for_update(conn, transfer_id)
    if row is None or (row.sender_id != user_id and row.recipient_id != user_id):
        raise TransferNotFound("No such transfer")
    if row.sender_id != user_id or row.status not in ("pending", "pending_claim"):
        raise TransferNotCancellable(
            f"A {row.status.replace('_', ' ')} transfer cannot be cancelled by you"
        )
    posting_id = await return_to_sender(conn, row)
    updated = await store.set_status(conn, row.id, "cancelled", posting_id=posting_id)
    await publish(conn, updated)
    return updated


async def _never_arrived(conn: AsyncConnection, row: Row[Any]) -> None:
    """What every ending without a recipient shares: a request it paid is open again, and its
    amount leaves the limit usage it was counted in."""
    if row.request_id is not None:
        # Locked right after the transfer row, before limits and accounts (the lock order).
        reopened = await requests_store.reopen(conn, row.request_id, row.id)
        if reopened is not None:
            await events.publish(
                conn, events.REQUEST_REOPENED, reopened.id, events.request_data(reopened)
            )
    await limits.give_back(
        conn,
        row.sender_id,
        Money(row.amount, row.currency),
        limits.CountedIn(row.limit_day, row.limit_month),
    )


async def return_to_sender(conn: AsyncConnection, row: Row[Any]) -> str | None:
    """Undo a transfer that has not reached its recipient (cancelled, refused on review or
    unclaimed): void its hold or empty its escrow, and give the amount back to the sender's
    limits if it still counts in the current window. Returns the return posting, if any."""
    await _never_arrived(conn, row)
    if row.status == "pending":
        await ledger.void_hold(conn, row.hold_id)
        return None
    posting = await ledger.move(
        conn,
        Money(row.amount, row.currency),
        debit=ESCROW,
        credit=wallet(row.sender_id),
        kind=POSTING_RETURN,
        reference=row.id,
    )
    return posting.id


async def release_pending(conn: AsyncConnection, rt: P2PRuntime, transfer_id: str) -> Row[Any]:
    """Complete a transfer held for review (the Fraud Service's "release"); one to an e-mail or
    phone goes on to escrow, and its event carries the contact again so its owner is invited
    (or, if they already have it verified, the claim consumer hands it over)."""
    row = await store.get_for_update(conn, transfer_id)
    if row is None or row.status != "pending":
        raise TransferNotFound("No pending transfer with this id")
    credit = wallet(row.recipient_id) if row.recipient_id else ESCROW
    posting = await ledger.commit_hold(
        conn, row.hold_id, row.amount, credit=credit, kind=POSTING_TRANSFER, memo=row.note
    )
    status = "completed" if row.recipient_id else "pending_claim"
    # The recipient's time to claim starts now, not when the review began.
    claim_window = timedelta(seconds=rt.settings.p2p_claim_ttl_seconds)
    updated = await store.set_status(
        conn,
        row.id,
        status,
        posting_id=posting.id,
        claim_expires_at=None if row.recipient_id else utcnow() + claim_window,
    )
    extra: dict[str, Any] = {}
    if row.recipient_id is None:
        sealed = await store.sealed_contact(conn, row.id)
        if sealed is not None:
            extra["invitee"] = rt.open_contact(row.id, sealed)
    await publish(conn, updated, **extra)
    return updated


async def fail_pending(conn: AsyncConnection, transfer_id: str, reason: str) -> Row[Any]:
    """Refuse a transfer held for review: the hold is released, the sender keeps the money."""
    row = await store.get_for_update(conn, transfer_id)
    if row is None or row.status != "pending":
        raise TransferNotFound("No pending transfer with this id")
    await return_to_sender(conn, row)
    updated = await store.set_status(conn, row.id, "failed", failure_reason=reason)
    await publish(conn, updated, reason=reason)
    return updated


async def reverse(conn: AsyncConnection, transfer_id: str, reason: str) -> Row[Any]:
    """Take a completed transfer back from its recipient (support/fraud correction)."""
    row = await store.get_for_update(conn, transfer_id)
    if row is None:
        raise TransferNotFound("No such transfer")
    if row.status != "completed":
        raise TransferNotCancellable(
            f"A {row.status.replace('_', ' ')} transfer cannot be reversed"
        )
    posting = await ledger.move(
        conn,
        Money(row.amount, row.currency),
        debit=wallet(row.recipient_id),
        credit=wallet(row.sender_id),
        kind="p2p_reversal",
        reference=row.id,
        memo=reason,
    )
    updated = await store.set_status(
        conn, row.id, "reversed", posting_id=posting.id, failure_reason=reason
    )
    await publish(conn, updated, reason=reason)
    return updated


async def expire_review(conn: AsyncConnection, hold_id: str, transfer_id: str) -> Row[Any] | None:
    """The review outlived its hold (the ledger's sweeper released it): the transfer fails
    with `review_expired`, stops counting against the sender's limits, and a request it paid
    is open again."""
    row = await store.get_for_update(conn, transfer_id)
    if row is None or row.status != "pending" or row.hold_id != hold_id:
        return None  # released, refused or cancelled before the hold ran out
    await _never_arrived(conn, row)
    updated = await store.set_status(conn, row.id, "failed", failure_reason=REVIEW_EXPIRED)
    await publish(conn, updated)
    return updated


def consumers() -> list[Consumer]:
    """Fails transfers whose review hold expired (`billfold.ledger.hold.expired`)."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        reference, hold_id = data.get("reference"), data.get("hold_id")
        if isinstance(reference, str) and reference.startswith("p2p_") and isinstance(hold_id, str):
            await expire_review(conn, hold_id, reference)

    return [Consumer("p2p.expire-reviews", frozenset({ledger.HOLD_EXPIRED}), handle)]
