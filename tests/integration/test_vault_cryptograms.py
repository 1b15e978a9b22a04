"""EMV payment tokens and their cryptograms: verified by an independent EMV implementation
(pyemv) from the issuer master key, ATCs that only go up, replays refused, domains enforced."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date

import pyemv
import pytest

from billfold.config import Settings
from billfold.vault import (
    CardInput,
    Cryptogram,
    LocalVault,
    PaymentToken,
    TokenDomain,
    TokenDomainViolation,
    TokenNotActive,
    VaultClient,
)
from billfold.vault.emv import CRYPTOGRAM_VERSION, luhn_valid
from tests.integration.vault_support import new_owner, new_pan, purchase, sql, sql_exec

# pyemv hands 16-byte keys to cryptography's TripleDES, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


async def _token(vault: VaultClient, domain: TokenDomain | None = None) -> PaymentToken:
    card = await vault.vault_card(CardInput(new_pan(), 12, 2030), owner_id=new_owner())
    return await vault.issue_token(card.card_id, domain=domain or TokenDomain())


def pyemv_arqc(imk: bytes, cryptogram: Cryptogram, request_amount: int, un: str, day: date) -> str:
    """The ARQC as pyemv computes it (Visa CVN 18) from the raw EMV tag values."""
    card = pyemv.cvn.VisaCVN18(
        iss_mk_ac=imk,
        iss_mk_smi=bytes.fromhex("11" * 16),  # secure messaging keys play no part in the AC
        iss_mk_smc=bytes.fromhex("22" * 16),
        pan=cryptogram.dpan,
        psn="00",
    )
    arqc = card.generate_ac(
        tag_9f02=bytes.fromhex(f"{request_amount:012d}"),
        tag_9f03=bytes.fromhex(f"{0:012d}"),
        tag_9f1a=bytes.fromhex("0840"),
        tag_95=bytes.fromhex("0000000000"),
        tag_5f2a=bytes.fromhex("0840"),
        tag_9a=bytes.fromhex(day.strftime("%y%m%d")),
        tag_9c=bytes.fromhex("00"),
        tag_9f37=bytes.fromhex(un),
        tag_82=bytes.fromhex(cryptogram.application_interchange_profile),
        tag_9f36=cryptogram.atc.to_bytes(2, "big"),
        tag_9f10=bytes.fromhex(cryptogram.issuer_application_data),
    )
    return arqc.hex().upper()


def pyemv_dynamic_cvv(imk: bytes, dpan: str, atc: int, un: str) -> str:
    """The dynamic CVV as pyemv's CVC3 gives it (see billfold.vault.emv for the key scheme)."""
    label = bytes.fromhex("D0" * 8)
    issuer_cvc3_key = pyemv.tools.adjust_key_parity(
        pyemv.tools.encrypt_tdes_ecb(imk, label + bytes(b ^ 0xFF for b in label))
    )
    icc_cvc3_key = pyemv.kd.derive_icc_mk_b(issuer_cvc3_key, dpan, "00")
    template = dpan + "D" + ("F" if len(dpan) % 2 == 0 else "")
    cvc3 = pyemv.cvv.generate_cvc3(
        icc_cvc3_key, bytes.fromhex(template), atc.to_bytes(2, "big"), bytes.fromhex(un)
    )
    return cvc3.zfill(5)[-3:]


async def test_cryptograms_verify_with_pyemv_given_the_issuer_master_key(
    local_vault: LocalVault, settings: Settings
) -> None:
    token = await _token(local_vault)
    imk = await local_vault.issuer_master_key(settings.token_bin)
    assert len(imk) == 16
    for amount in (1, 1234, 999_999):
        request = purchase(token.token_id, amount=amount)
        cryptogram = await local_vault.cryptogram(request)
        assert cryptogram.cryptogram_version == CRYPTOGRAM_VERSION == "visa-cvn18"
        assert cryptogram.arqc == pyemv_arqc(
            imk, cryptogram, amount, request.unpredictable_number, request.transaction_date
        )
        assert cryptogram.dynamic_cvv == pyemv_dynamic_cvv(
            imk, cryptogram.dpan, cryptogram.atc, request.unpredictable_number
        )
        # A wrong key does not reproduce it: the check can fail.
        wrong = bytes(b ^ 0x02 for b in imk)
        assert cryptogram.arqc != pyemv_arqc(
            wrong, cryptogram, amount, request.unpredictable_number, request.transaction_date
        )


