"""EMV arithmetic for payment tokens: DPANs, application cryptograms, dynamic CVVs.

Pure functions, no I/O. The vault calls them with the issuer master key it holds; an issuer (or
the network simulator) calls the same ones to verify. The scheme is Visa Cryptogram Version
Number 18 (`CRYPTOGRAM_VERSION`), chosen because the token BIN range is a Visa one and CVN 18 is
the Visa CVN built on the EMV *common* session key derivation:

1. ICC master key: EMV Book 2 A1.4.1 Option A — 3DES-ECB of the rightmost 16 digits of
   PAN || PSN and of their complement under the IMK, forced to odd parity. CVN 18 names Option B,
   which *is* Option A for PANs of up to 16 digits (every DPAN by default); for 17-19 digit PANs
   Option B first hashes PAN || PSN with SHA-1 and decimalises the digest, as done here.
2. Session key: EMV Book 2 A1.3.1 common session key derivation with R = ATC || 00 00 00 00 00 00
   (byte 3 set to F0 for the left half, 0F for the right), odd parity.
3. ARQC: ISO/IEC 9797-1 MAC algorithm 3 (single-DES CBC, 3DES output transformation), padding
   method 2 (80 00…), over 9F02 9F03 9F1A 95 5F2A 9A 9C 9F37 82 9F36 and the whole 9F10.

Issuer application data (9F10) is Visa format 0/1/3: length 06, derivation key index 01, CVN byte
0x12 (= 18), then the 4-byte card verification results 03 A0 00 00 (an ARQC was returned in the
first GENERATE AC, the second was not requested, nothing else to report).

The dynamic CVV is the three low-order digits of a CVC3 (the dynamic card verification code of
contactless magnetic-stripe data, as `pyemv.cvv.generate_cvc3` computes it): IV = the last 2
bytes of MAC algorithm 3 over a track template (DPAN || 'D', F-padded), then CVC3 = the last 2
bytes of 3DES(IV || UN || ATC), under a per-token CVC3 key. That key is derived like the
cryptogram key (Option A; B beyond 16 digits) from an issuer CVC3 key, itself derived one-way
from the IMK (3DES of a fixed label): the contract's one IMK still gives separate keys for
cryptograms and CVVs. The CVV changes with the ATC (and the unpredictable number).

Every cryptographic primitive is `cryptography`'s 3DES; pyemv is only the tests' independent
verifier and is never imported here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import date

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from billfold.platform import cards

__all__ = [
    "CRYPTOGRAM_VERSION",
    "EmvData",
    "EmvResult",
    "derive_icc_master_key",
    "derive_session_key",
    "dynamic_cvv",
    "generate_cryptogram",
    "generate_dpan",
    "issuer_application_data",
    "luhn_check_digit",
    "luhn_valid",
    "odd_parity",
    "verify_cryptogram",
    "verify_dynamic_cvv",
]

CRYPTOGRAM_VERSION = "visa-cvn18"

_DERIVATION_KEY_INDEX = 0x01
_CVN = 0x12  # 18
# Card verification results (length byte 03 + 3 bytes): byte 2 = 1010 0000, "ARQC returned in
# the first GENERATE AC, second GENERATE AC not requested"; no offline checks, scripts, failures.
_CVR = bytes.fromhex("03A00000")
# Label the issuer CVC3 key is derived from. It holds non-decimal nibbles and so does its
# complement, so it can never be an Option A input block (PAN/PSN digits) or their complement:
# no card key can ever equal the issuer CVC3 key.
_CVC3_KEY_LABEL = bytes.fromhex("D0D0D0D0D0D0D0D0")

_HEX = re.compile(r"[0-9A-Fa-f]*")
_MAX_N12 = 999_999_999_999  # 9F02/9F03 are n12: twelve BCD digits
_DPAN_LENGTHS = range(13, 20)


# -- Luhn and DPANs ---------------------------------------------------------------------------


def luhn_valid(number: str) -> bool:
    """True if `number` is all digits (at least two: a body and its check digit) and passes the
    Luhn check (`platform.cards.luhn_valid`, the one implementation every part shares)."""
    return len(number) >= 2 and cards.luhn_valid(number)


def luhn_check_digit(body: str) -> str:
    """The Luhn (ISO/IEC 7812-1) check digit to append to `body`, a non-empty string of digits."""
    if not body or not body.isascii() or not body.isdigit():
        raise ValueError("a Luhn body must be a non-empty string of digits")
    # Exactly one of the ten digits completes a Luhn-valid number: the shared check finds it.
    return next(d for d in "0123456789" if cards.luhn_valid(body + d))


def generate_dpan(token_bin: str, length: int = 16) -> str:
    """A device PAN from the token BIN range: `token_bin`, a random body drawn with `secrets`,
    and a Luhn check digit. `length` is 13-19; at least six random digits must remain, so a
    range never runs dry after a handful of tokens (the caller still checks uniqueness)."""
    if length not in _DPAN_LENGTHS:
        raise ValueError("a DPAN is 13 to 19 digits long")
    if not token_bin or not token_bin.isascii() or not token_bin.isdigit():
        raise ValueError("the token BIN must be digits")
    random_digits = length - len(token_bin) - 1
    if random_digits < 6:
        raise ValueError("the token BIN leaves fewer than 6 random digits in the DPAN")
    body = token_bin + "".join(secrets.choice("0123456789") for _ in range(random_digits))
    return body + luhn_check_digit(body)


# -- The data the cryptogram covers -----------------------------------------------------------


@dataclass(frozen=True)
class EmvData:
    """The terminal and card data elements an application cryptogram is computed over (EMV tags
    in comments). Codes are the digit strings EMV carries: `country_numeric` "840"."""

    amount: int  # 9F02, minor units
    other_amount: int  # 9F03, cashback
    country_numeric: str  # 9F1A, ISO 3166 numeric, 3 digits
    tvr: str  # 95, terminal verification results, 10 hex digits
    currency_numeric: str  # 5F2A, ISO 4217 numeric, 3 digits
    transaction_date: date  # 9A
    transaction_type: str  # 9C, 2 digits ("00" purchase)
    unpredictable_number: str  # 9F37, 8 hex digits
    aip: str = "1980"  # 82, application interchange profile, 4 hex digits


@dataclass(frozen=True)
class EmvResult:
    """What a tokenised transaction carries: the ARQC (9F26), the issuer application data (9F10)
    it was computed with, and a dynamic CVV for channels without chip data."""

    arqc: str  # 16 hex digits, upper case
    issuer_application_data: str  # 9F10, hex, upper case; holds the CVR
    dynamic_cvv: str  # 3 digits


def issuer_application_data() -> str:
    """9F10 as CVN 18 defines it (Visa format 0/1/3): 06 || DKI || CVN || CVR."""
    return (bytes([0x06, _DERIVATION_KEY_INDEX, _CVN]) + _CVR).hex().upper()


def generate_cryptogram(imk: bytes, pan: str, psn: str, atc: int, data: EmvData) -> EmvResult:
    """The ARQC and dynamic CVV for transaction `atc` of the card (token) `pan`/`psn`.

    `imk` is the 16-byte issuer master key for application cryptograms. Raises `ValueError` on
    any malformed input; the message never contains the PAN or a key.
    """
    iad = bytes.fromhex(issuer_application_data())
    arqc = _arqc(imk, pan, psn, atc, data, iad)
    return EmvResult(
        arqc=arqc.hex().upper(),
        issuer_application_data=iad.hex().upper(),
        dynamic_cvv=dynamic_cvv(imk, pan, psn, atc, data.unpredictable_number),
    )


def verify_cryptogram(imk: bytes, pan: str, psn: str, atc: int, data: EmvData, arqc: str) -> bool:
    """Issuer side: is `arqc` (16 hex digits, any case) the cryptogram for exactly this
    transaction? Compared in constant time. Whether `atc` is fresh is the caller's question."""
    expected = _arqc(imk, pan, psn, atc, data, bytes.fromhex(issuer_application_data()))
    return hmac.compare_digest(expected, _hex(arqc, 8, "the ARQC"))


