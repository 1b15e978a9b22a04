"""Card number checks before anything leaves the API: Luhn, brand from BIN ranges, expiry, CVV.

The BIN table is data: each row is a brand, an inclusive range of leading digits, the lengths its
PANs may have and its CVV length. The longest matching prefix wins, so a co-branded range
(Discover inside UnionPay's 62, Maestro's 50xx and 67xx) beats the wider one.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one Luhn check of billfold, re-exported with the other card checks.
from billfold.platform.cards import luhn_valid as luhn_valid
from billfold.platform.clock import utcnow

Brand = str  # visa | mastercard | amex | discover | jcb | diners | unionpay | maestro


@dataclass(frozen=True, slots=True)
class BinRange:
    brand: Brand
    low: str  # leading digits, inclusive; `low` and `high` have the same length
    high: str
    lengths: tuple[int, ...]
    cvv_length: int = 3


def _r(brand: Brand, low: str, high: str, lengths: tuple[int, ...], cvv: int = 3) -> BinRange:
    return BinRange(brand, low, high, lengths, cvv)


_ANY_12_19 = tuple(range(12, 20))
_16_19 = (16, 17, 18, 19)

BIN_RANGES: tuple[BinRange, ...] = (
    _r("visa", "4", "4", (13, 16, 19)),
    _r("mastercard", "51", "55", (16,)),
    _r("mastercard", "2221", "2720", (16,)),
    _r("amex", "34", "34", (15,), 4),
    _r("amex", "37", "37", (15,), 4),
    _r("discover", "6011", "6011", _16_19),
    _r("discover", "644", "649", _16_19),
    _r("discover", "65", "65", _16_19),
    _r("discover", "622126", "622925", _16_19),
    _r("jcb", "3528", "3589", _16_19),
    _r("diners", "300", "305", tuple(range(14, 20))),
    _r("diners", "3095", "3095", tuple(range(14, 20))),
    _r("diners", "36", "36", tuple(range(14, 20))),
    _r("diners", "38", "39", tuple(range(14, 20))),
    _r("unionpay", "62", "62", _16_19),
    _r("unionpay", "81", "81", _16_19),
    _r("maestro", "5018", "5018", _ANY_12_19),
    _r("maestro", "5020", "5020", _ANY_12_19),
    _r("maestro", "5038", "5038", _ANY_12_19),
    _r("maestro", "5893", "5893", _ANY_12_19),
    _r("maestro", "6304", "6304", _ANY_12_19),
    _r("maestro", "6759", "6759", _ANY_12_19),
    _r("maestro", "6761", "6763", _ANY_12_19),
)

# A card valid for more than this many years ahead is a typing error, not a card.
MAX_YEARS_AHEAD = 20


def normalise_pan(raw: str) -> str | None:
    """The digits of a PAN typed with spaces or dashes; None when it is not one."""
    digits = raw.replace(" ", "").replace("-", "")
    if not (digits.isascii() and digits.isdigit()) or not 12 <= len(digits) <= 19:
        return None
    return digits


def bin_range(pan: str) -> BinRange | None:
    """The most specific BIN range the PAN falls in (whatever its length)."""
    best: BinRange | None = None
    for row in BIN_RANGES:
        head = pan[: len(row.low)]
        if len(head) == len(row.low) and row.low <= head <= row.high:
            if best is None or len(row.low) > len(best.low):
                best = row
    return best


def brand_of(pan: str) -> Brand | None:
    """The brand of a PAN whose length fits its range; None for an unknown or misfit number."""
    row = bin_range(pan)
    return row.brand if row is not None and len(pan) in row.lengths else None


def cvv_valid(pan: str, cvv: str) -> bool:
    row = bin_range(pan)
    expected = row.cvv_length if row is not None else 3
    return cvv.isascii() and cvv.isdigit() and len(cvv) == expected


def expiry_state(month: int, year: int) -> str:
    """`valid`, `expired` (the month is over) or `invalid` (no such month, or absurd years)."""
    if not 1 <= month <= 12:
        return "invalid"
    today = utcnow()
    if (year, month) < (today.year, today.month):
        return "expired"
    if year > today.year + MAX_YEARS_AHEAD:
        return "invalid"
    return "valid"
