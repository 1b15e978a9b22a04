"""Fraud rules and lists without a database: expressions are checked when written, every shipped
rule catches its pattern and leaves everyday traffic alone, a broken rule is a non-hit, lists
match what they list (IP networks, expiry), and the compiled set's version follows its content."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from billfold.fraud.lists import ListEntry, ListSet, ListValueInvalid, normalize
from billfold.fraud.models import FEATURE_NAMES, FEATURES, RiskSubject, Thresholds
from billfold.fraud.rules import (
    DEFAULT_RULES,
    NEUTRAL,
    REASON_CODE_PATTERN,
    RULE_ID_PATTERN,
    ExpressionTrial,
    InvalidRuleExpression,
    RuleSpec,
    compile_expression,
    compile_rules,
    error_counter,
    try_expression,
    typed,
)
from billfold.fraud.scoring import combine

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def everyday(**overrides: Any) -> dict[str, Any]:
    """A settled user's usual coffee: a month-old verified account, some history, the usual
    device, place and hour."""
    features: dict[str, Any] = dict(NEUTRAL)
    features.update(
        kind="payment",
        is_payment=True,
        amount=450,
        currency="USD",
        channel="contactless",
        mcc="5814",
        mcc_risk=0.05,
        merchant_country="US",
        user_count_1m=1,
        user_count_1h=2,
        user_count_24h=4,
        user_sum_1h=900,
        user_sum_24h=4_000,
        device_count_1h=2,
        device_users_24h=1,
        card_count_1m=1,
        card_count_1h=2,
        ip_count_1h=2,
        ip_users_24h=1,
        history_count=40,
        amount_mean=600.0,
        amount_std=250.0,
        amount_zscore=-0.6,
        amount_to_max=0.3,
        has_location=True,
        km_from_last=2.0,
        speed_kmh=10.0,
        device_age_hours=700.0,
        account_age_days=90.0,
        kyc_tier=2,
        hour_of_day=9,
        hour_habit_share=0.2,
    )
    features.update(overrides)
    return features


def subject(**overrides: Any) -> RiskSubject:
    values: dict[str, Any] = {
        "kind": "payment",
        "subject_id": "txn_1",
        "user_id": "usr_1",
        "amount": 450,
        "currency": "USD",
        "at": NOW,
    }
    values.update(overrides)
    return RiskSubject(**values)


DEFAULTS = compile_rules(DEFAULT_RULES)


def reasons(features: dict[str, Any]) -> set[str]:
    return {h.reason_code for h in DEFAULTS.evaluate(features) if not h.shadow}


# --- the shipped rules --------------------------------------------------------------------------


def test_the_shipped_rules_are_well_formed() -> None:
    ids = [r.rule_id for r in DEFAULT_RULES]
    assert len(ids) == len(set(ids))
    for rule in DEFAULT_RULES:
        assert re.fullmatch(RULE_ID_PATTERN, rule.rule_id)
        assert re.fullmatch(REASON_CODE_PATTERN, rule.reason_code)
        assert rule.score > 0 or rule.action is not None
        assert 0 <= rule.score <= 1000
        assert len(rule.description) <= 500
        compile_expression(rule.expression)


def test_everyday_payments_and_transfers_hit_nothing() -> None:
    assert reasons(everyday()) == set()
    transfer = everyday(
        kind="transfer",
        is_payment=False,
        channel="p2p",
        mcc="",
        mcc_risk=0.0,
        merchant_country="",
        has_location=False,
        new_recipient=True,
        user_recipients_24h=2,
        recipient_senders_24h=1,
    )
    assert reasons(transfer) == set()
    assert combine([], None, Thresholds(), features=transfer).action == "allow"


def test_a_brand_new_users_first_payment_abroad_is_allowed() -> None:
    """What most of the test suite does: a fresh, unverified account, no device, no history,
    a merchant in another country than the profile's."""
    first = everyday(
        account_age_days=0.0,
        kyc_tier=0,
        history_count=0,
        amount_mean=0.0,
        amount_std=0.0,
        amount_zscore=0.0,
        amount_to_max=1.0,
        new_device=True,
        device_age_hours=0.0,
        new_country=True,
        country_mismatch=True,
        has_location=False,
        amount=999_999,
        user_sum_24h=999_999,
    )
    hits = DEFAULTS.evaluate(first)
    assert {h.reason_code for h in hits} == {"young_account_large_amount"}
    assert combine(hits, None, Thresholds(), features=first).action == "allow"


