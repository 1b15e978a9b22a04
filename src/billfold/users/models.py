"""Request and response shapes of the User Service."""

from __future__ import annotations

import functools
import re
from datetime import date, datetime
from typing import Annotated, Any, Literal
from zoneinfo import available_timezones

import phonenumbers
from babel import Locale, UnknownLocaleError
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StringConstraints,
)

from billfold.platform.validation import Strict

_COUNTRIES: frozenset[str] | None = None


def normalize_email(value: str) -> str:
    try:
        info = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return info.normalized.lower()


def normalize_phone(value: str) -> str:
    """E.164 form (`+14155550123`); only numbers that are possible and valid for their region."""
    if not value.startswith("+"):
        raise ValueError("phone must be in E.164 form, starting with + and the country code")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValueError("not a valid phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def check_country(value: str) -> str:
    global _COUNTRIES
    if _COUNTRIES is None:
        _COUNTRIES = frozenset(Locale("en").territories) - {"ZZ", "EU", "UN", "EZ", "QO"}
        _COUNTRIES = frozenset(c for c in _COUNTRIES if len(c) == 2 and c.isalpha())
    value = value.upper()
    if value not in _COUNTRIES:
        raise ValueError("must be an ISO 3166-1 alpha-2 country code such as US")
    return value


def check_locale(value: str) -> str:
    try:
        Locale.parse(value.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        raise ValueError("not a known locale (e.g. en, en_US, de_DE)") from None
    return value.replace("-", "_")


@functools.lru_cache(maxsize=1)
def _timezones() -> frozenset[str]:
    # available_timezones() walks the tz database on every call (~9 ms): read it once.
    return frozenset(available_timezones())


def check_timezone(value: str) -> str:
    if value not in _timezones():
        raise ValueError("not an IANA time zone (e.g. Europe/Berlin)")
    return value


def check_password(value: str) -> str:
    if len(value) < 10:
        raise ValueError("password must be at least 10 characters")
    if len(value) > 256:
        raise ValueError("password must be at most 256 characters")
    if len(set(value)) < 4:
        raise ValueError("password is too simple")
    return value


Email = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=254), AfterValidator(normalize_email)
]
Phone = Annotated[str, StringConstraints(max_length=32), AfterValidator(normalize_phone)]
Country = Annotated[
    str, StringConstraints(min_length=2, max_length=2), AfterValidator(check_country)
]
Password = Annotated[str, AfterValidator(check_password)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
LocaleCode = Annotated[str, StringConstraints(max_length=20), AfterValidator(check_locale)]
TimeZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(check_timezone)]
_HANDLE = re.compile(r"^[a-z0-9_]{3,30}$")


def check_handle(value: str) -> str:
    value = value.removeprefix("@").lower()
    if not _HANDLE.match(value):
        raise ValueError("handle must be 3-30 letters, digits or underscores")
    return value


Handle = Annotated[str, AfterValidator(check_handle)]


class Address(Strict):
    line1: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    line2: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] | None = None
    city: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    region: Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)] | None = None
    postal_code: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20)
    ]
    country: Country


class RegisterUser(Strict):
    email: Email
    phone: Phone
    password: Password
    name: Name
    date_of_birth: date
    country: Country
    handle: Handle | None = None
    locale: LocaleCode = "en"
    timezone: TimeZone = "UTC"


class User(BaseModel):
    """A user as they see themselves (`GET /v1/me`)."""

    id: str
    email: str
    phone: str
    name: str
    handle: str | None
    date_of_birth: date
    country: str
    address: Address | None
    locale: str
    timezone: str
    avatar_url: str | None
    email_verified: bool
    phone_verified: bool
    kyc_status: Literal["unverified", "pending", "verified", "rejected", "review"]
    kyc_tier: int
    two_factor_enabled: bool
    created_at: datetime
    updated_at: datetime


class UpdateProfile(Strict):
    name: Name | None = None
    email: Email | None = None
    phone: Phone | None = None
    handle: Handle | None = None
    address: Address | None = None
    locale: LocaleCode | None = None
    timezone: TimeZone | None = None


class StartVerification(Strict):
    channel: Literal["email", "phone"]


class Verification(BaseModel):
    id: str
    channel: Literal["email", "phone"]
    target: str = Field(description="Masked address the code was sent to")
    status: Literal["pending", "confirmed", "expired", "failed"]
    expires_at: datetime
    attempts_left: int


class ConfirmVerification(Strict):
    code: Annotated[str, StringConstraints(pattern=r"^\d{6}$")]


def mask_email(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    return f"{phone[:3]}*****{phone[-2:]}"


# --- devices and sessions -------------------------------------------------------------------------

DeviceName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]
PushToken = Annotated[
    str, StringConstraints(min_length=8, max_length=4096, pattern=r"^[\x21-\x7e]+$")
]


