"""`Pkcs11KeyStore`: KEKs and the fingerprint key inside a PKCS#11 HSM (python-pkcs11).

SoftHSM2 in development and CI; CloudHSM, Luna… in production through `hsm_module`.

- KEKs are AES-256 secret keys generated in the HSM (`CKA_SENSITIVE`, not `CKA_EXTRACTABLE`,
  token objects) labelled `billfold-kek-v1`, `billfold-kek-v2`…; the highest version is current.
- Wrapping is AES-GCM (`CKM_AES_GCM`) in the HSM with a random 96-bit IV per data key and the
  caller's `aad` (the data key's row id). Chosen over `CKM_AES_KEY_WRAP_PAD` because GCM
  authenticates the aad, so a wrapped key copied onto another row does not unwrap, and it works
  on plain bytes through C_Encrypt (key wrap needs the data key as an HSM object first).
  Stored form: `iv (12 bytes) || ciphertext || tag (16 bytes)`. The random-IV bound (2^32
  operations per key) is far away: one wrap per data key. Some HSMs (AWS CloudHSM) insist on
  generating the GCM IV themselves; such a module needs the IV taken from their output instead.
- The fingerprint key is a generic secret (`billfold-fingerprint-v1`, sensitive,
  non-extractable); fingerprints are `CKM_SHA256_HMAC` signatures.

PKCS#11 logs in per application, not per session, and python-pkcs11 keeps one library object
per module path per process; so this module keeps one logged-in session per (module, token) per
process, shared by every `Pkcs11KeyStore` on it (reference counted) and serialised by a lock:
a second C_Login would fail and closing one session would log the others out. A session the
HSM dropped (restart, network HSM failover) is reopened once, transparently, on the next call.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from billfold.platform.keys.base import KeyStoreError, UnknownKekVersion, UnwrapFailed

KEK_LABEL = "billfold-kek-v{version}"
FINGERPRINT_LABEL = "billfold-fingerprint-v1"
_KEK_RE = re.compile(r"^billfold-kek-v([1-9][0-9]*)$")
_IV_BYTES = 12
# What HSMs answer when an AES-GCM tag does not verify.
_TAG_MISMATCH = (
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.EncryptedDataInvalid,
    pkcs11.exceptions.EncryptedDataLenRange,
    pkcs11.exceptions.FunctionFailed,
)

# The session is gone (the HSM or its connection restarted): log in again and retry once.
_SESSION_LOST = (
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.TokenNotPresent,
)
T = TypeVar("T")

# Secret, never leaves the HSM in clear, stored on the token (survives restarts).
_KEY_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}


@dataclass
class _Shared:
    """The process's one session on a token, with the key handles found so far."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    session: Any = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0
    keks: dict[int, Any] = field(default_factory=dict)
    fingerprint_key: Any = None

    def login(self) -> None:
        """Open a session and log in (or join the login this process already has)."""
        self.keks.clear()
        self.fingerprint_key = None
        token = pkcs11.lib(self.module).get_token(token_label=self.token_label)
        try:
            self.session = token.open(rw=True, user_pin=self.pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Login is per application: a session opened without the PIN shares it.
            self.session = token.open(rw=True)

    def relogin(self) -> None:
        try:
            self.session.close()
        except PKCS11Error:
            pass  # already gone: that is why we are here
        self.login()


_sessions: dict[tuple[str, str], _Shared] = {}
_sessions_lock = threading.Lock()


class Pkcs11KeyStore:
    """A `KeyStore` on a PKCS#11 token. Open with `Pkcs11KeyStore.open(...)`; `close()` when done."""

    kind = "pkcs11"

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        self._closed = False

    @classmethod
    def open(
        cls, module: str, token_label: str, pin: str, *, create_keys: bool = True
    ) -> Pkcs11KeyStore:
        """Log in to the token (or join this process's session on it). `create_keys` generates
        KEK v1 and the fingerprint key in the HSM if the token has none yet (first start)."""
        key = (module, token_label)
        with _sessions_lock:
            shared = _sessions.get(key)
            if shared is None:
                shared = _Shared(module, token_label, pin)
                try:
                    shared.login()
                except PKCS11Error as exc:
                    raise KeyStoreError(
                        f"cannot open PKCS#11 token {token_label!r} with {module}: "
                        f"{type(exc).__name__}"
                    ) from exc
                _sessions[key] = shared
            shared.users += 1
        store = cls(shared)
        if create_keys:
            try:
                store._ensure_keys()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        """Leave the shared session; the last user closes it (and logs out)."""
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        with _sessions_lock:
            shared.users -= 1
            if shared.users > 0:
                return
            _sessions.pop((shared.module, shared.token_label), None)
        with shared.lock:
            try:
                shared.session.close()
            except PKCS11Error:
                pass  # a session the module already dropped: nothing left to release

    # --- KEKs -------------------------------------------------------------------------------

    def current_kek_version(self) -> int:
        versions = self._call("search", self._kek_versions)
        if not versions:
            raise UnknownKekVersion("the token holds no KEK yet")
        return max(versions)

    def create_kek_version(self) -> int:
        def create() -> int:
            version = max(self._kek_versions(), default=0) + 1
            self._shared.keks[version] = self._generate_aes(KEK_LABEL.format(version=version))
            return version

        return self._call("key generation", create)

    def wrap(self, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        def wrap() -> tuple[int, bytes]:
            versions = self._kek_versions()
            if not versions:
                raise UnknownKekVersion("the token holds no KEK yet")
            version = max(versions)
            iv = os.urandom(_IV_BYTES)
            sealed = self._kek(version).encrypt(
                data_key, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)
            )
            return version, iv + bytes(sealed)

        return self._call("wrap", wrap)

    def unwrap(self, kek_version: int, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) <= _IV_BYTES + 16:
            raise UnwrapFailed("wrapped key is too short")
        iv, body = wrapped[:_IV_BYTES], wrapped[_IV_BYTES:]

        def unwrap() -> bytes:
            try:
                return bytes(
                    self._kek(kek_version).decrypt(
                        body, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)
                    )
                )
            except _TAG_MISMATCH as exc:
                # SoftHSM2 answers a failed tag check with CKR_GENERAL_ERROR, others with
                # CKR_ENCRYPTED_DATA_INVALID: either way the key does not come out.
                raise UnwrapFailed(
                    f"wrapped key did not authenticate ({type(exc).__name__})"
                ) from exc

        return self._call("unwrap", unwrap)

    # --- fingerprints -----------------------------------------------------------------------

    def fingerprint(self, data: bytes) -> bytes:
        def sign() -> bytes:
            key = self._shared.fingerprint_key
            if key is None:
                key = self._shared.fingerprint_key = self._find(FINGERPRINT_LABEL)
                if key is None:
                    raise KeyStoreError(f"the token has no {FINGERPRINT_LABEL} key")
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))

        return self._call("HMAC", sign)

    # --- internals ----------------------------------------------------------------------------

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run `operation` on the session under the lock; a lost session is reopened and the
        operation retried once; other HSM errors become `KeyStoreError` (never key material)."""
        with self._shared.lock:
            try:
                try:
                    return operation()
                except _SESSION_LOST:
                    self._shared.relogin()
                    return operation()
            except PKCS11Error as exc:
                raise KeyStoreError(f"HSM {what} failed: {type(exc).__name__}") from exc

    def _ensure_keys(self) -> None:
        def ensure() -> None:
            if not self._kek_versions():
                version = 1
                self._shared.keks[version] = self._generate_aes(KEK_LABEL.format(version=version))
            if self._find(FINGERPRINT_LABEL) is None:
                self._shared.session.generate_key(
                    KeyType.GENERIC_SECRET,
                    256,
                    label=FINGERPRINT_LABEL,
                    store=True,
                    template={**_KEY_TEMPLATE, Attribute.SIGN: True, Attribute.VERIFY: True},
                )

        self._call("key generation", ensure)

    def _kek_versions(self) -> list[int]:
        """Versions on the token now (another process may have rotated since we last looked)."""
        objects = self._shared.session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
        )
        versions = []
        for obj in objects:
            match = _KEK_RE.match(obj.label or "")
            if match:
                versions.append(int(match.group(1)))
        return versions

    def _kek(self, version: int) -> Any:
        key = self._shared.keks.get(version)
        if key is None:
            key = self._find(KEK_LABEL.format(version=version))
            if key is None:
                raise UnknownKekVersion(f"no KEK version {version} on the token")
            self._shared.keks[version] = key
        return key

    def _find(self, label: str) -> Any:
        try:
            return self._shared.session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        except pkcs11.NoSuchKey:
            return None
        except pkcs11.MultipleObjectsReturned as exc:
            raise KeyStoreError(f"the token has several keys labelled {label!r}") from exc

    def _generate_aes(self, label: str) -> Any:
        return self._shared.session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            template={**_KEY_TEMPLATE, Attribute.ENCRYPT: True, Attribute.DECRYPT: True},
        )
