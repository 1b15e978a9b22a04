"""The payment network over real TCP: billfold's ISO 8583 client (`Iso8583Network`) against the
network simulator, whose issuer side asks the real Token Vault (SoftHSM2) to verify cryptograms.

Approvals and every decline code, cryptogram failures and replayed ATCs, timeouts that end in a
0420 reversal (no money left held), 200 messages in flight on one connection matched by STAN and
RRN, the circuit breaker opening and closing, stand-in, and malformed frames.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from dataclasses import replace
from typing import Any

import pytest

from billfold.app import VaultTokenService
from billfold.network import (
    NO_ANSWER,
    TEST_CARD_RULES,
    Authorization,
    Iso8583Network,
    Merchant,
    NetworkClientConfig,
    NetworkSimulator,
    NetworkTimeout,
    NetworkUnavailable,
    TokenisedCard,
    wire,
)
from billfold.vault import CardInput, LocalVault, TokenDomain
from tests.conftest import free_port
from tests.integration.payment_methods_support import new_pan
from tests.integration.vault_support import new_owner, purchase

pytestmark = pytest.mark.usefixtures("hsm")

SHOP = Merchant(
    id="mch_coffee", name="Blue Bottle Coffee", mcc="5814", country="US", city="Oakland"
)


class Card:
    def __init__(self, pan: str, expiry_month: int = 12, expiry_year: int = 2031) -> None:
        self.pan, self.expiry_month, self.expiry_year = pan, expiry_month, expiry_year


def client_for(
    simulator: NetworkSimulator | None = None, port: int = 0, **config: Any
) -> Iso8583Network:
    if simulator is not None:
        port = int(simulator.address.rsplit(":", 1)[1])
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "timeout": 2.0}
    values.update(config)
    return Iso8583Network(NetworkClientConfig(**values))


async def token_card(
    vault: LocalVault, *, suffix: str = "", amount: int = 1234, expiry_year: int = 2031
) -> tuple[TokenisedCard, str]:
    """A vaulted card (ending in `suffix`), a token for it and a fresh cryptogram for `amount`:
    what a payment sends the network. Returns the tokenised card and the vault's card id."""
    pan = new_pan(suffix=suffix) if suffix else new_pan()
    vaulted = await vault.vault_card(CardInput(pan, 12, expiry_year), owner_id=new_owner())
    token = await vault.issue_token(vaulted.card_id, domain=TokenDomain())
    return await cryptogram(vault, token.token_id, amount), vaulted.card_id


async def cryptogram(vault: LocalVault, token_id: str, amount: int) -> TokenisedCard:
    request = purchase(token_id, amount=amount, channel="ecommerce")
    c = await vault.cryptogram(request)
    return TokenisedCard(
        dpan=c.dpan,
        expiry_month=c.expiry_month,
        expiry_year=c.expiry_year,
        arqc=c.arqc,
        atc=c.atc,
        unpredictable_number=request.unpredictable_number,
        issuer_application_data=c.issuer_application_data,
        dynamic_cvv=c.dynamic_cvv,
        cryptogram_version=c.cryptogram_version,
        transaction_date=request.transaction_date,
        country_numeric=request.country_numeric,
    )


async def authorize(net: Iso8583Network, card: TokenisedCard, amount: int = 1234) -> Authorization:
    return await net.authorize(
        card,
        amount=amount,
        currency="USD",
        merchant=SHOP,
        channel="ecommerce",
        transaction_id="txn_" + secrets.token_hex(8),
    )


@pytest.fixture
async def net(network_simulator: NetworkSimulator) -> Any:
    client = client_for(network_simulator)
    yield client
    await client.aclose()


# --- cards in clear: account verification and top-up charges ---------------------------------


