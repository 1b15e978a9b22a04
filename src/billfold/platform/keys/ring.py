"""AES-256-GCM sealing under a ring of named keys, for small secrets that travel between
services in events (one-time codes): the ciphertext names its key (`kid`), so keys rotate
without breaking what is already in flight."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from billfold.config import Settings

# The kid of the key derived from the process secret key when no ring is configured.
DERIVED_KID = "sk1"


class SealError(ValueError):
    """A sealed value that does not open: malformed, an unknown kid, or not authentic (wrong
    key, tampered ciphertext or AAD)."""


class SealRing:
    """Seals with the current (first) key, opens with any key of the ring."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("a seal ring needs at least one key")
        for kid, key in keys.items():
            if not kid or len(key) != 32:
                raise ValueError(f"key {kid!r} must be named and 32 bytes")
        self._keys = {kid: AESGCM(key) for kid, key in keys.items()}
        self.current_kid = next(iter(keys))

    @classmethod
    def from_settings(cls, settings: Settings, purpose: str) -> SealRing:
        """The ring `settings.one_time_code_keys` configure (`kid:base64,…`, the first seals),
        or one key derived for `purpose` from the secret key (kid `sk1`)."""
        spec = settings.one_time_code_keys.strip()
        if spec:
            keys: dict[str, bytes] = {}
            for item in spec.split(","):
                kid, _, b64 = item.strip().partition(":")
                try:
                    keys[kid.strip()] = base64.b64decode(b64.strip(), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"one_time_code_keys: key {kid!r} is not base64") from exc
            return cls(keys)
        if not settings.secret_key:
            raise ValueError("a seal ring needs one_time_code_keys or the secret key")
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=f"billfold-{purpose}".encode()
        ).derive(base64.b64decode(settings.secret_key))
        return cls({DERIVED_KID: derived})

    def seal(self, plaintext: bytes, aad: bytes) -> dict[str, str]:
        """`{"kid", "ciphertext"}` (base64 of nonce + ciphertext + tag), JSON-ready."""
        nonce = os.urandom(12)
        sealed = nonce + self._keys[self.current_kid].encrypt(nonce, plaintext, aad)
        return {"kid": self.current_kid, "ciphertext": base64.b64encode(sealed).decode()}

    def open(self, sealed: Mapping[str, object], aad: bytes) -> bytes:
        kid, ciphertext = sealed.get("kid"), sealed.get("ciphertext")
        if not isinstance(kid, str) or not isinstance(ciphertext, str):
            raise SealError("not a sealed value")
        key = self._keys.get(kid)
        if key is None:
            raise SealError(f"unknown key {kid!r}")
        try:
            raw = base64.b64decode(ciphertext, validate=True)
            return key.decrypt(raw[:12], raw[12:], aad)
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SealError("the sealed value did not authenticate") from exc
