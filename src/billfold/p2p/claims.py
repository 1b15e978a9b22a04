"""Unclaimed transfers: claimed by the owner of the verified contact, or returned on expiry.

Money sent to an e-mail address or phone number waits in escrow (`pending_claim`) under a keyed
hash of that contact, whether or not anyone registered has it. It moves to the user who has the
contact *verified*: when they verify it (`billfold.users.contact.verified`), at once if they
already had (`billfold.p2p.transfer.pending_claim`), or when they ask (`POST
/v1/transfers/claims`). If nobody claims it by `claim_expires_at`, it goes back to the sender.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger, users
from billfold.p2p import events, transfers
from billfold.p2p.models import CONTACT_KINDS
from billfold.p2p.runtime import P2PRuntime
from billfold.p2p.store import transfers as store
from billfold.platform.bus.consumers import Consumer
from billfold.platform.db import unit_of_work
from billfold.platform.money import Money
from billfold.platform.observability import get_logger

log = get_logger(__name__)

# The User Service's event (its public face does not export event types; the name is the
# contract): a user has just verified an e-mail address or phone number.
CONTACT_VERIFIED = "billfold.users.contact.verified"


def verified_contact_hashes(rt: P2PRuntime, party: users.Party) -> list[bytes]:
    """The keyed hashes of the party's verified e-mail and phone: what waits for them is
    filed under these."""
    contacts = (("email", party.verified_email), ("phone", party.verified_phone))
    return [rt.contact_hash(kind, value) for kind, value in contacts if value]


async def verified_owner(
    conn: AsyncConnection, subject_id: str, invitee: Any
) -> users.Party | None:
    """The active user who has the invitee's contact (`{"email": …}` or `{"phone": …}`, as an
    event carries it) verified; None if nobody has, or it is only registered unverified."""
    if not isinstance(invitee, dict) or len(invitee) != 1:
        return None
    ((kind, value),) = invitee.items()
    if kind not in CONTACT_KINDS or not isinstance(value, str):
        return None
    _, found = await users.find_counterparty(conn, subject_id, kind, value)
    if found is None or not found.active:
        return None
    verified = found.verified_email if kind == "email" else found.verified_phone
    return found if verified == value else None


async def claim_for_user(conn: AsyncConnection, rt: P2PRuntime, user_id: str) -> list[Row[Any]]:
    """Move every transfer waiting for one of the user's verified contacts from escrow to
    their wallet (see `claim_for`). Returns the claimed transfers (none: nothing was waiting,
    or the user is not active)."""
    party = await users.get_party(conn, user_id)
    return await claim_for(conn, rt, party) if party is not None else []


async def claim_for(conn: AsyncConnection, rt: P2PRuntime, party: users.Party) -> list[Row[Any]]:
    """Move every transfer waiting for one of the party's verified contacts from escrow to
    their wallet, each as its own posting (kind `p2p_claim`, reference the transfer id), and
    complete it. Returns the claimed transfers (none: nothing was waiting, or the party is not
    active). A sender never claims their own transfer."""
    if not party.active:
        return []
    hashes = verified_contact_hashes(rt, party)
    claimed = []
    # Every row is locked before the first posting: a concurrent cancel (which locks its row,
    # then the escrow) is never waited on while this transaction holds the escrow.
    rows = await store.lock_unclaimed(conn, hashes, party.user_id)
    # Posted currency by currency: each posting locks that currency's escrow, shared by every
    # claim, so all claims take the escrows in one order. In id order, one claim holding the USD
    # escrow waited for the EUR one while another held EUR and waited for USD (a deadlock).
    for row in sorted(rows, key=lambda r: (r.currency, r.id)):
        posting = await ledger.move(
            conn,
            Money(row.amount, row.currency),
            debit=transfers.ESCROW,
            credit=transfers.wallet(party.user_id),
            kind=transfers.POSTING_CLAIM,
            reference=row.id,
            memo=row.note,
        )
        updated = await store.set_status(
            conn,
            row.id,
            "completed",
            recipient_id=party.user_id,
            recipient_name=party.name,
            posting_id=posting.id,
        )
        await transfers.publish(conn, updated, claimed=True)
        claimed.append(updated)
    if claimed:
        log.info("transfers claimed", user_id=party.user_id, count=len(claimed))
    return sorted(claimed, key=lambda r: r.id)  # oldest first, as they were locked


async def expire_claims(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Return unclaimed transfers past their deadline to their senders (worker job).

    One transaction per transfer, each taking the next due row that no other worker holds
    (`FOR UPDATE SKIP LOCKED`): two workers share the work and never return one twice, and a
    transfer whose return fails is logged and skipped without holding up the rest."""
    expired = 0
    failed: list[str] = []
    for _ in range(batch):
        current: str | None = None
        try:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                row = await store.lock_next_expired_claim(conn, failed)
                if row is None:
                    break
                current = row.id
                posting_id = await transfers.return_to_sender(conn, row)
                updated = await store.set_status(conn, row.id, "expired", posting_id=posting_id)
                await transfers.publish(conn, updated)
            expired += 1
        except Exception:
            if current is None:  # could not even look: the database is the problem, stop here
                raise
            log.exception("could not return an unclaimed transfer; will retry", transfer=current)
            failed.append(current)
    return expired


def contact_consumer(
    name: str,
    addressed: str,
    subject_field: str,
    serve: Callable[[AsyncConnection, users.Party], Awaitable[object]],
) -> Consumer:
    """A consumer that hands what waits for a contact to its verified owner (`serve`): when a
    user verifies one (`CONTACT_VERIFIED`), and when something new is addressed to a contact
    that someone already has verified (the `addressed` event: its `invitee`, looked up with
    its sender or requester, `subject_field`, as the subject: one query for both)."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event["type"] == CONTACT_VERIFIED:
            user_id = data.get("user_id")
            owner = await users.get_party(conn, user_id) if isinstance(user_id, str) else None
        else:
            owner = await verified_owner(conn, data.get(subject_field, ""), data.get("invitee"))
        if owner is not None:
            await serve(conn, owner)

    return Consumer(name, frozenset({CONTACT_VERIFIED, addressed}), handle)


def consumers(rt: P2PRuntime) -> list[Consumer]:
    """The event consumer that claims transfers for the owners of verified contacts."""
    return [
        contact_consumer(
            "p2p.claim-transfers",
            events.TRANSFER_PENDING_CLAIM,
            "sender_id",
            lambda conn, owner: claim_for(conn, rt, owner),
        )
    ]
