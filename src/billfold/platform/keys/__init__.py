"""Keys that protect data at rest. `software` for development; `pkcs11` (HSM) arrives with the vault."""

from billfold.platform.keys.software import SealedBox

__all__ = ["SealedBox"]