async def test_the_dpan_is_luhn_valid_in_the_token_bin_and_stays_in_the_vault(
    local_vault: LocalVault, settings: Settings
) -> None:
    token = await _token(local_vault)
    cryptogram = await local_vault.cryptogram(purchase(token.token_id))
    assert cryptogram.dpan.startswith(settings.token_bin) and len(cryptogram.dpan) == 16
    assert luhn_valid(cryptogram.dpan) and cryptogram.dpan.endswith(token.dpan_last4)
    assert (cryptogram.expiry_month, cryptogram.expiry_year) == (
        token.expiry_month,
        token.expiry_year,
    )
    assert (cryptogram.token_reference_id, cryptogram.token_id) == (
        token.token_reference_id,
        token.token_id,
    )
    found = await local_vault.token_by_dpan(cryptogram.dpan)
    assert found is not None and found.token == token and found.token_bin == settings.token_bin
    assert await local_vault.token_by_dpan(new_pan()) is None
    assert await local_vault.token_by_dpan("not a pan") is None
    # Neither the DPAN nor the dynamic CVV shows in a repr (a log line, a traceback's locals).
    shown = repr(cryptogram) + str(cryptogram) + repr(found)
    assert cryptogram.dpan not in shown and f"'{cryptogram.dynamic_cvv}'" not in shown
    assert cryptogram.arqc in shown  # the repr is there, only the secrets are left out


async def test_one_issuer_master_key_per_bin_sealed_and_kept_by_each_token(
    local_vault: LocalVault, settings: Settings
) -> None:
    imk = await local_vault.issuer_master_key(settings.token_bin)
    assert await local_vault.issuer_master_key(settings.token_bin) == imk
    other = await local_vault.issuer_master_key("400000")
    assert other != imk
    rows = await sql(
        local_vault,
        "SELECT token_bin, version, key_sealed FROM vault.issuer_keys WHERE retired_at IS NULL",
    )
    assert sorted(r["token_bin"] for r in rows) == sorted({settings.token_bin, "400000"})
    for row in rows:
        assert imk not in row["key_sealed"] and other not in row["key_sealed"]
    # Each byte has odd parity, as 3DES keys should.
    assert all(bin(b).count("1") % 2 == 1 for b in imk)


async def test_the_atc_increments_on_every_cryptogram_even_concurrently(
    local_vault: LocalVault,
) -> None:
    token = await _token(local_vault)
    first = await local_vault.cryptogram(purchase(token.token_id))
    second = await local_vault.cryptogram(purchase(token.token_id))
    assert (first.atc, second.atc) == (1, 2)
    burst = await asyncio.gather(
        *(local_vault.cryptogram(purchase(token.token_id)) for _ in range(12))
    )
    assert sorted(c.atc for c in burst) == list(range(3, 15))
    assert len({c.arqc for c in [first, second, *burst]}) == 14


async def test_a_cryptogram_verifies_once_and_a_replay_is_refused_even_out_of_order(
    vault: VaultClient,
    local_vault: LocalVault,
) -> None:
    token = await _token(vault)
    r1, r2, r3 = (purchase(token.token_id, amount=a) for a in (100, 200, 300))
    c1, c2, c3 = [await vault.cryptogram(r) for r in (r1, r2, r3)]

    assert await vault.verify_cryptogram(c2, r2) is True
    assert await vault.verify_cryptogram(c2, r2) is False  # replay
    # Two payments at once reach the issuer out of order: the older, unused ATC still counts…
    assert await vault.verify_cryptogram(c1, r1) is True
    assert await vault.verify_cryptogram(c1, r1) is False  # …once
    # Altered transaction data or cryptogram: refused, and the ATC is not used up by it.
    assert await vault.verify_cryptogram(c3, replace(r3, amount=301)) is False
    assert await vault.verify_cryptogram(replace(c3, arqc="00" * 8), r3) is False
    assert await vault.verify_cryptogram(replace(c3, arqc="zz"), r3) is False
    assert await vault.verify_cryptogram(replace(c3, dpan=new_pan()), r3) is False
    assert await vault.verify_cryptogram(replace(c3, atc=c3.atc + 1), r3) is False
    wrong_cvv = f"{(int(c3.dynamic_cvv) + 1) % 1000:03d}"
    assert await vault.verify_cryptogram(replace(c3, dynamic_cvv=wrong_cvv), r3) is False
    assert await vault.verify_cryptogram(replace(c3, dynamic_cvv="12a"), r3) is False
    assert (
        await vault.verify_cryptogram(replace(c3, issuer_application_data="06011203A00001"), r3)
        is False
    )
    assert await vault.verify_cryptogram(replace(c3, cryptogram_version="x"), r3) is False
    assert await vault.verify_cryptogram(c3, r3) is True
    [row] = await sql(
        local_vault,
        "SELECT atc, last_verified_atc FROM vault.tokens WHERE id = :id",
        id=token.token_id,
    )
    assert row == {"atc": 3, "last_verified_atc": 3}