@pytest.mark.parametrize(
    ("overrides", "reason", "action"),
    [
        (
            {"channel": "e_commerce", "is_ecommerce": True, "card_count_1m": 6, "amount": 100},
            "card_testing_burst",
            "block",
        ),
        ({"card_declines_1h": 3, "card_count_1h": 5}, "card_repeated_declines", "block"),
        ({"user_count_1m": 12}, "velocity_user_minute", None),
        ({"user_count_1h": 35}, "velocity_user_hour", None),
        ({"user_sum_24h": 1_500_000}, "velocity_amount_day", None),
        (
            {"amount": 90_000, "amount_zscore": 12.0, "amount_to_max": 6.0},
            "amount_anomaly",
            None,
        ),
        ({"km_from_last": 9_000.0, "speed_kmh": 4_500.0}, "impossible_travel", "challenge"),
        (
            {"new_device": True, "device_age_hours": 0.0, "amount": 60_000, "amount_to_max": 2.5},
            "new_device_large_amount",
            "challenge",
        ),
        (
            {
                "new_device": True,
                "new_country": True,
                "country_mismatch": True,
                "amount": 30_000,
                "amount_to_max": 2.5,
            },
            "account_takeover_pattern",
            "challenge",
        ),
        (
            {
                "is_payment": False,
                "kind": "transfer",
                "new_recipient": True,
                "user_recipients_24h": 12,
            },
            "mule_fan_out",
            "review",
        ),
        (
            {"is_payment": False, "kind": "transfer", "recipient_senders_24h": 14},
            "mule_fan_in",
            "review",
        ),
        ({"mcc": "7995", "mcc_risk": 0.9, "amount": 80_000}, "high_risk_merchant", None),
        (
            {"mcc": "6051", "mcc_risk": 0.85, "account_age_days": 2.0},
            "high_risk_merchant_new_account",
            None,
        ),
        (
            {"account_age_days": 0.2, "kyc_tier": 0, "amount": 75_000},
            "young_account_large_amount",
            None,
        ),
        (
            {"hour_of_day": 3, "hour_habit_share": 0.0, "amount_zscore": 3.0},
            "unusual_time",
            None,
        ),
        ({"device_users_24h": 5}, "shared_device", None),
    ],
)
def test_each_rule_family_catches_its_pattern(
    overrides: dict[str, Any], reason: str, action: str | None
) -> None:
    hits = [h for h in DEFAULTS.evaluate(everyday(**overrides)) if h.reason_code == reason]
    assert len(hits) == 1
    assert hits[0].action == action
    assert not hits[0].shadow
    assert hits[0].description


def test_card_testing_burst_is_blocked_and_travel_challenged_by_combine() -> None:
    burst = everyday(is_ecommerce=True, card_count_1m=7, amount=99)
    assert combine(DEFAULTS.evaluate(burst), None, Thresholds(), features=burst).action == "block"
    travel = everyday(km_from_last=6_000.0, speed_kmh=3_000.0)
    decided = combine(DEFAULTS.evaluate(travel), None, Thresholds(), features=travel)
    assert decided.action == "challenge"
    assert "impossible_travel" in decided.reasons
    # The same attempt after the user passed a step-up goes through.
    stepped = {**travel, "stepped_up": True}
    assert combine(DEFAULTS.evaluate(stepped), None, Thresholds(), features=stepped).action == (
        "allow"
    )


def test_a_shadow_rule_is_reported_not_enforced() -> None:
    crowded = everyday(ip_users_24h=50)
    hits = DEFAULTS.evaluate(crowded)
    assert [(h.reason_code, h.shadow) for h in hits] == [("shared_ip", True)]
    decided = combine(hits, None, Thresholds(), features=crowded)
    assert decided.action == "allow"
    assert decided.score == 0
    assert decided.hits == tuple(hits)


