"""The Token Vault against SoftHSM2 (PKCS#11) and PostgreSQL: key store, cards, token
lifecycle and its events, audited detokenisation, and no PAN in clear anywhere in its tables."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from sqlalchemy.exc import DBAPIError

from billfold.config import Settings
from billfold.platform.errors import Unprocessable
from billfold.platform.keys import KeyStore, UnknownKekVersion, UnwrapFailed
from billfold.vault import (
    CardInput,
    CardNotFound,
    CardNumberTaken,
    InvalidTokenTransition,
    LocalVault,
    TokenDomain,
    TokenNotActive,
    TokenNotFound,
    VaultClient,
)
from tests.integration.vault_support import (
    events_of,
    new_owner,
    new_pan,
    purchase,
    sql,
    sql_exec,
)

# --- the key store (HSM) ----------------------------------------------------------------------


def test_wrap_unwrap_round_trip_binds_the_aad(hsm: KeyStore) -> None:
    data_key = os.urandom(32)
    version, wrapped = hsm.wrap(data_key, b"vault.data_keys:key_a")
    assert version == hsm.current_kek_version()
    assert data_key not in wrapped and len(wrapped) == 12 + 32 + 16
    assert hsm.unwrap(version, wrapped, b"vault.data_keys:key_a") == data_key
    # A fresh IV every time: the same key wraps differently.
    assert hsm.wrap(data_key, b"vault.data_keys:key_a")[1] != wrapped


@pytest.mark.parametrize("where", ["iv", "ciphertext", "tag"])
def test_a_tampered_wrapped_key_does_not_unwrap(hsm: KeyStore, where: str) -> None:
    version, wrapped = hsm.wrap(os.urandom(32), b"aad")
    index = {"iv": 3, "ciphertext": 20, "tag": len(wrapped) - 1}[where]
    tampered = bytearray(wrapped)
    tampered[index] ^= 0x01
    with pytest.raises(UnwrapFailed):
        hsm.unwrap(version, bytes(tampered), b"aad")


def test_a_wrapped_key_moved_to_another_row_or_version_does_not_unwrap(hsm: KeyStore) -> None:
    version, wrapped = hsm.wrap(os.urandom(32), b"vault.data_keys:key_a")
    with pytest.raises(UnwrapFailed):
        hsm.unwrap(version, wrapped, b"vault.data_keys:key_b")
    with pytest.raises(UnknownKekVersion):
        hsm.unwrap(version + 1000, wrapped, b"vault.data_keys:key_a")
    with pytest.raises(UnwrapFailed):
        hsm.unwrap(version, wrapped[:20], b"vault.data_keys:key_a")


def test_keks_and_the_fingerprint_key_live_in_the_hsm_sensitive_and_not_extractable(
    hsm: KeyStore,
) -> None:
    settings = Settings()
    token = pkcs11.lib(settings.hsm_module).get_token(token_label=settings.hsm_token_label)
    # PKCS#11 login is per application: this session sees the private keys of the key store's.
    session = token.open()
    try:
        keys = {
            k.label: k
            for k in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
            if k.label.startswith("billfold-")
        }
        assert "billfold-kek-v1" in keys and "billfold-fingerprint-v1" in keys
        for key in keys.values():
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.TOKEN] is True
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.VALUE]
    finally:
        # Opened without a PIN: closing it does not log the key store's session out.
        session.close()


def test_fingerprint_is_an_hmac_that_is_stable_and_distinct(hsm: KeyStore) -> None:
    a = hsm.fingerprint(b"pan:4111111111111111")
    assert len(a) == 32
    assert hsm.fingerprint(b"pan:4111111111111111") == a
    assert hsm.fingerprint(b"pan:4111111111111112") != a


def test_fingerprint_is_the_same_in_a_new_process_with_its_own_hsm_session(
    hsm: KeyStore, data_dir: Any
) -> None:
    script = (
        "import sys\n"
        "from billfold.platform.hsm import ensure_softhsm_token\n"
        "from billfold.platform.keys.pkcs11 import Pkcs11KeyStore\n"
        "from billfold.config import Settings\n"
        "s = Settings()\n"
        "t = ensure_softhsm_token(sys.argv[1], s.hsm_token_label)\n"
        "k = Pkcs11KeyStore.open(s.hsm_module, t.label, t.pin, create_keys=False)\n"
        "print(k.fingerprint(b'pan:5555555555554444').hex(), k.current_kek_version())\n"
        "k.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fingerprint, version = done.stdout.split()
    assert fingerprint == hsm.fingerprint(b"pan:5555555555554444").hex()
    assert int(version) == hsm.current_kek_version()


# --- cards ------------------------------------------------------------------------------------


async def test_vaulting_the_same_card_again_for_the_same_owner_returns_the_same_card(
    local_vault: LocalVault,
) -> None:
    owner, pan = new_owner(), new_pan()
    first = await local_vault.vault_card(CardInput(pan, 12, 2031, "Ada Lovelace"), owner_id=owner)
    again = await local_vault.vault_card(CardInput(pan, 12, 2031, "Ada Lovelace"), owner_id=owner)
    assert again == first
    assert (first.bin, first.last4) == (pan[:6], pan[-4:])
    concurrent = await asyncio.gather(
        *(local_vault.vault_card(CardInput(pan, 12, 2031), owner_id=owner) for _ in range(6))
    )
    assert {c.card_id for c in concurrent} == {first.card_id}
    rows = await sql(local_vault, "SELECT id FROM vault.cards WHERE owner_id = :o", o=owner)
    assert len(rows) == 1


async def test_the_same_card_has_the_same_fingerprint_for_every_owner(
    local_vault: LocalVault,
) -> None:
    pan = new_pan()
    a = await local_vault.vault_card(CardInput(pan, 1, 2030), owner_id=new_owner())
    b = await local_vault.vault_card(CardInput(pan, 1, 2030), owner_id=new_owner())
    other = await local_vault.vault_card(CardInput(new_pan(), 1, 2030), owner_id=new_owner())
    assert a.card_id != b.card_id
    assert a.fingerprint == b.fingerprint != other.fingerprint
    assert len(bytes.fromhex(a.fingerprint)) == 32


@pytest.mark.parametrize(
    ("pan", "month", "year"),
    [
        ("4111111111111112", 12, 2030),  # Luhn fails
        ("41111111111", 12, 2030),  # too short
        ("4111x11111111111", 12, 2030),
        ("٤١١١١١١١١١١١١١١١", 12, 2030),  # Arabic-Indic digits are digits, not ASCII
        ("4111111111111111", 13, 2030),
        ("4111111111111111", 12, 30),
    ],
)
async def test_bad_cards_are_refused(
    local_vault: LocalVault, pan: str, month: int, year: int
) -> None:
    owner = new_owner()
    with pytest.raises(Unprocessable):
        await local_vault.vault_card(CardInput(pan, month, year), owner_id=owner)
    assert await sql(local_vault, "SELECT 1 FROM vault.cards WHERE owner_id = :o", o=owner) == []


async def test_unknown_or_junk_ids_are_not_found(local_vault: LocalVault) -> None:
    for card_id in ("card_01m8pns142e19bvkygb65sm6x0", "nope", "tok_01m8pns142e19bvkygb65sm6x0"):
        with pytest.raises(CardNotFound):
            await local_vault.get_card(card_id)
        with pytest.raises(CardNotFound):
            await local_vault.issue_token(card_id, domain=TokenDomain())
    for token_id in ("tok_01m8pns142e19bvkygb65sm6x0", "x" * 500):
        with pytest.raises(TokenNotFound):
            await local_vault.get_token(token_id)
        with pytest.raises(TokenNotFound):
            await local_vault.suspend_token(token_id, reason="lost")
    assert await local_vault.list_tokens("card_01m8pns142e19bvkygb65sm6x0") == []


async def test_a_reissued_card_keeps_its_tokens(local_vault: LocalVault) -> None:
    owner, old_pan, new = new_owner(), new_pan(), new_pan()
    card = await local_vault.vault_card(CardInput(old_pan, 3, 2027, "Ada"), owner_id=owner)
    token = await local_vault.issue_token(card.card_id, domain=TokenDomain())
    first = await local_vault.cryptogram(purchase(token.token_id))

    updated = await local_vault.update_card(card.card_id, pan=new, expiry_month=9, expiry_year=2031)
    assert updated.card_id == card.card_id
    assert (updated.last4, updated.expiry_month, updated.expiry_year) == (new[-4:], 9, 2031)
    assert updated.fingerprint != card.fingerprint
    assert (await local_vault.get_token(token.token_id)) == token  # the token is untouched
    secret = await local_vault.detokenize(
        token_id=token.token_id, requester="test", purpose="authorization"
    )
    assert (secret.pan, secret.expiry_month, secret.expiry_year) == (new, 9, 2031)
    assert secret.cardholder_name == "Ada"
    after = await local_vault.cryptogram(purchase(token.token_id))
    assert (after.dpan, after.token_reference_id) == (first.dpan, first.token_reference_id)
    assert after.atc == first.atc + 1

    # Only the expiry: the PAN and the fingerprint stay.
    again = await local_vault.update_card(card.card_id, expiry_month=10)
    assert (again.fingerprint, again.expiry_month, again.expiry_year) == (
        updated.fingerprint,
        10,
        2031,
    )
    types = [e["type"] for e in await events_of(local_vault, card.card_id)]
    assert types == [
        "billfold.vault.token.issued",
        "billfold.vault.card.updated",
        "billfold.vault.token.updated",
        "billfold.vault.card.updated",
        "billfold.vault.token.updated",
    ]
    # The same owner vaulting the new number again finds the reissued card.
    assert (await local_vault.vault_card(CardInput(new, 10, 2031), owner_id=owner)) == again


async def test_a_card_cannot_take_the_number_of_another_card_of_its_owner(
    local_vault: LocalVault,
) -> None:
    owner, pan_a, pan_b = new_owner(), new_pan(), new_pan()
    await local_vault.vault_card(CardInput(pan_a, 1, 2030), owner_id=owner)
    b = await local_vault.vault_card(CardInput(pan_b, 1, 2030), owner_id=owner)
    with pytest.raises(CardNumberTaken):
        await local_vault.update_card(b.card_id, pan=pan_a)
    assert (await local_vault.get_card(b.card_id)).last4 == pan_b[-4:]
    with pytest.raises(Unprocessable):
        await local_vault.update_card(b.card_id, expiry_month=0)


async def test_deleting_a_card_wipes_its_pan_and_deletes_its_tokens(
    local_vault: LocalVault,
) -> None:
    owner, pan = new_owner(), new_pan()
    card = await local_vault.vault_card(CardInput(pan, 5, 2030, "Ada"), owner_id=owner)
    active = await local_vault.issue_token(card.card_id, domain=TokenDomain())
    suspended = await local_vault.issue_token(card.card_id, domain=TokenDomain())
    await local_vault.suspend_token(suspended.token_id, reason="lost phone")

    await local_vault.delete_card(card.card_id, reason="user removed the card")

    with pytest.raises(CardNotFound):
        await local_vault.get_card(card.card_id)
    with pytest.raises(CardNotFound):
        await local_vault.detokenize(card_id=card.card_id, requester="t", purpose="refund")
    with pytest.raises(TokenNotActive):
        await local_vault.detokenize(token_id=active.token_id, requester="t", purpose="refund")
    with pytest.raises(CardNotFound):
        await local_vault.delete_card(card.card_id, reason="again")
    for token in (active, suspended):
        assert (await local_vault.get_token(token.token_id)).status == "deleted"
    [row] = await sql(
        local_vault,
        "SELECT pan_sealed, name_sealed, deleted_at FROM vault.cards WHERE id = :id",
        id=card.card_id,
    )
    assert row["pan_sealed"] is None and row["name_sealed"] is None and row["deleted_at"]
    types = [e["type"] for e in await events_of(local_vault, card.card_id)]
    assert types[-3:] == [
        "billfold.vault.token.deleted",
        "billfold.vault.token.deleted",
        "billfold.vault.card.deleted",
    ]
    # The owner may vault the same card again: a new card, the same fingerprint.
    again = await local_vault.vault_card(CardInput(pan, 5, 2030), owner_id=owner)
    assert again.card_id != card.card_id and again.fingerprint == card.fingerprint


# --- token lifecycle --------------------------------------------------------------------------


async def test_token_lifecycle_transitions_and_their_events(
    vault: VaultClient, local_vault: LocalVault
) -> None:
    card = await vault.vault_card(CardInput(new_pan(), 8, 2030), owner_id=new_owner())
    domain = TokenDomain(device_id="dev_phone", channels=("contactless", "in_app"))
    token = await vault.issue_token(card.card_id, domain=domain)
    assert token.status == "active" and token.domain == domain
    assert token.card_id == card.card_id and token.owner_id == card.owner_id
    assert len(token.token_reference_id) == 32 and len(token.dpan_last4) == 4
    assert await vault.list_tokens(card.card_id) == [token]

    suspended = await vault.suspend_token(token.token_id, reason="lost phone")
    assert suspended.status == "suspended"
    with pytest.raises(InvalidTokenTransition):
        await vault.suspend_token(token.token_id, reason="again")
    with pytest.raises(TokenNotActive):
        await vault.cryptogram(
            purchase(token.token_id, channel="contactless", device_id="dev_phone")
        )
    resumed = await vault.resume_token(token.token_id, reason="found it")
    assert resumed.status == "active"
    with pytest.raises(InvalidTokenTransition):
        await vault.resume_token(token.token_id, reason="again")
    deleted = await vault.delete_token(token.token_id, reason="user removed")
    assert deleted.status == "deleted"
    for change in (vault.resume_token, vault.suspend_token, vault.delete_token):
        with pytest.raises(InvalidTokenTransition):
            await change(token.token_id, reason="too late")
    with pytest.raises(Unprocessable):
        await vault.suspend_token(
            (await vault.issue_token(card.card_id, domain=TokenDomain())).token_id,
            reason=" ",
        )

    events = [
        e for e in await events_of(local_vault, card.card_id) if e["subject"] == token.token_id
    ]
    assert [(e["type"], e["data"]["status"], e["data"].get("reason")) for e in events] == [
        ("billfold.vault.token.issued", "active", None),
        ("billfold.vault.token.suspended", "suspended", "lost phone"),
        ("billfold.vault.token.resumed", "active", "found it"),
        ("billfold.vault.token.deleted", "deleted", "user removed"),
    ]
    assert all(e["source"] == "/billfold/vault" for e in events)
    assert events[0]["data"]["token_reference_id"] == token.token_reference_id


async def test_token_domains_are_validated(vault: VaultClient) -> None:
    card = await vault.vault_card(CardInput(new_pan(), 8, 2030), owner_id=new_owner())
    for domain in (
        TokenDomain(channels=()),
        TokenDomain(channels=("atm",)),  # type: ignore[arg-type]
        TokenDomain(device_id=""),
        TokenDomain(merchant_id="m" * 65),
    ):
        with pytest.raises(Unprocessable):
            await vault.issue_token(card.card_id, domain=domain)
    assert await vault.list_tokens(card.card_id) == []


# --- detokenisation audit ---------------------------------------------------------------------


async def test_every_detokenisation_is_audited_first(
    vault: VaultClient, local_vault: LocalVault
) -> None:
    pan = new_pan()
    card = await vault.vault_card(CardInput(pan, 8, 2030, "Grace Hopper"), owner_id=new_owner())
    token = await vault.issue_token(card.card_id, domain=TokenDomain())
    by_card = await vault.detokenize(
        card_id=card.card_id, requester="payment_methods", purpose="account_verification"
    )
    by_token = await vault.detokenize(
        token_id=token.token_id, requester="network", purpose="authorization"
    )
    assert by_card.pan == by_token.pan == pan
    assert by_card.cardholder_name == "Grace Hopper"
    assert pan not in repr(by_card) and "Grace" not in repr(by_card)

    rows = await sql(
        local_vault,
        "SELECT requester, purpose, card_id, token_id, at FROM vault.detokenizations"
        " WHERE card_id = :c ORDER BY seq",
        c=card.card_id,
    )
    assert [(r["requester"], r["purpose"], r["token_id"]) for r in rows] == [
        ("payment_methods", "account_verification", None),
        ("network", "authorization", token.token_id),
    ]
    assert rows[0]["at"] <= rows[1]["at"]

    # Refused requests leave no row and no PAN.
    await vault.suspend_token(token.token_id, reason="fraud check")
    with pytest.raises(TokenNotActive):
        await vault.detokenize(token_id=token.token_id, requester="n", purpose="authorization")
    refund = await vault.detokenize(token_id=token.token_id, requester="n", purpose="refund")
    assert refund.pan == pan
    with pytest.raises(Unprocessable):
        await vault.detokenize(card_id=card.card_id, requester=" ", purpose="refund")
    with pytest.raises(Unprocessable):
        await vault.detokenize(requester="n", purpose="refund")
    with pytest.raises(Unprocessable):
        await vault.detokenize(
            card_id=card.card_id, token_id=token.token_id, requester="n", purpose="refund"
        )
    with pytest.raises(Unprocessable):
        await vault.detokenize(card_id=card.card_id, requester="n", purpose="curiosity")  # type: ignore[arg-type]
    count = await sql(
        local_vault,
        "SELECT count(*) AS n FROM vault.detokenizations WHERE card_id = :c",
        c=card.card_id,
    )
    assert count[0]["n"] == 3


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE vault.detokenizations SET requester = 'nobody'",
        "DELETE FROM vault.detokenizations",
        "TRUNCATE vault.detokenizations",
        "TRUNCATE vault.detokenizations, vault.tokens, vault.cards CASCADE",
    ],
)
async def test_the_audit_log_is_append_only(local_vault: LocalVault, statement: str) -> None:
    card = await local_vault.vault_card(CardInput(new_pan(), 8, 2030), owner_id=new_owner())
    await local_vault.detokenize(card_id=card.card_id, requester="audit-test", purpose="refund")
    before = await sql(local_vault, "SELECT count(*) AS n FROM vault.detokenizations")
    with pytest.raises(DBAPIError) as raised:
        await sql_exec(local_vault, statement)
    assert "append-only" in str(raised.value)
    assert getattr(raised.value.orig, "sqlstate", None) == "BFV01"
    assert await sql(local_vault, "SELECT count(*) AS n FROM vault.detokenizations") == before
    rows = await sql(
        local_vault,
        "SELECT requester FROM vault.detokenizations WHERE card_id = :c",
        c=card.card_id,
    )
    assert rows == [{"requester": "audit-test"}]


# --- nothing in clear -------------------------------------------------------------------------


async def test_no_pan_dpan_or_name_in_clear_in_any_vault_row_or_event(
    local_vault: LocalVault,
) -> None:
    pans, dpans, names = [], [], []
    for i in range(12):
        pan, name = new_pan(), f"Holder Number{i:02d}"
        card = await local_vault.vault_card(
            CardInput(pan, 1 + i % 12, 2030, name), owner_id=new_owner()
        )
        token = await local_vault.issue_token(card.card_id, domain=TokenDomain())
        cryptogram = await local_vault.cryptogram(purchase(token.token_id))
        await local_vault.detokenize(token_id=token.token_id, requester="scan", purpose="refund")
        if i % 3 == 0:
            await local_vault.update_card(card.card_id, pan=new_pan(), expiry_year=2032)
        if i % 4 == 0:
            await local_vault.suspend_token(token.token_id, reason="scan")
        pans.append(pan)
        dpans.append(cryptogram.dpan)
        names.append(name)
    secrets_ = [*pans, *dpans, *names]
    tables = await sql(
        local_vault,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'vault'",
    )
    assert {t["table_name"] for t in tables} >= {
        "data_keys",
        "cards",
        "tokens",
        "issuer_keys",
        "detokenizations",
    }
    for table in [f"vault.{t['table_name']}" for t in tables] + ["platform.outbox"]:
        for row in await sql(local_vault, f"SELECT * FROM {table}"):
            as_text = json.dumps(row, default=str)
            as_bytes = b"".join(v for v in row.values() if isinstance(v, bytes))
            for secret in secrets_:
                assert secret not in as_text, f"{table} holds a secret in clear"
                assert secret.encode() not in as_bytes, f"{table} holds a secret in clear"
                # A bytea rendered as hex by a dump, too.
                assert secret.encode().hex() not in as_text


def test_software_keystore_is_the_same_contract(tmp_path: Any) -> None:
    from billfold.platform.keys import SealedBox, SoftwareKeyStore

    secret = SealedBox.generate_b64()
    store = SoftwareKeyStore.from_b64(secret, tmp_path / "ks.json")
    key = os.urandom(32)
    v1, wrapped = store.wrap(key, b"aad")
    assert (v1, store.unwrap(v1, wrapped, b"aad")) == (1, key)
    with pytest.raises(UnwrapFailed):
        store.unwrap(v1, wrapped, b"other")
    assert store.create_kek_version() == 2
    v2, wrapped2 = store.wrap(key, b"aad")
    assert v2 == 2 and store.unwrap(2, wrapped2, b"aad") == key
    with pytest.raises(UnwrapFailed):
        store.unwrap(1, wrapped2, b"aad")
    # Another process on the same secret and state file: same versions, same fingerprints.
    other = SoftwareKeyStore.from_b64(secret, tmp_path / "ks.json")
    assert other.current_kek_version() == 2
    assert other.unwrap(1, wrapped, b"aad") == key
    assert other.fingerprint(b"pan:1") == store.fingerprint(b"pan:1") != store.fingerprint(b"pan:2")
    assert SoftwareKeyStore.from_b64(SealedBox.generate_b64()).fingerprint(b"pan:1") != (
        store.fingerprint(b"pan:1")
    )


def test_open_keystore_joins_the_process_hsm_session_and_leaves_it_open(
    hsm: KeyStore, settings: Settings
) -> None:
    from billfold.platform.keys import SoftwareKeyStore, open_keystore

    # The app's settings name the same data dir: the same token, PIN read from data_dir/hsm/pin.
    joined = open_keystore(settings)
    try:
        assert joined.kind == "pkcs11"
        assert joined.fingerprint(b"pan:1") == hsm.fingerprint(b"pan:1")
        assert joined.current_kek_version() == hsm.current_kek_version()
    finally:
        joined.close()
    # Closing one user of the shared session did not log the other out.
    version, wrapped = hsm.wrap(b"k" * 32, b"aad")
    assert hsm.unwrap(version, wrapped, b"aad") == b"k" * 32

    software = open_keystore(settings.model_copy(update={"vault_keystore": "software"}))
    assert isinstance(software, SoftwareKeyStore)
    assert software.fingerprint(b"pan:1") != hsm.fingerprint(b"pan:1")


def test_the_development_token_lives_in_the_data_dir(
    hsm: KeyStore, data_dir: Any, tmp_path: Any
) -> None:
    from billfold.platform.hsm import HsmUnavailable, ensure_softhsm_token

    token = ensure_softhsm_token(data_dir, "billfold")
    hsm_dir = data_dir.resolve() / "hsm"
    assert os.environ["SOFTHSM2_CONF"] == str(token.conf) == str(hsm_dir / "softhsm2.conf")
    assert f"directories.tokendir = {hsm_dir / 'tokens'}" in token.conf.read_text()
    for secret in ("pin", "so-pin"):
        assert (hsm_dir / secret).stat().st_mode & 0o777 == 0o600
    assert (hsm_dir / "pin").read_text().strip() == token.pin and len(token.pin) >= 16
    assert ensure_softhsm_token(data_dir, "billfold") == token  # idempotent
    # The module read SOFTHSM2_CONF when it was loaded: another data dir cannot take over.
    with pytest.raises(HsmUnavailable):
        ensure_softhsm_token(tmp_path, "billfold")
    assert os.environ["SOFTHSM2_CONF"] == str(token.conf)


# python-pkcs11's search iterator complains, in its finaliser, that its session is gone.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_session_the_hsm_dropped_is_reopened_on_the_next_call(hsm: KeyStore) -> None:
    from billfold.platform.keys.pkcs11 import Pkcs11KeyStore

    assert isinstance(hsm, Pkcs11KeyStore)
    version, wrapped = hsm.wrap(b"d" * 32, b"aad")
    before = hsm.fingerprint(b"pan:42")
    # What an HSM restart looks like from here: the session handle is gone and logged out.
    hsm._shared.session.close()
    assert hsm.unwrap(version, wrapped, b"aad") == b"d" * 32
    hsm._shared.session.close()
    assert hsm.fingerprint(b"pan:42") == before
    hsm._shared.session.close()
    assert hsm.wrap(b"d" * 32, b"aad")[0] == hsm.current_kek_version()
