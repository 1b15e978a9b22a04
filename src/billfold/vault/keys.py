"""Envelope encryption: AES-256-GCM data keys, wrapped by the key store's KEK, seal the vault's
secrets; and KEK rotation, which re-wraps the data keys while the vault keeps serving.

Key hierarchy:  HSM KEK (vN)  ─wraps→  data key (vault.data_keys)  ─seals→  PAN, name, DPAN, IMK.

Unwrapped data keys are cached in process memory (the HSM is asked once per data key per
process). A sealed value is `nonce (12) || ciphertext || tag (16)` with an aad naming its table,
row and column, so a ciphertext copied to another row or column does not open.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.platform.ids import new_id
from billfold.platform.keys import DATA_KEY_BYTES, KeyStore
from billfold.platform.observability import get_logger
from billfold.vault import store

log = get_logger("billfold.vault.keys")

_NONCE = 12


class SealedValueInvalid(RuntimeError):
    """A sealed column did not authenticate under its data key (tampered or moved)."""


def data_key_aad(key_id: str) -> bytes:
    return f"vault.data_keys:{key_id}".encode()


def column_aad(table: str, row_id: str, column: str) -> bytes:
    return f"vault.{table}:{row_id}:{column}".encode()


def seal(key: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + key.encrypt(nonce, plaintext, aad)


def open_sealed(key: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    try:
        return key.decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
    except (InvalidTag, ValueError) as exc:
        raise SealedValueInvalid(aad.decode()) from exc


class DataKeys:
    """The vault's data keys: the current one for new ciphertexts, any one to open old ones."""

    def __init__(self, engine: AsyncEngine, keystore: KeyStore) -> None:
        self._engine = engine
        self._keystore = keystore
        self._cache: dict[str, AESGCM] = {}
        self._current: str | None = None
        self._creating = asyncio.Lock()

    @property
    def keystore(self) -> KeyStore:
        return self._keystore

    async def current(self) -> tuple[str, AESGCM]:
        """The data key new ciphertexts are sealed under, created on first use. Created in a
        transaction of its own, so it exists even if the caller's transaction rolls back."""
        if self._current is not None:
            return self._current, self._cache[self._current]
        async with self._creating:
            if self._current is None:
                self._current = await self._load_or_create_current()
        return self._current, self._cache[self._current]

    async def get(self, conn: AsyncConnection, key_id: str) -> AESGCM:
        """Data key `key_id`, unwrapped by the KEK version it is wrapped under now (during a
        rotation some rows are on the old version, some on the new: both unwrap)."""
        key = self._cache.get(key_id)
        if key is None:
            wrapped = await store.data_key(conn, key_id)
            if wrapped is None:
                raise KeyError(key_id)
            key = self._cache[key_id] = self._unwrap(wrapped)
        return key

    async def rotate(self) -> str:
        """Retire the current data key and make a new one current. Old ciphertexts stay under
        the data key they were sealed with (still readable); new ones use the new key. Another
        process keeps sealing under the key it cached until it restarts, which is harmless."""
        async with self._creating:
            async with self._engine.begin() as conn:
                await store.retire_current_data_key(conn)
            self._current = None
            self._current = await self._load_or_create_current()
            return self._current

    def forget(self) -> None:
        """Drop the cached data keys (they are unwrapped again on next use)."""
        self._cache.clear()
        self._current = None

    async def _load_or_create_current(self) -> str:
        for _ in range(3):
            async with self._engine.begin() as conn:
                existing = await store.current_data_key(conn)
                if existing is not None:
                    self._cache.setdefault(existing.id, self._unwrap(existing))
                    return existing.id
                key_id = new_id("key")
                plain = os.urandom(DATA_KEY_BYTES)
                version, wrapped = self._keystore.wrap(plain, data_key_aad(key_id))
                if await store.insert_data_key(conn, store.WrappedKey(key_id, version, wrapped)):
                    self._cache[key_id] = AESGCM(plain)
                    log.info("vault data key created", data_key_id=key_id, kek_version=version)
                    return key_id
            # Another process created the current data key at the same moment: use that one.
        raise RuntimeError("could not settle on a current data key")

    def _unwrap(self, wrapped: store.WrappedKey) -> AESGCM:
        plain = self._keystore.unwrap(
            wrapped.kek_version, wrapped.wrapped, data_key_aad(wrapped.id)
        )
        return AESGCM(plain)


# Each pass re-wraps what the previous one found; later passes only catch data keys created under
# the old KEK while the first pass ran, so a handful suffice.
_MAX_PASSES = 20


@dataclass(frozen=True)
class RotationReport:
    """What `rotate_kek` did: the new KEK version and how many data keys it re-wrapped."""

    kek_version: int
    rewrapped: int
    # Data keys per KEK version after the rotation (all on `kek_version` when it finished).
    data_keys_by_kek_version: dict[int, int] = field(default_factory=dict)


async def rotate_kek(
    engine: AsyncEngine, keystore: KeyStore, *, batch_size: int = 100
) -> RotationReport:
    """Create a new KEK version in the HSM, then re-wrap every data key under it, online.

    Each data key is re-wrapped in its own short transaction holding only that row's lock, so
    vault requests keep running: until a row is re-wrapped its old version unwraps it, after
    that the new one does (and a cached data key is the same key either way). Rows are read in
    batches of `batch_size` ids; the loop ends when no data key is left on an older version
    (one created meanwhile under the old KEK is caught by the next pass)."""
    version = keystore.create_kek_version()
    log.info("vault KEK version created", kek_version=version)
    rewrapped = 0
    for _ in range(_MAX_PASSES):
        after, found = "", 0
        while True:
            async with engine.connect() as conn:
                ids = await store.data_keys_below(conn, version, after=after, limit=batch_size)
            if not ids:
                break
            for key_id in ids:
                found += 1
                rewrapped += await _rewrap_one(engine, keystore, key_id, version)
            after = ids[-1]
        if found == 0:
            break
    else:  # data keys keep appearing under an old KEK: a process wrapping with a stale version
        raise RuntimeError(f"data keys remain under KEKs older than v{version}")
    async with engine.connect() as conn:
        counts = await store.data_keys_per_kek_version(conn)
    log.info("vault KEK rotation finished", kek_version=version, rewrapped=rewrapped)
    return RotationReport(version, rewrapped, counts)


async def _rewrap_one(engine: AsyncEngine, keystore: KeyStore, key_id: str, version: int) -> int:
    async with engine.begin() as conn:
        row = await store.data_key(conn, key_id, lock=True)
        if row is None or row.kek_version >= version:
            return 0
        aad = data_key_aad(key_id)
        plain = keystore.unwrap(row.kek_version, row.wrapped, aad)
        new_version, wrapped = keystore.wrap(plain, aad)
        if new_version < version:  # the key store must wrap under the version just created
            raise RuntimeError(f"key store wrapped under v{new_version}, expected v{version}+")
        await store.rewrap(conn, key_id, new_version, wrapped)
    return 1