# --- expressions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("amount >", "Syntax error"),
        ("amount > 10 &&", "Syntax error"),
        ("import os", "Syntax error"),
        ("__import__('os').system('true')", "Undefined variable or function: '__import__'"),
        ("max(amount, 1) > 1", "Undefined variable or function: 'max'"),
        ("mcc.matches('[')", "not a valid regex"),
        ("balance > 10", "Unknown feature(s): balance"),
        ("amount + 1", "must be true or false"),
        ("mcc > 5", "No such overload"),
        ("   ", "empty"),
        ("amount > 1 || " * 200 + "true", "longer than 2000"),
    ],
)
def test_a_bad_expression_is_refused_with_a_reason(expression: str, words: str) -> None:
    with pytest.raises(InvalidRuleExpression) as caught:
        compile_expression(expression)
    assert caught.value.code == "invalid_rule_expression"
    assert caught.value.status == 422
    assert words in str(caught.value.detail)


def test_an_expression_that_only_fails_on_zeros_is_accepted() -> None:
    # user_count_1h is 0 in the trial, never for a live attempt (the attempt is counted).
    compile_expression("amount / user_count_1h > 50000")
    compile_expression("int(mcc) >= 7995")  # '' for the trial's neutral mcc


def test_a_rule_that_fails_at_run_time_is_a_counted_non_hit() -> None:
    rules = compile_rules(
        [
            RuleSpec("ratio", "amount / user_count_1h > 100", "ratio_high", "ratio", score=100),
            RuleSpec("big", "amount > 100", "big_amount", "big", score=100),
        ]
    )
    features = everyday(amount=500, user_count_1h=0)
    assert [h.rule_id for h in rules.evaluate(features)] == ["big"]
    assert rules.errors["ratio"] == 1
    # A feature missing from the snapshot (a degraded source) is a non-hit too.
    partial = {k: v for k, v in everyday(amount=500).items() if k != "user_count_1h"}
    assert [h.rule_id for h in rules.evaluate(partial)] == ["big"]
    assert rules.errors["ratio"] == 2
    # A value that is no JSON scalar (a bug upstream) costs only the rules that use it.
    odd = {**everyday(amount=500), "user_count_1h": object()}
    assert [h.rule_id for h in rules.evaluate(odd)] == ["big"]
    registry = CollectorRegistry()
    rules.on_error = error_counter(registry)
    rules.evaluate(features)
    rules.evaluate(features)
    assert registry.get_sample_value("billfold_fraud_rule_errors_total", {"rule_id": "ratio"}) == 2


def test_values_are_given_their_catalogue_kind() -> None:
    # JSON snapshots and fallbacks may carry 4 for a float or 1 for a bool.
    features = typed({"amount_zscore": 4, "new_device": 1, "amount": 12.0, "other": "x"})
    assert features == {"amount_zscore": 4.0, "new_device": True, "amount": 12, "other": "x"}
    assert isinstance(features["amount_zscore"], float)
    assert typed({"user_count_1m": float("inf")}) == {"user_count_1m": float("inf")}
    rules = compile_rules([RuleSpec("z", "amount_zscore + 0.5 > 4.0", "z_high", "z", score=1)])
    assert [h.rule_id for h in rules.evaluate(everyday(amount_zscore=4))] == ["z"]


def test_the_try_endpoint_logic_reports_errors_and_fills_neutral_values() -> None:
    result = try_expression(ExpressionTrial(expression="card_count_1m >= 5", features={}))
    assert result.matched is False
    assert result.error is None
    assert result.features_used["card_count_1m"] == 0
    hit = try_expression(
        ExpressionTrial(expression="card_count_1m >= 5", features={"card_count_1m": 5})
    )
    assert hit.matched is True
    broken = try_expression(
        ExpressionTrial(expression="amount / user_count_1h > 1", features={"amount": 5})
    )
    assert broken.matched is False
    assert broken.error is not None and "division by zero" in broken.error
    with pytest.raises(ValueError, match="unknown feature"):
        ExpressionTrial(expression="true", features={"nope": 1})


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FEATURE_NAMES), _scalars, max_size=len(FEATURE_NAMES)))
def test_evaluation_never_raises_whatever_the_values(values: dict[str, Any]) -> None:
    features = {**everyday(), **values}
    for hit in DEFAULTS.evaluate(features, subject()):
        assert hit.reason_code


