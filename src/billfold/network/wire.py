"""billfold's ISO 8583 dialect on the wire: the field spec, TCP framing, EMV field 55 (BER-TLV)
and billfold's private data in field 48.

Spec: pyiso8583's `default_ascii` (ISO 8583:1987, ASCII bitmaps and lengths) with field 55 (ICC
data) binary, up to 255 bytes. Framing: each message is preceded by its length, 2 bytes big
endian (so at most 65,535 bytes; billfold refuses frames above `MAX_FRAME`).

Messages (the fields each carries are in docs/architecture.md, "Payment network"):

| MTI | what |
|---|---|
| 0100 / 0110 | authorization: a purchase (processing code 000000), an incremental one (48.IN) or a zero-amount account verification (with CVV2 in 48.92) |
| 0120 / 0130 | authorization advice: a stand-in approval the client gave while the network was down |
| 0200 / 0210 | financial request: a card top-up (000000), a refund (200000) |
| 0220 / 0230 | completion advice: a capture (48.FN = 1 for the final one) |
| 0420 / 0430 | reversal advice (0421 when repeated) |
| 0800 / 0810 | network management: echo (field 70 = 301) |

Field 48 is a sequence of `TT LLL value` (a 2-character tag, a 3-digit length): `CH` channel,
`DV` device id, `MI` merchant id (field 42 holds only 15 characters), `TX` billfold's
transaction id, `OR` the original's RRN, `IN` 1 on an incremental authorization, `FN` 1 on a
final completion, `RF` refund id, `CV` cryptogram version, `CR` CVV2 result (M/N/P), `92` CVV2,
`RR` reversal reason.
"""

from __future__ import annotations

import asyncio
import copy
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import iso8583
import iso8583.specs

SPEC: dict[str, dict[str, Any]] = copy.deepcopy(iso8583.specs.default_ascii)
SPEC["55"] = {
    "data_enc": "b",
    "len_enc": "ascii",
    "len_type": 3,
    "max_len": 255,
    "desc": "ICC data (EMV BER-TLV)",
}
MAX_FRAME = 8192

# Processing codes (field 3).
PURCHASE = "000000"
REFUND = "200000"
# Network management information code (field 70).
ECHO = "301"
# POS entry mode (field 22): how the card data came. 07x contactless chip, 81x e-commerce,
# 10x credential on file (the wallet's stored card for a top-up), 01x keyed (verification).
ENTRY_MODES = {"contactless": "071", "in_app": "072", "ecommerce": "812"}
ENTRY_STORED = "102"
ENTRY_KEYED = "012"

Message = dict[str, str]


class WireError(ValueError):
    """A frame that is not a billfold ISO 8583 message (never echoes the frame: it may hold a
    card number)."""


def encode(doc: Message) -> bytes:
    """One message, framed: 2-byte big-endian length, then the ISO 8583 body."""
    try:
        raw, _ = iso8583.encode(dict(doc), SPEC)
    except iso8583.EncodeError as exc:
        raise WireError(f"cannot encode field {exc.field}") from None
    if len(raw) > MAX_FRAME:
        raise WireError("message too large")
    return len(raw).to_bytes(2, "big") + bytes(raw)


def decode(body: bytes) -> Message:
    """The fields of one unframed message."""
    try:
        doc, _ = iso8583.decode(bytearray(body), SPEC)
    except (iso8583.DecodeError, ValueError, KeyError, IndexError) as exc:
        field = getattr(exc, "field", "?")
        raise WireError(f"malformed message (field {field})") from None
    return {k: v for k, v in doc.items() if k not in ("p", "1")}


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; `asyncio.IncompleteReadError` at a clean end of stream."""
    size = int.from_bytes(await reader.readexactly(2), "big")
    if size == 0 or size > MAX_FRAME:
        raise WireError(f"bad frame length {size}")
    return await reader.readexactly(size)


def response_mti(mti: str) -> str:
    """0100 → 0110, 0421 → 0430: the answer's message type."""
    if len(mti) != 4 or not mti.isdigit():
        raise WireError("bad message type")
    function = int(mti[2])
    return mti[:2] + str(function + 1 - function % 2) + "0"


# --- field 48: billfold private data -----------------------------------------------------------


def encode_private(values: Mapping[str, str | None]) -> str:
    out = []
    for tag, value in values.items():
        if value is None:
            continue
        if len(tag) != 2 or len(value) > 999:
            raise WireError(f"bad private data element {tag}")
        out.append(f"{tag}{len(value):03d}{value}")
    return "".join(out)