def dynamic_cvv(imk: bytes, pan: str, psn: str, atc: int, unpredictable_number: str) -> str:
    """The three low-order decimal digits of the CVC3 for transaction `atc` (see module doc)."""
    _check_key(imk)
    icc_key = derive_icc_master_key(_issuer_cvc3_key(imk), _pan(pan), _psn(psn))
    template = pan + "D"
    if len(template) % 2:
        template += "F"
    un = _hex(unpredictable_number, 4, "the unpredictable number")
    cvc3 = _cvc3(icc_key, bytes.fromhex(template), _atc(atc), un)
    return f"{cvc3 % 1000:03d}"


def verify_dynamic_cvv(imk: bytes, pan: str, psn: str, atc: int, data: EmvData, cvv: str) -> bool:
    """Issuer side: is `cvv` the dynamic CVV of transaction `atc`? Constant-time compare."""
    if len(cvv) != 3 or not cvv.isascii() or not cvv.isdigit():
        raise ValueError("a dynamic CVV is 3 digits")
    expected = dynamic_cvv(imk, pan, psn, atc, data.unpredictable_number)
    return hmac.compare_digest(expected, cvv)


# -- Key derivation ---------------------------------------------------------------------------


def derive_icc_master_key(imk: bytes, pan: str, psn: str = "00") -> bytes:
    """The card's (token's) 16-byte master key for CVN 18: EMV Option A, or Option B for PANs
    longer than 16 digits (Option B reduces to Option A up to 16 digits)."""
    _check_key(imk)
    pan, psn = _pan(pan), _psn(psn)
    if len(pan) <= 16:
        block = bytes.fromhex((pan + psn)[-16:].zfill(16))
    else:
        digits = pan + psn
        # SHA-1 is what Option B specifies; it only spreads long PANs over 16 digits.
        packed = bytes.fromhex(digits.zfill(len(digits) + len(digits) % 2))
        digest = hashlib.sha1(packed).hexdigest()  # noqa: S324
        decimal = [c for c in digest if c.isdigit()]
        # Too few digits: decimalise the letters a-f as 0-5, in order of appearance.
        letters = [str(int(c, 16) - 10) for c in digest if not c.isdigit()]
        block = bytes.fromhex("".join((decimal + letters)[:16]))
    return odd_parity(_tdes_ecb(imk, block + _complement(block)))


