"""The fraud hook: every transfer asks a `RiskCheck` before money moves (default: allow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.money import Money

RiskAction = Literal["allow", "challenge", "review", "block"]


@dataclass(frozen=True, slots=True)
class TransferRisk:
    """What a risk check knows about a transfer about to be made."""

    transfer_id: str
    sender_id: str
    recipient_id: str | None  # None: addressed to an e-mail/phone, not resolved here
    recipient_kind: str
    money: Money
    device_id: str | None
    ip: str | None
    stepped_up: bool = False
    # The e-mail or E.164 phone the transfer is addressed to, normalised as the counterparty is
    # (so a block list of contacts can match); None for a transfer to a user id or handle.
    recipient_contact: str | None = None


@dataclass(frozen=True, slots=True)
class RiskDecision:
    action: RiskAction
    score: int = 0  # 0-1000
    reasons: tuple[str, ...] = field(default=())


class RiskCheck(Protocol):
    async def assess(self, conn: AsyncConnection, transfer: TransferRisk) -> RiskDecision:
        """Decide allow, challenge (step-up), review (hold and queue) or block."""
        ...


class AllowAll:
    """The default until the Fraud Service plugs in."""

    async def assess(self, conn: AsyncConnection, transfer: TransferRisk) -> RiskDecision:
        return RiskDecision("allow")