# --- versions -----------------------------------------------------------------------------------


def test_the_version_names_the_content() -> None:
    again = compile_rules(DEFAULT_RULES)
    assert again.version == DEFAULTS.version
    assert DEFAULTS.version.startswith("rs_")
    changed = [replace(DEFAULT_RULES[0], score=899), *DEFAULT_RULES[1:]]
    assert compile_rules(changed).version != DEFAULTS.version
    disabled = [replace(DEFAULT_RULES[0], state="disabled"), *DEFAULT_RULES[1:]]
    assert compile_rules(disabled).version != DEFAULTS.version
    assert "card_testing_burst" not in {s.rule_id for s in compile_rules(disabled).specs}
    listed = compile_rules(
        DEFAULT_RULES, ListSet([ListEntry("lst_1", "block", "device", "d", "x")])
    )
    assert listed.version != DEFAULTS.version


# --- lists --------------------------------------------------------------------------------------


def test_lists_match_each_kind_of_value() -> None:
    lists = ListSet(
        [
            ListEntry("lst_a", "block", "device", "dev_stolen", "reported stolen"),
            ListEntry("lst_b", "block", "ip", "203.0.113.0/24", "botnet range"),
            ListEntry("lst_c", "block", "ip", "2001:db8::1", "one host"),
            ListEntry("lst_d", "block", "card", "fp_abc", "chargebacks"),
            ListEntry("lst_e", "block", "recipient", "usr_mule", "mule"),
            ListEntry("lst_f", "block", "merchant", "mch_bad", "fraudulent shop"),
            ListEntry("lst_g", "block", "country", "KP", "sanctions"),
            ListEntry("lst_h", "allow", "device", "dev_vip", "known good"),
        ]
    )
    rules = compile_rules([], lists)

    def codes(**fields: Any) -> list[str]:
        return [h.reason_code for h in rules.evaluate(everyday(), subject(**fields))]

    assert codes() == []
    assert codes(device_id="dev_stolen") == ["block_list_device"]
    assert codes(ip="203.0.113.77") == ["block_list_ip"]
    assert codes(ip="203.0.114.1") == []
    assert codes(ip="2001:0db8:0000::0001") == ["block_list_ip"]
    assert codes(ip="not an ip") == []
    assert codes(card_fingerprint="fp_abc") == ["block_list_card"]
    assert codes(kind="transfer", recipient_id="usr_mule") == ["block_list_recipient"]
    assert codes(kind="transfer", recipient_key="usr_mule") == ["block_list_recipient"]
    assert codes(merchant_id="mch_bad") == ["block_list_merchant"]
    assert codes(merchant_country="kp") == ["block_list_country"]
    assert codes(device_id="dev_vip") == ["allow_list_device"]
    # Features alone (a backtest) never reach the lists.
    assert rules.evaluate(everyday()) == []


def test_a_block_list_blocks_and_an_allow_list_overrides_rules_but_not_a_block() -> None:
    lists = ListSet(
        [
            ListEntry("lst_a", "block", "device", "dev_stolen", "reported stolen"),
            ListEntry("lst_b", "allow", "device", "dev_vip", "the CFO's phone"),
            ListEntry("lst_c", "allow", "merchant", "mch_ok", "our own shop"),
        ]
    )
    rules = compile_rules(DEFAULT_RULES, lists)
    travel = everyday(km_from_last=6_000.0, speed_kmh=3_000.0)

    def action(**fields: Any) -> str:
        return combine(
            rules.evaluate(travel, subject(**fields)), None, Thresholds(), features=travel
        ).action

    assert action() == "challenge"
    assert action(device_id="dev_vip") == "allow"
    assert action(device_id="dev_stolen") == "block"
    assert action(device_id="dev_stolen", merchant_id="mch_ok") == "block"
    hit = rules.evaluate(everyday(), subject(device_id="dev_stolen"))[0]
    assert hit.rule_id == "lst_a"
    assert hit.description == "The device is on the block list: reported stolen"
    assert (hit.score, hit.action) == (1000, "block")


