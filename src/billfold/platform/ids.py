"""Prefixed, time-sortable identifiers: `usr_` + Crockford base32 of a UUIDv7."""

from __future__ import annotations

import uuid_utils

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case, sorts like the bytes
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_LEN = 26  # ceil(128 / 5)

PREFIXES = frozenset(
    {
        "usr",
        "dev",
        "ses",
        "vrf",
        "kyc",
        "cred",
        "pm",
        "card",
        "tok",
        "acct",
        "hold",
        "txn",
        "pay",
        "ref",
        "p2p",
        "req",
        "ntf",
        "case",
        "evt",
        "key",
        "pst",
        "top",  # a wallet top-up from a card or bank account
        "wdl",  # a withdrawal to a bank account
        "cap",  # a capture of a card or wallet payment
        "inc",  # an incremental authorization of a payment
        "lst",  # an entry of a fraud block/allow list
        "dec",  # a fraud risk check's decision
        "dlv",  # one delivery of a notification on one channel
        "rdm",  # a redemption of loyalty points into wallet money
    }
)


def new_id(prefix: str) -> str:
    """A new id such as `usr_01jd…`; ids made later sort after ids made earlier."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    return f"{prefix}_{_encode(uuid_utils.uuid7().int)}"


def _encode(value: int) -> str:
    out = []
    for _ in range(_LEN):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def is_valid_id(value: str, prefix: str) -> bool:
    """True when `value` is well formed for `prefix` (used to answer 404 on junk without a query)."""
    head, sep, body = value.partition("_")
    if head != prefix or not sep or len(body) != _LEN:
        return False
    if body[0] not in "01234567":  # 130 bits would overflow 128
        return False
    return all(c in _DECODE for c in body)


def id_to_uuid_int(value: str) -> int:
    _, _, body = value.partition("_")
    n = 0
    for c in body:
        n = (n << 5) | _DECODE[c]
    return n


_OPAQUE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def is_opaque_token(value: str, max_length: int = 128) -> bool:
    """True for a `secrets.token_urlsafe` value (challenge and reset ids): safe to put in a
    Redis key, never a `:` that would reach another record's key."""
    return 0 < len(value) <= max_length and all(c in _OPAQUE for c in value)
