"""Rate-limit quotas (`"30/60"`) and the headers a decision answers with."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billfold.config import Settings
from billfold.gateway.middleware import route_class
from billfold.platform.ratelimit import Decision, Quota


@pytest.mark.parametrize(
    ("spec", "limit", "period"),
    [("30/60", 30, 60), ("1/1", 1, 1), ("1200/3600", 1200, 3600), ("5", 5, 60), ("5/", 5, 60)],
)
def test_parse_good_specs(spec, limit, period):
    assert Quota.parse(spec) == Quota(limit, period)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "/",
        "/60",
        "abc",
        "ten/60",
        "10/sixty",
        "0/60",
        "-1/60",
        "10/0",
        "10/-5",
        "1.5/60",
        "10/60.5",
        "10/60/5",
        "10:60",
        "1e3/60",
    ],
)
def test_parse_refuses_bad_specs(spec):
    with pytest.raises(ValueError):
        Quota.parse(spec)


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=1, max_value=10**7))
def test_parse_round_trips(limit, period):
    assert Quota.parse(f"{limit}/{period}") == Quota(limit, period)


def test_default_settings_parse():
    s = Settings()
    for klass in ("auth", "write", "read"):
        for kind in ("ip", "user"):
            q = Quota.parse(getattr(s, f"rate_limit_{klass}_{kind}"))
            assert q.limit > 0 and q.period_seconds > 0


def test_allowed_decision_headers_have_no_retry_after():
    d = Decision(allowed=True, limit=30, period_seconds=60, remaining=29, retry_after=0, reset=2)
    assert d.headers() == [
        ("RateLimit-Limit", "30"),
        ("RateLimit-Remaining", "29"),
        ("RateLimit-Reset", "2"),
        ("RateLimit-Policy", "30;w=60"),
    ]


def test_refused_decision_headers_add_retry_after():
    d = Decision(allowed=False, limit=3, period_seconds=60, remaining=0, retry_after=20, reset=40)
    headers = dict(d.headers())
    assert headers == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "40",
        "RateLimit-Policy": "3;w=60",
        "Retry-After": "20",
    }


@pytest.mark.parametrize("retry_after", [0, -3])
def test_retry_after_is_at_least_one_second(retry_after):
    d = Decision(
        allowed=False, limit=3, period_seconds=60, remaining=0, retry_after=retry_after, reset=0
    )
    assert dict(d.headers())["Retry-After"] == "1"


@given(
    st.booleans(),
    st.integers(1, 10**6),
    st.integers(1, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
def test_header_values_are_decimal_integers(allowed, limit, period, remaining, retry, reset):
    d = Decision(allowed, limit, period, remaining, retry, reset)
    for name, value in d.headers():
        assert name.isascii() and value.isascii()
        if name == "RateLimit-Policy":
            count, _, window = value.partition(";w=")
            assert (int(count), int(window)) == (limit, period)
        else:
            assert value.isdigit()


@pytest.mark.parametrize(
    ("method", "path", "klass"),
    [
        ("POST", "/v1/auth/token", "auth"),
        ("POST", "/v1/auth/challenge", "auth"),
        ("GET", "/v1/auth/anything", "auth"),
        ("POST", "/v1/users", "auth"),
        ("GET", "/v1/me", "read"),
        ("GET", "/v1/devices", "read"),
        ("PATCH", "/v1/me", "write"),
        ("POST", "/v1/devices", "write"),
        ("DELETE", "/v1/sessions/ses_x", "write"),
        ("PUT", "/v1/me/avatar", "write"),
    ],
)
def test_route_classes(method, path, klass):
    assert route_class(method, path) == klass
