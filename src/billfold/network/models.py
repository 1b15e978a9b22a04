"""What the payment network answers, and the interface every network client implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# ISO 8583 field 39 response codes the network answers with (the subset billfold acts on).
RESPONSE_CODES: dict[str, str] = {
    "00": "Approved",
    "05": "Do not honour",
    "14": "Invalid card number",
    "41": "Lost card, pick up",
    "43": "Stolen card, pick up",
    "51": "Insufficient funds",
    "54": "Expired card",
    "57": "Transaction not permitted to cardholder",
    "61": "Exceeds withdrawal amount limit",
    "91": "Issuer or switch inoperative",
    "N7": "Decline for CVV2 failure",
}
APPROVED = "00"


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


class CardNetwork(Protocol):
    """A payment network client. Implementations never keep the card or the CVV they are given."""

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
