"""Prefixed, time-sortable ids: `usr_` + 26 Crockford base32 characters of a UUIDv7."""

from __future__ import annotations

import itertools
import re
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billfold.platform.ids import PREFIXES, _encode, id_to_uuid_int, is_valid_id, new_id

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
ID_SHAPE = re.compile(r"^(?P<prefix>[a-z0-9]+)_(?P<body>[0-7][0-9a-hjkmnp-tv-z]{25})$")


@pytest.mark.parametrize("prefix", ["usr", "dev", "ses", "evt", "req", "pm", "p2p"])
def test_format_is_prefix_underscore_26_crockford_chars(prefix):
    value = new_id(prefix)
    m = ID_SHAPE.match(value)
    assert m, value
    assert m["prefix"] == prefix
    assert len(m["body"]) == 26
    # Crockford base32 leaves out i, l, o and u (they read like 1, 1, 0 and v).
    assert not set(m["body"]) & set("ilou")
    assert is_valid_id(value, prefix)


def test_body_is_a_uuid_version_7_with_the_current_time():
    before_ms = time.time_ns() // 1_000_000
    value = new_id("usr")
    after_ms = time.time_ns() // 1_000_000
    u = uuid.UUID(int=id_to_uuid_int(value))
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    stamp_ms = u.int >> 80  # the top 48 bits are the Unix time in milliseconds
    assert before_ms - 1 <= stamp_ms <= after_ms + 1


@pytest.mark.parametrize("prefix", ["", "user", "USR", "usr_", "nope", "usr ", " dev"])
def test_unknown_prefix_is_refused(prefix):
    with pytest.raises(ValueError, match="unknown id prefix"):
        new_id(prefix)


def test_every_declared_prefix_makes_valid_ids():
    for prefix in PREFIXES:
        value = new_id(prefix)
        assert value.startswith(prefix + "_")
        assert is_valid_id(value, prefix)


def test_ids_made_later_sort_after_across_many():
    # Many ids inside the same millisecond: the UUIDv7 counter keeps them ordered too.
    ids = [new_id("evt") for _ in range(20_000)]
    assert ids == sorted(ids)
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_ids_sort_by_time_across_milliseconds():
    earlier = new_id("txn")
    time.sleep(0.003)
    later = new_id("txn")
    assert earlier < later
    assert id_to_uuid_int(earlier) >> 80 < id_to_uuid_int(later) >> 80


def test_ids_are_unique():
    ids = [new_id("usr") for _ in range(50_000)]
    assert len(set(ids)) == len(ids)


def test_string_order_equals_uuid_order():
    ids = [new_id("ses") for _ in range(2_000)]
    assert sorted(ids) == sorted(ids, key=id_to_uuid_int)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_encoding_round_trips_every_128_bit_value(n):
    body = _encode(n)
    assert len(body) == 26
    assert is_valid_id("usr_" + body, "usr")
    assert id_to_uuid_int("usr_" + body) == n


@given(
    st.integers(min_value=0, max_value=2**128 - 1), st.integers(min_value=0, max_value=2**128 - 1)
)
def test_encoding_preserves_order(a, b):
    assert (a < b) == (_encode(a) < _encode(b))


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "usr",
        "usr_",
        "_01jd5z8k3xq7y2m4n6p8r0s2t4",
        "usr-01jd5z8k3xq7y2m4n6p8r0s2t4",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2t",  # 25 chars
        "usr_01jd5z8k3xq7y2m4n6p8r0s2t45",  # 27 chars
        "usr_81jd5z8k3xq7y2m4n6p8r0s2t4",  # first char > 7 overflows 128 bits
        "usr_01JD5Z8K3XQ7Y2M4N6P8R0S2T4",  # upper case
        "usr_01jd5z8k3xq7y2m4n6p8r0s2ti",  # i is not Crockford
        "usr_01jd5z8k3xq7y2m4n6p8r0s2tl",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2to",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2tu",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2t!",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2t ",
        "usr_01jd5z8k3xq7y2m4n6p8r0s2t\u0660",  # Arabic-Indic digit
        "dev_01jd5z8k3xq7y2m4n6p8r0s2t4",  # right shape, wrong prefix
        "usr_usr_01jd5z8k3xq7y2m4n6p8r0",
        "' OR 1=1 --",
        "usr_" + "0" * 1000,
    ],
)
def test_is_valid_id_rejects_junk(junk):
    assert not is_valid_id(junk, "usr")


def test_is_valid_id_checks_the_expected_prefix():
    value = new_id("dev")
    assert is_valid_id(value, "dev")
    assert not is_valid_id(value, "usr")
    assert not is_valid_id(value, "ses")


@given(st.text(max_size=64))
def test_is_valid_id_never_raises_and_accepts_only_the_exact_shape(text):
    result = is_valid_id(text, "usr")
    assert isinstance(result, bool)
    if result:
        assert ID_SHAPE.match(text) and text.startswith("usr_")


@given(st.text(alphabet=CROCKFORD, min_size=26, max_size=26))
def test_any_26_crockford_chars_under_the_128_bit_limit_are_valid(body):
    assert is_valid_id("usr_" + body, "usr") == (body[0] in "01234567")
