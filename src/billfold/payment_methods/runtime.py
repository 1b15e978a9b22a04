"""What the Payment Method Service needs at run time, built once per process by the app."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from billfold.config import Settings
from billfold.network import CardNetwork
from billfold.platform import idempotency
from billfold.platform.keys import SealedBox
from billfold.vault import VaultClient


@dataclass
class PaymentMethodsRuntime:
    settings: Settings  # with the secret key resolved
    vault: VaultClient
    network: CardNetwork
    sealed: SealedBox

    def bank_fingerprint(self, account: str) -> str:
        """Keyed HMAC-SHA256 of a normalised bank account (`us:<routing>:<number>` or
        `iban:<IBAN>`): finds the same account again without keeping its number in clear."""
        key = hashlib.sha256(b"billfold-bank-account:" + self.settings.secret_key.encode()).digest()
        return hmac.new(key, account.encode(), hashlib.sha256).hexdigest()

    def request_fingerprint(self, path: str, canonical: bytes) -> str:
        """Keyed hash of a request a route keeps its own idempotency for (the edge's key)."""
        key = idempotency.fingerprint_key(self.settings.secret_key)
        return idempotency.request_fingerprint("POST", path, canonical, key)

    def seal_account(self, method_id: str, account: str) -> bytes:
        """The account number or IBAN, sealed to its payment method (for the ACH file)."""
        return self.sealed.seal(account.encode(), b"payment-method-account\0" + method_id.encode())

    def open_account(self, method_id: str, sealed: bytes) -> str:
        aad = b"payment-method-account\0" + method_id.encode()
        return self.sealed.open(sealed, aad).decode()
