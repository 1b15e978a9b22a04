"""Request and response shapes of the Payment Method Service, and its problems.

Card numbers, CVVs and account numbers arrive as plain strings and are checked by the service
(stable codes such as `invalid_card_number`); none of them is ever part of a response or a
problem, not even in a validation error (the gateway renders only each error's message).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from babel import Locale
from pydantic import AfterValidator, BaseModel, Field, StrictInt, StringConstraints

from billfold.platform.errors import Conflict, NotFound, ProblemError, Unprocessable
from billfold.platform.money import Currency, MinorUnits
from billfold.platform.validation import Strict

MethodType = Literal["card", "bank_account"]
MethodStatus = Literal["pending_verification", "verified", "failed", "removed"]
AccountType = Literal["checking", "savings"]
METHOD_ID_PATTERN = r"^pm_[0-9a-z]{26}$"

_COUNTRIES: frozenset[str] | None = None


def _check_country(value: str) -> str:
    global _COUNTRIES
    if _COUNTRIES is None:
        names = frozenset(Locale("en").territories) - {"ZZ", "EU", "UN", "EZ", "QO"}
        _COUNTRIES = frozenset(c for c in names if len(c) == 2 and c.isalpha())
    if value not in _COUNTRIES:
        raise ValueError("must be an ISO 3166-1 alpha-2 country code such as US")
    return value


Country = Annotated[
    str, StringConstraints(min_length=2, max_length=2), AfterValidator(_check_country)
]


Nickname = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Line = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
OptionalLine = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]
Place = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
PostalCode = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20)]


class BillingAddress(Strict):
    line1: Line
    line2: OptionalLine | None = None
    city: Place
    region: Place | None = None
    postal_code: PostalCode
    country: Country


# Lengths here only keep absurd input out; the service checks the numbers themselves (Luhn,
# brand, ABA, IBAN) and answers with a code of its own.
class NewCard(Strict):
    # repr=False: a request model shows up in tracebacks, debuggers and log lines by its repr.
    pan: str = Field(
        max_length=32, repr=False, description="The card number (spaces and dashes allowed)"
    )
    expiry_month: StrictInt = Field(description="1-12")
    expiry_year: StrictInt = Field(description="Four digits, e.g. 2030")
    cvv: str = Field(
        max_length=8, repr=False, description="3 digits (4 for American Express); never stored"
    )
    cardholder_name: Name
    billing_address: BillingAddress


class NewBankAccount(Strict):
    """A US account (`routing_number` + `account_number` + `account_type`) or an `iban` (with an
    optional `bic`)."""

    routing_number: str | None = Field(default=None, max_length=32)
    account_number: str | None = Field(default=None, max_length=32, repr=False)
    account_type: AccountType | None = None
    iban: str | None = Field(default=None, max_length=64, repr=False)
    bic: str | None = Field(default=None, max_length=16)
    currency: Currency | None = Field(
        default=None, description="Default: the currency of the bank's country"
    )


class NewPaymentMethod(Strict):
    """Exactly one of `card` or `bank_account`."""

    card: NewCard | None = None
    bank_account: NewBankAccount | None = None
    nickname: Nickname | None = None


class UpdatePaymentMethod(Strict):
    nickname: Nickname | None = None
    billing_address: BillingAddress | None = None


class VerifyMicroDeposits(Strict):
    amounts: list[Annotated[StrictInt, Field(ge=1, le=99)]] = Field(
        min_length=2, max_length=2, description="The two deposits in minor units, any order"
    )


class CardView(BaseModel):
    brand: str
    last4: str
    expiry_month: int
    expiry_year: int
    cardholder_name: str | None
    billing_address: BillingAddress | None
    fingerprint: str = Field(description="Same card → same value (keyed hash; not the PAN)")
    token_id: str | None = Field(description="The device-bound EMV payment token, once verified")
    token_last4: str | None = Field(description="Last four digits of the payment token (DPAN)")


class BankAccountView(BaseModel):
    country: str
    last4: str
    routing_number: str | None
    account_type: str | None
    bic: str | None
    bank_name: str | None
    currency: str
    fingerprint: str


class MicroDepositsView(BaseModel):
    status: Literal["pending", "confirmed", "failed", "expired"]
    attempts_left: int
    expires_at: datetime


class PaymentMethod(BaseModel):
    id: str
    type: MethodType
    status: MethodStatus
    nickname: str | None
    is_default: bool
    card: CardView | None = None
    bank_account: BankAccountView | None = None
    micro_deposits: MicroDepositsView | None = None
    failure_code: str | None = Field(
        description="Why verification failed: an ISO 8583 response code for a card (N7 = CVV "
        "mismatch, 05 = do not honour, …), `micro_deposits_failed` / `micro_deposits_expired`"
    )
    failure_reason: str | None
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime


# --- wallet funding ---------------------------------------------------------------------------


class Funding(Strict):
    """A top-up from, or withdrawal to, one of your verified payment methods."""

    payment_method_id: str = Field(max_length=64)
    amount: MinorUnits = Field(description="Minor units (cents); must be positive")
    currency: Currency


class FundingBalance(BaseModel):
    currency: str
    available: int
    posted: int
    held: int


class FundingView(BaseModel):
    """A completed top-up or withdrawal; `posting_id` is its ledger posting (statement line)."""

    id: str
    type: Literal["topup", "withdrawal"]
    payment_method_id: str
    rail: Literal["card", "ach"]
    amount: int
    currency: str
    status: Literal["completed"] = "completed"
    posting_id: str
    authorization_code: str | None = None
    balance: FundingBalance = Field(description="The wallet's balance in this currency right after")
    created_at: datetime


# --- problems ---------------------------------------------------------------------------------


class PaymentMethodNotFound(NotFound):
    code, title = "payment_method_not_found", "Payment method not found"


class PaymentMethodExists(Conflict):
    code, title = "payment_method_exists", "You already have this payment method"


class PaymentMethodNotVerified(Conflict):
    code, title = "payment_method_not_verified", "The payment method is not verified"


class PaymentMethodNotPending(Conflict):
    code, title = "payment_method_not_pending", "The payment method is not awaiting verification"


class InvalidCardNumber(Unprocessable):
    code, title = "invalid_card_number", "Invalid card number"


class UnsupportedCardBrand(Unprocessable):
    code, title = "unsupported_card_brand", "Card brand not supported"


class CardExpired(Unprocessable):
    code, title = "card_expired", "The card has expired"


class InvalidExpiry(Unprocessable):
    code, title = "invalid_expiry", "Invalid expiry date"


class InvalidCvv(Unprocessable):
    code, title = "invalid_cvv", "Invalid CVV"


class InvalidRoutingNumber(Unprocessable):
    code, title = "invalid_routing_number", "Invalid routing number"


class InvalidAccountNumber(Unprocessable):
    code, title = "invalid_account_number", "Invalid account number"


class InvalidIban(Unprocessable):
    code, title = "invalid_iban", "Invalid IBAN"


class InvalidBic(Unprocessable):
    code, title = "invalid_bic", "Invalid BIC"


class InvalidMicroDeposits(Unprocessable):
    code, title = "invalid_micro_deposit_amounts", "The amounts do not match the deposits"


class MicroDepositsExpired(Conflict):
    code, title = "micro_deposits_expired", "The time to confirm the deposits is over"


class PaymentDeclined(ProblemError):
    status, code, title = 402, "payment_declined", "Payment declined"


class BankAccountRequired(Unprocessable):
    code, title = "bank_account_required", "Withdrawals go to a bank account"


class CurrencyMismatch(Unprocessable):
    code, title = "currency_mismatch", "The bank account holds another currency"


class TooManyCardAttempts(ProblemError):
    status, code, title = 429, "too_many_attempts", "Too many attempts"


class CardTokenInactive(Conflict):
    code, title = "card_token_inactive", "The card's payment token is not active"


class TopUpInterrupted(Conflict):
    code, title = "topup_interrupted", "The top-up was interrupted"


class CardRequired(Unprocessable):
    code, title = "card_required", "This needs a card"


@dataclass(frozen=True, slots=True)
class CardToken:
    """A verified card as a payment spends it: the vault's payment token and what a receipt
    shows. Never the PAN or the DPAN."""

    payment_method_id: str
    token_id: str
    brand: str
    last4: str
    expiry_month: int
    expiry_year: int
