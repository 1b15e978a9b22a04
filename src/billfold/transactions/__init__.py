"""The Transaction Service: card and wallet payments (authorize, capture, void, refund,
increment, expiry), their history, search, export, summary and receipts.

The app builds a `TransactionsRuntime` (vault client, network client, risk hook) and mounts
`router` (payments) and `history_router` (history); the worker runs `expire_authorizations`,
`recover_stuck_payments` and the `receipt_consumers` (a PDF per capture and refund). The Fraud
Service plugs in a `PaymentRiskCheck` and decides payments held for review with
`approve_review` / `reject_review`.
"""

from billfold.transactions.api import router
from billfold.transactions.api_history import history_router
from billfold.transactions.events import (
    PAYMENT_CAPTURED,
    PAYMENT_REFUNDED,
    SOURCE,
)
from billfold.transactions.operations import approve_review, reject_review
from billfold.transactions.receipts import receipt_consumers
from billfold.transactions.risk import (
    AllowAll,
    PaymentRisk,
    PaymentRiskCheck,
    RiskDecision,
)
from billfold.transactions.runtime import PaymentMetrics, TransactionsRuntime
from billfold.transactions.sweepers import expire_authorizations, recover_stuck_payments

__all__ = [
    "PAYMENT_CAPTURED",
    "PAYMENT_REFUNDED",
    "SOURCE",
    "AllowAll",
    "PaymentMetrics",
    "PaymentRisk",
    "PaymentRiskCheck",
    "RiskDecision",
    "TransactionsRuntime",
    "approve_review",
    "expire_authorizations",
    "history_router",
    "receipt_consumers",
    "recover_stuck_payments",
    "reject_review",
    "router",
]
