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


def _amount(value: Any, what: str) -> int:
    """A whole, non-negative number of minor units. Anything else is a producer's bug: raising
    parks the event as a dead letter with this error, where losing points silently would not
    be seen."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} is not a whole number of minor units: {value!r}")
    return value


async def _captured(conn: AsyncConnection, rt: LoyaltyRuntime, data: dict[str, Any]) -> None:
    capture = data.get("capture") or {}
    merchant = data.get("merchant") or {}
    user_id, capture_id = _text(data.get("user_id")), _text(capture.get("id"))
    currency = _text(data.get("currency"))
    if not user_id or not capture_id or not currency or currency == POINTS:
        return  # nothing was captured (or the event is not a capture loyalty can read)
    amount = _amount(capture.get("amount"), "capture.amount")
    if not amount:
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
    currency = _text(data.get("currency"))
    if not user_id or not refund_id or not currency:
        return
    amount = _amount(refund.get("amount"), "refund.amount")
    if not amount:
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