async def test_verification_and_charges_follow_the_test_card_rules(net: Iso8583Network) -> None:
    async def verify(pan: str, cvv: str = "123", **kw: int) -> str:
        return (await net.verify_account(Card(pan, **kw), cvv)).response_code

    async def charge(pan: str) -> str:
        result = await net.charge(Card(pan), amount=100, currency="USD", reference="top_x")
        return result.response_code

    ok = new_pan()
    assert await verify(ok) == "00" and await charge(ok) == "00"
    assert await verify(ok, "000") == "N7"
    bad = ok[:-1] + str((int(ok[-1]) + 1) % 10)
    assert await verify(bad) == "14" and await charge(bad) == "14"
    assert await verify(ok, expiry_year=2020) == "54"
    for suffix, (on_verify, on_charge) in TEST_CARD_RULES.items():
        pan = "400000000000" + suffix  # the processors' well-known test cards
        assert (await verify(pan), await charge(pan)) == (on_verify, on_charge), suffix
    approved = await net.charge(Card(ok), amount=1, currency="USD", reference="top_y")
    assert approved.approved and len(approved.authorization_code or "") == 6
    verification = await net.verify_account(Card(ok), "123")
    assert verification.cvv_result == "M" and len(verification.network_reference) == 12


# --- tokenised authorizations -------------------------------------------------------------------


