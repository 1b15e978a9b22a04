"""What the Token Vault hands out: card references, payment tokens, cryptograms, errors.

None of these carries a PAN except `CardSecret`, which only the payment-network path receives
(`VaultClient.detokenize`) and which must never be logged, stored or returned by an API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from billfold.platform.errors import Conflict, Forbidden, NotFound

TokenStatus = Literal["active", "suspended", "deleted"]
Channel = Literal["contactless", "in_app", "ecommerce"]
# Why a PAN is needed in clear: every detokenisation is audited with one of these.
DetokenizePurpose = Literal[
    "authorization", "account_verification", "refund", "network_token_update"
]


@dataclass(frozen=True, slots=True)
class CardInput:
    """A card as the user typed it. The CVV is deliberately absent: the vault never sees it."""

    pan: str
    expiry_month: int
    expiry_year: int  # four digits
    cardholder_name: str | None = None

    def __repr__(self) -> str:  # never the PAN, even in a traceback
        return (
            f"CardInput(pan=****{self.pan[-4:]}, expiry={self.expiry_month:02d}/{self.expiry_year})"
        )


@dataclass(frozen=True, slots=True)
class VaultedCard:
    """A PAN stored in the vault, as others may know it."""

    card_id: str
    owner_id: str
    fingerprint: str  # hex HMAC-SHA256 of the PAN under an HSM key: same card → same value
    bin: str  # first 6 digits (what brand detection and routing need)
    last4: str
    expiry_month: int
    expiry_year: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenDomain:
    """Where a payment token may be used (EMV tokenisation domain restriction controls)."""

    device_id: str | None = None  # device-bound token: cryptograms only for this device
    channels: tuple[Channel, ...] = ("contactless", "in_app", "ecommerce")
    merchant_id: str | None = None  # card-on-file token for one merchant


@dataclass(frozen=True, slots=True)
class PaymentToken:
    """An EMV payment token (DPAN) for a vaulted card. The DPAN itself stays in the vault;
    `dpan_last4` is what a wallet shows beside the card's own last4."""

    token_id: str
    card_id: str
    owner_id: str
    token_reference_id: str  # network-style token reference (stable for the token's life)
    dpan_last4: str
    expiry_month: int
    expiry_year: int
    status: TokenStatus
    domain: TokenDomain
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CryptogramRequest:
    """The transaction data an application cryptogram is computed over (EMV tags in comments)."""

    token_id: str
    amount: int  # 9F02, minor units
    currency_numeric: str  # 5F2A, ISO 4217 numeric, e.g. "840"
    country_numeric: str  # 9F1A, ISO 3166 numeric, e.g. "840"
    transaction_date: date  # 9A
    unpredictable_number: str  # 9F37, 8 hex digits from the terminal / the wallet server
    channel: Channel
    device_id: str | None = None
    merchant_id: str | None = None
    other_amount: int = 0  # 9F03
    transaction_type: str = "00"  # 9C: 00 purchase
    tvr: str = "0000000000"  # 95, 5 bytes hex


@dataclass(frozen=True, slots=True)
class Cryptogram:
    """What goes to the payment network with a tokenised transaction. The DPAN is a token, not
    the card number, but it is still never returned by a public API."""

    token_id: str
    token_reference_id: str
    dpan: str = field(repr=False)
    expiry_month: int
    expiry_year: int
    atc: int  # 9F36: increments per cryptogram, never reused
    arqc: str  # 9F26, 16 hex digits
    cryptogram_version: str  # which EMV scheme computed `arqc` (e.g. "visa-cvn18")
    issuer_application_data: str  # 9F10, hex
    dynamic_cvv: str = field(repr=False)  # 3 digits, for channels without a chip data field
    application_interchange_profile: str = "1980"  # 82


@dataclass(frozen=True, slots=True)
class TokenOnNetwork:
    """A token as the issuer side (the network simulator) finds it by its DPAN."""

    token: PaymentToken
    token_bin: str


@dataclass(frozen=True, slots=True)
class CardSecret:
    """The clear card number, for the payment network path only (audited when handed out)."""

    card_id: str
    pan: str = field(repr=False)
    expiry_month: int
    expiry_year: int
    cardholder_name: str | None = field(default=None, repr=False)


class CardNotFound(NotFound):
    code, title = "card_not_found", "Card not found"


class TokenNotFound(NotFound):
    code, title = "token_not_found", "Payment token not found"


class TokenNotActive(Conflict):
    code, title = "token_not_active", "The payment token is not active"


class TokenDomainViolation(Forbidden):
    code, title = "token_domain_violation", "The payment token may not be used here"


class InvalidTokenTransition(Conflict):
    code, title = "invalid_token_transition", "The token cannot move to that status"
