"""Rendering a notification: one Jinja2 template per kind and language, one block per channel
part (`title`/`body` for push and the inbox, `subject`/`email`, `sms`), with amounts and times
formatted by babel in the recipient's locale and time zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time, get_datetime_format
from babel.numbers import format_currency
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template

from billfold.platform.money import is_currency, minor_units

LANGUAGES = ("en", "de")
DEFAULT_LANGUAGE = "en"
_DIR = Path(__file__).parent / "templates"

# Words the templates take from the data (what a fraud check was about), per language.
_WORDS: dict[str, dict[str, str]] = {
    "en": {"payment": "payment", "transfer": "transfer"},
    "de": {"payment": "Zahlung", "transfer": "Überweisung"},
}


@dataclass(frozen=True)
class Rendered:
    """A notification's text in one language, for every channel."""

    language: str
    title: str
    body: str
    subject: str
    email: str
    sms: str


@lru_cache(maxsize=1)
def _environment() -> Environment:
    # Plain text only (push, SMS, text e-mail): nothing is HTML, so nothing is escaped; a
    # missing variable is an error, caught by the tests that render every template.
    return Environment(
        loader=FileSystemLoader(_DIR),
        autoescape=False,  # noqa: S701 - text/plain output, never HTML
        undefined=StrictUndefined,
        keep_trailing_newline=False,
    )


def language_of(locale: str) -> str:
    """The template language for a user's locale (`de-AT` → `de`); English when we have none."""
    lang = locale.replace("-", "_").split("_", 1)[0].lower()
    return lang if lang in LANGUAGES else DEFAULT_LANGUAGE


def babel_locale(locale: str) -> Locale:
    """The babel locale for a user's locale string, English when it is not one."""
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return Locale.parse("en")


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def format_money(amount: int, currency: str, locale: str) -> str:
    """`amount` minor units of `currency` as the user's locale writes it (`1.234,56 €`)."""
    if not is_currency(currency):
        return f"{amount} {currency}"
    value = Decimal(amount).scaleb(-minor_units(currency))
    return str(format_currency(value, currency, locale=babel_locale(locale)))


def format_when(value: datetime | str, locale: str, timezone: str) -> str:
    """An instant in the user's time zone and locale: date with abbreviated month, hours and
    minutes in the locale's own clock (`Nov 30, 2026, 5:30 PM`, `30. Nov. 2026, 23:30`)."""
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    loc, zone = babel_locale(locale), _zone(timezone)
    local = instant.astimezone(zone)
    pattern = str(get_datetime_format("medium", locale=loc))
    return pattern.replace("{1}", str(format_date(local, "medium", locale=loc))).replace(
        "{0}", str(format_time(local, "short", tzinfo=zone, locale=loc))
    )


def _template(kind: str, language: str) -> Template:
    return _environment().get_template(f"{language}/{kind}.j2")


def render(kind: str, context: dict[str, Any], *, locale: str, timezone: str) -> Rendered:
    """Render `kind` for a user with `locale` and `timezone`; `context` is the template data."""
    language = language_of(locale)
    if not locale.lower().startswith(language):
        locale = language  # text in English: numbers and dates in English too, not half French
    template = _template(kind, language)
    values = dict(context)
    if "subject_kind" in values:
        values["subject_kind"] = _WORDS[language].get(values["subject_kind"], "")
    values["money"] = lambda amount, currency: format_money(int(amount), str(currency), locale)
    values["when"] = lambda at: format_when(at, locale, timezone)
    ctx = template.new_context(values)
    parts = {
        name: "".join(template.blocks[name](ctx)).strip()
        for name in ("title", "body", "subject", "email", "sms")
    }
    return Rendered(language=language, **parts)
