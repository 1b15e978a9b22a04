"""AES-256-GCM sealing of small secrets (JWT private keys, TOTP seeds) under one process key,
and `SoftwareKeyStore`, the demo-only key store for machines without an HSM."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from billfold.platform.keys.base import UnknownKekVersion, UnwrapFailed

_VERSION = b"\x01"


class SealedBox:
    """Encrypts with a random 96-bit nonce; `aad` binds a ciphertext to its owner row."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("secret key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)

    @classmethod
    def from_b64(cls, value: str) -> SealedBox:
        return cls(base64.b64decode(value))

    @staticmethod
    def generate_b64() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if sealed[:1] != _VERSION:
            raise ValueError("unknown sealed-box version")
        return self._aead.decrypt(sealed[1:13], sealed[13:], aad)


class SoftwareKeyStore:
    """A `KeyStore` without an HSM, for demos only: NOT FOR PRODUCTION.

    Every key is derived (HKDF-SHA256) from the process secret key, so whoever reads the secret
    key (an environment variable, a file in data_dir) can unwrap every data key: there is no
    hardware boundary, and a "rotated" KEK comes from the same secret. It exists so that
    `billfold up` runs where SoftHSM2 is not installed. The current KEK version is kept in
    `state_path` (in memory when None); any version can be derived again, so losing that file
    loses nothing but the version number.
    """

    kind = "software"

    def __init__(self, secret_key: bytes, state_path: Path | None = None) -> None:
        if len(secret_key) != 32:
            raise ValueError("secret key must be 32 bytes")
        self._secret = secret_key
        self._state_path = state_path
        self._lock = threading.Lock()
        self._version = 1
        self._keks: dict[int, AESGCM] = {}
        self._hmac_key = self._derive(b"billfold-fingerprint-v1")

    @classmethod
    def from_b64(cls, secret_key_b64: str, state_path: Path | None = None) -> SoftwareKeyStore:
        return cls(base64.b64decode(secret_key_b64), state_path)

    def current_kek_version(self) -> int:
        # Re-read: another process (`billfold vault rotate-kek`) may have rotated.
        if self._state_path is not None and self._state_path.exists():
            self._version = max(
                self._version, int(json.loads(self._state_path.read_text())["kek_version"])
            )
        return self._version

    def create_kek_version(self) -> int:
        with self._lock:
            self._version = self.current_kek_version() + 1
            if self._state_path is not None:
                self._state_path.parent.mkdir(parents=True, exist_ok=True)
                self._state_path.write_text(json.dumps({"kek_version": self._version}))
            return self._version

    def wrap(self, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        version = self.current_kek_version()
        nonce = os.urandom(12)
        return version, nonce + self._kek(version).encrypt(nonce, data_key, aad)

    def unwrap(self, kek_version: int, wrapped: bytes, aad: bytes) -> bytes:
        if kek_version < 1:
            raise UnknownKekVersion(f"no KEK version {kek_version}")
        try:
            return self._kek(kek_version).decrypt(wrapped[:12], wrapped[12:], aad)
        except (InvalidTag, ValueError) as exc:
            raise UnwrapFailed("wrapped key did not authenticate") from exc

    def fingerprint(self, data: bytes) -> bytes:
        return hmac.new(self._hmac_key, data, hashlib.sha256).digest()

    def close(self) -> None:
        pass

    def _kek(self, version: int) -> AESGCM:
        kek = self._keks.get(version)
        if kek is None:
            kek = self._keks[version] = AESGCM(self._derive(f"billfold-kek-v{version}".encode()))
        return kek

    def _derive(self, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._secret)
