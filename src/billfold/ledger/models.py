"""What the ledger holds: accounts by owner/kind/currency, balanced postings, holds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from billfold.platform.errors import Conflict, ProblemError, Unprocessable

# The owner of the system accounts (funding, escrow, fees, network settlement).
SYSTEM = "system"

AccountKind = Literal["wallet", "escrow", "funding", "fees", "settlement"]
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