def derive_session_key(icc_master_key: bytes, atc: int) -> bytes:
    """EMV common session key derivation for application cryptograms, R = ATC || 00…00."""
    _check_key(icc_master_key)
    r = _atc(atc) + bytes(6)
    left = r[:2] + b"\xf0" + r[3:]
    right = r[:2] + b"\x0f" + r[3:]
    return odd_parity(_tdes_ecb(icc_master_key, left + right))


def _issuer_cvc3_key(imk: bytes) -> bytes:
    return odd_parity(_tdes_ecb(imk, _CVC3_KEY_LABEL + _complement(_CVC3_KEY_LABEL)))


def _cvc3(icc_key: bytes, track_template: bytes, atc: bytes, un: bytes) -> int:
    """CVC3 (0-65535): IV = last 2 bytes of MAC algorithm 3 over the track template, then the
    last 2 bytes of 3DES(IV || UN || ATC)."""
    iv = _mac_algorithm_3(icc_key, track_template)[-2:]
    return int.from_bytes(_tdes_ecb(icc_key, iv + un + atc)[-2:], "big")


# -- The cryptogram ---------------------------------------------------------------------------


def encode_data(data: EmvData) -> bytes:
    """The data elements in the order the AC covers them (before the ATC and 9F10); raises
    `ValueError` naming the first malformed one, so callers can refuse bad input up front."""
    return (
        _n12(data.amount, "the amount")
        + _n12(data.other_amount, "the other amount")
        + _numeric_code(data.country_numeric, "the country code")
        + _hex(data.tvr, 5, "the TVR")
        + _numeric_code(data.currency_numeric, "the currency code")
        + _date(data.transaction_date)
        + _transaction_type(data.transaction_type)
        + _hex(data.unpredictable_number, 4, "the unpredictable number")
        + _hex(data.aip, 2, "the AIP")
    )


