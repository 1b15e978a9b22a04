"""The `KeyStore` protocol: key-encryption keys (KEKs) and the fingerprint key, kept where the
data they protect cannot reach them (an HSM in production).

A KeyStore never hands out a key. It wraps and unwraps the vault's data keys under a versioned
KEK and computes keyed fingerprints; everything else (the AES-256-GCM of PANs under data keys)
happens in the vault with the data keys it unwrapped.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Data keys are AES-256 keys.
DATA_KEY_BYTES = 32


class KeyStoreError(RuntimeError):
    """The key store could not do what was asked (HSM unreachable, key missing…)."""


class UnwrapFailed(KeyStoreError):
    """A wrapped key did not authenticate: tampered, or bound to another row (aad)."""


class UnknownKekVersion(KeyStoreError):
    """No KEK with that version exists in the key store."""


@runtime_checkable
class KeyStore(Protocol):
    """Synchronous (an HSM call takes tens of microseconds); safe to call from several threads."""

    @property
    def kind(self) -> str:
        """`pkcs11` or `software`."""
        ...

    def current_kek_version(self) -> int:
        """The KEK version new data keys are wrapped under (the highest one)."""
        ...

    def create_kek_version(self) -> int:
        """Generate a new KEK (inside the HSM) and make it current; returns its version.
        Older versions stay usable for `unwrap` until they are destroyed."""
        ...

    def wrap(self, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        """Encrypt `data_key` under the current KEK, bound to `aad`; returns (version, wrapped)."""
        ...

    def unwrap(self, kek_version: int, wrapped: bytes, aad: bytes) -> bytes:
        """The data key back; raises `UnwrapFailed` if `wrapped` or `aad` was altered."""
        ...

    def fingerprint(self, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under the fingerprint key: stable for the key's life, so the
        same card has the same fingerprint for every owner and after KEK rotations."""
        ...

    def close(self) -> None: ...
