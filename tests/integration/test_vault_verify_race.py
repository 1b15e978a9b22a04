"""A cryptogram's verification reads the token and accepts its ATC in two statements without a
transaction around them (the payment hot path): a suspension or deletion committed between the
two must still refuse it. Raced for real: the status change holds the token's row lock while the
verification reads the still-active row, then commits while its ATC update waits on that lock."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from billfold.vault import CardInput, LocalVault, TokenDomain
from tests.integration.payments_support import eventually
from tests.integration.vault_support import (
    atc_acceptance_waits_on_a_lock,
    new_owner,
    new_pan,
    purchase,
    sql,
)


@pytest.mark.parametrize("status", ["suspended", "deleted"])
async def test_a_token_suspended_or_deleted_during_verification_does_not_verify(
    local_vault: LocalVault, status: str
) -> None:
    card = await local_vault.vault_card(CardInput(new_pan(), 12, 2030), owner_id=new_owner())
    token = await local_vault.issue_token(card.card_id, domain=TokenDomain())
    request = purchase(token.token_id)
    cryptogram = await local_vault.cryptogram(request)

    async with local_vault.engine.connect() as other:
        change = await other.begin()
        await other.execute(
            # What the vault's own status change writes (store._SET_STATUS).
            text(
                "UPDATE vault.tokens SET status = :status, updated_at = now(), "
                "deleted_at = CASE WHEN :status = 'deleted' THEN now() END WHERE id = :id"
            ),
            {"status": status, "id": token.token_id},
        )
        verification = asyncio.create_task(local_vault.verify_cryptogram(cryptogram, request))
        try:
            # The verification read the token (still active: the change is not committed) and
            # checked the cryptogram; its ATC update now waits for the change to commit.
            await eventually(lambda: atc_acceptance_waits_on_a_lock(local_vault), within=10)
            assert not verification.done()
        finally:
            await change.commit()
    assert await verification is False
    [row] = await sql(
        local_vault,
        "SELECT status, last_verified_atc FROM vault.tokens WHERE id = :id",
        id=token.token_id,
    )
    assert row == {"status": status, "last_verified_atc": 0}  # the ATC was not used