def _arqc(imk: bytes, pan: str, psn: str, atc: int, data: EmvData, iad: bytes) -> bytes:
    _check_key(imk)
    message = encode_data(data) + _atc(atc) + iad
    session_key = derive_session_key(derive_icc_master_key(imk, pan, psn), atc)
    return _mac_algorithm_3(session_key, message)


def _mac_algorithm_3(key: bytes, message: bytes) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 with padding method 2, 8-byte result: CBC single DES under
    the left key half, then the last block decrypted under the right half, encrypted under the
    left, which is one 3DES-EDE encryption of the last chained block."""
    padded = message + b"\x80" + bytes(-(len(message) + 1) % 8)
    left = key[:8]
    single_des = Cipher(TripleDES(left * 3), modes.CBC(bytes(8)))  # K K K: plain DES
    chained = single_des.encryptor().update(padded[:-8])
    previous = chained[-8:] if chained else bytes(8)
    last = bytes(a ^ b for a, b in zip(previous, padded[-8:], strict=True))
    return _tdes_ecb(key, last)


# -- Primitives -------------------------------------------------------------------------------


def _tdes_ecb(key16: bytes, data: bytes) -> bytes:
    # Two-key 3DES as K1 K2 K1: `cryptography` deprecates 16-byte TripleDES keys. ECB is what EMV
    # prescribes here: derivations and the MAC's last step each encrypt independent blocks.
    cipher = Cipher(TripleDES(key16 + key16[:8]), modes.ECB())  # noqa: S305
    return cipher.encryptor().update(data)


def odd_parity(key: bytes) -> bytes:
    """DES key bytes with odd parity (ANSI X9.17): each byte's low bit set so it has an odd
    number of ones; the 7 key bits are kept."""
    return bytes(b if b.bit_count() % 2 else b ^ 1 for b in key)


def _complement(block: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in block)


# -- Input checks (messages never carry the value: it may be a PAN or a key) ------------------


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != 16:
        raise ValueError("the master key must be a 16-byte (double-length) 3DES key")


def _pan(pan: str) -> str:
    if (
        not isinstance(pan, str)
        or not pan.isascii()
        or not pan.isdigit()
        or len(pan) not in (_DPAN_LENGTHS)
    ):
        raise ValueError("the PAN must be 13 to 19 digits")
    return pan


def _psn(psn: str) -> str:
    if not isinstance(psn, str) or len(psn) != 2 or not psn.isascii() or not psn.isdigit():
        raise ValueError("the PAN sequence number must be 2 digits")
    return psn


def _atc(atc: int) -> bytes:
    if isinstance(atc, bool) or not isinstance(atc, int) or not 0 <= atc <= 0xFFFF:
        raise ValueError("the ATC must be an integer from 0 to 65535")
    return atc.to_bytes(2, "big")


def _hex(value: str, size: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise ValueError(f"{what} must be {2 * size} hex digits")
    return bytes.fromhex(value)


def _n12(amount: int, what: str) -> bytes:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= _MAX_N12:
        raise ValueError(f"{what} must be an integer from 0 to {_MAX_N12} minor units")
    return bytes.fromhex(f"{amount:012d}")


def _numeric_code(code: str, what: str) -> bytes:
    if not isinstance(code, str) or len(code) != 3 or not code.isascii() or not code.isdigit():
        raise ValueError(f"{what} must be 3 digits")
    return bytes.fromhex("0" + code)


def _transaction_type(code: str) -> bytes:
    if not isinstance(code, str) or len(code) != 2 or not code.isascii() or not code.isdigit():
        raise ValueError("the transaction type must be 2 digits")
    return bytes.fromhex(code)


def _date(day: date) -> bytes:
    if not isinstance(day, date):
        raise ValueError("the transaction date must be a date")
    return bytes.fromhex(day.strftime("%y%m%d"))
