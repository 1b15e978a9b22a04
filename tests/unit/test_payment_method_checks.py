"""Card and bank-account checks: pure logic, no I/O (the network simulator's card rules are tested over TCP in tests/integration/test_network.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billfold.payment_methods import banks, cards


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


@given(st.text(alphabet="0123456789", min_size=11, max_size=18))
def test_luhn_accepts_the_right_check_digit_and_refuses_every_other(body: str) -> None:
    right = luhn_digit(body)
    assert cards.luhn_valid(body + right)
    for wrong in set("0123456789") - {right}:
        assert not cards.luhn_valid(body + wrong)


@given(st.text(alphabet="0123456789", min_size=12, max_size=19))
def test_luhn_catches_every_single_digit_typo(pan: str) -> None:
    pan = pan[:-1] + luhn_digit(pan[:-1])
    for i in range(len(pan)):
        for d in "0123456789":
            if d != pan[i]:
                assert not cards.luhn_valid(pan[:i] + d + pan[i + 1 :])


BRANDS = [
    ("4242424242424242", "visa"),
    ("4222222222222", "visa"),
    ("5555555555554444", "mastercard"),
    ("2221000000000009", "mastercard"),
    ("2720999999999996", "mastercard"),
    ("378282246310005", "amex"),
    ("341111111111111", "amex"),
    ("6011111111111117", "discover"),
    ("6445644564456445", "discover"),
    ("6221260000000000", "discover"),  # co-branded: Discover's range inside UnionPay's 62
    ("6229250000000000", "discover"),
    ("6200000000000005", "unionpay"),
    ("6221250000000001", "unionpay"),
    ("3530111333300000", "jcb"),
    ("3566002020360505", "jcb"),
    ("30569309025904", "diners"),
    ("38520000023237", "diners"),
    ("36227206271667", "diners"),
    ("6759649826438453", "maestro"),
    ("5018000000000009", "maestro"),
    ("6304000000000000", "maestro"),
    ("2220999999999999", None),  # just below Mastercard's 2-series
    ("2721000000000000", None),  # just above
    ("9111111111111111", None),
    ("424242424242424", None),  # Visa is 13, 16 or 19 long
    ("37828224631000", None),  # Amex is 15 long
]


@pytest.mark.parametrize(("pan", "brand"), BRANDS)
def test_brand_comes_from_the_longest_matching_bin_range(pan: str, brand: str | None) -> None:
    assert cards.brand_of(pan) == brand


def test_cvv_length_follows_the_brand() -> None:
    assert cards.cvv_valid("4242424242424242", "123")
    assert not cards.cvv_valid("4242424242424242", "1234")
    assert cards.cvv_valid("378282246310005", "1234")
    assert not cards.cvv_valid("378282246310005", "123")
    assert not cards.cvv_valid("4242424242424242", "١٢٣")  # Arabic-Indic digits
    assert cards.normalise_pan("4242 4242-4242 4242") == "4242424242424242"
    assert cards.normalise_pan("4242 4242 4242 424x") is None


def test_expiry_states() -> None:
    assert cards.expiry_state(12, 2099) == "invalid"  # more than 20 years ahead
    assert cards.expiry_state(13, 2030) == "invalid"
    assert cards.expiry_state(1, 2000) == "expired"
    assert cards.expiry_state(12, 2031) == "valid"


@pytest.mark.parametrize(
    ("routing", "ok"),
    [
        ("021000021", True),  # JPMorgan Chase
        ("011000015", True),  # Federal Reserve Bank of Boston
        ("322271627", True),  # thrift range
        ("021000022", False),  # checksum
        ("991000021", False),  # no such prefix
        ("02100002", False),
        ("02100002a", False),
        ("٠٢١٠٠٠٠٢١", False),
    ],
)
def test_aba_routing_numbers(routing: str, ok: bool) -> None:
    assert banks.routing_number_valid(routing) is ok


def test_us_account_numbers_and_ibans() -> None:
    assert banks.account_number_valid("1234") and banks.account_number_valid("1" * 17)
    assert not banks.account_number_valid("123") and not banks.account_number_valid("1" * 18)
    assert not banks.account_number_valid("0000")
    iban = banks.check_iban("de89 3704 0044 0532 0130 00")
    assert iban is not None
    assert (iban.compact, iban.country, iban.bic) == ("DE89370400440532013000", "DE", "COBADEFFXXX")
    assert banks.check_iban("DE89370400440532013001") is None
    assert banks.check_bic("NWBKGB2L") == "NWBKGB2L"
    assert banks.check_bic("NWBK") is None
    assert banks.currency_of("DE") == "EUR" and banks.currency_of("US") == "USD"
    assert banks.currency_of("GB") == "GBP"


def test_card_and_account_numbers_stay_out_of_reprs() -> None:
    from billfold.payment_methods.models import NewBankAccount, NewCard, NewPaymentMethod

    card = NewCard(
        pan="4242424242424242",
        expiry_month=12,
        expiry_year=2031,
        cvv="987",
        cardholder_name="Alice Example",
        billing_address={  # type: ignore[arg-type]
            "line1": "1 Main St",
            "city": "Springfield",
            "postal_code": "12345",
            "country": "US",
        },
    )
    bank = NewBankAccount(iban="DE89370400440532013000", account_number="000123456789")
    for shown in (repr(card), str(card), repr(NewPaymentMethod(card=card, bank_account=bank))):
        for secret in ("4242424242424242", "987", "DE89370400440532013000", "000123456789"):
            assert secret not in shown, shown
    assert "Alice Example" in repr(card)
