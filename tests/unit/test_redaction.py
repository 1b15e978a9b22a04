"""Logs redact PANs, bearer credentials, JWTs and secret fields before they are written."""

from __future__ import annotations

import json
import logging

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from billfold.platform.keys import SealedBox
from billfold.platform.observability import (
    REDACTED,
    configure_logging,
    get_logger,
    is_secret_key,
    luhn_valid,
    redact,
    redact_text,
    request_id_var,
)
from tests.conftest import plain_tracebacks

VISA = "4242424242424242"  # Luhn-valid test card
JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImtleV8xIn0"
    ".eyJzdWIiOiJ1c3JfMDEiLCJzaWQiOiJzZXNfMDEifQ"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


def luhn_complete(prefix: str) -> str:
    """Append the check digit that makes `prefix` Luhn-valid."""
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


# --- card numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shown",
    [
        "4242424242424242",
        "4242 4242 4242 4242",
        "4242-4242-4242-4242",
        "4242 4242-4242 4242",
        "5555555555554444",
        "378282246310005",  # 15-digit Amex
        "4000056655665556",
    ],
)
def test_luhn_valid_pan_is_masked_to_last4(shown):
    out = redact_text(f"card {shown} declined")
    digits = shown.replace(" ", "").replace("-", "")
    assert out == f"card [pan …{digits[-4:]}] declined"
    assert digits[:6] not in out.replace(" ", "")


def test_several_pans_in_one_string_are_all_masked():
    out = redact_text(f"from {VISA} to 5555-5555-5555-4444.")
    assert out == "from [pan …4242] to [pan …4444]."


@pytest.mark.parametrize(
    "kept",
    [
        "4242424242424241",  # fails the Luhn check
        "1234 5678 9012 3456",
        "order 20241130123456",
        "123456",  # a one-time code on its own is not a card number
        "12345678901",  # too short
    ],
)
def test_non_luhn_and_short_digit_runs_are_kept(kept):
    digits = "".join(ch for ch in kept if ch.isdigit())
    assert len(digits) < 13 or not luhn_valid(digits)
    assert redact_text(f"ref {kept} ok") == f"ref {kept} ok"


def test_digit_run_longer_than_any_pan_is_kept():
    long_run = "1" * 25
    assert redact_text(long_run) == long_run


@given(st.from_regex(r"[2-6][0-9]{14}", fullmatch=True))
def test_any_luhn_valid_16_digit_number_is_masked(prefix):
    pan = luhn_complete(prefix)
    spaced = " ".join(pan[i : i + 4] for i in range(0, 16, 4))
    dashed = spaced.replace(" ", "-")
    for shown in (pan, spaced, dashed):
        out = redact_text(f"x {shown} y")
        assert out == f"x [pan …{pan[-4:]}] y"
        assert pan[:12] not in out


@given(st.from_regex(r"[2-6][0-9]{15}", fullmatch=True))
def test_a_16_digit_number_is_masked_exactly_when_luhn_valid(number):
    masked = redact_text(number) != number
    assert masked == luhn_valid(number)


# --- credentials ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "Basic"])
def test_bearer_and_basic_credentials_are_redacted(scheme):
    out = redact_text(f"Authorization: {scheme} abc.DEF_ghi-123~+/=")
    assert out == f"Authorization: {scheme} {REDACTED}"


def test_jwt_is_redacted_anywhere():
    out = redact_text(f"token={JWT}&next=/v1/me")
    assert "eyJ" not in out
    assert REDACTED in out
    assert out.endswith("&next=/v1/me")


def test_bearer_jwt_is_redacted():
    out = redact_text(f"Bearer {JWT}")
    assert "eyJ" not in out


# --- secret keys in nested structures ----------------------------------------------------------


def test_secret_keys_are_redacted_in_nested_dicts():
    event = {
        "user": {
            "name": "Ada Lovelace",
            "password": "correct horse battery staple",
            "new_password": "another secret value",
            "refresh_token": "rt_abcdefghijklmnopqrstuvwxyz",
            "access_token": "at_abcdefghijklmnopqrstuvwxyz",
        },
        "card": {"cvv": "123", "CVC": 987, "card_number": "4111 1111 1111 1111", "last4": "1111"},
        "verification": {"code": "482913", "channel": "email"},
        "headers": {"Authorization": "Bearer xyz", "Cookie": "sid=abc", "Accept": "*/*"},
        "keys": {"client_secret": "s3cr3t", "private_key": "-----BEGIN", "pin": "0000"},
        "list": [{"otp": "111111"}, {"password": "in a list"}, "plain"],
        "status": 200,
    }
    out = redact(event)
    user = out["user"]
    assert user["name"] == "Ada Lovelace"
    for k in ("password", "new_password", "refresh_token", "access_token"):
        assert user[k] == REDACTED
    assert out["card"]["cvv"] == REDACTED
    assert out["card"]["CVC"] == REDACTED
    assert out["card"]["card_number"] == REDACTED
    assert out["card"]["last4"] == "1111"
    assert out["verification"] == {"code": REDACTED, "channel": "email"}
    assert out["headers"]["Authorization"] == REDACTED
    assert out["headers"]["Cookie"] == REDACTED
    assert out["headers"]["Accept"] == "*/*"
    assert out["keys"] == {"client_secret": REDACTED, "private_key": REDACTED, "pin": REDACTED}
    assert out["list"] == [{"otp": REDACTED}, {"password": REDACTED}, "plain"]
    assert out["status"] == 200
    dumped = json.dumps(out)
    for secret in ("horse", "rt_abc", "at_abc", "482913", "s3cr3t", "111111", "4111"):
        assert secret not in dumped.replace("…1111", "")
    # The input is not modified in place.
    assert event["user"]["password"] == "correct horse battery staple"


