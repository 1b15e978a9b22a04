"""Bank account checks: US ABA routing numbers and account numbers, IBAN and BIC (schwifty)."""

from __future__ import annotations

from dataclasses import dataclass

from babel.numbers import get_territory_currencies
from schwifty import BIC, IBAN
from schwifty.exceptions import SchwiftyException

from billfold.platform.money import is_currency

# The first two digits of an ABA routing number: Federal Reserve districts (01-12), thrift
# institutions (21-32), electronic (61-72) and traveller's cheques (80). Anything else is a typo.
_ROUTING_PREFIXES = frozenset(
    [f"{n:02d}" for n in range(0, 13)]
    + [f"{n:02d}" for n in range(21, 33)]
    + [f"{n:02d}" for n in range(61, 73)]
    + ["80"]
)
_ABA_WEIGHTS = (3, 7, 1) * 3


def routing_number_valid(value: str) -> bool:
    """Nine digits, a known prefix and the ABA checksum (3-7-1 weights, sum divisible by 10)."""
    if len(value) != 9 or not (value.isascii() and value.isdigit()):
        return False
    if value[:2] not in _ROUTING_PREFIXES:
        return False
    return sum(int(d) * w for d, w in zip(value, _ABA_WEIGHTS, strict=True)) % 10 == 0


def account_number_valid(value: str) -> bool:
    """US account numbers are 4 to 17 digits (NACHA); not all zeros."""
    return 4 <= len(value) <= 17 and value.isascii() and value.isdigit() and value.strip("0") != ""


@dataclass(frozen=True, slots=True)
class CheckedIban:
    compact: str
    country: str
    bic: str | None
    bank_name: str | None


def check_iban(value: str) -> CheckedIban | None:
    """The IBAN in compact form with what its bank code tells (schwifty's registry), or None."""
    if len(value) > 64 or not value.isascii():
        return None
    try:
        iban = IBAN(value)
    except (SchwiftyException, ValueError):
        return None
    bic = None
    try:
        found = iban.bic
        bic = str(found.compact) if found is not None else None
    except (SchwiftyException, ValueError):
        bic = None
    name = getattr(iban, "bank_name", None)
    return CheckedIban(str(iban.compact), str(iban.country_code), bic, name)


def check_bic(value: str) -> str | None:
    if len(value) > 16 or not value.isascii():
        return None
    try:
        return str(BIC(value).compact)
    except (SchwiftyException, ValueError):
        return None


def bic_country(bic: str) -> str:
    return bic[4:6]


def currency_of(country: str) -> str | None:
    """The currency a bank account in `country` holds (today's legal tender), if we know it."""
    try:
        found = get_territory_currencies(country)
    except Exception:  # babel raises for unknown territories in several ways
        return None
    for code in found:
        if is_currency(code):
            return str(code)
    return None