def decode_private(data: str) -> dict[str, str]:
    values: dict[str, str] = {}
    i = 0
    while i < len(data):
        if i + 5 > len(data) or not data[i + 2 : i + 5].isdigit():
            raise WireError("malformed field 48")
        size = int(data[i + 2 : i + 5])
        if i + 5 + size > len(data):
            raise WireError("malformed field 48")
        values[data[i : i + 2]] = data[i + 5 : i + 5 + size]
        i += 5 + size
    return values


# --- field 55: EMV data as BER-TLV ----------------------------------------------------------


def encode_tlv(elements: Mapping[str, bytes]) -> bytes:
    """BER-TLV of `{tag hex: value}` (tags as EMV writes them: "9F26", "82")."""
    out = bytearray()
    for tag, value in elements.items():
        out += bytes.fromhex(tag)
        n = len(value)
        if n < 0x80:
            out.append(n)
        elif n <= 0xFF:
            out += bytes([0x81, n])
        else:
            out += bytes([0x82]) + n.to_bytes(2, "big")
        out += value
    return bytes(out)


def decode_tlv(data: bytes) -> dict[str, bytes]:
    """`{tag hex upper: value}` of a flat BER-TLV string (EMV field 55 has no nesting)."""
    out: dict[str, bytes] = {}
    i = 0
    try:
        while i < len(data):
            start = i
            if data[i] in (0x00, 0xFF):  # padding between elements
                i += 1
                continue
            i += 1
            if data[start] & 0x1F == 0x1F:  # multi-byte tag: continue while bit 8 is set
                while data[i] & 0x80:
                    i += 1
                i += 1
            tag = data[start:i].hex().upper()
            n = data[i]
            i += 1
            if n & 0x80:
                width = n & 0x7F
                if width not in (1, 2):
                    raise WireError("bad TLV length")
                n = int.from_bytes(data[i : i + width], "big")
                i += width
            if i + n > len(data):
                raise WireError("truncated TLV")
            out[tag] = data[i : i + n]
            i += n
    except IndexError:
        raise WireError("truncated TLV") from None
    return out


# The largest amount fields 4 and 9F02 (12 digits) can carry, in minor units.
MAX_AMOUNT = 10**12 - 1


def n12(amount: int) -> str:
    """An amount as field 4 and 9F02 carry it: 12 digits."""
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_AMOUNT:
        raise WireError("amount out of range")
    return f"{amount:012d}"


def printable_ascii(text: str) -> str:
    """`text` as the ASCII-only `ans` fields (43, the card acceptor's name and location) can
    carry: accents dropped by decomposition ("Café Zoë" → "Cafe Zoe"), anything else left
    out, and a control character shown as `?`. A merchant's name is free Unicode; the wire
    is not, and an unencodable field would fail the payment."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in folded)


def bcd(value: str) -> bytes:
    return bytes.fromhex(value if len(value) % 2 == 0 else "0" + value)


# --- codes ----------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def currency_numeric(code: str) -> str:
    """ISO 4217 numeric code ("USD" → "840"); `WireError` for an unknown currency."""
    import pycountry

    found = pycountry.currencies.get(alpha_3=code.upper())
    if found is None:
        raise WireError("unknown currency")
    return str(found.numeric)


@lru_cache(maxsize=512)
def currency_alpha(numeric: str) -> str:
    import pycountry

    found = pycountry.currencies.get(numeric=numeric)
    if found is None:
        raise WireError("unknown currency")
    return str(found.alpha_3)


@lru_cache(maxsize=512)
def country_numeric(alpha2: str) -> str:
    """ISO 3166 numeric code ("US" → "840"); `WireError` for an unknown country."""
    import pycountry

    found = pycountry.countries.get(alpha_2=alpha2.upper())
    if found is None:
        raise WireError("unknown country")
    return str(found.numeric)


def transmission_time(now: datetime | None = None) -> dict[str, str]:
    """Fields 7 (MMDDhhmmss, UTC), 12 (hhmmss) and 13 (MMDD)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return {
        "7": now.strftime("%m%d%H%M%S"),
        "12": now.strftime("%H%M%S"),
        "13": now.strftime("%m%d"),
    }


def expiry(month: int, year: int) -> str:
    """Field 14: YYMM."""
    return f"{year % 100:02d}{month:02d}"