async def test_an_approved_authorization_holds_then_completes_then_refunds(
    net: Iso8583Network, network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    card, card_id = await token_card(local_vault, amount=5000)
    auth = await authorize(net, card, 5000)
    assert auth.approved and auth.ok and auth.response_code == "00" and not auth.stand_in
    assert auth.auth_code and len(auth.auth_code) == 6 and len(auth.rrn) == 12
    assert network_simulator.held(card_id) == 5000
    (seen,) = [s for s in network_simulator.messages("0100") if s.rrn == auth.rrn]
    assert seen.response_code == "00" and seen.private["CH"] == "ecommerce"

    await net.complete(auth, amount=3000, final=True)  # a partial, final capture
    assert network_simulator.held(card_id) == 0
    assert network_simulator.posted(card_id) == 3000

    refund = await net.refund(auth, card, amount=1000, refund_id="ref_1")
    assert refund.approved and network_simulator.posted(card_id) == 2000
    again = await net.refund(auth, card, amount=1000, refund_id="ref_1")  # asked again
    assert again.approved and network_simulator.posted(card_id) == 2000
    too_much = await net.refund(auth, None, amount=2500, refund_id="ref_2")
    assert too_much.response_code == "12" and network_simulator.posted(card_id) == 2000


async def test_incremental_authorization_and_partial_reversal(
    net: Iso8583Network, network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    card, card_id = await token_card(local_vault, amount=2000)
    auth = await authorize(net, card, 2000)
    more = await cryptogram(
        local_vault, (await local_vault.token_by_dpan(card.dpan)).token.token_id, 500
    )  # type: ignore[union-attr]
    tip = await net.increment(auth, more, amount=500, merchant=SHOP, transaction_id="txn_tip")
    assert tip.approved and network_simulator.held(card_id) == 2500
    await net.reverse(auth, amount=700, reason="void")
    assert network_simulator.held(card_id) == 1800
    await net.reverse(auth, amount=1800, reason="expiry")
    assert network_simulator.held(card_id) == 0


@pytest.mark.parametrize(
    ("suffix", "code"),
    [
        ("0002", "05"),
        ("0069", "54"),
        ("9987", "41"),
        ("9979", "43"),
        ("0119", "91"),
        ("9995", "51"),
    ],
)
async def test_each_test_card_declines_with_its_code(
    net: Iso8583Network,
    network_simulator: NetworkSimulator,
    local_vault: LocalVault,
    suffix: str,
    code: str,
) -> None:
    card, card_id = await token_card(local_vault, suffix=suffix)
    auth = await authorize(net, card)
    assert (auth.response_code, auth.approved, auth.auth_code) == (code, False, None)
    assert auth.reason
    assert network_simulator.held(card_id) == 0


async def test_insufficient_funds_follow_the_cards_balance(
    net: Iso8583Network, network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    balance = network_simulator.config.card_balance
    card, card_id = await token_card(local_vault, amount=balance + 1)
    declined = await authorize(net, card, balance + 1)
    assert declined.response_code == "51" and declined.reason == "Not enough money on the card"
    token_id = (await local_vault.token_by_dpan(card.dpan)).token.token_id  # type: ignore[union-attr]
    first = await authorize(
        net, await cryptogram(local_vault, token_id, balance - 100), balance - 100
    )
    assert first.approved
    second = await authorize(net, await cryptogram(local_vault, token_id, 200), 200)
    assert second.response_code == "51"
    await net.reverse(first, amount=balance - 100, reason="void")
    third = await authorize(net, await cryptogram(local_vault, token_id, 200), 200)
    assert third.approved and network_simulator.held(card_id) == 200


async def test_unknown_suspended_and_expired_tokens(
    net: Iso8583Network, local_vault: LocalVault
) -> None:
    card, _ = await token_card(local_vault)
    unknown = replace(card, dpan=new_pan(prefix="489537"))
    assert (await authorize(net, unknown)).response_code == "14"

    token = await local_vault.token_by_dpan(card.dpan)
    assert token is not None
    await local_vault.suspend_token(token.token.token_id, reason="lost phone")
    assert (await authorize(net, card)).response_code == "62"


async def test_a_bad_cryptogram_or_dynamic_cvv_is_82(
    net: Iso8583Network, network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    card, card_id = await token_card(local_vault)
    wrong_arqc = replace(card, arqc=("0" if card.arqc[0] != "0" else "1") + card.arqc[1:])
    assert (await authorize(net, wrong_arqc)).response_code == "82"
    token_id = (await local_vault.token_by_dpan(card.dpan)).token.token_id  # type: ignore[union-attr]
    fresh = await cryptogram(local_vault, token_id, 1234)
    wrong_cvv = replace(fresh, dynamic_cvv=f"{(int(fresh.dynamic_cvv) + 1) % 1000:03d}")
    assert (await authorize(net, wrong_cvv)).response_code == "82"
    other = await cryptogram(local_vault, token_id, 1234)
    # The cryptogram covers the amount: the same one for another amount does not verify.
    assert (await authorize(net, other, 9999)).response_code == "82"
    assert network_simulator.held(card_id) == 0


async def test_a_replayed_atc_is_refused(
    net: Iso8583Network, network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    card, card_id = await token_card(local_vault)
    assert (await authorize(net, card)).approved
    replay = await authorize(net, card)
    assert replay.response_code == "82" and not replay.approved
    assert network_simulator.held(card_id) == 1234


# --- timeouts, reversals ----------------------------------------------------------------------


async def test_a_timeout_is_reversed_with_0420_and_leaves_nothing_held(
    network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    amount = 777_001
    network_simulator.config.amount_rules[amount] = NO_ANSWER  # approved, answer lost
    client = client_for(network_simulator, timeout=0.3)
    try:
        card, card_id = await token_card(local_vault, amount=amount)
        with pytest.raises(NetworkTimeout):
            await authorize(client, card, amount)
        assert await client.flush(5)
        (request,) = [s for s in network_simulator.messages("0100") if s.amount == amount]
        (reversal,) = [
            s for s in network_simulator.messages("0420") if s.original_rrn == request.rrn
        ]
        assert reversal.response_code == "00" and reversal.amount == amount
        assert network_simulator.held(card_id) == 0
        assert client.breaker.state == "closed"
    finally:
        del network_simulator.config.amount_rules[amount]
        await client.aclose()


async def test_a_reversal_the_network_does_not_acknowledge_is_repeated_as_0421(
    network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    client = client_for(network_simulator, timeout=0.3, advice_retry_initial=0.05)
    try:
        card, card_id = await token_card(local_vault)
        auth = await authorize(client, card)
        network_simulator.paused = True  # receives, never answers
        await client.reverse(auth, amount=auth.amount, reason="void")
        assert client.pending_advices == 1
        network_simulator.paused = False
        assert await client.flush(10)
        repeats = [s for s in network_simulator.messages() if s.original_rrn == auth.rrn]
        mtis = [s.mti for s in repeats]
        assert mtis[0] == "0420" and "0421" in mtis
        assert network_simulator.held(card_id) == 0  # applied once, however often it came
    finally:
        network_simulator.paused = False
        await client.aclose()


async def test_an_increment_that_times_out_releases_only_itself(
    network_simulator: NetworkSimulator, local_vault: LocalVault
) -> None:
    amount = 777_003
    network_simulator.config.amount_rules[amount] = NO_ANSWER
    client = client_for(network_simulator, timeout=0.3)
    try:
        card, card_id = await token_card(local_vault, amount=1000)
        auth = await authorize(client, card, 1000)
        found = await local_vault.token_by_dpan(card.dpan)
        assert found is not None
        more = await cryptogram(local_vault, found.token.token_id, amount)
        with pytest.raises(NetworkTimeout):
            await client.increment(auth, more, amount=amount, merchant=SHOP, transaction_id="t")
        assert await client.flush(5)
        assert network_simulator.held(card_id) == 1000  # the original hold stays
    finally:
        del network_simulator.config.amount_rules[amount]
        await client.aclose()


async def test_a_top_up_charge_that_times_out_is_reversed(
    network_simulator: NetworkSimulator,
) -> None:
    amount = 777_002
    network_simulator.config.amount_rules[amount] = NO_ANSWER
    client = client_for(network_simulator, timeout=0.3)
    pan = new_pan()
    try:
        with pytest.raises(NetworkTimeout):
            await client.charge(Card(pan), amount=amount, currency="USD", reference="top_t")
        assert await client.flush(5)
        (request,) = [s for s in network_simulator.messages("0200") if s.amount == amount]
        assert [s.mti for s in network_simulator.messages() if s.original_rrn == request.rrn] == [
            "0420"
        ]
        # The issuer had charged the card; the reversal gave it back.
        assert network_simulator.posted(network_simulator.pan_key(pan)) == 0
    finally:
        del network_simulator.config.amount_rules[amount]
        await client.aclose()


# --- many messages on one connection --------------------------------------------------------


async def test_200_messages_in_flight_on_one_connection_get_their_own_answers(
    network_simulator: NetworkSimulator,
) -> None:
    client = client_for(network_simulator, pool_size=1, timeout=5)
    network_simulator.config.latency_ms, network_simulator.config.jitter_ms = 150, 150
    try:
        pans = [new_pan(suffix="0002") if i % 3 == 0 else new_pan() for i in range(200)]
        amounts = [random.randint(1, 5000) for _ in pans]
        results = await asyncio.gather(
            *(
                client.charge(Card(p), amount=a, currency="USD", reference=f"top_{i}")
                for i, (p, a) in enumerate(zip(pans, amounts, strict=True))
            )
        )
        for pan, result in zip(pans, results, strict=True):
            assert result.response_code == ("05" if pan.endswith("0002") else "00")
        seen = {s.rrn: s for s in network_simulator.messages("0200")}
        for amount, result in zip(amounts, results, strict=True):
            assert seen[result.network_reference].amount == amount  # its own answer
        assert len([c for c in client._slots if c is not None]) == 1
    finally:
        network_simulator.config.latency_ms = network_simulator.config.jitter_ms = 0
        await client.aclose()


# --- the circuit breaker and stand-in --------------------------------------------------------


async def test_the_breaker_opens_on_failures_and_closes_after_a_probe(
    local_vault: LocalVault,
) -> None:
    port = free_port()  # nobody listens yet: connections are refused
    client = client_for(port=port, breaker_failures=3, breaker_reset=0.5, timeout=0.5)
    simulator = NetworkSimulator(VaultTokenService(local_vault))
    try:
        for _ in range(3):
            with pytest.raises(NetworkUnavailable):
                await client.verify_account(Card(new_pan()), "123")
        assert client.breaker.state == "open"
        await simulator.start("127.0.0.1", port)
        # Open: refused at once without trying the (now healthy) network.
        with pytest.raises(NetworkUnavailable):
            await client.verify_account(Card(new_pan()), "123")
        assert simulator.messages() == []
        await asyncio.sleep(0.6)
        result = await client.verify_account(Card(new_pan()), "123")  # after an echo probe
        assert result.approved and client.breaker.state == "closed"
        assert [s.mti for s in simulator.messages()] == ["0800", "0100"]
    finally:
        await client.aclose()
        await simulator.stop()


async def test_the_breaker_opens_on_timeouts(local_vault: LocalVault) -> None:
    simulator = NetworkSimulator(VaultTokenService(local_vault))
    await simulator.start()
    client = client_for(simulator, breaker_failures=2, breaker_reset=30, timeout=0.2)
    try:
        simulator.paused = True
        for _ in range(2):
            with pytest.raises(NetworkTimeout):
                await client.verify_account(Card(new_pan()), "123")
        assert client.breaker.state == "open"
        with pytest.raises(NetworkUnavailable):
            await client.verify_account(Card(new_pan()), "123")
    finally:
        await client.aclose()
        await simulator.stop()


async def test_stand_in_approves_under_the_floor_limit_and_advises_later(
    local_vault: LocalVault,
) -> None:
    port = free_port()
    client = client_for(
        port=port,
        breaker_failures=1,
        breaker_reset=0.3,
        stand_in_floor_limit=1000,
        advice_retry_initial=0.1,
    )
    simulator = NetworkSimulator(VaultTokenService(local_vault))
    try:
        card, card_id = await token_card(local_vault, amount=600)
        small = await authorize(client, card, 600)
        assert small.approved and small.stand_in and (small.auth_code or "").startswith("S")
        over = await authorize(client, replace(card, atc=card.atc + 1), 600)  # 1200 > 1000
        assert (over.response_code, over.stand_in, over.approved) == ("91", True, False)
        assert over.reason == "Your card issuer could not be reached; try again later"
        with pytest.raises(NetworkUnavailable):  # no stand-in for anything but authorizations
            await client.verify_account(Card(new_pan()), "123")
        assert client.pending_advices == 1
        await simulator.start("127.0.0.1", port)
        assert await client.flush(10)
        (advice,) = [s for s in simulator.messages() if s.mti in ("0120", "0121")]
        assert advice.rrn == small.rrn and simulator.held(card_id) == 600
    finally:
        await client.aclose()
        await simulator.stop()


# --- the wire ---------------------------------------------------------------------------------


async def test_malformed_frames_do_not_kill_the_server(network_simulator: NetworkSimulator) -> None:
    host, port = network_simulator.address.rsplit(":", 1)
    echo = wire.encode(
        {"t": "0800", "7": "0101000000", "11": "000042", "37": "ABCDEF123456", "70": "301"}
    )

    reader, writer = await asyncio.open_connection(host, int(port))
    garbage = b"\x00\x05hello"  # a frame whose body is not ISO 8583
    writer.write(garbage + echo)
    await writer.drain()
    answer = wire.decode(await wire.read_frame(reader))
    assert (answer["t"], answer["39"], answer["11"]) == ("0810", "00", "000042")
    writer.write(b"\xff\xff")  # an impossible length: this connection is dropped…
    await writer.drain()
    assert await reader.read() == b""
    writer.close()

    reader, writer = await asyncio.open_connection(host, int(port))  # …the server lives on
    writer.write(echo)
    await writer.drain()
    assert wire.decode(await wire.read_frame(reader))["39"] == "00"
    writer.close()
    assert network_simulator.malformed >= 2


def test_field_55_is_ber_tlv_and_messages_round_trip() -> None:
    tlv = wire.encode_tlv(
        {"9F26": bytes(8), "82": b"\x19\x80", "9F10": bytes.fromhex("06011203A00000")}
    )
    assert tlv.hex().upper().startswith("9F260800000000000000008202198")
    assert wire.decode_tlv(tlv) == {
        "9F26": bytes(8),
        "82": b"\x19\x80",
        "9F10": bytes.fromhex("06011203A00000"),
    }
    message = {
        "t": "0100",
        "2": "4895370000000001",
        "4": wire.n12(1234),
        "11": "000001",
        "37": "612300000001",
        "55": tlv.hex().upper(),
        "48": wire.encode_private({"CH": "in_app"}),
    }
    framed = wire.encode(message)
    assert int.from_bytes(framed[:2], "big") == len(framed) - 2
    decoded = wire.decode(framed[2:])
    assert decoded == message
    assert wire.decode_private(decoded["48"]) == {"CH": "in_app"}
    assert wire.response_mti("0100") == "0110" and wire.response_mti("0421") == "0430"
    with pytest.raises(wire.WireError):
        wire.decode(b"0100garbage")
