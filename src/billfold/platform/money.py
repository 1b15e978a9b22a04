"""Money: an integer count of minor units and an ISO 4217 currency. No float ever."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Annotated

from babel.numbers import format_currency, get_currency_precision, list_currencies
from pydantic import AfterValidator, StrictInt

# Units that are not money people hold in a wallet (funds, metals, testing codes).
_NOT_WALLET_CURRENCIES = frozenset(
    {"XAU", "XAG", "XPT", "XPD", "XDR", "XTS", "XXX", "XBA", "XBB", "XBC", "XBD", "XSU", "XUA"}
)
POINTS = "PTS"  # loyalty points live in the ledger as their own unit


class CurrencyMismatch(ValueError):
    pass


@lru_cache
def currencies() -> frozenset[str]:
    return frozenset(c for c in list_currencies() if c not in _NOT_WALLET_CURRENCIES)


def is_currency(code: str) -> bool:
    return code in currencies() or code == POINTS


def minor_units(currency: str) -> int:
    """Digits after the decimal point (USD 2, JPY 0, BHD 3)."""
    if currency == POINTS:
        return 0
    return int(get_currency_precision(currency))


def _check_currency(code: str) -> str:
    if not is_currency(code):
        raise ValueError("must be an ISO 4217 currency code such as USD")
    return code


Currency = Annotated[str, AfterValidator(_check_currency)]
MinorUnits = StrictInt  # "12.34" or 12.34 is refused by validation, never rounded


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units of one currency."""

    amount: int
    currency: str

    def __post_init__(self) -> None:
        if type(self.amount) is not int:
            raise TypeError("Money.amount must be an int of minor units")
        _check_currency(self.currency)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"{self.currency} vs {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.amount < other.amount

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.amount <= other.amount

    @property
    def is_zero(self) -> bool:
        return self.amount == 0

    def allocate(self, ratios: list[int]) -> list[Money]:
        """Split by integer ratios without losing a minor unit (remainder to the first parts)."""
        if not ratios or any(r < 0 for r in ratios) or sum(ratios) == 0:
            raise ValueError("ratios must be non-negative with a positive sum")
        total = sum(ratios)
        parts = [self.amount * r // total for r in ratios]
        remainder = self.amount - sum(parts)
        takers = [i for i, r in enumerate(ratios) if r > 0]  # a zero ratio gets nothing
        for i in range(abs(remainder)):
            parts[takers[i % len(takers)]] += 1 if remainder > 0 else -1
        return [Money(p, self.currency) for p in parts]

    def display(self, locale: str = "en_US") -> str:
        """A human string such as `$12.34`; never a substitute for amount + currency."""
        if self.currency == POINTS:
            return f"{self.amount} pts"
        scaled = Decimal(self.amount).scaleb(-minor_units(self.currency))
        return str(format_currency(scaled, self.currency, locale=locale))
