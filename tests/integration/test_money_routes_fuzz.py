"""Hostile input on every money route (wallet, payment methods, transfers, claims, money requests,
admin): each is
a problem+json 4xx with a stable `code`, never a 500, never echoes a secret, and changes nothing
(balances, holds, postings, transfers, requests, limit usage, payment methods, micro-deposit
attempts, fundings, outbox, idempotency records).

One world (users, a completed transfer, one waiting for a claim, requests both ways, someone
else's transfer and request) is built once for the module; every case snapshots the database
before and after its request.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import SignedIn, fund, sign_up
from tests.integration.payment_methods_support import (
    add_bank,
    add_card,
    card_body,
    iban_body,
    new_pan,
    us_bank_body,
)
from tests.integration.transfer_support import make_admin

# Cards need the SoftHSM2-backed vault.
pytestmark = pytest.mark.usefixtures("hsm", "network_simulator")

PROBLEM = "application/problem+json"
# Put into every hostile string that could be a secret (tokens, keys, notes, reasons): no answer
# may contain it.
SECRET = "S3CR3T-d0n0tech0"
UNKNOWN_TRANSFER = "p2p_01" + "0" * 24  # well formed, nobody's
UNKNOWN_REQUEST = "req_01" + "0" * 24
UNKNOWN_USER = "usr_01" + "0" * 24
UNKNOWN_METHOD = "pm_01" + "0" * 24
UNKNOWN_PAYMENT = "txn_01" + "0" * 24


def b64(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str  # may name any key of the world ({done}, {claim}, {card}, {bank}, {me}, …)
    body: Any = None  # JSON-encoded unless bytes
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str | bytes] = field(default_factory=dict)
    as_: str = "alice"  # alice | admin | anonymous | junk_token
    idempotency: bool = True  # send a fresh Idempotency-Key
    status: int | None = None  # expected exactly, else any 4xx
    code: str | None = None  # expected problem code, else any


def transfer(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "recipient": {"email": "x@example.com"},
        "amount": 100,
        "currency": "USD",
    }
    body.update(overrides)
    return body


def ask(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"payer": {"email": "x@example.com"}, "amount": 100, "currency": "USD"}
    body.update(overrides)
    return body


# Values no amount may be: not positive, past 2^53-1 (or a bigint), not an integer.
BAD_AMOUNTS: list[tuple[str, Any, str]] = [
    ("zero", 0, "invalid_amount"),
    ("negative", -1, "invalid_amount"),
    ("min_bigint", -(2**63), "invalid_amount"),
    ("past_2_53", 2**53, "validation_failed"),
    ("past_bigint", 2**63, "validation_failed"),
    ("past_uint64", 2**64, "validation_failed"),
    ("huge", 10**40, "validation_failed"),
    ("float", 1.5, "validation_failed"),
    ("float_integral", 100.0, "validation_failed"),
    ("decimal_string", "100", "validation_failed"),
    ("exponent_string", "1e3", "validation_failed"),
    ("arabic_digits", "١٢٣", "validation_failed"),
    ("bool", True, "validation_failed"),
    ("null", None, "validation_failed"),
    ("array", [100], "validation_failed"),
    ("object", {"amount": 100}, "validation_failed"),
]
BAD_CURRENCIES: list[tuple[str, Any]] = [
    ("lowercase", "usd"),
    ("short", "US"),
    ("long", "USDD"),
    ("empty", ""),
    ("nul", "US\u0000"),
    ("not_iso", "ZZZ"),
    ("testing_code", "XXX"),
    ("unicode", "ÜSD"),
    ("number", 840),
    ("null", None),
    ("array", ["USD"]),
]
BAD_COUNTERPARTIES: list[tuple[str, Any]] = [
    ("empty", {}),
    ("two_ways", {"email": "x@example.com", "phone": "+4915112345678"}),
    ("unknown_key", {"iban": "DE89370400440532013000"}),
    ("extra_key", {"email": "x@example.com", "x": 1}),
    ("bad_email", {"email": "not-an-email"}),
    ("long_email", {"email": "x" * 300 + "@example.com"}),
    ("nul_email", {"email": "a\u0000b@example.com"}),
    ("bad_phone", {"phone": "12345"}),
    ("long_phone", {"phone": "+1" + "9" * 40}),
    ("bad_handle", {"handle": "a"}),
    ("handle_symbols", {"handle": "@@@; DROP TABLE p2p.transfers"}),
    ("bad_user_id", {"user_id": "usr_" + SECRET}),
    ("user_id_number", {"user_id": 5}),
    ("string", "usr_01" + "0" * 24),
    ("array", [{"email": "x@example.com"}]),
    ("null", None),
]
BAD_NOTES: list[tuple[str, Any]] = [
    ("too_long", SECRET + "n" * 141),
    ("nul", SECRET + "\u0000"),
    ("number", 5),
    ("array", [SECRET]),
]
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "application/json"),
    ("null", b"null", "application/json"),
    ("array", b"[]", "application/json"),
    ("string", b'"' + SECRET.encode() + b'"', "application/json"),
    ("number", b"1", "application/json"),
    ("truncated", b'{"amount": 1', "application/json"),
    ("not_utf8", b"\xff\xfe\xfd", "application/json"),
    ("digits_5000", b'{"amount": ' + b"9" * 5000 + b', "currency": "USD"}', "application/json"),
    ("nested_deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    ("nan", b'{"amount": NaN, "currency": "USD"}', "application/json"),
    ("infinity", b'{"amount": Infinity, "currency": "USD"}', "application/json"),
    ("text_plain", b'{"amount": 100, "currency": "USD"}', "text/plain"),
    ("form", b"amount=100&currency=USD", "application/x-www-form-urlencoded"),
]


def body_cases(prefix: str, path: str, valid: dict[str, Any], who: str) -> list[Case]:
    """Hostile bodies for a POST that moves or asks for money (`who` names its counterparty)."""
    cases = [
        Case(f"{prefix}-amount-{name}", "POST", path, {**valid, "amount": v}, code=code)
        for name, v, code in BAD_AMOUNTS
    ]
    cases += [
        Case(f"{prefix}-currency-{name}", "POST", path, {**valid, "currency": v})
        for name, v in BAD_CURRENCIES
    ]
    cases += [
        Case(f"{prefix}-{who}-{name}", "POST", path, {**valid, who: v}, status=422)
        for name, v in BAD_COUNTERPARTIES
    ]
    cases += [
        Case(f"{prefix}-note-{name}", "POST", path, {**valid, "note": v}, status=422)
        for name, v in BAD_NOTES
    ]
    cases += [
        Case(f"{prefix}-body-{name}", "POST", path, raw, headers={"content-type": ctype})
        for name, raw, ctype in BAD_BODIES
    ]
    missing = [k for k in valid]
    cases += [
        Case(f"{prefix}-missing-{k}", "POST", path, {x: v for x, v in valid.items() if x != k})
        for k in missing
    ]
    cases += [
        Case(f"{prefix}-unknown-field", "POST", path, {**valid, "fee": 0}, status=422),
        Case(f"{prefix}-no-idempotency-key", "POST", path, valid, idempotency=False, status=428),
        Case(
            f"{prefix}-long-idempotency-key",
            "POST",
            path,
            valid,
            idempotency=False,
            headers={"Idempotency-Key": SECRET + "k" * 256},
            code="invalid_idempotency_key",
        ),
        Case(f"{prefix}-anonymous", "POST", path, valid, as_="anonymous", status=401),
        Case(f"{prefix}-junk-token", "POST", path, valid, as_="junk_token", status=401),
    ]
    return cases


def card(**overrides: Any) -> dict[str, Any]:
    """A card body with a fresh, valid number; `overrides` replace its fields (None too)."""
    body = card_body()
    body["card"].update(overrides)
    return body


def without(body: dict[str, Any], kind: str, key: str) -> dict[str, Any]:
    return {kind: {k: v for k, v in body[kind].items() if k != key}}


ADD = "/v1/payment-methods"
ONE = "/v1/payment-methods/{id}"
PAYMENT_METHOD_CASES: list[Case] = [
    # --- POST /v1/payment-methods ---------------------------------------------------------------
    *[
        Case(f"add-body-{label}", "POST", ADD, raw, headers={"content-type": ctype})
        for label, raw, ctype in BAD_BODIES
    ],
    Case("add-neither", "POST", ADD, {}, code="validation_failed"),
    Case("add-both", "POST", ADD, {**card(), **us_bank_body()}, code="validation_failed"),
    Case("add-unknown-kind", "POST", ADD, {"wallet": {"id": SECRET}}, code="validation_failed"),
    *[
        Case(f"add-card-pan-{label}", "POST", ADD, card(pan=v), code=code)
        for label, v, code in [
            ("secret", SECRET, "invalid_card_number"),
            ("luhn", "4242424242424241", "invalid_card_number"),
            ("short", "4242", "invalid_card_number"),
            ("arabic-digits", "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢", "invalid_card_number"),
            ("unknown-brand", new_pan("9"), "unsupported_card_brand"),
            ("long", SECRET * 3, "validation_failed"),
            ("number", 4242424242424242, "validation_failed"),
            ("null", None, "validation_failed"),
            ("array", ["4242424242424242"], "validation_failed"),
            ("nul", "4242\u00004242" + SECRET, "validation_failed"),
        ]
    ],
    *[
        Case(f"add-card-expiry-{label}", "POST", ADD, card(**fields), code=code)
        for label, fields, code in [
            ("past", {"expiry_month": 1, "expiry_year": 2001}, "card_expired"),
            ("month-13", {"expiry_month": 13}, "invalid_expiry"),
            ("month-negative", {"expiry_month": -1}, "invalid_expiry"),
            ("year-huge", {"expiry_year": 2**70}, "invalid_expiry"),
            ("year-negative", {"expiry_year": -2031}, "card_expired"),
            ("month-string", {"expiry_month": "12"}, "validation_failed"),
            ("year-float", {"expiry_year": 2031.0}, "validation_failed"),
        ]
    ],
    *[
        Case(f"add-card-cvv-{label}", "POST", ADD, card(cvv=v), code=code)
        for label, v, code in [
            ("secret", SECRET, "validation_failed"),
            ("short", "12", "invalid_cvv"),
            ("letters", "1a3", "invalid_cvv"),
            ("number", 123, "validation_failed"),
            ("null", None, "validation_failed"),
        ]
    ],
    *[
        Case(f"add-card-missing-{key}", "POST", ADD, without(card(), "card", key), status=422)
        for key in (
            "pan",
            "expiry_month",
            "expiry_year",
            "cvv",
            "cardholder_name",
            "billing_address",
        )
    ],
    Case("add-card-extra", "POST", ADD, card(track2=SECRET), code="validation_failed"),
    Case(
        "add-card-billing-country",
        "POST",
        ADD,
        card(billing_address={"line1": "x", "city": "y", "postal_code": "1", "country": "XX"}),
        code="validation_failed",
    ),
    Case("add-card-name-long", "POST", ADD, card(cardholder_name=SECRET * 10), status=422),
    Case("add-card-twice", "POST", ADD, card(pan="{card_pan}"), code="payment_method_exists"),
    *[
        Case(f"add-bank-{label}", "POST", ADD, body, code=code)
        for label, body, code in [
            ("routing", us_bank_body(routing_number="021000022"), "invalid_routing_number"),
            ("routing-secret", us_bank_body(routing_number=SECRET), "invalid_routing_number"),
            ("account", us_bank_body(account_number="12"), "invalid_account_number"),
            ("account-secret", us_bank_body(account_number=SECRET), "invalid_account_number"),
            ("account-number", us_bank_body(account_number=12345678), "validation_failed"),
            ("type", us_bank_body(account_type="brokerage"), "validation_failed"),
            ("iban", {"bank_account": {"iban": SECRET}}, "invalid_iban"),
            ("iban-long", {"bank_account": {"iban": SECRET * 5}}, "validation_failed"),
            ("bic", iban_body(bic="XXXXXXXX"), "invalid_bic"),
            ("mixed", iban_body(account_number="12345678"), "validation_failed"),
            (
                "only-routing",
                {"bank_account": {"routing_number": "021000021"}},
                "validation_failed",
            ),
            ("currency", us_bank_body(currency="usd"), "validation_failed"),
            ("points", us_bank_body(currency="PTS"), "currency_not_supported"),
            (
                "twice",
                us_bank_body(account_number="{bank_pending_number}"),
                "payment_method_exists",
            ),
        ]
    ],
    Case("add-nickname-long", "POST", ADD, {**card(), "nickname": SECRET * 4}, status=422),
    Case("add-nickname-nul", "POST", ADD, {**card(), "nickname": SECRET + "\u0000"}, status=422),
    Case("add-no-idempotency-key", "POST", ADD, card(), idempotency=False, status=428),
    Case(
        "add-long-idempotency-key",
        "POST",
        ADD,
        card(),
        idempotency=False,
        headers={"Idempotency-Key": SECRET + "k" * 256},
        code="invalid_idempotency_key",
    ),
    Case("add-anonymous", "POST", ADD, card(), as_="anonymous", status=401),
    Case("add-junk-token", "POST", ADD, card(), as_="junk_token", status=401),
    # --- GET /v1/payment-methods ----------------------------------------------------------------
    *[
        Case(f"methods-list-{label}", "GET", ADD, params=params, status=422)
        for label, params in [
            ("type", {"type": "crypto"}),
            ("status", {"status": "stolen"}),
            ("cursor", {"cursor": SECRET + "!!"}),
            ("cursor-nul", {"cursor": b64("\u0000")}),
            ("limit", {"limit": 0}),
            ("limit-huge", {"limit": 2**70}),
        ]
    ],
    Case("methods-list-anonymous", "GET", ADD, as_="anonymous", status=401),
    # --- one method: get, patch, delete, default, verify; someone else's is a 404 ---------------
    *[
        case
        for label, mid, status, code in [
            ("nul", "pm_%00", 404, "payment_method_not_found"),
            ("junk", "pm_junk", 404, "payment_method_not_found"),
            ("unknown", UNKNOWN_METHOD, 404, "payment_method_not_found"),
            ("wrong-prefix", UNKNOWN_TRANSFER, 404, "payment_method_not_found"),
            ("sql", "pm_' OR '1'='1", 404, "payment_method_not_found"),
            ("too-long", "pm_" + "0" * 70, 422, "validation_failed"),
            ("someone-elses", "{other_card}", 404, "payment_method_not_found"),
            ("removed", "{removed}", 404, "payment_method_not_found"),
        ]
        for case in (
            Case(f"method-get-{label}", "GET", ONE.format(id=mid), status=status, code=code),
            Case(
                f"method-patch-{label}",
                "PATCH",
                ONE.format(id=mid),
                {"nickname": "mine"},
                status=status,
                code=code,
            ),
            Case(f"method-delete-{label}", "DELETE", ONE.format(id=mid), status=status, code=code),
            Case(
                f"method-default-{label}",
                "POST",
                ONE.format(id=mid) + "/default",
                status=status,
                code=code,
            ),
            Case(
                f"method-verify-{label}",
                "POST",
                ONE.format(id=mid) + "/verify",
                {"amounts": [1, 2]},
                status=status,
                code=code,
            ),
        )
    ],
    *[
        Case(f"method-patch-{label}", "PATCH", ONE.format(id="{card}"), body, status=422)
        for label, body in [
            ("nickname-long", {"nickname": SECRET * 4}),
            ("nickname-number", {"nickname": 5}),
            ("billing-null", {"billing_address": None}),
            (
                "billing-country",
                {
                    "billing_address": {
                        "line1": "x",
                        "city": "y",
                        "postal_code": "1",
                        "country": "ZZ",
                    }
                },
            ),
            ("unknown-field", {"last4": SECRET}),
            ("array", [{"nickname": "x"}]),
        ]
    ],
    Case(
        "method-patch-bank-billing",
        "PATCH",
        ONE.format(id="{bank}"),
        {"billing_address": {"line1": "x", "city": "y", "postal_code": "1", "country": "US"}},
        status=422,
    ),
    Case(
        "method-default-pending",
        "POST",
        ONE.format(id="{bank_pending}") + "/default",
        status=409,
        code="payment_method_not_verified",
    ),
    Case(
        "method-default-failed",
        "POST",
        ONE.format(id="{card_failed}") + "/default",
        status=409,
        code="payment_method_not_verified",
    ),
    Case(
        "method-verify-a-card",
        "POST",
        ONE.format(id="{card}") + "/verify",
        {"amounts": [1, 2]},
        status=409,
        code="payment_method_not_pending",
    ),
    Case(
        "method-verify-verified-bank",
        "POST",
        ONE.format(id="{bank}") + "/verify",
        {"amounts": [1, 2]},
        status=409,
        code="payment_method_not_pending",
    ),
    *[
        Case(
            f"method-verify-amounts-{label}",
            "POST",
            ONE.format(id="{bank_pending}") + "/verify",
            body,
            status=422,
            code="validation_failed",
        )
        for label, body in [
            ("one", {"amounts": [1]}),
            ("three", {"amounts": [1, 2, 3]}),
            ("zero", {"amounts": [0, 5]}),
            ("a-dollar", {"amounts": [100, 5]}),
            ("floats", {"amounts": [1.5, 2]}),
            ("strings", {"amounts": ["1", "2"]}),
            ("null", {"amounts": None}),
            ("missing", {}),
            ("extra", {"amounts": [1, 2], "x": SECRET}),
        ]
    ],
    Case("method-delete-anonymous", "DELETE", ONE.format(id="{card}"), as_="anonymous", status=401),
]


TRANSFER_OK = transfer()
REQUEST_OK = ask()
TOPUP_OK = {"payment_method_id": "{card}", "amount": 100, "currency": "USD"}
WITHDRAW_OK = {"payment_method_id": "{bank}", "amount": 100, "currency": "USD"}
BAD_METHOD_IDS: list[tuple[str, Any, int | None, str | None]] = [
    ("null", None, 422, "validation_failed"),
    ("number", 5, 422, "validation_failed"),
    ("array", ["{card}"], 422, "validation_failed"),
    ("too-long", "pm_" + "0" * 70, 422, "validation_failed"),
    ("nul", "pm_\u0000", 422, "validation_failed"),
    ("junk", "pm_" + SECRET, 404, "payment_method_not_found"),
    ("unknown", UNKNOWN_METHOD, 404, "payment_method_not_found"),
    ("wrong-prefix", UNKNOWN_TRANSFER, 404, "payment_method_not_found"),
    ("someone-elses", "{other_card}", 404, "payment_method_not_found"),
    ("removed", "{removed}", 404, "payment_method_not_found"),
    ("pending", "{bank_pending}", 409, "payment_method_not_verified"),
    ("failed", "{card_failed}", 409, "payment_method_not_verified"),
]

# --- payments -----------------------------------------------------------------------------------

MERCHANT = {"id": "mch_fuzz", "name": "Fuzz Cafe", "mcc": "5814", "country": "US", "city": "SF"}


def payment(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "card",
        "payment_method_id": "{card}",
        "amount": 100,
        "currency": "USD",
        "merchant": MERCHANT,
        "channel": "in_app",
    }
    body.update(overrides)
    return body


PAYMENT_ONE = "/v1/payments/{pay_open}"
PAYMENT_CASES: list[Case] = [
    # --- POST /v1/payments ----------------------------------------------------------------------
    *body_cases("pay", "/v1/payments", payment(), "merchant"),
    *[
        Case(f"pay-{label}", "POST", "/v1/payments", body, status=status, code=code)
        for label, body, status, code in [
            ("points", payment(currency="PTS"), 422, "currency_not_supported"),
            ("wallet-with-method", payment(source="wallet"), 422, "validation_failed"),
            ("card-without-method", payment(payment_method_id=None), 422, "validation_failed"),
            ("source-bank", payment(source="bank"), 422, "validation_failed"),
            ("method-junk", payment(payment_method_id="pm_" + SECRET), 422, "validation_failed"),
            ("method-unknown", payment(payment_method_id=UNKNOWN_METHOD), 404, None),
            ("method-someone-elses", payment(payment_method_id="{other_card}"), 404, None),
            ("method-removed", payment(payment_method_id="{removed}"), 404, None),
            ("method-bank", payment(payment_method_id="{bank}"), 422, "card_required"),
            ("method-pending", payment(payment_method_id="{bank_pending}"), 422, "card_required"),
            ("method-failed", payment(payment_method_id="{card_failed}"), 409, None),
            ("channel", payment(channel="pos"), 422, "validation_failed"),
            ("device-junk", payment(device_id="d v " + SECRET + "\u0000"), 422, None),
            ("description-long", payment(description=SECRET + "d" * 200), 422, None),
            ("merchant-country-lower", payment(merchant={**MERCHANT, "country": "us"}), 422, None),
            (
                "merchant-country-unknown",
                payment(merchant={**MERCHANT, "country": "ZZ"}),
                422,
                None,
            ),
            ("merchant-mcc", payment(merchant={**MERCHANT, "mcc": "58a4"}), 422, None),
            ("merchant-latitude", payment(merchant={**MERCHANT, "latitude": 91}), 422, None),
            ("merchant-longitude", payment(merchant={**MERCHANT, "longitude": -181.5}), 422, None),
            ("merchant-nan", payment(merchant={**MERCHANT, "latitude": "NaN"}), 422, None),
            ("merchant-name-empty", payment(merchant={**MERCHANT, "name": "  "}), 422, None),
            ("merchant-id-long", payment(merchant={**MERCHANT, "id": "m" * 65}), 422, None),
            ("merchant-extra", payment(merchant={**MERCHANT, "pan": SECRET}), 422, None),
            ("pan-in-body", payment(pan="4242424242424242"), 422, "validation_failed"),
        ]
    ],
    # --- one payment: get, resume, capture, void, refunds, increment; someone else's is a 404 --
    *[
        Case(
            f"payment-{verb or 'get'}-{label}",
            "POST" if verb else "GET",
            f"/v1/payments/{pid}" + (f"/{verb}" if verb else ""),
            body=({"amount": 1} if verb in ("increment",) else {}) if verb else None,
            headers={"X-Step-Up-Token": "junk"} if verb == "resume" else {},
            status=status,
            code=code,
        )
        for label, pid, status, code in [
            ("nul", "txn_%00", 404, "payment_not_found"),
            ("unknown", UNKNOWN_PAYMENT, 404, "payment_not_found"),
            ("wrong-prefix", UNKNOWN_TRANSFER, 404, "payment_not_found"),
            ("sql", "txn_' OR '1'='1", 404, "payment_not_found"),
            ("too-long", "txn_" + "0" * 70, 422, "validation_failed"),
            ("someone-elses", "{pay_other}", 404, "payment_not_found"),
        ]
        for verb in (None, "resume", "capture", "void", "refunds", "increment")
    ],
    *[
        Case(
            f"payment-{verb}-no-key",
            "POST",
            f"{PAYMENT_ONE}/{verb}",
            {},
            idempotency=False,
            status=428,
        )
        for verb in ("capture", "void", "refunds", "increment", "resume")
    ],
    *[
        Case(
            f"payment-{verb}-anonymous",
            "POST",
            f"{PAYMENT_ONE}/{verb}",
            {},
            as_="anonymous",
            status=401,
        )
        for verb in ("capture", "void", "refunds", "increment", "resume")
    ],
    Case("payment-get-anonymous", "GET", PAYMENT_ONE, as_="anonymous", status=401),
    Case(
        "payment-resume-no-token",
        "POST",
        f"{PAYMENT_ONE}/resume",
        {},
        status=422,
        code="validation_failed",
    ),
    Case(
        "payment-resume-not-challenged",
        "POST",
        f"{PAYMENT_ONE}/resume",
        {},
        headers={"X-Step-Up-Token": SECRET},
        status=409,
        code="payment_not_resumable",
    ),
    *[
        Case(
            f"payment-{verb}-amount-{name}",
            "POST",
            f"{PAYMENT_ONE}/{verb}",
            {"amount": v},
            code=code,
        )
        for verb in ("capture", "refunds", "increment")
        for name, v, code in BAD_AMOUNTS
        # A capture or refund without an amount takes all there is: not hostile.
        if v is not None or verb == "increment"
    ],
    *[
        Case(
            f"payment-{verb}-body-{name}",
            "POST",
            f"{PAYMENT_ONE}/{verb}",
            raw,
            headers={"content-type": ctype},
        )
        for verb in ("capture", "refunds", "increment")
        for name, raw, ctype in BAD_BODIES
    ],
    *[
        Case(
            f"payment-{verb}-unknown-field",
            "POST",
            f"{PAYMENT_ONE}/{verb}",
            {"amount": 1, "fee": 1},
            status=422,
        )
        for verb in ("capture", "refunds", "increment")
    ],
    Case("capture-final-string", "POST", f"{PAYMENT_ONE}/capture", {"final": "yes"}, status=422),
    Case(
        "capture-over-authorized",
        "POST",
        f"{PAYMENT_ONE}/capture",
        {"amount": 1_001},
        status=422,
        code="capture_exceeds_authorized",
    ),
    Case(
        "capture-captured",
        "POST",
        "/v1/payments/{pay_captured}/capture",
        {},
        status=409,
        code="payment_not_capturable",
    ),
    Case(
        "void-captured",
        "POST",
        "/v1/payments/{pay_captured}/void",
        status=409,
        code="payment_not_voidable",
    ),
    Case(
        "refund-uncaptured",
        "POST",
        f"{PAYMENT_ONE}/refunds",
        {},
        status=409,
        code="payment_not_refundable",
    ),
    Case(
        "refund-over-captured",
        "POST",
        "/v1/payments/{pay_captured}/refunds",
        {"amount": 1_001},
        status=422,
        code="refund_exceeds_captured",
    ),
    Case(
        "refund-reason-long",
        "POST",
        "/v1/payments/{pay_captured}/refunds",
        {"amount": 1, "reason": SECRET + "r" * 200},
        status=422,
    ),
    Case(
        "increment-captured",
        "POST",
        "/v1/payments/{pay_captured}/increment",
        {"amount": 1},
        status=409,
        code="payment_not_incrementable",
    ),
    Case("increment-missing-amount", "POST", f"{PAYMENT_ONE}/increment", {}, status=422),
]

CASES: list[Case] = [
    # --- POST /v1/transfers -------------------------------------------------------------------
    *body_cases("send", "/v1/transfers", TRANSFER_OK, "recipient"),
    Case(
        "send-unknown-user",
        "POST",
        "/v1/transfers",
        transfer(recipient={"user_id": UNKNOWN_USER}),
        code="recipient_not_found",
    ),
    Case(
        "send-unknown-handle",
        "POST",
        "/v1/transfers",
        transfer(recipient={"handle": "nobody_" + uuid.uuid4().hex[:12]}),
        code="recipient_not_found",
    ),
    Case(
        "send-to-self",
        "POST",
        "/v1/transfers",
        transfer(recipient={"user_id": "{me}"}),
        code="self_transfer",
    ),
    Case(
        "send-points",
        "POST",
        "/v1/transfers",
        transfer(currency="PTS"),
        code="currency_not_supported",
    ),
    Case(
        "send-yen", "POST", "/v1/transfers", transfer(currency="JPY"), code="currency_not_supported"
    ),
    Case(
        "send-over-per-transfer",
        "POST",
        "/v1/transfers",
        transfer(amount=5001),
        code="limit_exceeded",
    ),
    Case(
        "send-more-than-balance",
        "POST",
        "/v1/transfers",
        transfer(recipient={"user_id": "{bob}"}, amount=5000, currency="GBP"),
        code="insufficient_funds",
    ),
    Case(
        "send-junk-step-up",
        "POST",
        "/v1/transfers",
        TRANSFER_OK,
        headers={"X-Step-Up-Token": SECRET},
        code="invalid_step_up_token",
    ),
    Case(
        "send-jwt-shaped-step-up",
        "POST",
        "/v1/transfers",
        TRANSFER_OK,
        headers={"X-Step-Up-Token": f"eyJ{SECRET}.eyJ{SECRET}.{SECRET}"},
        code="invalid_step_up_token",
    ),
    *[
        Case(
            f"send-step-up-{label}",
            "POST",
            "/v1/transfers",
            TRANSFER_OK,
            headers={"X-Step-Up-Token": token},
            code="invalid_step_up_token",
        )
        for label, token in [
            ("alg-none", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
            ("three-dots", "..."),
            ("latin1", b"t\xe9" + SECRET.encode()),
            ("empty-parts", "a..b"),
        ]
    ],
    Case(
        "send-long-step-up",
        "POST",
        "/v1/transfers",
        TRANSFER_OK,
        headers={"X-Step-Up-Token": SECRET + "t" * 4100},
        status=422,
    ),
    # --- POST /v1/transfer-requests -----------------------------------------------------------
    *body_cases("ask", "/v1/transfer-requests", REQUEST_OK, "payer"),
    Case(
        "ask-unknown-user",
        "POST",
        "/v1/transfer-requests",
        ask(payer={"user_id": UNKNOWN_USER}),
        code="recipient_not_found",
    ),
    Case(
        "ask-self",
        "POST",
        "/v1/transfer-requests",
        ask(payer={"user_id": "{me}"}),
        code="self_request",
    ),
    Case(
        "ask-points",
        "POST",
        "/v1/transfer-requests",
        ask(currency="PTS"),
        code="currency_not_supported",
    ),
    # --- POST /v1/wallet/topups and /withdrawals ----------------------------------------------
    *[
        case
        for path, name, ok in (
            ("/v1/wallet/topups", "topup", TOPUP_OK),
            ("/v1/wallet/withdrawals", "withdraw", WITHDRAW_OK),
        )
        for case in [
            *[
                Case(f"{name}-amount-{label}", "POST", path, {**ok, "amount": v})
                for label, v, _ in BAD_AMOUNTS
            ],
            *[
                Case(f"{name}-currency-{label}", "POST", path, {**ok, "currency": v})
                for label, v in BAD_CURRENCIES
            ],
            *[
                Case(
                    f"{name}-method-{label}",
                    "POST",
                    path,
                    {**ok, "payment_method_id": v},
                    status=status,
                    code=code,
                )
                for label, v, status, code in BAD_METHOD_IDS
            ],
            Case(
                f"{name}-method-missing",
                "POST",
                path,
                {k: v for k, v in ok.items() if k != "payment_method_id"},
                code="validation_failed",
            ),
            *[
                Case(f"{name}-body-{label}", "POST", path, raw, headers={"content-type": ctype})
                for label, raw, ctype in BAD_BODIES
            ],
            Case(
                f"{name}-over-maximum",
                "POST",
                path,
                {**ok, "amount": 1_000_001},
                code="amount_too_large",
            ),
            Case(
                f"{name}-points",
                "POST",
                path,
                {**ok, "currency": "PTS"},
                code="currency_not_supported",
            ),
            Case(f"{name}-unknown-field", "POST", path, {**ok, "source": SECRET}, status=422),
            Case(f"{name}-no-idempotency-key", "POST", path, ok, idempotency=False, status=428),
            Case(f"{name}-anonymous", "POST", path, ok, as_="anonymous", status=401),
            Case(
                f"{name}-bank-in-another-currency",
                "POST",
                path,
                {**ok, "payment_method_id": "{bank}", "currency": "EUR"},
                code="currency_mismatch",
            ),
        ]
    ],
    Case(
        "topup-declined-by-the-card-issuer",
        "POST",
        "/v1/wallet/topups",
        {**TOPUP_OK, "payment_method_id": "{card_declined}"},
        status=402,
        code="payment_declined",
    ),
    Case(
        "withdraw-to-a-card",
        "POST",
        "/v1/wallet/withdrawals",
        {**WITHDRAW_OK, "payment_method_id": "{card}"},
        code="bank_account_required",
    ),
    Case(
        "withdraw-more-than-balance",
        "POST",
        "/v1/wallet/withdrawals",
        {**WITHDRAW_OK, "amount": 999_999},
        code="insufficient_funds",
    ),
    Case(
        "withdraw-currency-never-held",
        "POST",
        "/v1/wallet/withdrawals",
        {"payment_method_id": "{bank_sek}", "amount": 1, "currency": "SEK"},
        code="insufficient_funds",
    ),
    *PAYMENT_METHOD_CASES,
    *PAYMENT_CASES,
    # --- GET /v1/wallet, /v1/wallet/entries ----------------------------------------------------
    *[
        Case(f"wallet-as-of-{label}", "GET", "/v1/wallet", params={"as_of": v}, status=422)
        for label, v in [
            ("future", "9999-01-01T00:00:00Z"),
            ("no-offset", "2025-01-01T00:00:00"),
            ("date-only", "2025-01-01"),
            ("junk", SECRET),
            ("year-0-in-utc", "0001-01-01T00:00:00+14:00"),
            ("year-10000-in-utc", "9999-12-31T23:59:59-14:00"),
            ("month-13", "2025-13-01T00:00:00Z"),
            ("too-long", "2025-01-01T00:00:00Z" + " " * 60),
            ("epoch-number", "1735689600"),
        ]
    ],
    *[
        Case(f"entries-{label}", "GET", "/v1/wallet/entries", params=params, status=422)
        for label, params in [
            ("cursor-junk", {"cursor": SECRET + "!!"}),
            ("cursor-nul", {"cursor": b64("\u0000")}),
            ("cursor-zero", {"cursor": b64("0")}),
            ("cursor-negative", {"cursor": b64("-1")}),
            ("cursor-past-bigint", {"cursor": b64(str(2**63))}),
            ("cursor-float", {"cursor": b64("1.5")}),
            ("cursor-unicode-digits", {"cursor": b64("١٢")}),
            ("cursor-too-long", {"cursor": "A" * 401}),
            ("limit-zero", {"limit": 0}),
            ("limit-over", {"limit": 101}),
            ("limit-huge", {"limit": 2**70}),
            ("limit-float", {"limit": 1.5}),
            ("currency-lower", {"currency": "usd"}),
            ("currency-nul", {"currency": "\u0000"}),
        ]
    ],
    # --- GET /v1/transfers (history filters) --------------------------------------------------
    *[
        Case(f"history-{label}", "GET", "/v1/transfers", params=params, status=422)
        for label, params in [
            ("status", {"status": "stolen"}),
            ("direction", {"direction": "sideways"}),
            ("counterparty-email", {"counterparty": "x@example.com"}),
            ("counterparty-nul", {"counterparty": "usr_\u0000"}),
            ("from-no-offset", {"from": "2025-01-01T00:00:00"}),
            ("from-junk", {"from": SECRET}),
            ("from-year-0-in-utc", {"from": "0001-01-01T00:00:00+14:00"}),
            ("to-year-10000-in-utc", {"to": "9999-12-31T23:59:59-14:00"}),
            ("amount-min-negative", {"amount_min": -1}),
            ("amount-min-past-bigint", {"amount_min": 2**63}),
            ("amount-max-float", {"amount_max": 1.5}),
            ("currency", {"currency": "usd"}),
            ("cursor-junk", {"cursor": "%%%"}),
            ("cursor-nul", {"cursor": b64("\u0000")}),
            ("limit", {"limit": -5}),
        ]
    ],
    # --- GET /v1/transfer-requests ------------------------------------------------------------
    *[
        Case(f"request-list-{label}", "GET", "/v1/transfer-requests", params=params, status=422)
        for label, params in [
            ("direction", {"direction": "sideways"}),
            ("status", {"status": "paid"}),
            ("cursor", {"cursor": b64("\u0000")}),
            ("limit", {"limit": 1000}),
        ]
    ],
    # --- one transfer: get, cancel; someone else's is a 404 -----------------------------------
    *[
        case
        for label, tid, status, code in [
            ("empty-prefix", "p2p_", 404, "transfer_not_found"),
            ("nul", "p2p_%00", 404, "transfer_not_found"),
            ("unknown", UNKNOWN_TRANSFER, 404, "transfer_not_found"),
            ("wrong-prefix", UNKNOWN_REQUEST, 404, "transfer_not_found"),
            ("unicode", "p2p_\u202e" + "0" * 25, 404, "transfer_not_found"),
            ("sql", "p2p_' OR '1'='1", 404, "transfer_not_found"),
            ("too-long", "p2p_" + "0" * 70, 422, "validation_failed"),
            ("someone-elses", "{other_transfer}", 404, "transfer_not_found"),
        ]
        for case in (
            Case(f"transfer-get-{label}", "GET", f"/v1/transfers/{tid}", status=status, code=code),
            Case(
                f"transfer-cancel-{label}",
                "POST",
                f"/v1/transfers/{tid}/cancel",
                status=status,
                code=code,
            ),
        )
    ],
    Case(
        "transfer-cancel-completed",
        "POST",
        "/v1/transfers/{done}/cancel",
        status=409,
        code="transfer_not_cancellable",
    ),
    Case(
        "transfer-cancel-anonymous",
        "POST",
        "/v1/transfers/{claim}/cancel",
        as_="anonymous",
        status=401,
    ),
    Case(
        "claims-long-idempotency-key",
        "POST",
        "/v1/transfers/claims",
        idempotency=False,
        headers={"Idempotency-Key": "k" * 256},
        code="invalid_idempotency_key",
    ),
    Case("claims-anonymous", "POST", "/v1/transfers/claims", as_="anonymous", status=401),
    Case("limits-anonymous", "GET", "/v1/transfers/limits", as_="anonymous", status=401),
    # --- one request: get, accept, decline, cancel; someone else's is a 404 -------------------
    *[
        Case(
            f"request-{verb or 'get'}-{label}",
            "POST" if verb else "GET",
            f"/v1/transfer-requests/{rid}" + (f"/{verb}" if verb else ""),
            status=status,
            code=code,
        )
        for label, rid, status, code in [
            ("nul", "req_%00", 404, "request_not_found"),
            ("unknown", UNKNOWN_REQUEST, 404, "request_not_found"),
            ("wrong-prefix", UNKNOWN_TRANSFER, 404, "request_not_found"),
            ("too-long", "req_" + "0" * 70, 422, "validation_failed"),
            ("someone-elses", "{req_other}", 404, "request_not_found"),
        ]
        for verb in (None, "accept", "decline", "cancel")
    ],
    Case(
        "request-accept-own",
        "POST",
        "/v1/transfer-requests/{req_out}/accept",
        status=403,
        code="request_action_not_allowed",
    ),
    Case(
        "request-decline-own",
        "POST",
        "/v1/transfer-requests/{req_out}/decline",
        status=403,
        code="request_action_not_allowed",
    ),
    Case(
        "request-cancel-theirs",
        "POST",
        "/v1/transfer-requests/{req_in}/cancel",
        status=403,
        code="request_action_not_allowed",
    ),
    Case(
        "request-accept-no-key",
        "POST",
        "/v1/transfer-requests/{req_in}/accept",
        idempotency=False,
        status=428,
    ),
    Case(
        "request-accept-junk-step-up",
        "POST",
        "/v1/transfer-requests/{req_in}/accept",
        headers={"X-Step-Up-Token": SECRET},
        code="invalid_step_up_token",
    ),
    # --- admin: reverse, limit overrides ------------------------------------------------------
    Case(
        "reverse-not-admin",
        "POST",
        "/v1/admin/transfers/{done}/reverse",
        {"reason": "fraud " + SECRET},
        status=403,
    ),
    Case(
        "reverse-anonymous",
        "POST",
        "/v1/admin/transfers/{done}/reverse",
        {"reason": "fraud"},
        as_="anonymous",
        status=401,
    ),
    Case(
        "reverse-no-key",
        "POST",
        "/v1/admin/transfers/{done}/reverse",
        {"reason": "fraud"},
        as_="admin",
        idempotency=False,
        status=428,
    ),
    *[
        Case(
            f"reverse-reason-{label}",
            "POST",
            "/v1/admin/transfers/{done}/reverse",
            body,
            as_="admin",
            status=422,
        )
        for label, body in [
            ("missing", {}),
            ("short", {"reason": "ab"}),
            ("blank", {"reason": "     "}),
            ("long", {"reason": SECRET + "r" * 500}),
            ("nul", {"reason": "fraud " + SECRET + "\u0000"}),
            ("number", {"reason": 12345}),
            ("array", [{"reason": "fraud"}]),
            ("extra", {"reason": "fraud", "amount": 1}),
        ]
    ],
    Case(
        "reverse-pending-claim",
        "POST",
        "/v1/admin/transfers/{claim}/reverse",
        {"reason": "fraud"},
        as_="admin",
        status=409,
        code="transfer_not_cancellable",
    ),
    *[
        Case(
            f"reverse-id-{label}",
            "POST",
            f"/v1/admin/transfers/{tid}/reverse",
            {"reason": "fraud"},
            as_="admin",
            status=status,
        )
        for label, tid, status in [
            ("nul", "p2p_%00", 404),
            ("unknown", UNKNOWN_TRANSFER, 404),
            ("too-long", "p2p_" + "0" * 70, 422),
        ]
    ],
    Case(
        "override-not-admin",
        "PUT",
        "/v1/admin/users/{me}/transfer-limits/USD",
        {"daily": 10**9},
        status=403,
    ),
    *[
        Case(
            f"override-user-{label}",
            "PUT",
            f"/v1/admin/users/{uid}/transfer-limits/USD",
            {"daily": 1},
            as_="admin",
            status=status,
        )
        for label, uid, status in [
            ("nul", "usr_%00", 404),
            ("unknown", UNKNOWN_USER, 404),
            ("junk", "nobody", 404),
            ("too-long", "usr_" + "0" * 70, 422),
        ]
    ],
    *[
        Case(
            f"override-currency-{label}",
            "PUT",
            f"/v1/admin/users/{{bob}}/transfer-limits/{cur}",
            {"daily": 1},
            as_="admin",
            status=422,
            code=code,
        )
        for label, cur, code in [
            ("lower", "usd", "validation_failed"),
            ("points", "PTS", "currency_not_supported"),
            ("not-offered", "JPY", "currency_not_supported"),
            ("junk", "U%00D", "validation_failed"),
        ]
    ],
    *[
        Case(
            f"override-body-{label}",
            "PUT",
            "/v1/admin/users/{bob}/transfer-limits/USD",
            body,
            as_="admin",
            status=422,
        )
        for label, body in [
            ("negative", {"daily": -1}),
            ("past-2-53", {"monthly": 2**53}),
            ("past-bigint", {"per_transfer": 2**63}),
            ("float", {"daily": 1.5}),
            ("string", {"daily": "100"}),
            ("bool", {"daily": True}),
            ("unknown-field", {"weekly": 1}),
            ("array", [{"daily": 1}]),
            ("null-body", None),
        ]
    ],
]


# --- the world and its snapshot ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def world(client: httpx.AsyncClient, app: Any) -> dict[str, Any]:
    alice = await sign_up(client, name="Alice Fuzz")
    bob = await sign_up(client, name="Bob Fuzz")
    carol = await sign_up(client, name="Carol Fuzz")
    admin = await make_admin(app, client)
    await fund(app, alice.user["id"], 100_000, "USD")
    await fund(app, alice.user["id"], 1_000, "GBP")
    await fund(app, carol.user["id"], 10_000, "USD")
    card_pan = new_pan()
    card = await add_card(client, alice, pan=card_pan)
    bank = await add_bank(client, app, alice, "USD")
    r = await client.post(
        "/v1/payment-methods",
        json=iban_body(currency="SEK"),
        headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    from tests.integration.payment_methods_support import deposits

    a, b = await deposits(app, alice, r.json()["id"])
    bank_sek = r.json()["id"]
    r = await client.post(
        f"/v1/payment-methods/{bank_sek}/verify",
        json={"amounts": [a, b]},
        headers=alice.headers,
    )
    assert r.status_code == 200, r.text
    pending_body = us_bank_body()
    removed = await add_card(client, alice)
    assert (
        await client.delete(f"/v1/payment-methods/{removed['id']}", headers=alice.headers)
    ).status_code == 204

    async def post(who: SignedIn, path: str, body: dict[str, Any]) -> str:
        r = await client.post(
            path, json=body, headers={**who.headers, "Idempotency-Key": uuid.uuid4().hex}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    return {
        "alice": alice,
        "admin": admin,
        "me": alice.user["id"],
        "bob": bob.user["id"],
        "done": await post(alice, "/v1/transfers", transfer(recipient={"user_id": bob.user["id"]})),
        "claim": await post(alice, "/v1/transfers", transfer()),
        "other_transfer": await post(
            carol, "/v1/transfers", transfer(recipient={"user_id": bob.user["id"]})
        ),
        "req_in": await post(
            bob, "/v1/transfer-requests", ask(payer={"user_id": alice.user["id"]})
        ),
        "req_out": await post(
            alice, "/v1/transfer-requests", ask(payer={"user_id": bob.user["id"]})
        ),
        "req_other": await post(
            carol, "/v1/transfer-requests", ask(payer={"user_id": bob.user["id"]})
        ),
        "card": card["id"],
        "card_pan": card_pan,
        "bank": bank["id"],
        "bank_sek": bank_sek,
        "bank_pending": await post(alice, "/v1/payment-methods", pending_body),
        "bank_pending_number": pending_body["bank_account"]["account_number"],
        "card_failed": await post(alice, "/v1/payment-methods", card_body(cvv="000")),
        "card_declined": (await add_card(client, alice, pan=new_pan(suffix="9995")))["id"],
        "other_card": (await add_card(client, carol))["id"],
        "removed": removed["id"],
        **await _payments(client, alice, carol),
    }


async def _payments(client: httpx.AsyncClient, alice: SignedIn, carol: SignedIn) -> dict[str, str]:
    """Wallet payments: one open, one captured in full (alice's), one of carol's."""

    async def pay(who: SignedIn) -> str:
        body = {
            "source": "wallet",
            "amount": 1_000,
            "currency": "USD",
            "merchant": MERCHANT,
            "channel": "contactless",
        }
        r = await client.post(
            "/v1/payments", json=body, headers={**who.headers, "Idempotency-Key": uuid.uuid4().hex}
        )
        assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
        return str(r.json()["id"])

    captured = await pay(alice)
    r = await client.post(
        f"/v1/payments/{captured}/capture",
        json={},
        headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text
    return {"pay_open": await pay(alice), "pay_captured": captured, "pay_other": await pay(carol)}


SNAPSHOT = {
    "accounts": "SELECT id, posted, held FROM ledger.accounts ORDER BY id",
    "postings": "SELECT count(*), max(id) FROM ledger.postings",
    "entries": "SELECT count(*) FROM ledger.entries",
    "holds": "SELECT id, status, remaining FROM ledger.holds ORDER BY id",
    "transfers": "SELECT id, status, recipient_id, updated_at FROM p2p.transfers ORDER BY id",
    "requests": (
        "SELECT id, status, payer_id, transfer_id, updated_at FROM p2p.transfer_requests ORDER BY id"
    ),
    "limits": "SELECT * FROM p2p.transfer_limits ORDER BY user_id, currency",
    "methods": (
        "SELECT id, status, is_default, nickname, billing_address::text, updated_at "
        "FROM payment_methods.methods ORDER BY id"
    ),
    "micro_deposits": (
        "SELECT payment_method_id, status, attempts, updated_at "
        "FROM payment_methods.micro_deposits ORDER BY payment_method_id"
    ),
    "fundings": "SELECT count(*), max(id) FROM payment_methods.fundings",
    "outbox": "SELECT count(*), max(seq) FROM platform.outbox",
    "idempotency": "SELECT count(*) FROM platform.idempotency_keys",
    "payments": (
        "SELECT id, status, authorized_amount, captured_amount, released_amount, "
        "refunded_amount, hold_id, updated_at FROM transactions.transactions ORDER BY id"
    ),
    "captures": "SELECT count(*), max(id) FROM transactions.captures",
    "refunds": "SELECT id, status, amount FROM transactions.refunds ORDER BY id",
    "increments": "SELECT id, status FROM transactions.increments ORDER BY id",
}


async def snapshot(app: Any) -> dict[str, list[Any]]:
    async with app.state.resources.engine.connect() as conn:
        return {
            name: [tuple(r) for r in (await conn.execute(text(sql))).all()]
            for name, sql in SNAPSHOT.items()
        }


def _fill(value: Any, world: dict[str, Any]) -> Any:
    if isinstance(value, str):
        for key, filler in world.items():
            if isinstance(filler, str):
                value = value.replace("{" + key + "}", filler)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input_is_a_clean_4xx_that_changes_nothing(
    client: httpx.AsyncClient, app: Any, world: dict[str, Any], case: Case
) -> None:
    headers: dict[str, str | bytes] = {}
    if case.as_ in ("alice", "admin"):
        headers.update(world[case.as_].headers)
    elif case.as_ == "junk_token":
        headers["Authorization"] = f"Bearer {SECRET}"
    if case.idempotency:
        headers["Idempotency-Key"] = uuid.uuid4().hex
    headers.update(case.headers)
    content: bytes | None
    if isinstance(case.body, bytes):
        content = case.body
    elif case.body is None and case.method == "GET":
        content = None
    else:
        content = json.dumps(_fill(case.body, world)).encode()
        headers.setdefault("content-type", "application/json")
    path = _fill(case.path, world)

    before = await snapshot(app)
    r = await client.request(
        case.method, path, params=case.params, content=content, headers=headers
    )
    after = await snapshot(app)

    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == PROBLEM, r.headers["content-type"]
    problem = r.json()
    assert isinstance(problem.get("code"), str) and problem["code"], problem
    assert problem["status"] == r.status_code
    if case.status is not None:
        assert r.status_code == case.status, problem
    if case.code is not None:
        assert problem["code"] == case.code, problem
    assert SECRET not in r.text
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_every_money_route_is_fuzzed(app: Any) -> None:
    """A new money route must get hostile cases here too."""
    templates = {
        (method, route.path)
        for route in app.routes
        for method in getattr(route, "methods", ()) or ()
        if route.path.startswith(
            (
                "/v1/wallet",
                "/v1/payment-methods",
                "/v1/transfer",
                "/v1/admin/transfers",
                "/v1/admin/users/{user_id}/transfer-limits",
                "/v1/payments",
            )
        )
    }

    def covers(method: str, template: str) -> bool:
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        return any(c.method == method and re.match(pattern, c.path) for c in CASES)

    missing = sorted(f"{m} {t}" for m, t in templates if m != "HEAD" and not covers(m, t))
    assert not missing, missing
