"""`SimulatedNetwork`: the minimal in-process card verifier of this issue (the Card Transactions
issue replaces it with an ISO 8583 simulator over TCP). Deterministic, so tests and the demo can
ask for any outcome with a documented test card:

| what | account verification | charge |
|---|---|---|
| a PAN that fails the Luhn check | 14 | 14 |
| an expiry month already over | 54 | 54 |
| CVV `000` | N7 | (no CVV on a charge) |
| PAN ending `0002` (4000 0000 0000 0002) | 05 | 05 |
| PAN ending `9995` (4000 0000 0000 9995) | 00 | 51 |
| PAN ending `0069` (4000 0000 0000 0069) | 54 | 54 |
| PAN ending `9987` (4000 0000 0000 9987) | 41 | 41 |
| PAN ending `9979` (4000 0000 0000 9979) | 43 | 43 |
| PAN ending `0119` (4000 0000 0000 0119) | 91 | 91 |
| any other card | 00 | 00 |

(The suffixes follow well-known processor test cards; a real card with one of these endings is
declined by the simulator too, which is why it never runs in production.)
"""

from __future__ import annotations

import secrets
import string

from billfold.network.models import AccountVerification, Charge, NetworkCard
from billfold.platform.clock import utcnow

# Last four digits of the PAN → (verification response code, charge response code).
TEST_CARD_RULES: dict[str, tuple[str, str]] = {
    "0002": ("05", "05"),
    "9995": ("00", "51"),
    "0069": ("54", "54"),
    "9987": ("41", "41"),
    "9979": ("43", "43"),
    "0119": ("91", "91"),
}
CVV_MISMATCH = "000"


def _luhn_ok(pan: str) -> bool:
    if not (pan.isascii() and pan.isdigit()) or not 12 <= len(pan) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _expired(card: NetworkCard) -> bool:
    today = utcnow()
    return (card.expiry_year, card.expiry_month) < (today.year, today.month)


def _card_code(card: NetworkCard) -> str | None:
    """The answer the card itself forces, whatever is asked of it (None: no objection)."""
    if not _luhn_ok(card.pan):
        return "14"
    if _expired(card):
        return "54"
    return None


def _reference() -> str:
    return "".join(secrets.choice(string.digits) for _ in range(12))


class SimulatedNetwork:
    """A `CardNetwork` that answers from the rules above, at once and in process."""

    async def verify_account(self, card: NetworkCard, cvv: str) -> AccountVerification:
        code = _card_code(card)
        rule = TEST_CARD_RULES.get(card.pan[-4:])
        cvv_result = "P"
        if code is None and rule is not None and rule[0] != "00":
            code = rule[0]
        if code is None:
            cvv_result = "N" if cvv == CVV_MISMATCH else "M"
            code = "N7" if cvv_result == "N" else "00"
        return AccountVerification(
            response_code=code, network_reference=_reference(), cvv_result=cvv_result
        )

    async def charge(
        self, card: NetworkCard, *, amount: int, currency: str, reference: str
    ) -> Charge:
        code = _card_code(card)
        if code is None:
            rule = TEST_CARD_RULES.get(card.pan[-4:])
            code = rule[1] if rule is not None else "00"
        auth = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(6))
        return Charge(
            response_code=code,
            network_reference=_reference(),
            authorization_code=auth if code == "00" else None,
        )
