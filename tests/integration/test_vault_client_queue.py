"""`HttpVault` under many concurrent calls: they queue in the client, none fails for waiting.

At 500 payments in flight the network simulator asks the vault for hundreds of verifications at
once; a call that waits for a connection of the client's own pool is our backlog, not the
vault being unavailable.
"""

from __future__ import annotations

import asyncio

import httpx

from billfold.vault import TokenDomain
from billfold.vault.models import CardInput
from tests.integration.vault_support import (
    VaultProcess,
    http_vault,
    new_owner,
    new_pan,
    vault_process,
)

__all__ = ["vault_process"]  # the module-scoped vault process fixture


async def test_two_hundred_calls_at_once_on_two_connections_all_answer(
    vault_process: VaultProcess,
) -> None:
    # Two connections, and a pool wait of 50 ms that two hundred calls cannot all meet.
    client = http_vault(
        vault_process,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        timeout=httpx.Timeout(10.0, connect=2.0, pool=0.05),
    )
    try:
        card = await client.vault_card(
            CardInput(pan=new_pan(), expiry_month=12, expiry_year=2031, cardholder_name="Q"),
            owner_id=new_owner(),
        )
        token = await client.issue_token(card.card_id, domain=TokenDomain())
        answers = await asyncio.gather(
            *(client.get_token(token.token_id) for _ in range(200)), return_exceptions=True
        )
    finally:
        await client.aclose()
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, f"{len(failures)} calls failed, e.g. {failures[0]!r}"
    assert {a.token_id for a in answers if not isinstance(a, BaseException)} == {token.token_id}