class EnrolDevice(Strict):
    name: DeviceName
    platform: Literal["ios", "android", "web", "watch"]
    push_token: PushToken | None = None
    public_key: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None,
        description="The device's P-256 public key (Secure Enclave / TEE), PEM or base64 DER "
        "SPKI; enables device-signature (biometric) sign-in",
    )
    attestation: dict[str, Any] | None = Field(
        default=None, description="Platform attestation (App Attest / Play Integrity), stored as is"
    )


class UpdateDevice(Strict):
    name: DeviceName | None = None
    push_token: PushToken | None = None


class Device(BaseModel):
    id: str
    name: str
    platform: Literal["ios", "android", "web", "watch"]
    has_push_token: bool
    has_device_key: bool
    scopes: list[str]
    created_at: datetime
    last_seen_at: datetime | None
    current: bool = False


class Session(BaseModel):
    id: str
    device_id: str | None
    auth_method: str
    scopes: list[str]
    ip: str | None
    user_agent: str | None
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    current: bool


# --- tokens ---------------------------------------------------------------------------------------

Scope = Annotated[str, StringConstraints(max_length=200, pattern=r"^[a-z_ ]*$")]


class PasswordGrant(Strict):
    grant_type: Literal["password"]
    username: Annotated[str, StringConstraints(max_length=254)] = Field(description="The email")
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    device_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    scope: Scope | None = None


class RefreshGrant(Strict):
    grant_type: Literal["refresh_token"]
    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    scope: Scope | None = None


class DeviceSignatureGrant(Strict):
    grant_type: Literal["device_signature"]
    device_id: Annotated[str, StringConstraints(max_length=64)]
    challenge_id: Annotated[str, StringConstraints(max_length=64)]
    signature: Annotated[str, StringConstraints(max_length=512)] = Field(
        description="base64url ECDSA P-256/SHA-256 signature (DER or raw r||s) of `signing_input`"
    )
    scope: Scope | None = None


class PasskeyGrant(Strict):
    grant_type: Literal["passkey"]
    challenge_id: Annotated[str, StringConstraints(max_length=64)]
    credential: dict[str, Any] = Field(description="The PublicKeyCredential JSON from the browser")
    scope: Scope | None = None


class MfaOtpGrant(Strict):
    grant_type: Literal["mfa_otp"]
    mfa_token: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="From the `mfa_required` answer to the password grant"
    )
    otp: Annotated[str, StringConstraints(pattern=r"^\d{6}$")] = Field(
        description="The current code of the authenticator app"
    )


TokenRequest = Annotated[
    PasswordGrant | RefreshGrant | DeviceSignatureGrant | PasskeyGrant | MfaOtpGrant,
    Field(discriminator="grant_type"),
]


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    refresh_token: str
    scope: str
    session_id: str


class DeviceChallengeRequest(Strict):
    device_id: Annotated[str, StringConstraints(max_length=64)]


class DeviceChallenge(BaseModel):
    challenge_id: str
    nonce: str
    signing_input: str = Field(description="The exact UTF-8 string the device key must sign")
    expires_at: datetime


# --- two-factor, step-up and passkeys ---

OtpCode = Annotated[str, StringConstraints(pattern=r"^\d{6}$")]
StepUpMethod = Literal["totp", "sms", "email", "device_signature"]
StepUpPurpose = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
StepUpReference = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
]
ChallengeId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
PasskeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]


class TotpEnrolment(BaseModel):
    """Shown once: put `provisioning_uri` in a QR code for the authenticator app."""

    secret: str = Field(description="The base32 TOTP seed; it is never shown again")
    provisioning_uri: str = Field(description="`otpauth://totp/...` for authenticator apps")
    issuer: str
    digits: int = 6
    period: int = 30
    algorithm: Literal["SHA1"] = "SHA1"


class TotpCode(Strict):
    code: OtpCode


class TwoFactorStatus(BaseModel):
    totp_enabled: bool
    totp_pending: bool = Field(description="An enrolment was started but not confirmed")
    confirmed_at: datetime | None


class StartStepUp(Strict):
    method: StepUpMethod
    purpose: StepUpPurpose = Field(description="What the step-up is for, e.g. `payment`")
    reference: StepUpReference | None = Field(
        default=None, description="The id of the payment, transfer or change it authorises"
    )


class StepUpChallenge(BaseModel):
    id: str
    method: StepUpMethod
    purpose: str
    reference: str | None
    expires_at: datetime
    target: str | None = Field(
        default=None, description="Masked phone or email the code was sent to (sms, email)"
    )
    signing_input: str | None = Field(
        default=None, description="device_signature: the exact UTF-8 string the device key signs"
    )


class VerifyStepUp(Strict):
    code: OtpCode | None = Field(default=None, description="totp, sms, email: the 6-digit code")
    signature: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        default=None,
        description="device_signature: base64url ECDSA P-256/SHA-256 signature of `signing_input`",
    )


class StepUpToken(BaseModel):
    step_up_token: str = Field(description="Short-lived, single-use; not an access token")
    token_type: Literal["step_up"] = "step_up"
    expires_in: int
    amr: list[str]


