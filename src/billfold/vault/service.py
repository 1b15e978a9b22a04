"""The vault's use cases: `LocalVault`, the in-process `VaultClient`, and KEK rotation.

Every operation is its own transaction on the vault's engine, except a cryptogram and its
verification (the card payment's hot path): their one write is a single atomic statement, run in
autocommit. Secrets are sealed under the current data key before they touch SQL and opened only
in this process's memory; the HSM is asked for data keys (once each, then cached), fingerprints
and DPAN indexes.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import secrets
import unicodedata
from contextlib import AbstractAsyncContextManager
from datetime import date, timedelta
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.config import Settings
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Conflict, Unprocessable
from billfold.platform.ids import is_valid_id, new_id
from billfold.platform.keys import KeyStore, open_keystore
from billfold.platform.observability import get_logger
from billfold.vault import emv, events, store
from billfold.vault.keys import DataKeys, RotationReport, column_aad, open_sealed, seal
from billfold.vault.keys import rotate_kek as _rotate_kek
from billfold.vault.models import (
    CardInput,
    CardNotFound,
    CardSecret,
    Channel,
    Cryptogram,
    CryptogramRequest,
    DetokenizePurpose,
    InvalidTokenTransition,
    PaymentToken,
    TokenDomain,
    TokenDomainViolation,
    TokenNotActive,
    TokenNotFound,
    TokenOnNetwork,
    TokenStatus,
    VaultedCard,
)

log = get_logger("billfold.vault")

# Issuer master keys for application cryptograms are double-length 3DES keys.
_IMK_BYTES = 16
_PSN = "00"
_DPAN_ATTEMPTS = 8
_CHANNELS: frozenset[str] = frozenset({"contactless", "in_app", "ecommerce"})
_PURPOSES: frozenset[str] = frozenset(
    {"authorization", "account_verification", "refund", "network_token_update"}
)
_MAX_REASON = 200


class CardNumberTaken(Conflict):
    """Another live card of the same owner already has that number."""

    code, title = "card_already_vaulted", "This card is already in the wallet"


class LocalVault:
    """The Token Vault in this process: `VaultClient` on an engine, a `KeyStore` and Settings.

    `billfold vault` wraps one of these behind HTTP; the demo and the tests use it directly.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        keystore: KeyStore,
        settings: Settings,
        *,
        owns_keystore: bool = False,
    ) -> None:
        self._engine = engine
        # The same pool; a connection checked out through it is in autocommit until returned.
        self._autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._keystore = keystore
        self._settings = settings
        self._owns_keystore = owns_keystore
        self._keys = DataKeys(engine, keystore)
        self._imks: dict[str, bytes] = {}
        self._imk_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, settings: Settings, engine: AsyncEngine, keystore: KeyStore | None = None
    ) -> LocalVault:
        """The vault on `engine`; opens the key store `settings` name unless one is given (then
        the caller keeps ownership of it)."""
        if keystore is not None:
            return cls(engine, keystore, settings)
        opened = await asyncio.to_thread(open_keystore, settings)
        return cls(engine, opened, settings, owns_keystore=True)

    @property
    def keystore(self) -> KeyStore:
        return self._keystore

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def ping(self) -> None:
        """Readiness: the key store answers."""
        self._keystore.current_kek_version()

    async def rotate_data_key(self) -> str:
        """Start sealing new secrets under a fresh data key (existing ones stay readable under
        theirs); returns its id. Limits how much one data key protects."""
        return await self._keys.rotate()

    async def aclose(self) -> None:
        self._keys.forget()
        self._imks.clear()
        if self._owns_keystore:
            self._keystore.close()

    # --- cards --------------------------------------------------------------------------------

    async def vault_card(self, card: CardInput, *, owner_id: str) -> VaultedCard:
        pan = _checked_pan(card.pan)
        _check_expiry(card.expiry_month, card.expiry_year)
        if not owner_id or len(owner_id) > 64 or _has_control(owner_id):
            raise Unprocessable("owner_id is required (1 to 64 characters, no control characters)")
        fingerprint = self._fingerprint(pan)
        key_id, key = await self._keys.current()
        card_id = new_id("card")
        async with self._transaction() as conn:
            existing = await store.live_card_by_fingerprint(conn, owner_id, fingerprint)
            if existing is not None:
                return _vaulted(existing)
            row = await store.insert_card(
                conn,
                id=card_id,
                owner_id=owner_id,
                fingerprint=fingerprint,
                bin=pan[:6],
                last4=pan[-4:],
                data_key_id=key_id,
                pan_sealed=seal(key, pan.encode(), column_aad("cards", card_id, "pan")),
                name_sealed=_seal_name(key, card_id, card.cardholder_name),
                expiry_month=card.expiry_month,
                expiry_year=card.expiry_year,
            )
            if row is None:  # the same card vaulted concurrently for this owner
                row = await store.live_card_by_fingerprint(conn, owner_id, fingerprint)
                assert row is not None
            return _vaulted(row)

    async def get_card(self, card_id: str) -> VaultedCard:
        async with self._transaction() as conn:
            return _vaulted(await self._live_card(conn, card_id))

    async def update_card(
        self,
        card_id: str,
        *,
        pan: str | None = None,
        expiry_month: int | None = None,
        expiry_year: int | None = None,
    ) -> VaultedCard:
        new_pan = _checked_pan(pan) if pan is not None else None
        async with self._transaction() as conn:
            row = await self._live_card(conn, card_id, lock=True)
            month = expiry_month if expiry_month is not None else row.expiry_month
            year = expiry_year if expiry_year is not None else row.expiry_year
            _check_expiry(month, year)
            key_id, key = await self._keys.current()
            old = await self._keys.get(conn, row.data_key_id)
            old_pan = open_sealed(old, _present(row.pan_sealed), column_aad("cards", row.id, "pan"))
            name = (
                open_sealed(old, row.name_sealed, column_aad("cards", row.id, "name"))
                if row.name_sealed is not None
                else None
            )
            pan_bytes = new_pan.encode() if new_pan is not None else old_pan
            pan_changed = new_pan is not None and new_pan.encode() != old_pan
            fingerprint = self._fingerprint(new_pan) if pan_changed and new_pan else row.fingerprint
            if pan_changed:
                other = await store.live_card_by_fingerprint(conn, row.owner_id, fingerprint)
                if other is not None and other.id != row.id:
                    raise CardNumberTaken("Another card of this owner has that number")
            # Re-sealed under the current data key: an update also moves a card off an old one.
            updated = await store.update_card(
                conn,
                id=row.id,
                fingerprint=fingerprint,
                bin=pan_bytes.decode()[:6],
                last4=pan_bytes.decode()[-4:],
                data_key_id=key_id,
                pan_sealed=seal(key, pan_bytes, column_aad("cards", row.id, "pan")),
                name_sealed=(
                    seal(key, name, column_aad("cards", row.id, "name"))
                    if name is not None
                    else None
                ),
                expiry_month=month,
                expiry_year=year,
            )
            changes = {
                "pan_changed": pan_changed,
                "expiry_changed": (month, year) != (row.expiry_month, row.expiry_year),
            }
            await events.publish(
                conn,
                events.CARD_UPDATED,
                row.id,
                {
                    "card_id": row.id,
                    "owner_id": row.owner_id,
                    "last4": updated.last4,
                    "expiry_month": month,
                    "expiry_year": year,
                    **changes,
                },
                card_id=row.id,
            )
            # The tokens stay as they are (same DPAN, expiry, reference id); the network is told
            # that the card behind them changed.
            for token in await store.card_tokens(conn, row.id):
                if token.status != "deleted":
                    await events.publish(
                        conn,
                        events.TOKEN_UPDATED,
                        token.id,
                        {**_token_event(token), **changes},
                        card_id=row.id,
                    )
            return _vaulted(updated)

    async def delete_card(self, card_id: str, *, reason: str) -> None:
        reason = _reason(reason)
        async with self._transaction() as conn:
            row = await self._live_card(conn, card_id, lock=True)
            for token in await store.delete_card_tokens(conn, row.id, reason):
                await events.publish(
                    conn,
                    events.TOKEN_DELETED,
                    token.id,
                    {**_token_event(token), "reason": reason},
                    card_id=row.id,
                )
            await store.delete_card(conn, row.id, reason)
            await events.publish(
                conn,
                events.CARD_DELETED,
                row.id,
                {"card_id": row.id, "owner_id": row.owner_id, "reason": reason},
                card_id=row.id,
            )

    # --- tokens -------------------------------------------------------------------------------

    async def issue_token(self, card_id: str, *, domain: TokenDomain) -> PaymentToken:
        domain = _checked_domain(domain)
        token_bin = self._settings.token_bin
        imk_id, _ = await self._current_imk(token_bin)
        key_id, key = await self._keys.current()
        expiry = utcnow().date() + timedelta(days=self._settings.token_ttl_days)
        async with self._transaction() as conn:
            card = await self._live_card(conn, card_id, lock=True)
            for _ in range(_DPAN_ATTEMPTS):
                dpan = emv.generate_dpan(token_bin)
                token_id = new_id("tok")
                row = await store.insert_token(
                    conn,
                    id=token_id,
                    card_id=card.id,
                    owner_id=card.owner_id,
                    token_reference_id=_token_reference_id(),
                    token_bin=token_bin,
                    issuer_key_id=imk_id,
                    data_key_id=key_id,
                    dpan_sealed=seal(key, dpan.encode(), column_aad("tokens", token_id, "dpan")),
                    dpan_index=self._dpan_index(dpan),
                    dpan_last4=dpan[-4:],
                    expiry_month=expiry.month,
                    expiry_year=expiry.year,
                    device_id=domain.device_id,
                    channels=list(domain.channels),
                    merchant_id=domain.merchant_id,
                )
                if row is not None:
                    break
            else:  # a nearly full BIN range, or a broken random source
                raise RuntimeError("could not draw an unused DPAN")
            await events.publish(
                conn, events.TOKEN_ISSUED, row.id, _token_event(row), card_id=card.id
            )
            return _payment_token(row)

    async def get_token(self, token_id: str) -> PaymentToken:
        async with self._transaction() as conn:
            return _payment_token(await self._token(conn, token_id))

    async def list_tokens(self, card_id: str) -> list[PaymentToken]:
        async with self._transaction() as conn:
            if not is_valid_id(card_id, "card"):
                return []
            return [_payment_token(t) for t in await store.card_tokens(conn, card_id)]

    async def suspend_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._transition(
            token_id, "suspended", ("active",), events.TOKEN_SUSPENDED, reason
        )

    async def resume_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._transition(
            token_id, "active", ("suspended",), events.TOKEN_RESUMED, reason
        )

    async def delete_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._transition(
            token_id, "deleted", ("active", "suspended"), events.TOKEN_DELETED, reason
        )

    async def _transition(
        self,
        token_id: str,
        to: TokenStatus,
        from_: tuple[TokenStatus, ...],
        event_type: str,
        reason: str,
    ) -> PaymentToken:
        reason = _reason(reason)
        async with self._transaction() as conn:
            current = await self._token(conn, token_id)
            row = await store.set_token_status(conn, current.id, to=to, from_=from_, reason=reason)
            if row is None:
                raise InvalidTokenTransition(
                    f"A {(await self._token(conn, token_id)).status} token cannot become {to}"
                )
            await events.publish(
                conn,
                event_type,
                row.id,
                {**_token_event(row), "reason": reason},
                card_id=row.card_id,
            )
            return _payment_token(row)

    # --- cryptograms --------------------------------------------------------------------------

    async def cryptogram(self, request: CryptogramRequest) -> Cryptogram:
        data = _emv_data(request)
        today = utcnow().date()
        # No transaction: the only write is next_atc's UPDATE, atomic on its own, and no event
        # is published; a refusal's read needs no snapshot shared with it (READ COMMITTED gave
        # each statement its own anyway). BEGIN and COMMIT were two of three round trips.
        async with self._autocommit() as conn:
            token = (
                await store.next_atc(
                    conn,
                    request.token_id,
                    month_index=today.year * 12 + today.month,
                    channel=request.channel,
                    device_id=request.device_id,
                    merchant_id=request.merchant_id,
                )
                if is_valid_id(request.token_id, "tok")
                else None
            )
            if token is None:  # refused, nothing changed: say why
                current = await self._token(conn, request.token_id)
                _check_usable(current)
                _check_domain(current, request.channel, request.device_id, request.merchant_id)
                raise TokenNotActive("The payment token cannot produce another cryptogram")
            atc = token.atc
            dpan = await self._dpan(conn, token)
            imk = await self._imk(conn, token.issuer_key_id)
            result = emv.generate_cryptogram(imk, dpan, token.psn, atc, data)
            return Cryptogram(
                token_id=token.id,
                token_reference_id=token.token_reference_id,
                dpan=dpan,
                expiry_month=token.expiry_month,
                expiry_year=token.expiry_year,
                atc=atc,
                arqc=result.arqc,
                cryptogram_version=emv.CRYPTOGRAM_VERSION,
                issuer_application_data=result.issuer_application_data,
                dynamic_cvv=result.dynamic_cvv,
                application_interchange_profile=data.aip,
            )

    async def verify_cryptogram(self, cryptogram: Cryptogram, request: CryptogramRequest) -> bool:
        if cryptogram.token_id != request.token_id:
            return False
        if cryptogram.cryptogram_version != emv.CRYPTOGRAM_VERSION:
            return False
        if not 0 < cryptogram.atc <= 0xFFFF:
            return False
        try:
            data = _emv_data(request, aip=cryptogram.application_interchange_profile)
        except Unprocessable:  # malformed data elements never verify
            return False
        # No transaction: accept_atc is the only write and rechecks the one thing the read
        # checked that can change in between (the status); expiry, domain, DPAN and issuer key
        # are fixed when the token is issued. Two round trips instead of four.
        async with self._autocommit() as conn:
            token = await self._token(conn, request.token_id)
            if token.status != "active" or _expired(token.expiry_month, token.expiry_year):
                return False
            try:
                _check_domain(token, request.channel, request.device_id, request.merchant_id)
            except TokenDomainViolation:
                return False
            dpan = await self._dpan(conn, token)
            if cryptogram.dpan != dpan:
                return False
            imk = await self._imk(conn, token.issuer_key_id)
            try:
                # The ARQC covers the issuer application data the vault sends (9F10), the
                # dynamic CVV stands beside it for channels without chip data: both must match.
                valid = (
                    cryptogram.issuer_application_data.upper() == emv.issuer_application_data()
                    and emv.verify_cryptogram(
                        imk, dpan, token.psn, cryptogram.atc, data, cryptogram.arqc
                    )
                    and emv.verify_dynamic_cvv(
                        imk, dpan, token.psn, cryptogram.atc, data, cryptogram.dynamic_cvv
                    )
                )
            except ValueError:  # a malformed ARQC, CVV or data element from the caller
                return False
            if not valid:
                return False
            # Atomic: of two verifications of one ATC, only one moves last_verified_atc.
            return await store.accept_atc(conn, token.id, cryptogram.atc)

    # --- detokenisation -----------------------------------------------------------------------

    async def detokenize(
        self,
        *,
        card_id: str | None = None,
        token_id: str | None = None,
        requester: str,
        purpose: DetokenizePurpose,
    ) -> CardSecret:
        if (card_id is None) == (token_id is None):
            raise Unprocessable("Give exactly one of card_id and token_id")
        if purpose not in _PURPOSES:
            raise Unprocessable("Unknown detokenisation purpose")
        requester = requester.strip()
        if not requester or len(requester) > 200 or _has_control(requester):
            raise Unprocessable("requester is required (at most 200 characters)")
        # A suspended token may still be refunded or updated on the network, never authorised.
        statuses = ("active",) if purpose == "authorization" else ("active", "suspended")
        async with self._transaction() as conn:
            # The audit row is written by the statement that reads the card, in this
            # transaction, before the PAN is opened: no PAN leaves without it.
            card = await store.audited_card(
                conn,
                card_id=card_id if is_valid_id(card_id or "", "card") else None,
                token_id=token_id if is_valid_id(token_id or "", "tok") else None,
                statuses=statuses,
                requester=requester,
                purpose=purpose,
            )
            if card is None:  # refused, nothing written: say why
                if token_id is None:
                    raise CardNotFound()
                token = await self._token(conn, token_id)
                if token.status not in statuses:
                    raise TokenNotActive(f"The payment token is {token.status}")
                raise TokenNotActive("The card of this token was deleted")
            key = await self._keys.get(conn, card.data_key_id)
            pan = open_sealed(key, _present(card.pan_sealed), column_aad("cards", card.id, "pan"))
            name = (
                open_sealed(key, card.name_sealed, column_aad("cards", card.id, "name")).decode()
                if card.name_sealed is not None
                else None
            )
            log.info(
                "vault detokenized",
                card_id=card.id,
                token_id=token_id,
                requester=requester,
                purpose=purpose,
            )
            return CardSecret(card.id, pan.decode(), card.expiry_month, card.expiry_year, name)

    # --- issuer side (network simulator, tests) -----------------------------------------------

    async def issuer_master_key(self, token_bin: str) -> bytes:
        """The current issuer master key (application cryptograms) of a token BIN, created on
        first use: what the issuer/network side needs to verify cryptograms independently."""
        _, imk = await self._current_imk(token_bin)
        return imk

    async def token_by_dpan(self, dpan: str) -> TokenOnNetwork | None:
        """The token a DPAN belongs to (found by its HMAC index, never by the clear DPAN)."""
        if not dpan.isdigit() or not 13 <= len(dpan) <= 19:
            return None
        async with self._transaction() as conn:
            row = await store.token_by_dpan_index(conn, self._dpan_index(dpan))
            return TokenOnNetwork(_payment_token(row), row.token_bin) if row else None

    # --- internals ----------------------------------------------------------------------------

    def _transaction(self) -> Any:
        return _Transaction(self._engine)

    def _autocommit(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection on which each statement commits by itself (no BEGIN/COMMIT round
        trips): only for operations whose every write is one self-contained statement and that
        publish no event."""
        return self._autocommit_engine.connect()

    def _fingerprint(self, pan: str) -> bytes:
        return self._keystore.fingerprint(b"pan:" + pan.encode())

    def _dpan_index(self, dpan: str) -> bytes:
        return self._keystore.fingerprint(b"dpan:" + dpan.encode())

    async def _live_card(
        self, conn: AsyncConnection, card_id: str, *, lock: bool = False
    ) -> store.CardRow:
        row = (
            await store.live_card(conn, card_id, lock=lock)
            if is_valid_id(card_id, "card")
            else None
        )
        if row is None:
            raise CardNotFound()
        return row

    async def _token(self, conn: AsyncConnection, token_id: str) -> store.TokenRow:
        row = await store.token(conn, token_id) if is_valid_id(token_id, "tok") else None
        if row is None:
            raise TokenNotFound()
        return row

    async def _dpan(self, conn: AsyncConnection, token: store.TokenRow) -> str:
        key = await self._keys.get(conn, token.data_key_id)
        return open_sealed(key, token.dpan_sealed, column_aad("tokens", token.id, "dpan")).decode()

    async def _imk(self, conn: AsyncConnection, issuer_key_id: str) -> bytes:
        imk = self._imks.get(issuer_key_id)
        if imk is None:
            row = await store.issuer_key(conn, issuer_key_id)
            if row is None:
                raise KeyError(issuer_key_id)
            imk = self._imks[issuer_key_id] = await self._open_imk(conn, row)
        return imk

    async def _open_imk(self, conn: AsyncConnection, row: store.IssuerKeyRow) -> bytes:
        key = await self._keys.get(conn, row.data_key_id)
        return open_sealed(key, row.key_sealed, column_aad("issuer_keys", row.id, "imk"))

    async def _current_imk(self, token_bin: str) -> tuple[str, bytes]:
        """The BIN's current IMK (id, key), generated and sealed on first use in a transaction
        of its own (it must exist before a token can name it)."""
        if not (token_bin.isdigit() and 6 <= len(token_bin) <= 8):
            raise ValueError("a token BIN is 6 to 8 digits")
        async with self._imk_lock:
            for _ in range(3):
                async with self._engine.begin() as conn:
                    row = await store.current_issuer_key(conn, token_bin)
                    if row is not None:
                        imk = self._imks.get(row.id) or await self._open_imk(conn, row)
                        self._imks[row.id] = imk
                        return row.id, imk
                    key_id, key = await self._keys.current()
                    imk_id = new_id("key")
                    imk = emv.odd_parity(os.urandom(_IMK_BYTES))
                    sealed = seal(key, imk, column_aad("issuer_keys", imk_id, "imk"))
                    if await store.insert_issuer_key(
                        conn,
                        key_id=imk_id,
                        token_bin=token_bin,
                        data_key_id=key_id,
                        key_sealed=sealed,
                    ):
                        log.info(
                            "vault issuer master key created", token_bin=token_bin, key_id=imk_id
                        )
                        self._imks[imk_id] = imk
                        return imk_id, imk
        raise RuntimeError("could not settle on an issuer master key")


async def rotate_kek(
    engine: AsyncEngine, keystore: KeyStore, *, batch_size: int = 100
) -> RotationReport:
    """Create a new KEK version in the key store and re-wrap every data key under it, online
    (`billfold vault rotate-kek`). See `billfold.vault.keys.rotate_kek`."""
    return await _rotate_kek(engine, keystore, batch_size=batch_size)


class _Transaction:
    """One vault operation = one unit of work: committed on success, rolled back on error."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._uow = UnitOfWork(engine)

    async def __aenter__(self) -> AsyncConnection:
        return await self._uow.connection()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self._uow.commit()
        else:
            await self._uow.rollback()


# --- pure helpers -----------------------------------------------------------------------------


def _checked_pan(pan: str) -> str:
    digits = pan.replace(" ", "").replace("-", "")
    if not (digits.isascii() and digits.isdigit() and 12 <= len(digits) <= 19):
        raise Unprocessable("The card number must be 12 to 19 digits")
    if not emv.luhn_valid(digits):
        raise Unprocessable("The card number is not valid")
    return digits


def _check_expiry(month: int, year: int) -> None:
    if not 1 <= month <= 12 or not 2000 <= year <= 2199:
        raise Unprocessable("The expiry is not a valid month and four-digit year")


def _expired(month: int, year: int) -> bool:
    last_day = date(year, month, calendar.monthrange(year, month)[1])
    return utcnow().date() > last_day


def _reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > _MAX_REASON or _has_control(reason):
        raise Unprocessable(
            f"A reason is required (at most {_MAX_REASON} characters, no control characters)"
        )
    return reason


# Control characters, surrogates and line/paragraph separators: PostgreSQL text refuses a NUL
# (a 500 if it reached the database), and the others have no business in an audit trail.
_CONTROL = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _has_control(value: str) -> bool:
    return any(unicodedata.category(ch) in _CONTROL for ch in value)


def _present(sealed: bytes | None) -> bytes:
    if sealed is None:  # only deleted cards lack one, and those are never read
        raise CardNotFound()
    return sealed


def _seal_name(key: AESGCM, card_id: str, name: str | None) -> bytes | None:
    if name is None or not name.strip():
        return None
    if len(name) > 200 or _has_control(name):
        raise Unprocessable("cardholder_name must be at most 200 characters, no control characters")
    return seal(key, name.strip().encode(), column_aad("cards", card_id, "name"))


def _checked_domain(domain: TokenDomain) -> TokenDomain:
    channels = tuple(dict.fromkeys(domain.channels))
    if not channels or not set(channels) <= _CHANNELS:
        raise Unprocessable("channels must be a non-empty subset of contactless, in_app, ecommerce")
    for name, value in (("device_id", domain.device_id), ("merchant_id", domain.merchant_id)):
        if value is not None and (not 0 < len(value) <= 64 or _has_control(value)):
            raise Unprocessable(f"{name} must be 1 to 64 characters, no control characters")
    return TokenDomain(domain.device_id, channels, domain.merchant_id)


def _check_usable(token: store.TokenRow) -> None:
    if token.status != "active":
        raise TokenNotActive(f"The payment token is {token.status}")
    if _expired(token.expiry_month, token.expiry_year):
        raise TokenNotActive("The payment token has expired")


def _check_domain(
    token: store.TokenRow, channel: Channel, device_id: str | None, merchant_id: str | None
) -> None:
    if channel not in token.channels:
        raise TokenDomainViolation(f"The payment token is not enabled for {channel}")
    if token.device_id is not None and device_id != token.device_id:
        raise TokenDomainViolation("The payment token is bound to another device")
    if token.merchant_id is not None and merchant_id != token.merchant_id:
        raise TokenDomainViolation("The payment token is bound to another merchant")


def _emv_data(request: CryptogramRequest, *, aip: str = "1980") -> emv.EmvData:
    if request.amount < 0 or request.other_amount < 0:
        raise Unprocessable("amounts must not be negative")
    data = emv.EmvData(
        amount=request.amount,
        other_amount=request.other_amount,
        country_numeric=request.country_numeric,
        tvr=request.tvr,
        currency_numeric=request.currency_numeric,
        transaction_date=request.transaction_date,
        transaction_type=request.transaction_type,
        unpredictable_number=request.unpredictable_number,
        aip=aip,
    )
    try:
        emv.encode_data(data)
    except ValueError as exc:  # the message names the data element, never a card number
        raise Unprocessable(f"Invalid transaction data: {exc}", code="invalid_emv_data") from exc
    return data


def _token_reference_id() -> str:
    # Network token reference ids are 32 alphanumerics; random, so they reveal nothing.
    return "DNITHE" + secrets.token_hex(13).upper()


def _vaulted(row: store.CardRow) -> VaultedCard:
    return VaultedCard(
        card_id=row.id,
        owner_id=row.owner_id,
        fingerprint=row.fingerprint.hex(),
        bin=row.bin,
        last4=row.last4,
        expiry_month=row.expiry_month,
        expiry_year=row.expiry_year,
        created_at=row.created_at,
    )


def _payment_token(row: store.TokenRow) -> PaymentToken:
    return PaymentToken(
        token_id=row.id,
        card_id=row.card_id,
        owner_id=row.owner_id,
        token_reference_id=row.token_reference_id,
        dpan_last4=row.dpan_last4,
        expiry_month=row.expiry_month,
        expiry_year=row.expiry_year,
        status=row.status,  # type: ignore[arg-type]
        domain=TokenDomain(row.device_id, tuple(row.channels), row.merchant_id),  # type: ignore[arg-type]
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _token_event(row: store.TokenRow) -> dict[str, Any]:
    """What a token event says: ids, status and last4, never the DPAN."""
    return {
        "token_id": row.id,
        "card_id": row.card_id,
        "owner_id": row.owner_id,
        "token_reference_id": row.token_reference_id,
        "dpan_last4": row.dpan_last4,
        "status": row.status,
        "expiry_month": row.expiry_month,
        "expiry_year": row.expiry_year,
    }
