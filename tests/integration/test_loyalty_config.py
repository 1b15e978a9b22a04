"""Loyalty settings are checked when they load: a bad tier or redemption rate stops the process
with a clear error instead of answering 500 to the requests it would break."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from billfold.config import Settings
from billfold.loyalty import LoyaltyRuntime

GREEN = {"name": "green", "multiplier": 1}


@pytest.mark.parametrize(
    ("tiers", "error"),
    [
        ([GREEN, {"name": "gold", "multiplier": 2, "min_spend": {"USD": 0}}], "positive"),
        ([GREEN, {"name": "gold", "multiplier": 2, "min_spend": {"USD": -5}}], "positive"),
        ([GREEN, {"name": "gold", "multiplier": 2, "min_spend": {"usd": 100}}], "ISO 4217"),
        ([GREEN, {"name": "gold", "multiplier": 2, "min_spend": {"ZZZ": 100}}], "ISO 4217"),
        ([GREEN, {"name": "gold", "multiplier": 2, "min_spend": {"PTS": 100}}], "ISO 4217"),
        ([{**GREEN, "min_spend": {"USD": 1}}], "everyone's"),
        ([GREEN, {"name": "gold", "multiplier": 2}], "needs a min_spend"),
        ([GREEN, {"name": "green", "multiplier": 2, "min_spend": {"USD": 1}}], "twice"),
        (
            [
                GREEN,
                {"name": "gold", "multiplier": 2, "min_spend": {"USD": 500}},
                {"name": "platinum", "multiplier": 3, "min_spend": {"USD": 500}},
            ],
            "more USD spend",
        ),
    ],
)
def test_a_tier_configuration_that_cannot_work_is_refused_at_load(
    tiers: list[dict[str, Any]], error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        Settings(loyalty_tiers=tiers)


@pytest.mark.parametrize(
    ("rates", "error"),
    [
        ({"usd": {}}, "ISO 4217"),
        ({"PTS": {}}, "ISO 4217"),
        ({"ZZZ": {}}, "ISO 4217"),
        ({"USD": {"amount": 1_001}}, "at most 1000"),
        ({"USD": {"points": 3, "step": 100}}, "multiple"),
        ({"USD": {"amount": 0}}, "greater than 0"),
    ],
)
def test_a_redemption_rate_that_cannot_work_is_refused_at_load(
    rates: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        Settings(loyalty_redemption_rates=rates)


def test_a_currency_no_wallet_holds_stops_the_loyalty_runtime() -> None:
    settings = Settings(loyalty_redemption_rates={"XAU": {}})  # ISO 4217, but gold
    with pytest.raises(ValueError, match="XAU"):
        LoyaltyRuntime(settings)


def test_the_defaults_load_and_redeem_into_usd_only() -> None:
    settings = Settings()
    LoyaltyRuntime(settings)
    assert list(settings.loyalty_redemption_rates) == ["USD"]
    assert [t.name for t in settings.loyalty_tiers] == ["green", "gold", "platinum"]
