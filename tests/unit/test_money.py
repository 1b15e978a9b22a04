"""Money: integer minor units + ISO 4217 currency; never a float, never a lost minor unit."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from billfold.platform import money as money_module
from billfold.platform.money import (
    POINTS,
    Currency,
    CurrencyMismatch,
    MinorUnits,
    Money,
    currencies,
    is_currency,
    minor_units,
)

CODES = ["USD", "EUR", "JPY", "BHD", "GBP", "KWD", "CHF", POINTS]
amounts = st.integers(min_value=-(10**15), max_value=10**15)
currency_codes = st.sampled_from(CODES)
ratios = st.lists(st.integers(min_value=0, max_value=1_000), min_size=1, max_size=12).filter(
    lambda rs: sum(rs) > 0
)


@st.composite
def monies(draw, currency=None):
    return Money(draw(amounts), currency or draw(currency_codes))


# --- allocation -------------------------------------------------------------------------------


@given(monies(), ratios)
def test_allocate_never_loses_or_makes_a_minor_unit(m, rs):
    parts = m.allocate(rs)
    assert len(parts) == len(rs)
    assert sum(p.amount for p in parts) == m.amount
    assert all(p.currency == m.currency for p in parts)
    assert all(type(p.amount) is int for p in parts)


@given(monies(), ratios)
def test_allocate_parts_are_within_one_minor_unit_of_the_exact_share(m, rs):
    # The documented rule is "floor, then the remainder one by one to the first sharing parts",
    # so a part may get one unit more than an exact integer share, never more than that.
    total = sum(rs)
    parts = m.allocate(rs)
    for part, r in zip(parts, rs, strict=True):
        floor = m.amount * r // total
        assert part.amount - floor in (0, 1)
        assert abs(part.amount - Fraction(m.amount * r, total)) <= 1
    extra = [
        i
        for i, (p, r) in enumerate(zip(parts, rs, strict=True))
        if p.amount > m.amount * r // total
    ]
    takers = [i for i, r in enumerate(rs) if r > 0]
    assert extra == takers[: len(extra)]


@given(monies(), st.integers(min_value=1, max_value=50))
def test_allocate_equal_ratios_differ_by_at_most_one(m, n):
    parts = [p.amount for p in m.allocate([1] * n)]
    assert max(parts) - min(parts) <= 1
    assert sum(parts) == m.amount


@given(monies(), ratios)
def test_allocate_gives_nothing_to_a_zero_ratio(m, rs):
    for part, r in zip(m.allocate(rs), rs, strict=True):
        if r == 0:
            assert part.amount == 0


def test_allocate_examples():
    usd = Money(100, "USD")
    assert [p.amount for p in usd.allocate([1, 1, 1])] == [34, 33, 33]
    assert [p.amount for p in usd.allocate([70, 30])] == [70, 30]
    assert [p.amount for p in Money(5, "USD").allocate([1, 1])] == [3, 2]
    assert [p.amount for p in Money(-5, "USD").allocate([1, 1])] == [-2, -3]
    assert [p.amount for p in Money(0, "JPY").allocate([3, 4])] == [0, 0]
    # The remainder goes to the first parts that take a share, never to a zero ratio.
    assert [p.amount for p in Money(1, "USD").allocate([0, 1, 1])] == [0, 1, 0]


@pytest.mark.parametrize("bad", [[], [0], [0, 0], [1, -1], [-1, 2]])
def test_allocate_refuses_bad_ratios(bad):
    with pytest.raises(ValueError):
        Money(100, "USD").allocate(bad)


# --- arithmetic -------------------------------------------------------------------------------


@given(amounts, amounts, currency_codes)
def test_sums_and_differences_are_exact(a, b, cur):
    assert (Money(a, cur) + Money(b, cur)) == Money(a + b, cur)
    assert (Money(a, cur) - Money(b, cur)) == Money(a - b, cur)
    assert -Money(a, cur) == Money(-a, cur)
    assert (Money(a, cur) + Money(b, cur)) - Money(b, cur) == Money(a, cur)


@given(st.lists(amounts, max_size=30), currency_codes)
def test_summing_many_is_associative(values, cur):
    total = Money(0, cur)
    for v in values:
        total = total + Money(v, cur)
    assert total == Money(sum(values), cur)
    reverse = Money(0, cur)
    for v in reversed(values):
        reverse = reverse + Money(v, cur)
    assert reverse == total


@given(amounts, amounts, currency_codes, currency_codes)
def test_currency_mismatch_raises(a, b, c1, c2):
    assume(c1 != c2)
    x, y = Money(a, c1), Money(b, c2)
    for op in (
        lambda: x + y,
        lambda: x - y,
        lambda: x < y,
        lambda: x <= y,
    ):
        with pytest.raises(CurrencyMismatch):
            op()
    assert x != y  # equality never converts currencies


def test_currency_mismatch_is_a_value_error():
    assert issubclass(CurrencyMismatch, ValueError)


@given(amounts, amounts, currency_codes)
def test_comparisons_follow_amounts(a, b, cur):
    assert (Money(a, cur) < Money(b, cur)) == (a < b)
    assert (Money(a, cur) <= Money(b, cur)) == (a <= b)


def test_is_zero():
    assert Money(0, "USD").is_zero
    assert not Money(1, "USD").is_zero


def test_money_is_immutable():
    m = Money(1, "USD")
    with pytest.raises(AttributeError):
        m.amount = 2  # type: ignore[misc]


# --- refusing non-integers and unknown currencies -----------------------------------------------


@pytest.mark.parametrize(
    "amount", [12.34, 12.0, Decimal("12.34"), Decimal("12"), "1234", True, False, None, Fraction(1)]
)
def test_non_int_amount_is_refused(amount):
    with pytest.raises(TypeError):
        Money(amount, "USD")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_no_float_is_ever_accepted(value):
    with pytest.raises(TypeError):
        Money(value, "USD")  # type: ignore[arg-type]


@pytest.mark.parametrize("code", ["usd", "US", "USDX", "", "XXX", "XAU", "XTS", "ABC", "pts"])
def test_unknown_or_non_wallet_currency_is_refused(code):
    assert not is_currency(code)
    with pytest.raises(ValueError, match="ISO 4217"):
        Money(1, code)


def test_wallet_currencies_include_the_usual_ones_and_points():
    for code in ("USD", "EUR", "GBP", "JPY", "BHD", "CHF", "INR"):
        assert code in currencies()
        assert is_currency(code)
    assert is_currency(POINTS)
    assert POINTS == "PTS"


class _Body(BaseModel):
    amount: MinorUnits
    currency: Currency


@pytest.mark.parametrize("amount", [12.34, "12.34", "1234", 12.0, True, None, [1]])
def test_validation_refuses_decimal_strings_and_floats(amount):
    with pytest.raises(ValidationError):
        _Body.model_validate({"amount": amount, "currency": "USD"})


def test_validation_refuses_a_json_float_too():
    with pytest.raises(ValidationError):
        _Body.model_validate_json('{"amount": 12.34, "currency": "USD"}')
    with pytest.raises(ValidationError):
        _Body.model_validate_json('{"amount": 12.0, "currency": "USD"}')


@pytest.mark.parametrize("currency", ["usd", "XXX", "EURO", ""])
def test_validation_refuses_unknown_currency(currency):
    with pytest.raises(ValidationError):
        _Body.model_validate({"amount": 1, "currency": currency})


def test_validation_accepts_integer_minor_units():
    body = _Body.model_validate_json('{"amount": 1234, "currency": "USD"}')
    assert body.amount == 1234 and type(body.amount) is int
    assert body.currency == "USD"


# --- minor units and display --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "digits"),
    [("JPY", 0), ("KRW", 0), ("USD", 2), ("EUR", 2), ("GBP", 2), ("BHD", 3), ("KWD", 3)],
)
def test_minor_units_per_iso_4217(code, digits):
    assert minor_units(code) == digits


def test_points_have_no_minor_units():
    assert minor_units(POINTS) == 0


def test_display_examples():
    assert Money(1234, "USD").display() == "$12.34"
    assert Money(5, "USD").display() == "$0.05"
    assert Money(-1234, "USD").display() == "-$12.34"
    assert Money(123456, "USD").display() == "$1,234.56"
    assert Money(1234, "JPY").display() == "¥1,234"
    assert Money(1234, "EUR").display() == "€12.34"
    assert Money(1234, "BHD").display().replace("\xa0", " ").endswith("1.234")
    assert Money(1234, POINTS).display() == "1234 pts"


def test_display_uses_decimal_not_float():
    # 2**53 + 1 cents cannot be represented as a float; Decimal keeps every digit.
    huge = 2**53 + 1
    assert float(huge) != huge
    shown = Money(huge, "USD").display()
    assert shown == "$90,071,992,547,409.93"
    assert Money(123456789012345678, "USD").display() == "$1,234,567,890,123,456.78"


def test_display_passes_a_decimal_to_the_formatter(monkeypatch):
    seen = []

    def spy(value, currency, locale):
        seen.append(value)
        return "x"

    monkeypatch.setattr(money_module, "format_currency", spy)
    Money(1234, "USD").display()
    Money(1234, "BHD").display()
    Money(1234, "JPY").display()
    assert [type(v) for v in seen] == [Decimal, Decimal, Decimal]
    assert seen == [Decimal("12.34"), Decimal("1.234"), Decimal("1234")]


@given(monies())
def test_display_round_trips_the_exact_amount(m):
    assume(m.currency != POINTS)
    shown = m.display()
    digits = "".join(ch for ch in shown if ch.isdigit())
    assert int(digits) == abs(m.amount)
    assert shown.startswith("-") == (m.amount < 0)
