"""The payment network: billfold's ISO 8583 client and the network/issuer simulator.

Others use `CardNetwork` (implemented by `Iso8583Network`): zero-amount account verification and
card top-ups (Payment Methods), tokenised authorizations, incremental authorizations, reversals,
completions and refunds (Transactions). Errors are `NetworkUnavailable` and `NetworkTimeout`
(both `NetworkError`, a 503 problem); declines are answers with a field 39 response code. A
request that cannot be put on the wire raises `WireError` (a `ValueError`) before anything is
sent.

The network knows nothing of the vault: a PAN comes as any `NetworkCard` (the vault's
`CardSecret` is one), a token as a `TokenisedCard`, and the simulator maps DPANs back to cards
through the `TokenService` protocol (an adapter over the vault in `billfold.app`).
"""

from billfold.network.client import (
    CircuitBreaker,
    Iso8583Network,
    NetworkClientConfig,
    new_rrn,
)
from billfold.network.models import (
    APPROVED,
    RESPONSE_CODES,
    AccountVerification,
    Authorization,
    CardNetwork,
    Charge,
    CryptogramCheck,
    IssuerCard,
    Merchant,
    NetworkCard,
    NetworkError,
    NetworkTimeout,
    NetworkUnavailable,
    TokenisedCard,
    TokenService,
    user_reason,
)
from billfold.network.simulator import (
    NO_ANSWER,
    TEST_CARD_RULES,
    NetworkSimulator,
    SimulatorConfig,
)
from billfold.network.wire import MAX_AMOUNT as MAX_NETWORK_AMOUNT
from billfold.network.wire import WireError, country_numeric, currency_numeric

__all__ = [
    "APPROVED",
    "MAX_NETWORK_AMOUNT",
    "NO_ANSWER",
    "RESPONSE_CODES",
    "TEST_CARD_RULES",
    "AccountVerification",
    "Authorization",
    "CardNetwork",
    "Charge",
    "CircuitBreaker",
    "CryptogramCheck",
    "Iso8583Network",
    "IssuerCard",
    "Merchant",
    "NetworkCard",
    "NetworkClientConfig",
    "NetworkError",
    "NetworkSimulator",
    "NetworkTimeout",
    "NetworkUnavailable",
    "SimulatorConfig",
    "TokenService",
    "TokenisedCard",
    "WireError",
    "country_numeric",
    "currency_numeric",
    "new_rrn",
    "user_reason",
]
