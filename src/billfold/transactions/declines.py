"""Why a payment did not go through, in stable codes and in words a person understands.

The network answers with ISO 8583 response codes (field 39); an app shows the user the words and
may act on the code (offer another card, retry later). Codes of our own cover what never reached
the issuer: the wallet balance, the risk check, the card's token, the network itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decline:
    code: str
    reason: str


# ISO 8583 response code → (stable code, words for the user).
_ISO: dict[str, tuple[str, str]] = {
    "03": ("merchant_not_accepted", "This merchant cannot take this card."),
    "04": ("card_not_usable", "Your card issuer declined the payment. Contact them."),
    "05": (
        "do_not_honour",
        "Your card issuer declined the payment. Try another card or contact your bank.",
    ),
    "12": ("invalid_transaction", "This kind of payment is not possible with this card."),
    "13": ("invalid_amount", "The card issuer did not accept this amount."),
    "14": ("invalid_card", "The card number is not valid; add the card again."),
    "41": ("card_lost", "This card was reported lost. Use another card."),
    "43": ("card_stolen", "This card was reported stolen. Use another card."),
    "51": ("insufficient_funds", "There is not enough money on the card for this payment."),
    "54": ("card_expired", "The card has expired. Add the new card to your wallet."),
    "55": ("incorrect_pin", "The PIN was wrong."),
    "57": (
        "not_permitted",
        "Your card does not allow this kind of payment. Contact your bank.",
    ),
    "59": ("suspected_fraud", "Your card issuer declined the payment. Contact them."),
    "61": ("limit_exceeded", "The payment is above your card's spending limit."),
    "62": ("restricted_card", "Your card cannot be used here."),
    "65": ("too_many_payments", "Your card has reached its number of payments for now."),
    "82": (
        "card_authentication_failed",
        "The card could not be verified for this payment. Try again.",
    ),
    "91": (
        "issuer_unavailable",
        "Your card issuer could not be reached. Try again in a moment.",
    ),
    "96": ("issuer_unavailable", "Your card issuer could not be reached. Try again in a moment."),
    "N7": ("cvv_mismatch", "The card's security code did not match."),
    "1A": ("authentication_required", "Your card issuer needs you to confirm this payment."),
}
_DEFAULT = ("declined", "The payment was declined. Try another card or contact your bank.")

# Outcomes decided before (or without) the issuer.
WALLET_INSUFFICIENT_FUNDS = Decline(
    "insufficient_funds", "Your wallet balance is too low for this payment."
)
RISK_BLOCKED = Decline(
    # The signals stay with the risk decision: naming them would teach a fraudster.
    "blocked",
    "This payment was declined for your security. Contact support if this was you.",
)
CARD_INACTIVE = Decline(
    "card_inactive", "This card is suspended or removed in your wallet. Use another card."
)
CARD_NOT_ALLOWED_HERE = Decline(
    "card_not_allowed_here", "This card cannot pay on this device or in this way."
)
NETWORK_TIMEOUT = Decline(
    "network_timeout",
    "The card network did not answer in time. Nothing was charged; try again.",
)
NETWORK_UNAVAILABLE = Decline(
    "network_unavailable", "Card payments are unavailable right now. Nothing was charged."
)
SERVICE_UNAVAILABLE = Decline(
    "temporarily_unavailable", "The payment could not be made right now. Nothing was charged."
)
INTERRUPTED = Decline(
    "interrupted", "The payment was interrupted before it finished. Nothing was charged."
)


def from_response_code(response_code: str) -> Decline:
    """The decline an ISO 8583 response code stands for."""
    code, reason = _ISO.get(response_code, _DEFAULT)
    return Decline(code, reason)


_BY_CODE: dict[str, str] = {code: reason for code, reason in _ISO.values()}
_BY_CODE |= {
    d.code: d.reason
    for d in (
        RISK_BLOCKED,
        CARD_INACTIVE,
        CARD_NOT_ALLOWED_HERE,
        NETWORK_TIMEOUT,
        NETWORK_UNAVAILABLE,
        SERVICE_UNAVAILABLE,
        INTERRUPTED,
    )
}
_BY_CODE[_DEFAULT[0]] = _DEFAULT[1]


def reason_for(code: str | None, source: str = "card") -> str | None:
    """The words for a stored decline code (a wallet and a card share `insufficient_funds`)."""
    if code is None:
        return None
    if source == "wallet" and code == WALLET_INSUFFICIENT_FUNDS.code:
        return WALLET_INSUFFICIENT_FUNDS.reason
    return _BY_CODE.get(code, _DEFAULT[1])


def codes() -> dict[str, str]:
    """Every decline code and its words (the API guide lists them)."""
    return dict(_BY_CODE)
