"""The fraud hook: every payment asks a `PaymentRiskCheck` before it is authorized (default:
allow). The same shape as P2P's `RiskCheck`, with what a card payment adds (merchant, channel,
place), so the Fraud Service can plug one implementation into both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.money import Money

RiskAction = Literal["allow", "challenge", "review", "block"]


@dataclass(frozen=True, slots=True)
class PaymentRisk:
    """What a risk check knows about a payment about to be authorized."""

    transaction_id: str
    user_id: str
    source: str  # card | wallet
    payment_method_id: str | None
    money: Money
    merchant_id: str
    merchant_name: str
    mcc: str
    category: str
    merchant_country: str
    merchant_city: str | None
    latitude: float | None
    longitude: float | None
    channel: str
    device_id: str | None  # the device the payment comes from (the session's, else the body's)
    session_device_id: str | None  # the device the caller's session is bound to
    ip: str | None
    stepped_up: bool = False


@dataclass(frozen=True, slots=True)
class RiskDecision:
    action: RiskAction
    score: int = 0  # 0-1000
    reasons: tuple[str, ...] = field(default=())


class PaymentRiskCheck(Protocol):
    async def assess(self, conn: AsyncConnection, payment: PaymentRisk) -> RiskDecision:
        """Decide allow, challenge (step-up), review (authorize and hold for a reviewer) or
        block (declined without contacting the network). `conn` is the payment's first,
        short transaction: a check must not wait on anything slow with it."""
        ...


class AllowAll:
    """The default until the Fraud Service plugs in."""

    async def assess(self, conn: AsyncConnection, payment: PaymentRisk) -> RiskDecision:
        return RiskDecision("allow")
