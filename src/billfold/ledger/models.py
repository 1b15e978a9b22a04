"""What the ledger holds: accounts by owner/kind/currency, balanced postings, holds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from billfold.platform.errors import Conflict, ProblemError, Unprocessable

# The owner of the system accounts (funding, escrow, fees, network settlement).
SYSTEM = "system"

# `points` (a user's loyalty points, PTS) and `loyalty` (the system's points and rewards
# expense) are the Loyalty Service's (migration 0011).
AccountKind = Literal["wallet", "escrow", "funding", "fees", "settlement", "points", "loyalty"]
HoldStatus = Literal["active", "committed", "voided", "expired"]


@dataclass(frozen=True, slots=True)
class Leg:
    """One side of a posting: `amount` (signed minor units) raises or lowers the account."""

    owner_id: str
    kind: AccountKind
    amount: int


@dataclass(frozen=True, slots=True)
class AccountBalance:
    account_id: str
    owner_id: str
    kind: str
    currency: str
    posted: int
    held: int

    @property
    def available(self) -> int:
        return self.posted - self.held


@dataclass(frozen=True, slots=True)
class Posting:
    """A balanced, immutable set of entries; `accounts` are the balances right after it."""

    id: str
    kind: str
    reference: str
    currency: str
    accounts: tuple[AccountBalance, ...]

    def balance_of(self, owner_id: str, kind: str = "wallet") -> AccountBalance:
        for account in self.accounts:
            if account.owner_id == owner_id and account.kind == kind:
                return account
        raise KeyError((owner_id, kind))


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    account_id: str
    owner_id: str
    currency: str
    amount: int
    remaining: int
    status: HoldStatus
    reference: str
    expires_at: datetime
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an account statement, with the account's posted balance after it."""

    seq: int
    posting_id: str
    posting_kind: str
    reference: str
    memo: str | None
    currency: str
    amount: int
    balance_after: int
    created_at: datetime


class InsufficientFunds(ProblemError):
    status, code, title = 422, "insufficient_funds", "Insufficient funds"


class HoldNotActive(Conflict):
    code, title = "hold_not_active", "Hold is not active"


class HoldExpired(Conflict):
    code, title = "hold_expired", "Hold has expired"


class HoldAmountExceeded(Unprocessable):
    code, title = "hold_amount_exceeded", "Amount exceeds the hold"


class AlreadyReversed(Conflict):
    code, title = "already_reversed", "Posting already reversed"


class InvalidAmount(Unprocessable):
    code, title = "invalid_amount", "Invalid amount"


class AmountTooLarge(ProblemError):
    status, code, title = 422, "amount_too_large", "Amount above the maximum"


class CurrencyNotSupported(Unprocessable):
    code, title = "currency_not_supported", "Currency not supported"


class InvalidAsOf(ProblemError):
    status, code, title = 422, "invalid_as_of", "Invalid point in time"


# --- HTTP shapes of the wallet (api.py) -------------------------------------------------------


class WalletBalance(BaseModel):
    """One currency of the wallet now: `available` = `posted` - `held`."""

    currency: str
    available: int = Field(description="What can be spent or sent now (minor units)")
    posted: int = Field(description="The booked balance: the sum of all entries (minor units)")
    held: int = Field(description="Reserved by active holds, not yet posted (minor units)")

    @classmethod
    def of(cls, balance: AccountBalance) -> WalletBalance:
        return cls(
            currency=balance.currency,
            available=balance.available,
            posted=balance.posted,
            held=balance.held,
        )


class Wallet(BaseModel):
    balances: list[WalletBalance]


class PastBalance(BaseModel):
    """One currency of the wallet at a past instant: the booked balance then."""

    currency: str
    posted: int = Field(description="The running balance after the last entry at or before as_of")


class PastWallet(BaseModel):
    """The wallet at `as_of`. Holds are reservations, not entries of the books, and the ledger
    keeps no history of how much each one reserved over time, so a past instant reports only
    the posted balance: there is no `held` or `available` in the past."""

    as_of: datetime
    balances: list[PastBalance]


class StatementEntry(BaseModel):
    """One line of the wallet statement."""

    posting_id: str
    kind: str = Field(description="What moved the money, e.g. `wallet_topup`, `p2p_transfer`")
    reference: str = Field(description="The business object behind it, e.g. a transfer id")
    memo: str | None
    direction: Literal["credit", "debit"]
    amount: int = Field(description="Signed minor units: positive credits, negative debits")
    currency: str
    balance_after: int = Field(description="The posted balance right after this entry")
    created_at: datetime


WalletMovementType = Literal["topup", "withdrawal"]
