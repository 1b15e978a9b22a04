"""The one Luhn check (`billfold.platform.cards`) and who uses it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from billfold.payment_methods import cards
from billfold.platform.cards import luhn_valid


def test_known_numbers() -> None:
    for good in ("4242424242424242", "378282246310005", "6011111111111117", "0"):
        assert luhn_valid(good), good
    for bad in ("4242424242424241", "", "4242 4242 4242 4242", "\uff14\uff12", "42a2"):
        assert not luhn_valid(bad), bad


@given(st.text(alphabet="0123456789", min_size=1, max_size=19))
def test_exactly_one_check_digit_completes_any_number(body: str) -> None:
    assert sum(luhn_valid(body + str(d)) for d in range(10)) == 1


def test_payment_methods_use_the_shared_check() -> None:
    assert cards.luhn_valid is luhn_valid
