"""Request and response shapes of the payment flow, and its problems."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StringConstraints, model_validator

from billfold.platform.errors import Conflict, NotFound, Unprocessable
from billfold.platform.money import Currency, MinorUnits
from billfold.platform.validation import Strict

PaymentStatus = Literal[
    "authorizing",
    "authorized",
    "declined",
    "challenge_required",
    "review",
    "partially_captured",
    "captured",
    "voided",
    "expired",
    "partially_refunded",
    "refunded",
    "failed",
]
PaymentSource = Literal["card", "wallet"]
# The vault's channels: a token's domain restricts which of them it may be used on.
Channel = Literal["contactless", "in_app", "ecommerce"]
RefundStatus = Literal["pending", "succeeded", "failed"]
IncrementStatus = Literal["pending", "approved", "declined", "failed"]

# The largest integer every JSON parser keeps exact (as for transfers): far above any payment.
MAX_AMOUNT = 2**53 - 1
METHOD_ID_PATTERN = r"^pm_[0-9a-z]{26}$"
Amount = Annotated[
    MinorUnits, Field(description="Minor units (cents); must be positive", le=MAX_AMOUNT)
]
# No control characters (U+0000-U+001F, U+007F) in free text: it is shown in apps, the CSV
# export and the PDF receipts, where they hide or garble what follows (the history's `merchant`
# filter refuses the same).
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=140, pattern=_PRINTABLE),
]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=_PRINTABLE),
]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class MerchantIn(Strict):
    """Who is paid: the merchant as the terminal or checkout describes itself."""

    id: Identifier = Field(description="The merchant's id at its acquirer")
    name: Name
    mcc: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}$")] = Field(
        description="ISO 18245 merchant category code, e.g. `5812` (restaurants)"
    )
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] = Field(
        description="ISO 3166-1 alpha-2"
    )
    city: Name | None = None
    latitude: Annotated[float, Field(ge=-90, le=90)] | None = None
    longitude: Annotated[float, Field(ge=-180, le=180)] | None = None


class NewPayment(Strict):
    """A merchant-initiated payment through the wallet: a verified card (its payment token goes
    to the network) or the wallet balance (a ledger hold)."""

    source: PaymentSource
    payment_method_id: Annotated[str, StringConstraints(pattern=METHOD_ID_PATTERN)] | None = None
    amount: Amount
    currency: Currency
    merchant: MerchantIn
    channel: Channel
    device_id: Identifier | None = None
    description: Text | None = None
    note: Text | None = None

    @model_validator(mode="after")
    def _method_for_cards(self) -> NewPayment:
        if (self.source == "card") != (self.payment_method_id is not None):
            raise ValueError("a card payment names its payment_method_id; a wallet payment none")
        return self


class NewCapture(Strict):
    """Capture part or all of what is authorized. Without `amount`: all that remains. `final`
    releases what is left uncaptured (default: only when nothing would be left anyway)."""

    amount: Amount | None = None
    final: StrictBool | None = None


class NewRefund(Strict):
    """Refund part or all of what was captured (without `amount`: all that is refundable)."""

    amount: Amount | None = None
    reason: Text | None = None


class NewIncrement(Strict):
    """Raise the authorization by `amount` (a tip, a longer hotel stay)."""

    amount: Amount


class MerchantView(BaseModel):
    id: str
    name: str
    mcc: str
    category: str
    country: str
    city: str | None = None
    latitude: float | None = None
    longitude: float | None = None


class CardView(BaseModel):
    brand: str | None
    last4: str | None


class StepUpHint(BaseModel):
    """How to confirm a payment held for step-up: start a step-up for `purpose` and `reference`,
    then resume the payment with the step-up token in `X-Step-Up-Token`."""

    purpose: str
    reference: str
    challenge_url: str
    resume_url: str


class CaptureView(BaseModel):
    id: str
    amount: int
    final: bool
    created_at: datetime


class RefundView(BaseModel):
    id: str
    amount: int
    status: RefundStatus
    reason: str | None = None
    failure_code: str | None = None
    failure_reason: str | None = None
    created_at: datetime


class IncrementView(BaseModel):
    id: str
    amount: int
    status: IncrementStatus
    decline_code: str | None = None
    decline_reason: str | None = None
    created_at: datetime


class Payment(BaseModel):
    id: str
    status: PaymentStatus
    source: PaymentSource
    payment_method_id: str | None
    card: CardView | None = None
    amount: int = Field(description="What the merchant first asked for (minor units)")
    currency: str
    authorized_amount: int = Field(description="What the authorization covers now")
    captured_amount: int
    refunded_amount: int = Field(description="Refunded, including refunds still in progress")
    capturable_amount: int = Field(description="What may still be captured")
    refundable_amount: int = Field(description="What may still be refunded")
    merchant: MerchantView
    channel: Channel
    device_id: str | None
    description: str | None
    note: str | None
    decline_code: str | None = Field(
        default=None, description="Why it was declined or failed: a stable code"
    )
    decline_reason: str | None = Field(default=None, description="The same, in words for people")
    auth_code: str | None = None
    step_up: StepUpHint | None = None
    expires_at: datetime | None = Field(
        default=None, description="When what is not captured is released"
    )
    captures: list[CaptureView] = Field(default_factory=list)
    refunds: list[RefundView] = Field(default_factory=list)
    increments: list[IncrementView] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime


class CaptureResult(CaptureView):
    payment: Payment


class RefundResult(RefundView):
    payment: Payment


class IncrementResult(IncrementView):
    payment: Payment


def problem_extra(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# --- problems ---------------------------------------------------------------------------------


class PaymentNotFound(NotFound):
    code, title = "payment_not_found", "Payment not found"


class PaymentInProgress(Conflict):
    code, title = "payment_in_progress", "The payment is still being processed"


class PaymentNotCapturable(Conflict):
    code, title = "payment_not_capturable", "The payment cannot be captured"


class CaptureExceedsAuthorized(Unprocessable):
    code, title = "capture_exceeds_authorized", "The capture is more than what is authorized"


class PaymentNotVoidable(Conflict):
    code, title = "payment_not_voidable", "The payment cannot be voided"


class PaymentNotRefundable(Conflict):
    code, title = "payment_not_refundable", "The payment cannot be refunded"


class RefundExceedsCaptured(Unprocessable):
    code, title = "refund_exceeds_captured", "The refund is more than what is refundable"


class RefundInProgress(Conflict):
    code, title = "refund_in_progress", "A refund with this key is still being processed"


class PaymentNotIncrementable(Conflict):
    code, title = "payment_not_incrementable", "The authorization cannot be raised"


class IncrementInProgress(Conflict):
    code, title = "increment_in_progress", "An increment with this key is still being processed"


class PaymentNotResumable(Conflict):
    code, title = "payment_not_resumable", "The payment is not waiting for a step-up"


class InvalidPaymentAmount(Unprocessable):
    code, title = "invalid_amount", "Invalid amount"


class PaymentCurrencyNotSupported(Unprocessable):
    code, title = "currency_not_supported", "Currency not supported"