class PasskeyOptions(BaseModel):
    """WebAuthn options for `navigator.credentials.create()` / `.get()` (JSON form)."""

    challenge_id: str
    options: dict[str, Any]
    expires_at: datetime


class RegisterPasskey(Strict):
    challenge_id: ChallengeId
    credential: dict[str, Any] = Field(description="The PublicKeyCredential JSON from the browser")
    name: PasskeyName = "Passkey"


class PasskeyAuthenticationRequest(Strict):
    email: Email | None = Field(
        default=None, description="Optional; without it the browser offers discoverable passkeys"
    )


class Passkey(BaseModel):
    id: str
    name: str
    credential_id: str = Field(description="base64url WebAuthn credential id")
    transports: list[str]
    created_at: datetime
    last_used_at: datetime | None


# --- kyc ------------------------------------------------------------------------------------------

KycStatus = Literal["unverified", "pending", "verified", "rejected", "review"]
DocumentType = Literal["passport", "national_id", "driving_licence"]
CheckResult = Literal["pass", "fail", "review"]
_DOCUMENT_NUMBER = re.compile(r"^[A-Z0-9]{4,20}$")
_NAME_PUNCTUATION = frozenset(" -'\u2019.,")  # \u2019: typographic apostrophe


def normalize_document_number(value: str) -> str:
    """Upper case without spaces and hyphens; the per-country format is the provider's check."""
    cleaned = re.sub(r"[\s\-]", "", value).upper()
    if not _DOCUMENT_NUMBER.match(cleaned):
        raise ValueError("must be 4 to 20 letters or digits (spaces and hyphens are ignored)")
    return cleaned


def check_legal_name(value: str) -> str:
    value = " ".join(value.split())
    if not any(c.isalpha() for c in value):
        raise ValueError("a legal name must contain letters")
    if any(not (c.isalpha() or c in _NAME_PUNCTUATION) for c in value):
        raise ValueError("a legal name may contain only letters, spaces, hyphens and apostrophes")
    return value


LegalName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=2, max_length=140),
    AfterValidator(check_legal_name),
]
DocumentNumber = Annotated[
    str, StringConstraints(max_length=40), AfterValidator(normalize_document_number)
]


class SubmitKyc(Strict):
    """Identity data for `POST /v1/me/kyc`; the document number is never stored or shown in clear."""

    legal_name: LegalName
    date_of_birth: date
    address: Address
    document_type: DocumentType
    document_country: Country
    document_number: DocumentNumber = Field(
        description="As printed on the document; stored only as its last 4 characters and a keyed hash"
    )


class KycCheck(BaseModel):
    name: str
    result: CheckResult
    reason: str | None = None


class AdminKycCheck(KycCheck):
    detail: dict[str, Any] | None = Field(
        default=None, description="Evidence, e.g. the sanctions list entry and match score"
    )


class KycSubmission(BaseModel):
    """A KYC submission as its owner sees it (no document number, no screening details)."""

    id: str
    status: Literal["pending", "verified", "rejected", "review"]
    tier: int
    document_type: DocumentType
    document_country: str
    checks: list[KycCheck]
    reason: str | None = Field(default=None, description="Why it was rejected or is in review")
    created_at: datetime
    decided_at: datetime | None


class KycState(BaseModel):
    """`GET /v1/me/kyc`: where the caller stands and their latest submission."""

    status: KycStatus
    tier: int = Field(description="0 unverified, 1 identity verified, 2 identity + email + phone")
    can_submit: bool
    submission: KycSubmission | None


class KycAuditEntry(BaseModel):
    from_status: KycStatus
    to_status: KycStatus
    actor: str
    reason: str | None
    at: datetime


class AdminKycSubmission(BaseModel):
    """A KYC submission as a reviewer sees it: identity data, every check, and its history."""

    id: str
    user_id: str
    status: Literal["pending", "verified", "rejected", "review"]
    tier: int
    legal_name: str
    date_of_birth: date
    address: Address
    document_type: DocumentType
    document_country: str
    document_number_last4: str
    checks: list[AdminKycCheck]
    reason: str | None
    decided_by: str | None
    created_at: datetime
    decided_at: datetime | None
    history: list[KycAuditEntry] = Field(default_factory=list)


class KycDecisionRequest(Strict):
    decision: Literal["verified", "rejected"]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500)]


# --- passwords ------------------------------------------------------------------------------------


class ChangePassword(Strict):
    current_password: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    new_password: Password = Field(description="Same rules as at registration; not the current")


class StartPasswordReset(Strict):
    email: Email


class PasswordResetStarted(BaseModel):
    """The same answer whether or not the email has an account."""

    reset_id: str = Field(description="Send it back with the emailed code to set a new password")
    expires_in: int = Field(description="Seconds the code is valid")


class ConfirmPasswordReset(Strict):
    reset_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    code: OtpCode = Field(description="The 6-digit code from the email")
    new_password: Password