def test_an_ipv4_entry_matches_a_client_seen_ipv4_mapped() -> None:
    lists = ListSet(
        [
            ListEntry("lst_a", "block", "ip", "203.0.113.0/24", "botnet range"),
            ListEntry("lst_b", "block", "ip", "198.51.100.7", "one host"),
            ListEntry("lst_c", "block", "ip", "::ffff:192.0.2.9", "stored mapped before"),
        ]
    )
    rules = compile_rules([], lists)

    def codes(ip: str) -> list[str]:
        return [h.reason_code for h in rules.evaluate(everyday(), subject(ip=ip))]

    assert codes("::ffff:203.0.113.77") == ["block_list_ip"]
    assert codes("::ffff:198.51.100.7") == ["block_list_ip"]
    assert codes("192.0.2.9") == ["block_list_ip"]
    assert codes("::ffff:198.51.100.8") == []


def test_an_expired_entry_stops_matching() -> None:
    lists = ListSet(
        [ListEntry("lst_a", "block", "device", "dev_x", "cooling off", NOW + timedelta(hours=1))]
    )
    rules = compile_rules([], lists)
    assert rules.evaluate(everyday(), subject(device_id="dev_x"))
    later = subject(device_id="dev_x", at=NOW + timedelta(hours=2))
    assert rules.evaluate(everyday(), later) == []


@pytest.mark.parametrize(
    ("kind", "value", "stored"),
    [
        ("ip", " 10.1.2.3 ", "10.1.2.3"),
        # Host bits set: the network. (A /8 is refused now: wider than MIN_PREFIX, below.)
        ("ip", "10.1.2.3/16", "10.1.0.0/16"),
        ("ip", "2001:db8:1:2::5/48", "2001:db8:1::/48"),
        ("ip", "2001:0DB8::0001/128", "2001:db8::1"),
        # IPv4-mapped: the IPv4 address/network it is (a dual-stack client is matched so).
        ("ip", "::ffff:10.1.2.3", "10.1.2.3"),
        ("ip", "::ffff:10.1.0.0/112", "10.1.0.0/16"),
        ("ip", "64:ff9b::10.1.0.0/112", "64:ff9b::a01:0/112"),
        ("country", "de", "DE"),
        ("device", "  dev_1 ", "dev_1"),
    ],
)
def test_values_are_stored_in_one_form(kind: str, value: str, stored: str) -> None:
    assert normalize(kind, value) == stored


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("ip", "300.1.1.1"),
        ("ip", "example.com"),
        ("country", "DEU"),
        ("country", "ß"),  # upper-cased it would be "SS" (South Sudan)
        ("card", "\x00"),
    ],
)
def test_values_that_are_not_of_their_kind_are_refused(kind: str, value: str) -> None:
    with pytest.raises(ValueError):
        normalize(kind, value)


@pytest.mark.parametrize(
    "value",
    [
        "0.0.0.0/0",
        "10.1.2.3/8",
        "10.0.0.0/15",
        "::/0",
        "2001:db8::/31",
        "::/1",
        # IPv6 networks that embed all of IPv4 (or a /8 of it) in their last 32 bits.
        "::ffff:0.0.0.0/96",
        "::ffff:0:0/95",
        "::ffff:10.0.0.0/104",
        "64:ff9b::/96",
        "64:ff9b::10.0.0.0/104",
        "::/80",
    ],
)
def test_networks_wider_than_the_minimum_prefix_are_refused(value: str) -> None:
    with pytest.raises(ListValueInvalid) as refused:
        normalize("ip", value)
    assert refused.value.code == "network_too_broad"
    assert normalize("ip", "10.0.0.0/16") == "10.0.0.0/16"  # the broadest allowed
    assert normalize("ip", "2001:db8::/32") == "2001:db8::/32"


def test_every_feature_has_a_neutral_value() -> None:
    assert set(NEUTRAL) == {f.name for f in FEATURES}
