"""Keys that protect data at rest.

`SealedBox` seals small secrets under the process secret key; `SealRing` seals what travels
between services (one-time codes in events) under named, rotatable keys. A `KeyStore` holds
the vault's key-encryption keys and fingerprint key: `Pkcs11KeyStore` (an HSM over PKCS#11; SoftHSM2 in
development and CI) or `SoftwareKeyStore` (demo without an HSM, not for production).
"""

from __future__ import annotations

from pathlib import Path

from billfold.config import Settings
from billfold.platform.keys.base import (
    DATA_KEY_BYTES,
    KeyStore,
    KeyStoreError,
    UnknownKekVersion,
    UnwrapFailed,
)
from billfold.platform.keys.ring import SealError, SealRing
from billfold.platform.keys.software import SealedBox, SoftwareKeyStore

__all__ = [
    "DATA_KEY_BYTES",
    "KeyStore",
    "KeyStoreError",
    "SealError",
    "SealRing",
    "SealedBox",
    "SoftwareKeyStore",
    "UnknownKekVersion",
    "UnwrapFailed",
    "open_keystore",
]


def open_keystore(settings: Settings) -> KeyStore:
    """The key store `settings` name. For `pkcs11` with no `hsm_pin` outside production, a
    SoftHSM2 token is initialised in `data_dir/hsm` first (this must precede any other PKCS#11
    use in the process). `software` needs the secret key (`settings.secret_key`, or in
    development the one kept in `data_dir/secret.key`)."""
    if settings.vault_keystore == "software":
        if settings.environment == "production":
            raise KeyStoreError("the software key store is for demos: production uses an HSM")
        secret = settings.secret_key
        # Development: the secret key the API generated into data_dir (see app.resolve_secret_key).
        dev_key = Path(settings.data_dir) / "secret.key"
        if not secret and settings.environment != "production" and dev_key.exists():
            secret = dev_key.read_text().strip()
        if not secret:
            raise KeyStoreError("the software key store needs BILLFOLD_SECRET_KEY")
        return SoftwareKeyStore.from_b64(
            secret, Path(settings.data_dir) / "vault" / "software-keystore.json"
        )
    from billfold.platform.keys.pkcs11 import Pkcs11KeyStore

    pin = settings.hsm_pin
    if not pin:
        if settings.environment == "production":
            raise KeyStoreError("BILLFOLD_HSM_PIN must be set in production")
        from billfold.platform.hsm import ensure_softhsm_token

        pin = ensure_softhsm_token(Path(settings.data_dir), settings.hsm_token_label).pin
    return Pkcs11KeyStore.open(settings.hsm_module, settings.hsm_token_label, pin)
