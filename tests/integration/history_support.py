"""Helpers for the history tests: transactions written with plain SQL (the payment flow is tested
on its own; the history reads whatever the flow stored), with the captures and refunds that
make receipts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from billfold.platform.ids import new_id

_TXN = text(
    """
    INSERT INTO transactions.transactions (
        id, user_id, source, payment_method_id, status, amount, currency, authorized_amount,
        captured_amount, refunded_amount, merchant_id, merchant_name, mcc, category, channel,
        description, note, auth_code, decline_code, idempotency_key, request_hash, created_at,
        updated_at)
    VALUES (
        :id, :user_id, :source, :payment_method_id, :status, :amount, :currency, :amount,
        :captured, :refunded, :merchant_id, :merchant_name, :mcc,
        transactions.category_for_mcc(:mcc), :channel, :description, :note, :auth_code,
        :decline_code, :key, 'test', :created_at, :created_at)
    """
)
_DETAILS = text(
    """
    INSERT INTO transactions.transaction_details (
        transaction_id, merchant_country, merchant_city, card_brand, card_last4, response_code)
    VALUES (:id, :country, :city, :brand, :last4, '00')
    """
)
_CAPTURE = text(
    """
    INSERT INTO transactions.captures (
        id, transaction_id, amount, final, idempotency_key, request_hash, created_at)
    VALUES (:id, :txn, :amount, true, :key, 'test', :at)
    """
)
_REFUND = text(
    """
    INSERT INTO transactions.refunds (
        id, transaction_id, amount, status, idempotency_key, request_hash, created_at, updated_at)
    VALUES (:id, :txn, :amount, :status, :key, 'test', :at, :at)
    """
)


async def add_transaction(
    app: Any,
    user_id: str,
    *,
    merchant: str = "Corner Shop",
    amount: int = 1250,
    currency: str = "USD",
    mcc: str = "5411",
    status: str = "captured",
    captured: int | None = None,
    refunded: int = 0,
    card: tuple[str, str] | None = ("visa", "4242"),
    description: str | None = None,
    note: str | None = None,
    created_at: datetime | None = None,
    city: str | None = "Seattle",
    country: str = "US",
    decline_code: str | None = None,
    refund_status: str = "succeeded",
) -> str:
    """A transaction of `user_id` as the payment flow stores it, captured in full by default
    (with its capture row, and a refund row when `refunded`). Returns its id."""
    txn = new_id("txn")
    at = created_at or datetime.now(UTC)
    if captured is None:
        captured = amount if status in ("captured", "partially_refunded", "refunded") else 0
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            _TXN,
            {
                "id": txn,
                "user_id": user_id,
                "source": "card" if card else "wallet",
                "payment_method_id": new_id("pm") if card else None,
                "status": status,
                "amount": amount,
                "currency": currency,
                "captured": captured,
                "refunded": refunded,
                "merchant_id": f"m-{merchant.lower().replace(' ', '-')}"[:60],
                "merchant_name": merchant,
                "mcc": mcc,
                "channel": "contactless",
                "description": description,
                "note": note,
                "auth_code": "A1B2C3" if card and decline_code is None else None,
                "decline_code": decline_code,
                "key": uuid.uuid4().hex,
                "created_at": at,
            },
        )
        await conn.execute(
            _DETAILS,
            {
                "id": txn,
                "country": country,
                "city": city,
                "brand": card[0] if card else None,
                "last4": card[1] if card else None,
            },
        )
        if captured:
            await conn.execute(
                _CAPTURE,
                {
                    "id": new_id("cap"),
                    "txn": txn,
                    "amount": captured,
                    "key": uuid.uuid4().hex,
                    "at": at,
                },
            )
        if refunded:
            await conn.execute(
                _REFUND,
                {
                    "id": new_id("ref"),
                    "txn": txn,
                    "amount": refunded,
                    "status": refund_status,
                    "key": uuid.uuid4().hex,
                    "at": at,
                },
            )
    return txn


async def source_ids(app: Any, transaction_id: str) -> dict[str, list[str]]:
    """The capture and refund ids of a transaction, oldest first."""
    async with app.state.resources.engine.connect() as conn:
        caps = await conn.execute(
            text("SELECT id FROM transactions.captures WHERE transaction_id = :t ORDER BY id"),
            {"t": transaction_id},
        )
        refs = await conn.execute(
            text("SELECT id FROM transactions.refunds WHERE transaction_id = :t ORDER BY id"),
            {"t": transaction_id},
        )
        return {"capture": list(caps.scalars()), "refund": list(refs.scalars())}
