"""Pure rules of the notification service: every template renders in every language with
babel formatting, quiet hours in the user's time zone (wrapping midnight, DST), preferences
with locked security channels."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from billfold.notifications import KINDS
from billfold.notifications.events import _first_name, _masked_contact
from billfold.notifications.service import effective, quiet_until
from billfold.notifications.templates import LANGUAGES, format_money, format_when, render
from billfold.users import Party

CONTEXT = {
    "name": "Ada",
    "counterparty": "Bob",
    "amount": 123_456,
    "currency": "EUR",
    "merchant": "Blue Bottle Coffee",
    "at": "2026-03-29T00:30:00Z",
    "subject_kind": "payment",
    "device_name": "Ada's iPhone",
    "platform": "ios",
    "code": "123456",
    "minutes": 10,
    "verified": True,
    "tier": "gold",
    "previous": "green",
    "multiplier": 2,
    "days": 14,
}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_renders_every_part_in_every_language(kind: str, language: str) -> None:
    rendered = render(kind, CONTEXT, locale=language, timezone="Europe/Berlin")
    assert rendered.language == language
    for part in ("title", "body", "subject", "email", "sms"):
        value = getattr(rendered, part)
        assert value and "{{" not in value and "{%" not in value, (kind, part, value)
    assert len(rendered.sms) <= 160


def test_the_languages_differ_and_format_their_own_way() -> None:
    en = render("transfer_received", CONTEXT, locale="en-GB", timezone="Europe/London")
    de = render("transfer_received", CONTEXT, locale="de-AT", timezone="Europe/Vienna")
    assert en.body == "Bob sent you €1,234.56."
    assert de.body == "Bob hat dir €\xa01.234,56 gesendet."  # Austria puts € first
    # 00:30 UTC, half an hour before Europe switches to summer time: 00:30 GMT in London,
    # 01:30 CET in Vienna.
    assert "29 Mar 2026, 00:30" in en.email
    assert "29.03.2026, 01:30" in de.email


def test_an_unsupported_locale_reads_english_throughout() -> None:
    fr = render("payment_declined", CONTEXT, locale="fr-FR", timezone="Europe/Paris")
    assert fr.language == "en" and fr.body.startswith("Your payment of €1,234.56")


def test_money_and_time_formatting() -> None:
    assert format_money(1_234, "USD", "en-US") == "$12.34"
    assert format_money(1_234, "JPY", "ja") == "￥1,234"
    assert format_money(5, "XXX-not", "en") == "5 XXX-not"
    assert format_when("2026-11-30T22:30:00Z", "en-US", "America/New_York") == (
        "Nov 30, 2026, 5:30\u202fPM"
    )
    assert format_when("2026-11-30T22:30:00Z", "en", "Not/AZone").endswith("10:30\u202fPM")


def test_quiet_hours_in_the_users_time_zone() -> None:
    window = (time(22, 0), time(7, 0))
    tokyo = "Asia/Tokyo"  # UTC+9
    # 23:30 in Tokyo: quiet until 07:00 the next morning there (22:00 UTC).
    assert quiet_until(datetime(2026, 11, 30, 14, 30, tzinfo=UTC), tokyo, window) == datetime(
        2026, 11, 30, 22, 0, tzinfo=UTC
    )
    # 06:00 in Tokyo: quiet for one more hour.
    assert quiet_until(datetime(2026, 11, 30, 21, 0, tzinfo=UTC), tokyo, window) == datetime(
        2026, 11, 30, 22, 0, tzinfo=UTC
    )
    # 12:00 in Tokyo: not quiet.
    assert quiet_until(datetime(2026, 11, 30, 3, 0, tzinfo=UTC), tokyo, window) is None
    # A window within one day, and none at all.
    day = (time(9, 0), time(17, 0))
    assert quiet_until(datetime(2026, 11, 30, 10, 0, tzinfo=UTC), "UTC", day) == datetime(
        2026, 11, 30, 17, 0, tzinfo=UTC
    )
    assert quiet_until(datetime(2026, 11, 30, 18, 0, tzinfo=UTC), "UTC", day) is None
    assert quiet_until(datetime(2026, 11, 30, 18, 0, tzinfo=UTC), "UTC", None) is None
    # The night the clocks go forward in Berlin: 07:00 local is 05:00 UTC (CEST).
    berlin = quiet_until(datetime(2026, 3, 28, 23, 0, tzinfo=UTC), "Europe/Berlin", window)
    assert berlin == datetime(2026, 3, 29, 5, 0, tzinfo=UTC)


def test_preferences_overlay_defaults_and_keep_security_on() -> None:
    prefs = effective(
        [
            ("transfers", "push", False),
            ("transfers", "sms", True),
            ("security", "email", False),  # stored somehow: still on
            ("security", "sms", True),
        ]
    )
    assert prefs["transfers"] == {"push": False, "email": True, "sms": True, "in_app": True}
    assert prefs["security"] == {"push": True, "email": True, "sms": True, "in_app": True}
    assert prefs["payments"] == {"push": True, "email": False, "sms": False, "in_app": True}


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("Alice Example", "Alice"),
        ("Jean-Luc Picard", "Jean-Luc"),
        ("O\u2019Brien", "O\u2019Brien"),
        ("\u00dcnal Y\u0131lmaz", "\u00dcnal"),
        ("billfold Security: call +1 900 555 0100", None),
        ("BillfoldSupport", None),
        (
            "\uff22\uff29\uff2c\uff2c\uff26\uff2f\uff2c\uff24 team",
            None,
        ),  # full-width letters fold (NFKC) to the brand
        ("Security team", None),
        ("evil.example", None),
        ("Call18005550100", None),
        ("Alice1", None),
        ("x" * 25, None),
        ("https://evil.example", None),
    ],
)
def test_an_invitation_shows_a_first_name_only_when_it_reads_as_one(
    name: str, shown: str | None
) -> None:
    assert _first_name(name) == shown


def _party(email: str | None, phone: str | None) -> Party:
    return Party("usr_1", "x", None, "active", 1, "UTC", "en", email, phone)


def test_an_invitation_shows_the_senders_verified_contact_masked() -> None:
    # The phone first; an e-mail's domain is the sender's choice too, so it is masked as well.
    assert _masked_contact(_party("mallory@billfold-help.example", "+4915123456789")) == (
        "+49*****89"
    )
    assert _masked_contact(_party("mallory@billfold-help.example", None)) == "m***@b***.example"
    assert _masked_contact(_party(None, None)) is None
