"""What the payment network answers, the messages billfold sends it, and the interfaces: the
`CardNetwork` every network client implements and the `TokenService` the issuer side (the
simulator) maps DPANs back to cards with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Literal, Protocol

from billfold.platform.errors import ServiceUnavailable

# ISO 8583 field 39 response codes the network answers with (the subset billfold acts on).
RESPONSE_CODES: dict[str, str] = {
    "00": "Approved",
    "05": "Do not honour",
    "12": "Invalid transaction",
    "14": "Invalid card number",
    "25": "Original transaction not found",
    "41": "Lost card, pick up",
    "43": "Stolen card, pick up",
    "51": "Insufficient funds",
    "54": "Expired card",
    "57": "Transaction not permitted to cardholder",
    "61": "Exceeds withdrawal amount limit",
    "62": "Restricted card",
    "82": "Card authentication failed (cryptogram or dynamic CVV)",
    "91": "Issuer or switch inoperative",
    "96": "System malfunction",
    "N7": "Decline for CVV2 failure",
}
# What a user is told: the issuer's words are for operators, these are for people.
_USER_REASONS: dict[str, str] = {
    "00": "Approved",
    "05": "Your card issuer declined the payment",
    "12": "Your card issuer declined the payment",
    "14": "The card number is not valid",
    "25": "The original payment was not found",
    "41": "The card was reported lost",
    "43": "The card was reported stolen",
    "51": "Not enough money on the card",
    "54": "The card has expired",
    "57": "The card cannot be used for this payment",
    "61": "The payment is over the card's limit",
    "62": "The card is restricted",
    "82": "The card could not be authenticated",
    "91": "Your card issuer could not be reached; try again later",
    "96": "The payment network had a problem; try again later",
    "N7": "The security code (CVV) is wrong",
}
APPROVED = "00"
Channel = Literal["contactless", "in_app", "ecommerce"]


def user_reason(response_code: str) -> str:
    """A decline reason a cardholder understands, for a field 39 response code."""
    return _USER_REASONS.get(response_code, "Your card issuer declined the payment")


class NetworkError(ServiceUnavailable):
    """The payment network could not give an answer (no card was charged by this call, or the
    client has already queued the reversal that undoes it)."""

    code, title = "network_unavailable", "The payment network is unavailable"


class NetworkUnavailable(NetworkError):
    """The circuit breaker is open or no connection to the network could be made: nothing was
    sent."""


class NetworkTimeout(NetworkError):
    """A request was sent but not answered in time. For an authorization or a purchase the
    client has already queued a 0420 reversal advice (repeated until the network acknowledges
    it), so no money stays held."""

    code, title = "network_timeout", "The payment network did not answer in time"


class NetworkCard(Protocol):
    """A card in clear, as the network needs it (the vault's `CardSecret` is one). Whoever holds
    one must never log, store or return it."""

    @property
    def pan(self) -> str: ...

    @property
    def expiry_month(self) -> int: ...

    @property
    def expiry_year(self) -> int: ...


@dataclass(frozen=True, slots=True)
class AccountVerification:
    """The answer to a zero-amount account verification (ISO 8583 0100 with amount 0)."""

    response_code: str  # field 39
    network_reference: str  # the network's trace id (field 37, retrieval reference number)
    cvv_result: str  # "M" matched, "N" did not match, "P" not processed

    @property
    def approved(self) -> bool:
        return self.response_code == APPROVED

    @property
    def reason(self) -> str:
        return RESPONSE_CODES.get(self.response_code, "Declined")


@dataclass(frozen=True, slots=True)
class Charge:
    """The answer to a card charge (authorisation and capture in one, as a top-up needs)."""

    response_code: str
    network_reference: str
    authorization_code: str | None  # field 38, six characters when approved

    @property
    def approved(self) -> bool:
        return self.response_code == APPROVED

    @property
    def reason(self) -> str:
        return RESPONSE_CODES.get(self.response_code, "Declined")


@dataclass(frozen=True)
class TokenisedCard:
    """What a payment sends instead of a PAN: the DPAN and the EMV data of one cryptogram from
    the vault (tags in comments). `device_id` / `merchant_id` are the token domain the
    cryptogram was asked for (the issuer checks the same domain when it verifies)."""

    dpan: str = field(repr=False)
    expiry_month: int
    expiry_year: int
    arqc: str  # 9F26
    atc: int  # 9F36
    unpredictable_number: str  # 9F37
    issuer_application_data: str  # 9F10
    dynamic_cvv: str
    cryptogram_version: str
    transaction_date: date  # 9A
    country_numeric: str  # 9F1A
    tvr: str = "0000000000"  # 95
    transaction_type: str = "00"  # 9C
    aip: str = "1980"  # 82
    other_amount: int = 0  # 9F03
    device_id: str | None = None
    merchant_id: str | None = None


@dataclass(frozen=True)
class Merchant:
    """The card acceptor (fields 18, 42, 43)."""

    id: str
    name: str
    mcc: str  # ISO 18245, 4 digits
    country: str  # ISO 3166 alpha-2
    city: str | None = None
    latitude: float | None = None
    longitude: float | None = None


@dataclass(frozen=True)
class Authorization:
    """The network's answer to an authorization (0110) or a refund (0210), or the client's own
    stand-in answer when the network is down (`stand_in`). `stan`/`rrn` identify it for the
    advices that follow (capture, reversal, refund)."""

    response_code: str
    auth_code: str | None
    stan: str
    rrn: str
    amount: int
    currency: str
    stand_in: bool = False

    @property
    def approved(self) -> bool:
        return self.response_code == APPROVED

    @property
    def ok(self) -> bool:
        return self.approved

    @property
    def reason(self) -> str:
        """Why, in words a user understands."""
        return user_reason(self.response_code)


class CardNetwork(Protocol):
    """A payment network client. Implementations never keep the card or the CVV they are given.

    `NetworkUnavailable` / `NetworkTimeout` (both `NetworkError`, a 503 problem) are the only
    errors; a decline is an answer, not an error. `authorize` never raises `NetworkUnavailable`:
    when the network is down it answers by the stand-in rules (docs/architecture.md).
    """

    async def verify_account(self, card: NetworkCard, cvv: str) -> AccountVerification:
        """Zero-amount account verification with the CVV: is the card real, open and the CVV
        right? No money moves."""
        ...

    async def charge(
        self, card: NetworkCard, *, amount: int, currency: str, reference: str
    ) -> Charge:
        """Charge `amount` minor units of `currency` to the card (a stored-credential,
        merchant-initiated payment: no CVV); `reference` is the merchant's order id."""
        ...

    async def authorize(
        self,
        card: TokenisedCard,
        *,
        amount: int,
        currency: str,
        merchant: Merchant,
        channel: str,
        transaction_id: str,
        rrn: str | None = None,
    ) -> Authorization:
        """0100/0110: hold `amount` on the card behind the token. A timeout raises
        `NetworkTimeout` after queuing the 0420 reversal. `rrn` (from `new_rrn()`) names the
        authorization: a caller that stored it first can reverse it after a crash."""
        ...

    async def increment(
        self,
        original: Authorization,
        card: TokenisedCard,
        *,
        amount: int,
        merchant: Merchant,
        transaction_id: str,
        channel: str = "ecommerce",
        rrn: str | None = None,
    ) -> Authorization:
        """Incremental authorization (0100 naming the original): hold `amount` more. `channel`
        is the one the cryptogram was asked for (the issuer checks the token's domain); `rrn`
        as for `authorize`."""
        ...

    async def reverse(self, original: Authorization, *, amount: int, reason: str) -> None:
        """0420 reversal advice of `amount` of the original (full or partial: a void, an
        expiry, a timeout). Returns once acknowledged (0430) or queued for repeats (0421)."""
        ...

    async def complete(self, original: Authorization, *, amount: int, final: bool) -> None:
        """0220 completion advice for a capture of `amount`; `final` releases the rest."""
        ...

    async def refund(
        self,
        original: Authorization,
        card: TokenisedCard | None,
        *,
        amount: int,
        refund_id: str,
    ) -> Authorization:
        """0200 with processing code 20: credit `amount` back to the card of the original."""
        ...


# --- the issuer side ------------------------------------------------------------------------

TokenState = Literal["active", "suspended", "deleted"]


@dataclass(frozen=True)
class IssuerCard:
    """What the issuer knows about the card behind a DPAN. `pan` (the funding card, for the
    simulator's card rules) is None when the token is not active."""

    token_id: str
    token_reference_id: str
    card_id: str
    token_status: TokenState
    token_expiry_month: int
    token_expiry_year: int
    pan: str | None = field(default=None, repr=False)
    expiry_month: int = 12
    expiry_year: int = 9999


@dataclass(frozen=True)
class CryptogramCheck:
    """Everything an issuer verifies a tokenised authorization's ARQC and dynamic CVV over, as
    it arrived in the message (field 55 and billfold's private data in field 48)."""

    dpan: str = field(repr=False)
    atc: int
    arqc: str
    issuer_application_data: str
    dynamic_cvv: str
    cryptogram_version: str
    aip: str
    amount: int
    other_amount: int
    currency_numeric: str
    country_numeric: str
    transaction_date: date
    transaction_type: str
    unpredictable_number: str
    tvr: str
    channel: Channel
    device_id: str | None
    merchant_id: str | None


class TokenService(Protocol):
    """The issuer side's view of the token vault (the network package never imports the vault:
    `billfold.app.VaultTokenService` adapts a `VaultClient` to this)."""

    async def card_for_dpan(self, dpan: str) -> IssuerCard | None:
        """The token and funding card a DPAN stands for; None for a DPAN nobody issued."""
        ...

    async def verify_cryptogram(self, card: IssuerCard, check: CryptogramCheck) -> bool:
        """Do the ARQC and the dynamic CVV verify under the issuer master key, within the
        token's domain, with an ATC never seen before (a replay fails)?"""
        ...
