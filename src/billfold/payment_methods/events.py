"""Events the Payment Method Service publishes (`billfold.payment_methods.*`), and the one it
consumes (`billfold.vault.card.updated`, see `service.card_updated`).

None carries a card number, CVV or account number: a method is named by its id, type, brand and
last four digits."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/payment_methods"

ADDED = "billfold.payment_methods.added"
VERIFIED = "billfold.payment_methods.verified"
VERIFICATION_FAILED = "billfold.payment_methods.verification_failed"
MICRO_DEPOSITS_SENT = "billfold.payment_methods.micro_deposits_sent"
REMOVED = "billfold.payment_methods.removed"
DEFAULT_CHANGED = "billfold.payment_methods.default_changed"
UPDATED = "billfold.payment_methods.updated"
TOPUP_COMPLETED = "billfold.payment_methods.topup.completed"
WITHDRAWAL_COMPLETED = "billfold.payment_methods.withdrawal.completed"

# Consumed: a reissued card (new number and/or expiry) in the vault. By its type string: the
# vault's public face exports no event names, and the envelope is the contract.
VAULT_CARD_UPDATED = "billfold.vault.card.updated"


async def publish(
    conn: AsyncConnection, type_: str, subject: str, user_id: str, data: dict[str, Any]
) -> Event:
    """Record an event in the caller's transaction; a user's events stay in order (the user is
    the aggregate), so "default changed" never overtakes the "verified" that caused it."""
    return await record_event(
        conn,
        Event(
            type=type_,
            source=SOURCE,
            subject=subject,
            aggregate_id=user_id,
            data={"user_id": user_id, **data},
        ),
    )
