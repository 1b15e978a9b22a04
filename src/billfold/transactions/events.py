"""Events the Transaction Service publishes (`billfold.transactions.*`).

One event per state change of a payment, keyed by the payment (transaction) id so consumers
(notifications, fraud features, loyalty, receipts) see them in order. No PAN, DPAN or cryptogram
is ever part of one: a card payment names its payment method and the card's brand and last4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billfold.platform.clock import rfc3339
from billfold.platform.events import Event

SOURCE = "/billfold/transactions"

PAYMENT_AUTHORIZING = "billfold.transactions.payment.authorizing"
PAYMENT_AUTHORIZED = "billfold.transactions.payment.authorized"
PAYMENT_DECLINED = "billfold.transactions.payment.declined"
PAYMENT_CHALLENGE_REQUIRED = "billfold.transactions.payment.challenge_required"
PAYMENT_REVIEW = "billfold.transactions.payment.review"
PAYMENT_FAILED = "billfold.transactions.payment.failed"
# One per capture: `capture` in the data says which one and whether it was the final one.
PAYMENT_CAPTURED = "billfold.transactions.payment.captured"
PAYMENT_VOIDED = "billfold.transactions.payment.voided"
# The authorization lapsed: whatever was not captured is released (`released` in the data).
PAYMENT_EXPIRED = "billfold.transactions.payment.expired"
PAYMENT_INCREMENTED = "billfold.transactions.payment.incremented"
PAYMENT_INCREMENT_DECLINED = "billfold.transactions.payment.increment_declined"
# One per refund that succeeded (`refund` in the data), and one per refund the network refused.
PAYMENT_REFUNDED = "billfold.transactions.payment.refunded"
PAYMENT_REFUND_FAILED = "billfold.transactions.payment.refund_failed"
# A payment held for review was released (authorized) or refused (voided) by a reviewer.
PAYMENT_REVIEW_APPROVED = "billfold.transactions.payment.review_approved"

STATUS_EVENTS = {
    "authorizing": PAYMENT_AUTHORIZING,
    "authorized": PAYMENT_AUTHORIZED,
    "declined": PAYMENT_DECLINED,
    "challenge_required": PAYMENT_CHALLENGE_REQUIRED,
    "review": PAYMENT_REVIEW,
    "failed": PAYMENT_FAILED,
    "voided": PAYMENT_VOIDED,
    "expired": PAYMENT_EXPIRED,
}


def payment_data(row: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """What every `billfold.transactions.payment.*` event says about the payment, as it is now."""
    data: dict[str, Any] = {
        "transaction_id": row["id"],
        "user_id": row["user_id"],
        "status": row["status"],
        "source": row["source"],
        "payment_method_id": row["payment_method_id"],
        "amount": row["amount"],
        "currency": row["currency"],
        "authorized_amount": row["authorized_amount"],
        "captured_amount": row["captured_amount"],
        "refunded_amount": row["refunded_amount"],
        "merchant": {
            "id": row["merchant_id"],
            "name": row["merchant_name"],
            "mcc": row["mcc"],
            "country": row.get("merchant_country"),
            "city": row.get("merchant_city"),
        },
        "category": row["category"],
        "channel": row["channel"],
        "device_id": row["device_id"],
        "decline_code": row["decline_code"],
        "created_at": rfc3339(row["created_at"]) if row.get("created_at") else None,
    }
    data.update(extra)
    return data


def event(type_: str, row: Mapping[str, Any], **extra: Any) -> Event:
    """The event `type_` of the payment `row` (a row's mapping, joined with its details)."""
    return Event(
        type=type_,
        source=SOURCE,
        subject=row["id"],
        aggregate_id=row["id"],
        data=payment_data(row, **extra),
    )
