"""Who a transfer or money request is between: the caller and the counterparty they name, and
how that counterparty is shown afterwards (a masked contact, an @handle or a name).

Transfers name a recipient and requests a payer the same way (`Counterparty`), so both check
and show them here, alike.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import users
from billfold.gateway import Principal
from billfold.p2p.models import Counterparty, InvalidAmount, RecipientNotFound
from billfold.platform.errors import Forbidden, ProblemError


async def resolve(
    conn: AsyncConnection,
    principal: Principal,
    who: Counterparty,
    amount: int,
    *,
    action: str,
    role: str,
    to_self: ProblemError,
) -> tuple[users.Party, users.Party | None]:
    """Check a new transfer or request before anything is written: a positive `amount`, an
    active caller (refused as "cannot `action`", e.g. "send money"), and a counterparty `who`
    (the `role`, "recipient" or "payer") who is not the caller (`to_self` is that refusal).

    Returns the caller and the counterparty: the active user named by id or handle (else
    `RecipientNotFound`), or None for an e-mail/phone even when someone has it, so the answer
    never tells whether that contact belongs to a registered user."""
    if amount <= 0:
        raise InvalidAmount("The amount must be a positive number of minor units")
    caller, found = await users.find_counterparty(conn, principal.user_id, who.kind, who.value)
    if caller is None or not caller.active:
        raise Forbidden(f"This account cannot {action}", code="account_not_active")
    if found is not None and found.user_id == caller.user_id:
        raise to_self
    if who.is_contact:
        return caller, None
    if found is None or not found.active:
        raise RecipientNotFound(f"No user matches this {role}")
    return caller, found


def hint(kind: str, value: str, party: users.Party | None) -> str:
    """What is stored to show the counterparty later: an e-mail/phone masked, else the user's
    "@handle", or their name if they have no handle (`party` is the user named by id/handle)."""
    if kind == "email":
        return users.mask_email(value)
    if kind == "phone":
        return users.mask_phone(value)
    assert party is not None
    return f"@{party.handle}" if party.handle else party.name


def handle_in(hint: str, name: str | None) -> str | None:
    """The @handle a stored `hint` shows, if it is one. The hint is "@handle", or the name of a
    user without one; names are free text, so a name "@someone" must not pass for a handle."""
    return hint if hint.startswith("@") and hint != name else None
