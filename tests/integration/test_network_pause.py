"""The simulator's `paused` is a dead link: what it receives while paused is never answered,
even when the issuer's checks of it (vault calls) finish after it is un-paused. Tests that
un-pause to let the timeouts' reversals through rely on this, so a message sent during the
pause still ends as a timeout however slow the vault is at that moment."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from billfold.app import VaultTokenService
from billfold.network import NetworkSimulator, NetworkTimeout
from billfold.vault import LocalVault
from tests.integration.payments_support import eventually
from tests.integration.test_network import authorize, client_for, token_card
from tests.integration.vault_support import atc_acceptance_waits_on_a_lock

pytestmark = pytest.mark.usefixtures("hsm")


async def test_a_message_received_while_paused_is_not_answered_after_the_pause(
    local_vault: LocalVault,
) -> None:
    simulator = NetworkSimulator(VaultTokenService(local_vault))
    await simulator.start()
    client = client_for(simulator, timeout=2.0)
    card, card_id = await token_card(local_vault)
    found = await local_vault.token_by_dpan(card.dpan)
    assert found is not None
    try:
        async with local_vault.engine.connect() as other:
            # The token's row lock keeps the issuer's cryptogram check (its ATC update) waiting:
            # the authorization is received while paused and handled after the un-pause. (NO KEY:
            # the detokenisation's audit row, whose foreign key names the token, goes through.)
            lock = await other.begin()
            await other.execute(
                text("SELECT 1 FROM vault.tokens WHERE id = :id FOR NO KEY UPDATE"),
                {"id": found.token.token_id},
            )
            simulator.paused = True
            pending = asyncio.create_task(authorize(client, card))
            await eventually(lambda: atc_acceptance_waits_on_a_lock(local_vault), within=10)
            simulator.paused = False
            await lock.rollback()
        # Approved by the issuer (its check went through) in well under the client's 2 s, but
        # the answer was lost with the link: a timeout, reversed like any other.
        with pytest.raises(NetworkTimeout):
            await pending
        [request] = simulator.messages("0100")
        assert request.response_code == "00"
        assert await client.flush(5)
        assert simulator.held(card_id) == 0
    finally:
        simulator.paused = False
        await client.aclose()
        await simulator.stop()
