"""The payment events loyalty learns from (by type string, never by importing transactions):
a capture earns points, a succeeded refund takes them back in proportion."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.loyalty import service
from billfold.loyalty.events import PAYMENT_CAPTURED, PAYMENT_REFUNDED
from billfold.loyalty.models import Capture, LoyaltyRuntime
from billfold.platform.bus.consumers import Consumer
from billfold.platform.money import POINTS

CONSUMER = "loyalty"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _amount(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


async def _captured(conn: AsyncConnection, rt: LoyaltyRuntime, data: dict[str, Any]) -> None:
    capture = data.get("capture") or {}
    merchant = data.get("merchant") or {}
    user_id, capture_id = _text(data.get("user_id")), _text(capture.get("id"))
    currency = _text(data.get("currency"))
    amount = _amount(capture.get("amount"))
    if not user_id or not capture_id or not currency or currency == POINTS or not amount:
        return  # nothing was captured (or the event is not a capture loyalty can read)
    await service.earn(
        conn,
        rt,
        Capture(
            user_id=user_id,
            transaction_id=str(data["transaction_id"]),
            capture_id=capture_id,
            amount=amount,
            currency=currency,
            category=_text(data.get("category")),
            mcc=_text(merchant.get("mcc")),
            merchant_id=_text(merchant.get("id")),
            channel=_text(data.get("channel")),
        ),
    )


async def _refunded(conn: AsyncConnection, rt: LoyaltyRuntime, data: dict[str, Any]) -> None:
    refund = data.get("refund") or {}
    # Only money that went back takes points back: a pending or failed refund changes nothing.
    if refund.get("status") != "succeeded":
        return
    user_id, refund_id = _text(data.get("user_id")), _text(refund.get("id"))
    currency, amount = _text(data.get("currency")), _amount(refund.get("amount"))
    if not user_id or not refund_id or not currency or not amount:
        return
    await service.reverse_refund(
        conn,
        rt,
        user_id=user_id,
        transaction_id=str(data["transaction_id"]),
        refund_id=refund_id,
        refund_amount=amount,
        currency=currency,
    )


def consumers(rt: LoyaltyRuntime) -> list[Consumer]:
    """The loyalty consumer (`billfold worker --consumers loyalty`): its effects commit with
    its inbox row, and a capture or refund id is handled once even under another event id."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event["type"] == PAYMENT_CAPTURED:
            await _captured(conn, rt, data)
        elif event["type"] == PAYMENT_REFUNDED:
            await _refunded(conn, rt, data)

    return [Consumer(CONSUMER, frozenset({PAYMENT_CAPTURED, PAYMENT_REFUNDED}), handle)]