def test_values_under_ordinary_keys_are_still_scanned():
    out = redact({"note": f"paid with {VISA}", "nested": {"msg": f"Bearer {JWT}"}})
    assert out == {"note": "paid with [pan …4242]", "nested": {"msg": f"Bearer {REDACTED}"}}


def test_pan_given_as_an_integer_is_masked():
    out = redact({"number": int(VISA), "list": [int(VISA)], "amount": 1234, "big": 10**20})
    assert out == {
        "number": "[pan …4242]",
        "list": ["[pan …4242]"],
        "amount": 1234,
        "big": 10**20,
    }


def test_empty_secret_values_stay_visible():
    # "no password given" is useful when debugging and reveals nothing.
    assert redact({"password": None, "token": "", "codes": []}) == {
        "password": None,
        "token": "",
        "codes": [],
    }


# --- logging end to end ---------------------------------------------------------------------


@pytest.fixture
def json_logging(monkeypatch):
    # Loggers must not cache this configuration: the edge's module-level logger, first used
    # here, would otherwise keep writing to this test's handler for the rest of the session.
    configure = structlog.configure
    monkeypatch.setattr(
        structlog,
        "configure",
        lambda **kw: configure(**{**kw, "cache_logger_on_first_use": False}),
    )
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("uvicorn.access").disabled)
    yield
    root.handlers, level, disabled = saved[0], saved[1], saved[2]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = disabled
    structlog.reset_defaults()
    plain_tracebacks()  # what the suite runs with (tests/conftest.py)


def _lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_configured_logs_are_json_with_request_id_and_no_secret(json_logging, capsys):
    configure_logging("INFO", json_logs=True)
    token = request_id_var.set("req_test_123")
    try:
        get_logger("billfold.test").info(
            "request",
            method="POST",
            route="/v1/users",
            status=201,
            password="correct horse battery staple",
            authorization=f"Bearer {JWT}",
            body={"email": "ada@example.com", "card": {"number": VISA, "cvv": "123"}},
        )
        logging.getLogger("billfold.stdlib").warning("stdlib line with %s", f"Bearer {JWT}")
    finally:
        request_id_var.reset(token)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == 2, err
    first, second = lines
    assert first["event"] == "request"
    assert first["request_id"] == "req_test_123"
    assert first["level"] == "info"
    assert first["logger"] == "billfold.test"
    assert "timestamp" in first
    assert first["status"] == 201
    assert first["password"] == REDACTED
    assert first["authorization"] == REDACTED
    assert first["body"]["card"] == {"number": "[pan …4242]", "cvv": REDACTED}
    assert second["request_id"] == "req_test_123"
    assert second["level"] == "warning"
    for secret in ("correct horse", "eyJ", VISA, '"123"'):
        assert secret not in err


def test_exception_tracebacks_are_redacted(json_logging, capsys):
    configure_logging("INFO", json_logs=True)
    try:
        raise ValueError(f"card {VISA} with Bearer abc.def")
    except ValueError:
        get_logger("billfold.test").exception("boom")
    err = capsys.readouterr().err
    (line,) = _lines(err)
    assert "ValueError" in line["exception"]
    assert VISA not in err and "abc.def" not in err


async def test_gateway_request_log_has_request_id_and_no_secret(json_logging, capsys):
    """Drive the edge middleware with a tiny ASGI app; its request log line is checked."""
    from billfold.config import Settings
    from billfold.gateway.middleware import Edge, EdgeConfig
    from billfold.platform.db import create_engine
    from billfold.platform.errors import Unauthorized
    from billfold.platform.observability import Metrics

    class Verifier:
        async def verify(self, token: str):
            raise Unauthorized("bad token", code="invalid_token")

    async def inner(scope, receive, send):
        get_logger("billfold.inner").info("handling", password="hunter2hunter2")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    configure_logging("INFO", json_logs=True)
    # The engine never connects: this request opens no transaction.
    engine = create_engine("postgresql://nobody@127.0.0.1:1/none")
    edge = Edge(
        inner,
        EdgeConfig(
            Settings(rate_limits_enabled=False),
            engine,
            Verifier(),
            None,
            Metrics(),
            SealedBox(bytes(32)),
        ),
    )
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": f"/v1/cards/{VISA}",
        "raw_path": f"/v1/cards/{VISA}".encode(),
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {JWT}".encode()),
            (b"x-request-id", b"client-chosen-id-1"),
        ],
        "client": ("203.0.113.9", 5000),
    }
    await edge(scope, receive, send)
    await engine.dispose()
    assert sent[0]["status"] == 200
    assert (b"x-request-id", b"client-chosen-id-1") in sent[0]["headers"]
    err = capsys.readouterr().err
    lines = _lines(err)
    by_event = {line["event"]: line for line in lines}
    assert by_event["handling"]["request_id"] == "client-chosen-id-1"
    assert by_event["handling"]["password"] == REDACTED
    request = by_event["request"]
    assert request["request_id"] == "client-chosen-id-1"
    assert request["method"] == "GET"
    assert request["status"] == 200
    assert request["client_ip"] == "203.0.113.9"
    assert "duration_ms" in request
    assert VISA not in err
    assert "eyJ" not in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "refresh_token",
        "accessToken",
        "X-Api-Secret",
        "cvv",
        "code",
        "otp_code",
        "verification_code",
        "cardNumber",
        "document_number",
        "private_key",
        "Authorization",
        "pin",
    ],
)
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["country_code", "postal_code", "company", "shipping", "currency_code", "spinner", "name"],
)
def test_ordinary_keys_stay_readable(key):
    assert not is_secret_key(key)
