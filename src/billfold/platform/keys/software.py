"""AES-256-GCM sealing of small secrets (JWT private keys, TOTP seeds) under one process key."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