async def test_an_atc_further_back_than_the_window_is_refused(vault: VaultClient) -> None:
    from billfold.vault.store import ATC_WINDOW

    token = await _token(vault)
    requests = [purchase(token.token_id, amount=a) for a in range(1, ATC_WINDOW + 2)]
    made = [await vault.cryptogram(r) for r in requests]
    oldest, inside, newest = made[0], made[1], made[-1]
    assert await vault.verify_cryptogram(newest, requests[-1]) is True
    # 64 below the newest: just outside the window, refused; 63 below: inside, accepted once.
    assert (newest.atc - oldest.atc, newest.atc - inside.atc) == (ATC_WINDOW, ATC_WINDOW - 1)
    assert await vault.verify_cryptogram(oldest, requests[0]) is False
    assert await vault.verify_cryptogram(inside, requests[1]) is True
    assert await vault.verify_cryptogram(inside, requests[1]) is False


async def test_two_verifications_of_one_cryptogram_at_once_accept_it_once(
    vault: VaultClient,
) -> None:
    token = await _token(vault)
    request = purchase(token.token_id)
    cryptogram = await vault.cryptogram(request)
    results = await asyncio.gather(
        *(vault.verify_cryptogram(cryptogram, request) for _ in range(6))
    )
    assert sorted(results) == [False] * 5 + [True]


async def test_a_token_is_used_only_within_its_domain(
    vault: VaultClient,
) -> None:
    token = await _token(
        vault,
        TokenDomain(device_id="dev_a", channels=("contactless", "in_app"), merchant_id="mrc_1"),
    )
    ok = purchase(token.token_id, channel="in_app", device_id="dev_a", merchant_id="mrc_1")
    for bad in (
        replace(ok, device_id="dev_b"),
        replace(ok, device_id=None),
        replace(ok, channel="ecommerce"),
        replace(ok, merchant_id="mrc_2"),
        replace(ok, merchant_id=None),
    ):
        with pytest.raises(TokenDomainViolation):
            await vault.cryptogram(bad)
    # Refusals consume no ATC; a cryptogram made in-domain fails verification out of domain.
    cryptogram = await vault.cryptogram(ok)
    assert cryptogram.atc == 1
    assert await vault.verify_cryptogram(cryptogram, replace(ok, device_id="dev_b")) is False
    assert await vault.verify_cryptogram(cryptogram, ok) is True

    # An unrestricted token works on any device and merchant, on its channels.
    free = await _token(vault, TokenDomain(channels=("ecommerce",)))
    await vault.cryptogram(purchase(free.token_id, device_id="x", merchant_id="y"))
    with pytest.raises(TokenDomainViolation):
        await vault.cryptogram(purchase(free.token_id, channel="contactless"))


async def test_only_active_unexpired_tokens_make_or_pass_cryptograms(
    vault: VaultClient,
    local_vault: LocalVault,
) -> None:
    token = await _token(vault)
    request = purchase(token.token_id)
    cryptogram = await vault.cryptogram(request)
    await vault.suspend_token(token.token_id, reason="fraud check")
    with pytest.raises(TokenNotActive):
        await vault.cryptogram(purchase(token.token_id))
    assert await vault.verify_cryptogram(cryptogram, request) is False
    await vault.resume_token(token.token_id, reason="cleared")
    assert await vault.verify_cryptogram(cryptogram, request) is True

    await sql_exec(
        local_vault,
        "UPDATE vault.tokens SET expiry_month = 1, expiry_year = 2020 WHERE id = :id",
        id=token.token_id,
    )
    with pytest.raises(TokenNotActive):
        await vault.cryptogram(purchase(token.token_id))

    gone = await _token(vault)
    await vault.delete_token(gone.token_id, reason="removed")
    with pytest.raises(TokenNotActive):
        await vault.cryptogram(purchase(gone.token_id))


async def test_the_atc_never_wraps(local_vault: LocalVault) -> None:
    token = await _token(local_vault)
    await sql_exec(
        local_vault, "UPDATE vault.tokens SET atc = 65534 WHERE id = :id", id=token.token_id
    )
    last = await local_vault.cryptogram(purchase(token.token_id))
    assert last.atc == 65535
    with pytest.raises(TokenNotActive):
        await local_vault.cryptogram(purchase(token.token_id))


@pytest.mark.parametrize(
    "bad",
    [
        {"unpredictable_number": "XYZ"},
        {"tvr": "00"},
        {"currency_numeric": "84"},
        {"transaction_type": "purchase"},
        {"country_numeric": "USA"},
    ],
)
async def test_malformed_transaction_data_is_a_422_and_uses_no_atc(
    local_vault: LocalVault, bad: dict[str, str]
) -> None:
    from billfold.platform.errors import Unprocessable

    token = await _token(local_vault)
    with pytest.raises(Unprocessable) as refused:
        await local_vault.cryptogram(purchase(token.token_id, **bad))
    assert refused.value.code == "invalid_emv_data" and refused.value.status == 422
    assert (await local_vault.cryptogram(purchase(token.token_id))).atc == 1
    good = await local_vault.cryptogram(purchase(token.token_id))
    assert not await local_vault.verify_cryptogram(good, purchase(token.token_id, **bad))
