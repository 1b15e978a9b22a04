"""The fraud features' pure part: what a store's raw state means as features (the same function
turns Redis' and PostgreSQL's answers into the catalogue), geography, MCC risk."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billfold.fraud import FEATURE_NAMES, FEATURES, RiskSubject
from billfold.fraud.features import (
    RawState,
    card_key,
    features_from,
    haversine_km,
    recipient_key,
)
from billfold.fraud.models import MCC_RISK_DEFAULT, mcc_risk
from billfold.fraud.store.features import Profile

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
HOME = Profile(AT - timedelta(days=100), 2, "DE", "Europe/Berlin")


def payment(**overrides: object) -> RiskSubject:
    values: dict[str, object] = {
        "kind": "payment",
        "subject_id": "txn_1",
        "user_id": "usr_1",
        "amount": 6_000,
        "currency": "EUR",
        "at": AT,
        "mcc": "5411",
        "merchant_country": "DE",
        "channel": "contactless",
    }
    values.update(overrides)
    return RiskSubject(**values)  # type: ignore[arg-type]


def test_without_history_the_amount_features_are_neutral() -> None:
    f = features_from(payment(), RawState(profile=HOME))
    assert (f["history_count"], f["amount_mean"], f["amount_std"]) == (0, 0.0, 0.0)
    assert (f["amount_zscore"], f["amount_to_max"], f["hour_habit_share"]) == (0.0, 1.0, 0.0)


def test_amount_against_history() -> None:
    raw = RawState(
        hist_n=3, hist_sum=6_000, hist_sumsq=14_000_000, hist_max=3_000, hours_near=2, hours_total=3
    )
    f = features_from(payment(), raw)
    assert f["amount_mean"] == 2_000.0
    assert f["amount_std"] == pytest.approx(816.4966, abs=1e-4)
    assert f["amount_zscore"] == pytest.approx(4_000 / 816.4966, abs=1e-3)
    assert f["amount_to_max"] == 2.0
    assert f["hour_habit_share"] == pytest.approx(0.6667)


def test_a_single_earlier_amount_has_no_spread() -> None:
    # std 0 → divided by 1: the z-score is the difference in minor units, not infinity.
    f = features_from(payment(amount=150), RawState(hist_n=1, hist_sum=100, hist_sumsq=10_000))
    assert (f["amount_std"], f["amount_zscore"]) == (0.0, 50.0)


def test_great_circle_distances() -> None:
    assert haversine_km(52.52, 13.405, 48.8566, 2.3522) == pytest.approx(877.5, abs=1.0)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * 6371.0088, rel=1e-9)
    assert haversine_km(10, 10, 10, 10) == 0.0


def test_speed_from_the_previous_location() -> None:
    raw = RawState(prev_lat=52.52, prev_lon=13.405, prev_at=AT - timedelta(hours=2))
    f = features_from(payment(latitude=48.8566, longitude=2.3522), raw)
    assert f["has_location"] is True
    assert f["speed_kmh"] == pytest.approx(877.5 / 2, abs=1.0)
    # Seconds apart count as a minute: a few hundred metres of GPS jitter is not a flight.
    near = RawState(prev_lat=52.52, prev_lon=13.405, prev_at=AT - timedelta(seconds=2))
    f = features_from(payment(latitude=52.5245, longitude=13.405), near)
    assert f["speed_kmh"] == pytest.approx(0.5 * 60, abs=1.0)
    # No location now: nothing is said about travel.
    f = features_from(payment(), raw)
    assert (f["has_location"], f["km_from_last"], f["speed_kmh"]) == (False, 0.0, 0.0)


def test_countries() -> None:
    f = features_from(payment(merchant_country="DE"), RawState(profile=HOME))
    assert (f["country_mismatch"], f["new_country"]) == (False, False)
    f = features_from(payment(merchant_country="fr"), RawState(profile=HOME))
    assert (f["merchant_country"], f["country_mismatch"], f["new_country"]) == ("FR", True, True)
    f = features_from(payment(merchant_country="FR"), RawState(profile=HOME, country_seen=True))
    assert (f["country_mismatch"], f["new_country"]) == (True, False)


def test_devices() -> None:
    assert features_from(payment(), RawState())["new_device"] is True
    f = features_from(payment(device_id="dev_1"), RawState())
    assert (f["new_device"], f["device_age_hours"]) == (True, 0.0)
    seen = RawState(device_first_seen=AT - timedelta(hours=36))
    f = features_from(payment(device_id="dev_1"), seen)
    assert (f["new_device"], f["device_age_hours"]) == (False, 36.0)


def test_transfers() -> None:
    t = RiskSubject(
        kind="transfer",
        subject_id="p2p_1",
        user_id="usr_1",
        amount=100,
        currency="EUR",
        at=AT,
        recipient_id="usr_2",
    )
    f = features_from(t, RawState(profile=HOME))
    assert (f["kind"], f["is_payment"], f["channel"], f["mcc"], f["mcc_risk"]) == (
        "transfer",
        False,
        "p2p",
        "",
        0.0,
    )
    assert (f["new_recipient"], f["new_country"], f["is_ecommerce"]) == (True, False, False)
    assert features_from(t, RawState(recipient_seen=True))["new_recipient"] is False
    assert recipient_key(t) == "usr_2"
    # To an e-mail/phone not resolved to a user: no recipient key, nothing to call new.
    contact = RiskSubject(
        kind="transfer", subject_id="p2p_2", user_id="usr_1", amount=100, currency="EUR", at=AT
    )
    assert (recipient_key(contact), features_from(contact, RawState())["new_recipient"]) == (
        None,
        False,
    )
    assert features_from(payment(), RawState())["new_recipient"] is False
    assert recipient_key(payment()) is None


def test_profile_features() -> None:
    f = features_from(payment(), RawState(profile=HOME))
    assert (f["account_age_days"], f["kyc_tier"], f["hour_of_day"]) == (100.0, 2, 13)
    odd = Profile(AT, 0, "DE", "Not/AZone")
    assert features_from(payment(), RawState(profile=odd))["hour_of_day"] == 12  # UTC
    f = features_from(payment(), RawState())
    assert (f["account_age_days"], f["kyc_tier"]) == (0.0, 0)


def test_mcc_risk_and_channel() -> None:
    assert mcc_risk("7995") == 0.9
    assert mcc_risk("5411") == MCC_RISK_DEFAULT
    assert mcc_risk(None) == 0.0
    f = features_from(payment(mcc="6051", channel="ecommerce"), RawState())
    assert (f["mcc_risk"], f["is_ecommerce"]) == (0.8, True)


def test_card_key_prefers_the_fingerprint() -> None:
    assert card_key(payment(payment_method_id="pm_1")) == "pm_1"
    assert card_key(payment(payment_method_id="pm_1", card_fingerprint="fp")) == "fp"
    assert card_key(payment()) is None


_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


@given(
    counts=st.lists(st.integers(0, 10_000), min_size=16, max_size=16),
    amounts=st.lists(st.integers(1, 10**9), min_size=0, max_size=20),
    amount=st.integers(1, 10**9),
    lat=st.one_of(st.none(), st.floats(-90, 90)),
    lon=st.floats(-180, 180),
    prev=st.one_of(st.none(), st.tuples(st.floats(-90, 90), st.floats(-180, 180))),
    seconds_ago=st.integers(0, 10**8),
    device=st.one_of(st.none(), st.just("dev_1")),
    kind=st.sampled_from(["payment", "transfer"]),
)
def test_every_feature_has_its_catalogue_type(
    counts: list[int],
    amounts: list[int],
    amount: int,
    lat: float | None,
    lon: float,
    prev: tuple[float, float] | None,
    seconds_ago: int,
    device: str | None,
    kind: str,
) -> None:
    names = [
        "user_count_1m",
        "user_count_1h",
        "user_count_24h",
        "user_sum_1h",
        "user_sum_24h",
        "user_declines_24h",
        "device_count_1h",
        "device_users_24h",
        "card_count_1m",
        "card_count_1h",
        "card_declines_1h",
        "ip_count_1h",
        "ip_users_24h",
        "recipient_count_24h",
        "recipient_senders_24h",
        "user_recipients_24h",
    ]
    windows: dict[str, Any] = dict(zip(names, counts, strict=True))
    raw = RawState(
        **windows,
        hist_n=len(amounts),
        hist_sum=float(sum(amounts)),
        hist_sumsq=float(sum(a * a for a in amounts)),
        hist_max=max(amounts, default=0),
        hours_near=len(amounts) // 2,
        hours_total=len(amounts),
        prev_lat=prev[0] if prev else None,
        prev_lon=prev[1] if prev else None,
        prev_at=AT - timedelta(seconds=seconds_ago) if prev else None,
        device_first_seen=AT - timedelta(seconds=seconds_ago) if device else None,
        profile=HOME,
    )
    subject = payment(
        kind=kind,
        amount=amount,
        latitude=lat,
        longitude=lon if lat is not None else None,
        device_id=device,
        recipient_id="usr_2" if kind == "transfer" else None,
    )
    f = features_from(subject, raw)
    assert tuple(f) == FEATURE_NAMES
    for spec in FEATURES:
        value = f[spec.name]
        assert type(value) is _KINDS[spec.kind], (spec.name, value)
        if isinstance(value, float):
            assert (math.isfinite(value) and value >= 0) or spec.name == "amount_zscore"
    assert 0.0 <= float(f["hour_habit_share"]) <= 1.0  # type: ignore[arg-type]
    assert f["amount_std"] >= 0  # type: ignore[operator]
