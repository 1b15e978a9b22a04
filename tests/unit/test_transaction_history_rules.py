"""The history's pure rules: CSV cells and amounts, month bounds in a time zone, search terms and
cursors, receipt lines (no I/O)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billfold.platform.errors import ProblemError
from billfold.transactions.history import decimal_amount, month_bounds, safe_cell
from billfold.transactions.receipts import ReceiptData, receipt_lines
from billfold.transactions.search import (
    MAX_TERMS,
    SearchCursor,
    prefix_tsquery,
    terms,
)


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (1234, "USD", "12.34"),
        (5, "USD", "0.05"),
        (0, "EUR", "0.00"),
        (1234, "JPY", "1234"),
        (1234, "BHD", "1.234"),
        (9007199254740991, "USD", "90071992547409.91"),
    ],
)
def test_decimal_amounts_use_the_currencys_minor_units(
    amount: int, currency: str, expected: str
) -> None:
    assert decimal_amount(amount, currency) == expected


@given(st.integers(min_value=0, max_value=2**53 - 1), st.sampled_from(["USD", "JPY", "BHD"]))
def test_decimal_amount_round_trips_exactly(amount: int, currency: str) -> None:
    digits = {"USD": 2, "JPY": 0, "BHD": 3}[currency]
    assert Decimal(decimal_amount(amount, currency)).scaleb(digits) == amount


@pytest.mark.parametrize("dangerous", ["=1+1", "+1", "-1", "@A1", "\tx", "\rx", "\nx", "|x", "%x"])
def test_formula_cells_become_text(dangerous: str) -> None:
    assert safe_cell(dangerous) == "'" + dangerous


@pytest.mark.parametrize("plain", ["Starbucks", "1-800 Flowers", "a=b", "Café", ""])
def test_plain_cells_are_left_alone(plain: str) -> None:
    assert safe_cell(plain) == plain
    assert safe_cell(None) == ""


def test_month_bounds_follow_the_time_zone() -> None:
    label, start, end = month_bounds("2026-03", "Europe/Berlin", date(2026, 1, 1))
    assert label == "2026-03"
    assert start.astimezone(UTC) == datetime(2026, 2, 28, 23, tzinfo=UTC)
    assert end.astimezone(UTC) == datetime(2026, 3, 31, 22, tzinfo=UTC)  # after the DST change
    label, start, end = month_bounds("2026-12", "America/New_York", date(2026, 1, 1))
    assert end.astimezone(UTC) == datetime(2027, 1, 1, 5, tzinfo=UTC)
    assert month_bounds(None, "UTC", date(2026, 7, 9))[0] == "2026-07"


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "0000-01", "x-y", "2026"])
def test_month_must_be_a_real_month(bad: str) -> None:
    with pytest.raises(ProblemError) as err:
        month_bounds(bad, "UTC", date(2026, 1, 1))
    assert err.value.status == 422


def test_search_terms_carry_no_query_syntax() -> None:
    assert terms("Star:*bucks & (coffee) | !x 'y' _z") == [
        "Star",
        "bucks",
        "coffee",
        "x",
        "y",
        "z",
    ]
    assert terms("Café Zürich") == ["Café", "Zürich"]
    assert terms("\uff33\uff34\uff21\uff32 \ufb01sh") == ["STAR", "fish"]  # full width, ligature
    assert terms("!&|:*()' --") == []
    assert len(terms("a " * 50)) == MAX_TERMS
    assert prefix_tsquery(["coffe", "corn"]) == "coffe:* & corn:*"


@given(st.text(max_size=300))
def test_any_text_makes_a_safe_tsquery(query: str) -> None:
    for word in terms(query):
        assert word and all(ch.isalnum() for ch in word)


def test_search_cursor_round_trips() -> None:
    cursor = SearchCursor(Decimal("1.060790"), "txn_01m8pr984qepm875fqb8zftcd2")
    assert SearchCursor.decode(cursor.encode()) == cursor
    newest = SearchCursor(None, "txn_01m8pr984qepm875fqb8zftcd2")
    assert SearchCursor.decode(newest.encode()) == newest
    for junk in ("abc|txn_x", "NaN|txn_x", "Infinity|txn_x", "1e999999999|txn_x", "-1.000000|t"):
        assert SearchCursor.decode(junk) is None, junk


def _receipt(**overrides: object) -> ReceiptData:
    values: dict[str, object] = {
        "kind": "capture",
        "source_id": "cap_1",
        "transaction_id": "txn_1",
        "merchant_name": "Café Zürich 東京",
        "merchant_city": "Zürich",
        "merchant_country": "CH",
        "amount": 123456,
        "currency": "CHF",
        "occurred_at": datetime(2026, 3, 1, 12, tzinfo=UTC),
        "card_brand": "mastercard",
        "card_last4": "4444",
        "auth_code": "123456",
        "locale": "de_CH",
        "time_zone": "Europe/Zurich",
    }
    values.update(overrides)
    return ReceiptData(**values)  # type: ignore[arg-type]


def test_receipt_lines_in_locale_and_zone() -> None:
    lines = dict(receipt_lines(_receipt()))
    assert lines["Merchant"] == "Café Zürich ??"  # drawable in Helvetica; never a broken box
    assert "1\u2019234.56" in lines["Amount paid"] or "1'234.56" in lines["Amount paid"]
    assert lines["Date"].startswith("01.03.2026, 13:00") and "Europe/Zurich" in lines["Date"]
    assert lines["Paid with"] == "Mastercard ending 4444"
    refund = dict(receipt_lines(_receipt(kind="refund", card_last4=None, card_brand=None)))
    assert "Amount refunded" in refund and refund["Paid with"] == "Wallet balance"
    # A locale or zone the profile should never hold still renders.
    odd = dict(receipt_lines(_receipt(locale="xx_YY", time_zone="Mars/Base")))
    assert odd["Date"].endswith("(UTC)")
