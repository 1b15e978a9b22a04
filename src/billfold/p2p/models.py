"""Request and response shapes of the P2P Transfer Service, and its problems."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from billfold import users
from billfold.platform.errors import FieldError, NotFound, ProblemError, Unprocessable
from billfold.platform.money import Currency, MinorUnits
from billfold.platform.validation import Strict

TransferStatus = Literal[
    "pending", "completed", "failed", "cancelled", "pending_claim", "expired", "reversed"
]
RequestStatus = Literal["pending", "accepted", "declined", "cancelled", "expired"]
Note = Annotated[str, StringConstraints(strip_whitespace=True, max_length=140)]
USER_ID_PATTERN = r"^usr_[0-9a-z]{26}$"
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
# The largest integer every JSON parser keeps exact. Far above any limit, and small enough that
# adding it to a day's usage never overflows a bigint (a larger amount was a 500, not a 422).
MAX_AMOUNT = 2**53 - 1
# The ways to name someone that may name nobody registered yet (the money waits in escrow).
CONTACT_KINDS = ("email", "phone")
# A transfer's or request's amount: positive (checked by the service: 0 is an `invalid_amount`
# problem pointing at the field) and at most MAX_AMOUNT.
Amount = Annotated[
    MinorUnits, Field(description="Minor units (cents); must be positive", le=MAX_AMOUNT)
]


class Counterparty(Strict):
    """Exactly one way to name someone: a user id, an e-mail address, an E.164 phone or a handle."""

    user_id: UserId | None = None
    email: users.Email | None = None
    phone: users.Phone | None = None
    handle: users.Handle | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Counterparty:
        if sum(v is not None for v in (self.user_id, self.email, self.phone, self.handle)) != 1:
            raise ValueError("give exactly one of user_id, email, phone or handle")
        return self

    @property
    def kind(self) -> users.ContactKind:
        for kind in ("user_id", "email", "phone", "handle"):
            if getattr(self, kind) is not None:
                return kind  # type: ignore[return-value]
        raise AssertionError("validated: exactly one is set")

    @property
    def value(self) -> str:
        return str(getattr(self, self.kind))

    @property
    def is_contact(self) -> bool:
        """E-mail and phone may name someone not registered yet (the money waits in escrow)."""
        return self.kind in CONTACT_KINDS


class NewTransfer(Strict):
    recipient: Counterparty
    amount: Amount
    currency: Currency
    note: Note | None = None


class PartyView(BaseModel):
    user_id: str | None
    name: str | None = None
    handle: str | None = None
    # How the sender addressed an unregistered (or not yet claimed) recipient, masked.
    contact: str | None = None


class Transfer(BaseModel):
    id: str
    status: TransferStatus
    direction: Literal["sent", "received"]
    sender: PartyView
    recipient: PartyView
    amount: int
    currency: str
    note: str | None
    failure_reason: str | None = None
    request_id: str | None = None
    claim_expires_at: datetime | None = None
    created_at: datetime
    completed_at: datetime | None = None
    updated_at: datetime


class LimitWindow(BaseModel):
    limit: int
    used: int
    remaining: int
    resets_at: datetime


class TransferLimits(BaseModel):
    currency: str
    per_transfer: int
    daily: LimitWindow
    monthly: LimitWindow


class LimitsView(BaseModel):
    kyc_tier: int
    timezone: str
    data: list[TransferLimits]


class SelfTransfer(Unprocessable):
    code, title = "self_transfer", "Cannot send money to yourself"


class RecipientNotFound(ProblemError):
    status, code, title = 422, "recipient_not_found", "Unknown recipient"


class LimitExceeded(Unprocessable):
    code, title = "limit_exceeded", "Transfer limit exceeded"


class CurrencyNotSupported(Unprocessable):
    code, title = "currency_not_supported", "Currency not supported for transfers"


class InvalidAmount(Unprocessable):
    code, title = "invalid_amount", "Invalid amount"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        # Point at the field, like every other invalid field of the body does.
        kwargs.setdefault(
            "errors",
            [FieldError(pointer="#/amount", detail="must be positive", code="invalid_amount")],
        )
        super().__init__(detail, **kwargs)


class TransferNotFound(NotFound):
    code = "transfer_not_found"


class TransferNotCancellable(ProblemError):
    status, code, title = 409, "transfer_not_cancellable", "Transfer cannot be cancelled"


class TransferBlocked(ProblemError):
    status, code, title = 422, "transfer_declined", "Transfer declined"


class ReverseTransfer(Strict):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500)]


class LimitOverride(Strict):
    """Per-user limits in minor units; null restores the KYC tier's default."""

    per_transfer: MinorUnits | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    daily: MinorUnits | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    monthly: MinorUnits | None = Field(default=None, ge=0, le=MAX_AMOUNT)


# --- claims and money requests --------------------------------------------------------------


class ClaimedTransfers(BaseModel):
    """What a claim moved to you just now (empty when nothing was waiting)."""

    data: list[Transfer]


class NewTransferRequest(Strict):
    payer: Counterparty
    amount: Amount
    currency: Currency
    note: Note | None = None


RequestDirection = Literal["outgoing", "incoming"]


class TransferRequest(BaseModel):
    id: str
    status: RequestStatus
    # outgoing: you asked for the money; incoming: you are asked to pay.
    direction: RequestDirection
    requester: PartyView
    payer: PartyView
    amount: int
    currency: str
    note: str | None
    transfer_id: str | None = None
    expires_at: datetime
    created_at: datetime
    decided_at: datetime | None = None
    updated_at: datetime


class SelfRequest(ProblemError):
    status, code, title = 422, "self_request", "Cannot request money from yourself"


class RequestNotFound(NotFound):
    status, code, title = 404, "request_not_found", "Not found"


class RequestNotPending(ProblemError):
    status, code, title = 409, "request_not_pending", "Request is no longer pending"


class RequestActionNotAllowed(ProblemError):
    status, code, title = 403, "request_action_not_allowed", "Not yours to do"
