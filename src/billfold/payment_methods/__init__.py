"""The Payment Method Service: cards and bank accounts, their verification, the default one,
and wallet funding (top-ups from them, withdrawals to bank accounts).

Transactions spend a verified card through `card_token_for` (its payment token, never a number).
The app builds a `PaymentMethodsRuntime` (the vault client, the payment network, the sealing
key) and mounts `router` and `wallet_router`; the worker runs `expire_micro_deposits` and
`recover_fundings` (card top-ups a crash left between the charge and the credit) and the
`consumers` (a card the vault reissued updates its methods' last4 and expiry).
`micro_deposit_amounts` reads what the simulated ACH deposited (the demo and tests play the user
reading their bank statement).
"""

from billfold.payment_methods.api import router, wallet_router
from billfold.payment_methods.funding import recover_fundings
from billfold.payment_methods.models import (
    CardRequired,
    CardToken,
    PaymentMethodNotFound,
    PaymentMethodNotVerified,
)
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.payment_methods.service import (
    card_token_for,
    consumers,
    expire_micro_deposits,
    micro_deposit_amounts,
)

__all__ = [
    "CardRequired",
    "CardToken",
    "PaymentMethodNotFound",
    "PaymentMethodNotVerified",
    "PaymentMethodsRuntime",
    "card_token_for",
    "consumers",
    "expire_micro_deposits",
    "micro_deposit_amounts",
    "recover_fundings",
    "router",
    "wallet_router",
]
