"""Card-number arithmetic every part of billfold shares (no business rules): the Luhn check.

One implementation, so the API's input check, the vault, the network simulator and the log
redactor cannot disagree on which numbers are card numbers.
"""

from __future__ import annotations


def luhn_valid(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn (mod 10) check; False for anything else
    (empty, spaces, non-ASCII digits such as fullwidth ones)."""
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
