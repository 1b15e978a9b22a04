"""Events the vault publishes (`billfold.vault.*`). Never a PAN or a DPAN in `data`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, record_event

SOURCE = "/billfold/vault"

TOKEN_ISSUED = "billfold.vault.token.issued"
TOKEN_SUSPENDED = "billfold.vault.token.suspended"
TOKEN_RESUMED = "billfold.vault.token.resumed"
TOKEN_DELETED = "billfold.vault.token.deleted"
# The card behind the token was reissued (new PAN and/or expiry); the token itself is unchanged.
TOKEN_UPDATED = "billfold.vault.token.updated"
CARD_UPDATED = "billfold.vault.card.updated"
CARD_DELETED = "billfold.vault.card.deleted"


async def publish(
    conn: AsyncConnection, type_: str, subject: str, data: dict[str, Any], *, card_id: str
) -> Event:
    """Write an event in the caller's transaction. Every vault event of a card (its own and its
    tokens') shares the card as aggregate, so they are delivered in the order they happened."""
    return await record_event(
        conn, Event(type=type_, source=SOURCE, subject=subject, aggregate_id=card_id, data=data)
    )
