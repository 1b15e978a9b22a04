"""Structured JSON logs with request ids and secret redaction; Prometheus metrics."""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from billfold.platform.cards import luhn_valid as luhn_valid

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# A key is secret when one of its words is (`refresh_token`, `cvv`, `X-Api-Secret`); `code` only
# on its own or after verification/otp words, so `country_code` and `postal_code` stay readable.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "authorization",
        "cookie",
        "pan",
        "cvv",
        "cvc",
        "cvv2",
        "otp",
        "totp",
        "signature",
        "private",
        "pin",
        "assertion",
        "attestation",
        "credential",
        "credentials",
        "apikey",
        "nonce",
    }
)
_SECRET_KEYS = frozenset({"code", "card_number", "document_number", "account_number", "api_key"})
_CODE_QUALIFIERS = frozenset({"verification", "otp", "auth", "step_up", "totp", "sms", "email"})


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_key(key: str) -> bool:
    lowered = _CAMEL.sub("_", key).lower().replace("-", "_")
    if lowered in _SECRET_KEYS:
        return True
    words = lowered.split("_")
    if any(w in _SECRET_WORDS for w in words):
        return True
    return words[-1] == "code" and "_".join(words[:-1]) in _CODE_QUALIFIERS


_PAN_CANDIDATE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED = "[redacted]"


def _mask_pan(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return f"[pan …{digits[-4:]}]"
    return match.group(0)


def redact_text(value: str) -> str:
    """Mask card numbers, bearer credentials and JWTs found anywhere in a string."""
    value = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
    value = _JWT.sub(REDACTED, value)
    return _PAN_CANDIDATE.sub(_mask_pan, value)


def redact(value: Any, key: str | None = None) -> Any:
    if key is not None and is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if type(value) is int and value >= 10**12:  # a card number logged as a number
        masked = redact_text(str(value))
        return value if masked == str(value) else masked
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


_KEEP = frozenset({"event", "level", "timestamp", "logger", "request_id"})


def _redact_processor(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if k in _KEEP else redact(v, k)) if k != "event" else redact(v)
        for k, v in event_dict.items()
    }


def _add_request_id(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    rid = request_id_var.get()
    if rid is not None:
        event_dict.setdefault("request_id", rid)
    return event_dict


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Route stdlib and structlog through one redacting JSON renderer on stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        # Plain tracebacks: rich ones print every frame's locals (request bodies, secrets).
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer)
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would repeat our request log without redaction or request ids.
    logging.getLogger("uvicorn.access").disabled = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class Metrics:
    """The process's Prometheus collectors (one registry per app, so tests stay independent)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "billfold_http_requests_total",
            "HTTP requests by route template, method and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "billfold_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "billfold_rate_limited_total",
            "Requests refused by rate limits, by route class",
            ["route_class"],
            registry=self.registry,
        )
        self.events_published = Counter(
            "billfold_outbox_events_published_total",
            "Outbox events handed to the bus",
            ["type"],
            registry=self.registry,
        )
