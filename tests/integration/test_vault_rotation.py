"""KEK rotation online: a new KEK version in the HSM and every data key re-wrapped under it while
cards are vaulted, detokenised and used for cryptograms at the same time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

from billfold.config import Settings
from billfold.platform.keys import KeyStore
from billfold.vault import CardInput, LocalVault, TokenDomain, rotate_kek
from tests.integration.vault_support import new_owner, new_pan, purchase, sql


async def test_kek_rotation_while_requests_run(
    local_vault: LocalVault, hsm: KeyStore, settings: Settings
) -> None:
    # Many data keys (one per few cards), so the rotation has real work in several batches.
    cards: list[tuple[str, str]] = []
    tokens: list[str] = []
    for _ in range(25):
        await local_vault.rotate_data_key()
        for _ in range(2):
            pan = new_pan()
            card = await local_vault.vault_card(CardInput(pan, 6, 2031), owner_id=new_owner())
            cards.append((card.card_id, pan))
        tokens.append((await local_vault.issue_token(card.card_id, domain=TokenDomain())).token_id)
    old_version = hsm.current_kek_version()
    on_old = await sql(
        local_vault,
        "SELECT count(*) AS n FROM vault.data_keys WHERE kek_version <= :v",
        v=old_version,
    )
    assert on_old[0]["n"] >= 25
    fingerprint_pan, fingerprint_owner = cards[0][1], new_owner()
    before = await local_vault.vault_card(CardInput(fingerprint_pan, 6, 2031), owner_id=new_owner())

    # A vault with a cold cache that forgets its data keys after every call: each of its reads
    # unwraps from whatever the row says at that moment (old KEK or new).
    cold = LocalVault(local_vault.engine, hsm, settings)
    done = Counter[str]()
    errors: list[BaseException] = []
    stop = asyncio.Event()
    running = asyncio.Event()  # every kind of request has completed twice (or one failed)

    async def add_card() -> None:
        pan = new_pan()
        card = await local_vault.vault_card(CardInput(pan, 7, 2031), owner_id=new_owner())
        cards.append((card.card_id, pan))

    async def detokenize_cold() -> None:
        card_id, pan = random.choice(cards)
        cold._keys.forget()
        secret = await cold.detokenize(card_id=card_id, requester="rotation-test", purpose="refund")
        assert secret.pan == pan

    async def cryptogram() -> None:
        cold._keys.forget()
        await cold.cryptogram(purchase(random.choice(tokens)))

    async def new_data_key() -> None:
        await local_vault.rotate_data_key()
        await add_card()

    async def loop(name: str, op: Callable[[], Awaitable[None]]) -> None:
        while not stop.is_set():
            try:
                await op()
                done[name] += 1
            except BaseException as exc:
                errors.append(exc)
                running.set()
                return
            if min(done[n] for n in ops) >= 2:
                running.set()
            await asyncio.sleep(0)

    ops = {
        "vault_card": add_card,
        "detokenize": detokenize_cold,
        "cryptogram": cryptogram,
        "new_data_key": new_data_key,
    }
    workers = [asyncio.create_task(loop(n, op)) for n, op in ops.items() for _ in range(2)]
    await asyncio.wait_for(running.wait(), 60)
    at_start = done.copy()
    report = await rotate_kek(local_vault.engine, hsm, batch_size=3)
    during = done - at_start
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*workers)
    await cold.aclose()

    assert not errors, errors
    assert all(during[n] > 0 for n in ops), f"the rotation did not overlap the requests: {during}"
    assert report.kek_version == old_version + 1 == hsm.current_kek_version()
    assert report.rewrapped >= on_old[0]["n"]
    assert report.data_keys_by_kek_version == {
        report.kek_version: sum(report.data_keys_by_kek_version.values())
    }
    versions = await sql(local_vault, "SELECT DISTINCT kek_version FROM vault.data_keys")
    assert versions == [{"kek_version": report.kek_version}]

    # Everything still opens, unwrapped afresh under the new KEK only.
    fresh = LocalVault(local_vault.engine, hsm, settings)
    try:
        for card_id, pan in cards:
            secret = await fresh.detokenize(
                card_id=card_id, requester="rotation-test", purpose="refund"
            )
            assert secret.pan == pan
        for token_id in tokens:
            cryptogram_ = await fresh.cryptogram(purchase(token_id))
            assert cryptogram_.atc > 0
        # Fingerprints do not depend on the KEK: the same card matches across the rotation.
        after = await fresh.vault_card(
            CardInput(fingerprint_pan, 6, 2031), owner_id=fingerprint_owner
        )
        assert after.fingerprint == before.fingerprint
    finally:
        await fresh.aclose()

    # A second rotation with nothing old left re-wraps everything once more, no more.
    again = await rotate_kek(local_vault.engine, hsm, batch_size=50)
    count = await sql(local_vault, "SELECT count(*) AS n FROM vault.data_keys")
    assert again.kek_version == report.kek_version + 1
    assert again.rewrapped == count[0]["n"]
