"""The Payment Method Service: cards and bank accounts, their verification, the default one,
and wallet funding (top-ups from them, withdrawals to bank accounts).

The app builds a `PaymentMethodsRuntime` (the vault client, the payment network, the sealing
key) and mounts `router` and `wallet_router`; the worker runs `expire_micro_deposits`.
`micro_deposit_amounts` reads what the simulated ACH deposited (the demo and tests play the user
reading their bank statement).
"""

from billfold.payment_methods.api import router, wallet_router
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.payment_methods.service import expire_micro_deposits, micro_deposit_amounts

__all__ = [
    "PaymentMethodsRuntime",
    "expire_micro_deposits",
    "micro_deposit_amounts",
    "router",
    "wallet_router",
]
