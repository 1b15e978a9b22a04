"""The payment network, as Payment Methods sees it: zero-amount account verification and card
charges with ISO 8583 response codes.

This issue's `SimulatedNetwork` is a deliberately small, in-process stand-in with documented,
deterministic test cards; the Card Transactions issue replaces it with an ISO 8583 client and a
network simulator over TCP behind the same `CardNetwork` protocol. The network knows nothing of
the vault: it takes any object with a `pan` and an expiry (`NetworkCard`), such as the vault's
`CardSecret`.
"""

from billfold.network.models import (
    RESPONSE_CODES,
    AccountVerification,
    CardNetwork,
    Charge,
    NetworkCard,
)
from billfold.network.simulated import TEST_CARD_RULES, SimulatedNetwork

__all__ = [
    "RESPONSE_CODES",
    "TEST_CARD_RULES",
    "AccountVerification",
    "CardNetwork",
    "Charge",
    "NetworkCard",
    "SimulatedNetwork",
]
