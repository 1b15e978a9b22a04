"""KYC: identity checks, the review queue, and the user's KYC status and tier.

States: `unverified → pending → verified | rejected | review`; `review → verified | rejected` by
an administrator. A submission moves the user to `pending` and the provider decides it in the
same transaction, so each submission writes two transitions. Every transition updates
`users.users.kyc_status/kyc_tier`, appends a `users.kyc_audit` row and publishes
`billfold.users.kyc.status_changed`, all in the caller's transaction.

Resubmission: refused with 409 while `pending` (`kyc_pending`) or `review` (`kyc_in_review`) and
once `verified` (`already_verified`). After `rejected` the user may submit again (a typo in a
document number should not lock anyone out), at most `MAX_SUBMISSIONS_PER_DAY` times in 24 hours
(429). A user once rejected with a sanctions concern goes to manual review on every later
submission, so trying spellings of a name until one passes the fuzzy match does not work.

Tiers (read by later limits): 0 not verified (any status but `verified`); 1 identity verified;
2 identity verified and both email and phone verified. The tier is set at each decision and by
`refresh_tier`, which the contact-verification flow should call when a contact changes.

The provider is pluggable (`KycProvider`): the routes use `app.state.kyc_provider` when it is set
and otherwise `BuiltinKycProvider` with the sanctions list shipped in `users/data/sanctions.csv`
(or `settings.sanctions_list_path`). The provider is pure; this module adds the checks that need
the database (document reuse, profile consistency, earlier sanctions concerns).

The document number is kept only as its last 4 characters and an HMAC-SHA256 under a key
derived from the process secret; it is never logged, returned or published.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from rapidfuzz import fuzz
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.config import Settings
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import (
    Conflict,
    FieldError,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unprocessable,
)
from billfold.platform.ids import is_valid_id, new_id
from billfold.users import events
from billfold.users.models import (
    Address,
    AdminKycCheck,
    AdminKycSubmission,
    KycAuditEntry,
    KycCheck,
    KycState,
    KycSubmission,
    SubmitKyc,
)
from billfold.users.runtime import UsersRuntime
from billfold.users.store import kyc as store

Decision = Literal["verified", "rejected", "review"]
Result = Literal["pass", "fail", "review"]

MINIMUM_AGE = 18
MAXIMUM_AGE = 120
MAX_SUBMISSIONS_PER_DAY = 5

# Name screening thresholds on 0-100 rapidfuzz scores of normalised names.
STRONG_MATCH = 95.0  # token_sort_ratio: the same name up to spelling noise and word order
FUZZY_MATCH = 88.0  # token_sort_ratio: a close variant
PHONETIC_MATCH = 95.0  # token_sort_ratio of the spelling skeletons (Smyth ~ Smith)

_SEVERITY: dict[str, int] = {"pass": 0, "review": 1, "fail": 2}
# Checks whose details would tip off the subject or reveal other users: owners never see them.
_INTERNAL_CHECKS = frozenset({"sanctions", "document_uniqueness", "sanctions_history"})


# --- provider interface ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KycApplicant:
    """What a provider gets: the submitted identity and what the account already proves."""

    legal_name: str
    date_of_birth: date
    address: Mapping[str, str | None]
    document_type: str
    document_country: str
    document_number: str
    email_verified: bool = False
    phone_verified: bool = False


@dataclass(frozen=True)
class Check:
    """One named check: `pass`, `fail` (reject) or `review` (a person must look)."""

    name: str
    result: Result
    reason: str | None = None
    detail: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "result": self.result, "reason": self.reason}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class KycDecision:
    decision: Decision
    tier: int
    checks: tuple[Check, ...]
    reason: str | None = None


class KycProvider(Protocol):
    """Decides a KYC submission. `name` becomes the audit actor `system:<name>`."""

    name: str

    async def assess(self, applicant: KycApplicant, today: date) -> KycDecision: ...


def tier_for(status: str, *, email_verified: bool, phone_verified: bool) -> int:
    if status != "verified":
        return 0
    return 2 if email_verified and phone_verified else 1


def combine(checks: Sequence[Check], *, email_verified: bool, phone_verified: bool) -> KycDecision:
    """Any failed check rejects; otherwise any check needing review sends it to review."""
    worst = max((_SEVERITY[c.result] for c in checks), default=0)
    decision: Decision = ("verified", "review", "rejected")[worst]  # type: ignore[assignment]
    reasons = [c.reason or c.name for c in checks if _SEVERITY[c.result] == worst and worst]
    return KycDecision(
        decision=decision,
        tier=tier_for(decision, email_verified=email_verified, phone_verified=phone_verified),
        checks=tuple(checks),
        reason="; ".join(reasons) or None,
    )


def _escalate(
    verdict: KycDecision, checks: Sequence[Check], *, email_verified: bool, phone_verified: bool
) -> KycDecision:
    """The provider's decision made stricter by further checks (never more lenient); the tier
    is the lower of the provider's and the one the final decision allows."""
    combined = combine(checks, email_verified=email_verified, phone_verified=phone_verified)
    order: tuple[Decision, ...] = ("verified", "review", "rejected")
    decision = max(verdict.decision, combined.decision, key=order.index)
    if decision == verdict.decision:
        reason = verdict.reason
    else:
        reason = combined.reason
    tier = min(
        verdict.tier,
        tier_for(decision, email_verified=email_verified, phone_verified=phone_verified),
    )
    return KycDecision(decision, tier, tuple(checks), reason)


# --- age ------------------------------------------------------------------------------------------


def age_on(dob: date, today: date) -> int:
    """Whole years; someone born on 29 February comes of age on 1 March in common years."""
    return today.year - dob.year - ((today.month, today.day) < (dob.month, dob.day))


def check_age(dob: date, today: date) -> Check:
    if dob > today:
        return Check("age", "fail", "The date of birth is in the future")
    age = age_on(dob, today)
    if age < MINIMUM_AGE:
        return Check("age", "fail", f"You must be at least {MINIMUM_AGE} years old")
    if age > MAXIMUM_AGE:
        return Check("age", "fail", "The date of birth is not plausible")
    return Check("age", "pass")


# --- document numbers -----------------------------------------------------------------------------

_DE_CHARS = "0-9CFGHJKLMNPRTVWXYZ"  # German documents use no vowels and no B, D, Q, S
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"

# (pattern, human description) per document type and issuing country; None: not issued there.
DOCUMENT_FORMATS: dict[str, dict[str, tuple[str, str] | None]] = {
    "passport": {
        "US": (r"[0-9]{9}|[A-Z][0-9]{8}", "9 digits, or a letter and 8 digits"),
        "DE": (rf"[CFGHJK][{_DE_CHARS}]{{8}}", "9 characters starting with C, F, G, H, J or K"),
        "GB": (r"[0-9]{9}", "9 digits"),
        "FR": (r"[0-9]{2}[A-Z]{2}[0-9]{5}", "2 digits, 2 letters and 5 digits"),
        "ES": (r"[A-Z]{3}[0-9]{6}", "3 letters and 6 digits"),
        "IT": (r"[A-Z]{2}[0-9]{7}", "2 letters and 7 digits"),
        "*": (r"[A-Z0-9]{6,9}", "6 to 9 letters or digits"),
    },
    "national_id": {
        "US": None,
        "GB": None,
        "DE": (rf"[LMNPRTVWXY][{_DE_CHARS}]{{8}}", "9 characters starting with L to Y"),
        "FR": (r"[0-9]{12}|[A-Z0-9]{9}", "12 digits (before 2021) or 9 letters or digits"),
        "ES": (r"[0-9]{8}[A-Z]|[XYZ][0-9]{7}[A-Z]", "DNI (8 digits and a letter) or NIE"),
        "IT": (r"[A-Z]{2}[0-9]{5}[A-Z]{2}", "2 letters, 5 digits and 2 letters"),
        "*": (r"[A-Z0-9]{5,20}", "5 to 20 letters or digits"),
    },
    "driving_licence": {
        "US": (
            r"(?=[A-Z]*[0-9])[A-Z0-9]{5,13}",
            "5 to 13 letters or digits, as issued by the state",
        ),
        "GB": (r"[A-Z9]{5}[0-9]{6}[A-Z9]{2}[0-9][A-Z]{2}", "16 characters (DVLA format)"),
        "DE": (r"[A-Z0-9]{11}", "11 letters or digits"),
        "FR": (
            r"[0-9]{12}|[0-9]{2}[A-Z]{2}[0-9]{5}",
            "12 digits, or 2 digits, 2 letters, 5 digits",
        ),
        "*": (r"(?=[A-Z]*[0-9])[A-Z0-9]{5,20}", "5 to 20 letters or digits"),
    },
}
_DOCUMENT_NAMES = {
    "passport": "passport",
    "national_id": "national identity card",
    "driving_licence": "driving licence",
}


def _spanish_id_ok(number: str) -> bool:
    """DNI/NIE control letter: the number modulo 23 indexes `_DNI_LETTERS`."""
    digits = number[:-1]
    if digits[0] in "XYZ":
        digits = str("XYZ".index(digits[0])) + digits[1:]
    return _DNI_LETTERS[int(digits) % 23] == number[-1]


def _dvla_birth_date_ok(number: str, dob: date) -> bool:
    """GB licence characters 6-11 encode the birth date: decade digit, month (+50 for some
    holders), day, year digit."""
    decade, month, day, year = (
        int(number[5]),
        int(number[6:8]),
        int(number[8:10]),
        int(number[10]),
    )
    if month > 50:
        month -= 50
    return (decade, month, day, year) == (dob.year // 10 % 10, dob.month, dob.day, dob.year % 10)


def check_document(document_type: str, country: str, number: str, dob: date) -> Check:
    """The number's format for its type and issuing country (generic rule elsewhere)."""
    rules = DOCUMENT_FORMATS.get(document_type)
    kind = _DOCUMENT_NAMES.get(document_type, document_type)
    if rules is None:
        return Check("document_number", "fail", f"Unsupported document type {document_type}")
    rule = rules.get(country, rules["*"])
    if rule is None:
        return Check(
            "document_number", "fail", f"{country} does not issue a {kind}; use another document"
        )
    pattern, described = rule
    if not re.fullmatch(pattern, number):
        return Check(
            "document_number",
            "fail",
            f"A {country} {kind} number is {described}",
        )
    if document_type == "national_id" and country == "ES" and not _spanish_id_ok(number):
        return Check("document_number", "fail", "The control letter of the DNI/NIE is wrong")
    if (
        document_type == "driving_licence"
        and country == "GB"
        and not _dvla_birth_date_ok(number, dob)
    ):
        return Check(
            "document_number", "fail", "The licence number does not match the date of birth"
        )
    return Check("document_number", "pass")


# --- address --------------------------------------------------------------------------------------

POSTAL_CODES: dict[str, str] = {
    "US": r"[0-9]{5}(-[0-9]{4})?",
    "DE": r"[0-9]{5}",
    "FR": r"[0-9]{5}",
    "ES": r"[0-9]{5}",
    "IT": r"[0-9]{5}",
    "AT": r"[0-9]{4}",
    "CH": r"[0-9]{4}",
    "BE": r"[0-9]{4}",
    "DK": r"[0-9]{4}",
    "AU": r"[0-9]{4}",
    "NL": r"[0-9]{4} ?[A-Z]{2}",
    "PL": r"[0-9]{2}-[0-9]{3}",
    "PT": r"[0-9]{4}-[0-9]{3}",
    "SE": r"[0-9]{3} ?[0-9]{2}",
    "JP": r"[0-9]{3}-?[0-9]{4}",
    "CA": r"[A-Z][0-9][A-Z] ?[0-9][A-Z][0-9]",
    "GB": r"[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}",
    "IE": r"[A-Z][0-9]{2}[0-9W]? ?[A-Z0-9]{4}",
}
_GENERIC_POSTAL = r"[A-Z0-9][A-Z0-9 -]{1,9}"
_US_STATES = frozenset(
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH "
    "NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY AS GU MP PR VI".split()
)
_REGION_REQUIRED = frozenset({"US", "CA", "AU", "BR", "MX"})
# Countries whose street addresses carry a house number.
_HOUSE_NUMBER_REQUIRED = frozenset({"US", "DE", "FR", "ES", "IT", "AT", "CH", "NL", "BE", "PL"})
_PO_BOX = re.compile(
    r"\b(p\.?\s*o\.?\s*box|post\s*office\s*box|postfach|bo[iî]te\s+postale|apartado\s+de\s+correos)\b",
    re.IGNORECASE,
)
_PLACEHOLDERS = frozenset({"na", "n/a", "none", "unknown", "xxx", "test", "-", ".", "?", "null"})


def _placeholder(value: str) -> bool:
    v = value.strip().lower()
    return v in _PLACEHOLDERS or (len(v) > 0 and len(set(v)) == 1)


def check_address(address: Mapping[str, str | None]) -> Check:
    """A residential address someone can be found at: no PO boxes, no placeholders, a postal
    code of the country's shape, a state/province where the country needs one."""
    problems: list[str] = []
    country = (address.get("country") or "").upper()
    line1 = (address.get("line1") or "").strip()
    line2 = (address.get("line2") or "").strip()
    city = (address.get("city") or "").strip()
    region = (address.get("region") or "").strip()
    postal = (address.get("postal_code") or "").strip().upper()
    for name, value in (("street", line1), ("city", city), ("postal code", postal)):
        if not value or _placeholder(value):
            problems.append(f"the {name} is missing")
    if line1 and not any(c.isalpha() for c in line1):
        problems.append("the street has no name")
    if city and not any(c.isalpha() for c in city):
        problems.append("the city is not a name")
    if _PO_BOX.search(line1) or _PO_BOX.search(line2):
        problems.append("a PO box is not a residential address")
    if country in _HOUSE_NUMBER_REQUIRED and line1 and not any(c.isdigit() for c in line1 + line2):
        problems.append("the house number is missing")
    if country in _REGION_REQUIRED and (not region or _placeholder(region)):
        problems.append("the state or province is missing")
    elif country == "US" and region.upper() not in _US_STATES:
        problems.append("the state must be a two-letter USPS code such as CA")
    if postal and not re.fullmatch(POSTAL_CODES.get(country, _GENERIC_POSTAL), postal):
        problems.append(f"the postal code is not valid for {country or 'the country'}")
    if problems:
        return Check("address", "fail", "Address incomplete: " + "; ".join(problems))
    return Check("address", "pass")


# --- names and sanctions screening ----------------------------------------------------------------

# Romanisation tables built from code points (the letters themselves look like Latin ones).
_CYRILLIC = dict(
    zip(
        (chr(c) for c in range(0x430, 0x450)),  # Cyrillic a..ya
        "a b v g d e zh z i y k l m n o p r s t u f kh ts ch sh shch - y - e yu ya".split(),
        strict=True,
    )
) | {
    "\u0451": "e",
    "\u0453": "gj",
    "\u0454": "ye",
    "\u0455": "dz",
    "\u0456": "i",
    "\u0457": "yi",
    "\u0458": "j",
    "\u0459": "lj",
    "\u045a": "nj",
    "\u045b": "c",
    "\u045c": "kj",
    "\u045f": "dz",
    "\u0491": "g",
}
_GREEK = dict(
    zip(
        (chr(c) for c in range(0x3B1, 0x3CA)),  # Greek alpha..omega, with final sigma
        "a v g d e z i th i k l m n x o p r s s t y f ch ps o".split(),
        strict=True,
    )
)
_LATIN = {
    "ß": "ss", "æ": "ae", "ø": "o", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th",
    "\u0131": "i", "ħ": "h", "ŋ": "ng", "'": "", "\u2019": "", "`": "",
}  # fmt: skip
_TRANSLITERATE = str.maketrans(
    {k: ("" if v == "-" else v) for k, v in (_CYRILLIC | _GREEK | _LATIN).items()}
)
_HONORIFICS = frozenset(
    {"mr", "mrs", "ms", "miss", "dr", "prof", "sir", "dame", "sheikh", "hon", "jr", "sr"}
)
_SKELETON_RULES = (
    ("ph", "f"),
    ("ck", "k"),
    ("ks", "x"),
    ("ue", "u"),
    ("oe", "o"),
    ("ae", "a"),
    ("y", "i"),
    ("w", "v"),
    ("q", "k"),
    ("z", "s"),
    ("c", "k"),
)


def normalize_name(value: str) -> str:
    """Lower-case ASCII words: transliterated (Cyrillic, Greek), without diacritics, punctuation
    or honorifics, so `Dr. Jürgen O'Brien-Łęcki` becomes `jurgen obrien lecki`."""
    value = value.casefold().translate(_TRANSLITERATE)
    value = unicodedata.normalize("NFKD", value)
    value = "".join(c for c in value if not unicodedata.combining(c)).translate(_TRANSLITERATE)
    words = re.sub(r"[^a-z0-9]+", " ", value).split()
    return " ".join(w for w in words if w not in _HONORIFICS)


def name_skeleton(normalized: str) -> str:
    """A spelling-insensitive form of a normalised name: common variant spellings collapse
    (ph/f, y/i, ue/u, c/k), an `h` after another letter and doubled letters drop out."""
    out = []
    for word in normalized.split():
        for old, new in _SKELETON_RULES:
            word = word.replace(old, new)
        word = word[:1] + word[1:].replace("h", "")
        word = re.sub(r"(.)\1+", r"\1", word)
        out.append(word)
    return " ".join(out)


@dataclass(frozen=True)
class SanctionsEntry:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    date_of_birth: str | None = None  # YYYY-MM-DD or YYYY
    country: str | None = None
    source: str = ""
    program: str | None = None
    _forms: tuple[tuple[str, str, str, frozenset[str]], ...] = field(
        default=(), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        forms = []
        for listed in (self.name, *self.aliases):
            norm = normalize_name(listed)
            if norm:
                forms.append((listed, norm, name_skeleton(norm), frozenset(norm.split())))
        object.__setattr__(self, "_forms", tuple(forms))

    def dob_relation(self, dob: date) -> Literal["match", "mismatch", "unknown"]:
        if not self.date_of_birth:
            return "unknown"
        listed = self.date_of_birth.strip()
        if len(listed) == 4 and listed.isdigit():
            return "match" if int(listed) == dob.year else "mismatch"
        return "match" if listed == dob.isoformat() else "mismatch"


@dataclass(frozen=True)
class _Hit:
    result: Result
    entry: SanctionsEntry
    listed_name: str
    kind: str
    score: float
    dob: str


class SanctionsList:
    """A screening list held in memory with every name and alias pre-normalised."""

    def __init__(self, entries: Iterable[SanctionsEntry], source: str = "") -> None:
        self.entries = tuple(entries)
        self.source = source

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_csv(cls, path: Path | str) -> SanctionsList:
        """Columns: id, name, aliases (`;`-separated), date_of_birth, country, source, program."""
        entries = []
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                name = (row.get("name") or "").strip()
                if not name:
                    continue
                entries.append(
                    SanctionsEntry(
                        id=(row.get("id") or "").strip(),
                        name=name,
                        aliases=tuple(
                            a.strip() for a in (row.get("aliases") or "").split(";") if a.strip()
                        ),
                        date_of_birth=(row.get("date_of_birth") or "").strip() or None,
                        country=(row.get("country") or "").strip() or None,
                        source=(row.get("source") or "").strip(),
                        program=(row.get("program") or "").strip() or None,
                    )
                )
        if not entries:
            raise ValueError(f"the sanctions list {path} has no entries")
        return cls(entries, source=str(path))

    def _classify(
        self, entry: SanctionsEntry, name: str, skeleton: str, words: frozenset[str], dob: date
    ) -> _Hit | None:
        best: _Hit | None = None
        relation = entry.dob_relation(dob)
        for listed, norm, skel, listed_words in entry._forms:
            score = fuzz.token_sort_ratio(name, norm)
            if score >= STRONG_MATCH:
                kind = "exact" if name == norm or score == 100 else "strong"
            elif score >= FUZZY_MATCH:
                kind = "fuzzy"
            elif fuzz.token_sort_ratio(skeleton, skel) >= PHONETIC_MATCH:
                kind, score = "phonetic", max(score, fuzz.token_sort_ratio(skeleton, skel))
            elif len(words & listed_words) >= 2 and (
                words <= listed_words or listed_words <= words
            ):
                kind, score = "partial", max(score, fuzz.token_set_ratio(name, norm))
            else:
                continue
            if kind == "exact" and relation != "mismatch":
                result: Result = "fail"
            elif kind == "strong" and relation == "match":
                result = "fail"
            elif kind in ("exact", "strong") or relation != "mismatch":
                result = "review"
            else:
                result = "pass"  # a loose match whose listed birth date rules the person out
            hit = _Hit(result, entry, listed, kind, round(score, 1), relation)
            if best is None or (_SEVERITY[hit.result], hit.score) > (
                _SEVERITY[best.result],
                best.score,
            ):
                best = hit
        return best

    def screen(self, legal_name: str, dob: date) -> Check:
        """Fuzzy-match a name (and birth date) against every entry.

        fail: the same name after normalisation (score 100) unless the list's birth date
        differs, or a strong match (>= 95) whose listed birth date matches.
        review: other strong matches, close variants (>= 88), spelling variants (skeleton
        match) and partial names sharing two or more words, unless the list's birth date rules
        the person out. pass: everything else.
        """
        name = normalize_name(legal_name)
        if not name:
            return Check("sanctions", "review", "The name could not be screened")
        skeleton, words = name_skeleton(name), frozenset(name.split())
        hits = [h for e in self.entries if (h := self._classify(e, name, skeleton, words, dob))]
        flagged = sorted(
            (h for h in hits if h.result != "pass"),
            key=lambda h: (_SEVERITY[h.result], h.score),
            reverse=True,
        )
        if not flagged:
            cleared = [h.entry.id for h in hits]
            detail = {"entries_screened": len(self.entries), "cleared_by_birth_date": cleared}
            return Check("sanctions", "pass", None, detail)
        top = flagged[0]
        detail = {
            "entries_screened": len(self.entries),
            "matches": [
                {
                    "entry_id": h.entry.id,
                    "listed_name": h.listed_name,
                    "list": h.entry.source,
                    "program": h.entry.program,
                    "match": h.kind,
                    "score": h.score,
                    "date_of_birth": h.dob,
                    "result": h.result,
                }
                for h in flagged[:5]
            ],
        }
        verb = "matches" if top.result == "fail" else "may match"
        reason = (
            f"Name {verb} {top.entry.source or 'sanctions list'} entry {top.entry.id} "
            f"({top.kind}, score {top.score}, birth date {top.dob})"
        )
        return Check("sanctions", top.result, reason, detail)


# --- the built-in provider ------------------------------------------------------------------------


class BuiltinKycProvider:
    """Rules that need nothing outside the process: age, document number format, address
    completeness and sanctions screening."""

    name = "builtin-kyc"

    def __init__(self, sanctions: SanctionsList) -> None:
        self.sanctions = sanctions

    def evaluate(self, applicant: KycApplicant, today: date) -> KycDecision:
        checks = [
            check_age(applicant.date_of_birth, today),
            check_document(
                applicant.document_type,
                applicant.document_country,
                applicant.document_number,
                applicant.date_of_birth,
            ),
            check_address(applicant.address),
            self.sanctions.screen(applicant.legal_name, applicant.date_of_birth),
        ]
        return combine(
            checks, email_verified=applicant.email_verified, phone_verified=applicant.phone_verified
        )

    async def assess(self, applicant: KycApplicant, today: date) -> KycDecision:
        return self.evaluate(applicant, today)


def default_sanctions_path() -> Path:
    return Path(str(resources.files("billfold.users") / "data" / "sanctions.csv"))


@lru_cache(maxsize=4)
def load_sanctions_list(path: Path) -> SanctionsList:
    """Read once per path and process."""
    return SanctionsList.from_csv(path)


def default_provider(settings: Settings) -> BuiltinKycProvider:
    path = settings.sanctions_list_path or default_sanctions_path()
    return _builtin_provider(Path(path))


@lru_cache(maxsize=4)
def _builtin_provider(path: Path) -> BuiltinKycProvider:
    return BuiltinKycProvider(load_sanctions_list(path))


# --- views ----------------------------------------------------------------------------------------


def _user_reason(row: Row[Any], checks: list[dict[str, Any]]) -> str | None:
    if row.status in ("pending", "review"):
        return "Your details are being reviewed; we will let you know the outcome"
    if row.status != "rejected":
        return None
    visible = [
        c["reason"]
        for c in checks
        if c["result"] == "fail" and c["name"] not in _INTERNAL_CHECKS and c.get("reason")
    ]
    return "; ".join(visible) or "We could not verify your identity with these details"


def to_submission(row: Row[Any]) -> KycSubmission:
    """The owner's view: no document number, no screening evidence, no internal reasons."""
    checks = list(row.checks or [])
    return KycSubmission(
        id=row.id,
        status=row.status,
        tier=row.tier,
        document_type=row.document_type,
        document_country=row.document_country,
        checks=[
            KycCheck(name=c["name"], result=c["result"], reason=c.get("reason"))
            for c in checks
            if c["name"] not in _INTERNAL_CHECKS
        ],
        reason=_user_reason(row, checks),
        created_at=row.created_at,
        decided_at=row.decided_at,
    )


def to_admin_submission(row: Row[Any], history: Sequence[Row[Any]] = ()) -> AdminKycSubmission:
    return AdminKycSubmission(
        id=row.id,
        user_id=row.user_id,
        status=row.status,
        tier=row.tier,
        legal_name=row.legal_name,
        date_of_birth=row.date_of_birth,
        address=Address.model_validate(row.address),
        document_type=row.document_type,
        document_country=row.document_country,
        document_number_last4=row.document_number_last4,
        checks=[AdminKycCheck.model_validate(c) for c in row.checks or []],
        reason=row.reason,
        decided_by=row.decided_by,
        created_at=row.created_at,
        decided_at=row.decided_at,
        history=[
            KycAuditEntry(
                from_status=h.from_status,
                to_status=h.to_status,
                actor=h.actor,
                reason=h.reason,
                at=h.at,
            )
            for h in history
        ],
    )


# --- use cases ------------------------------------------------------------------------------------


def document_hash(rt: UsersRuntime, document_type: str, country: str, number: str) -> bytes:
    """Keyed, so the hash of a short document number cannot be brute-forced from the table."""
    return rt.keyed_hash("kyc-document", f"{document_type}|{country}|{number}")


async def _transition(
    conn: AsyncConnection,
    *,
    user_id: str,
    submission_id: str | None,
    from_status: str,
    to_status: str,
    tier: int,
    actor: str,
    reason: str | None,
    now: datetime,
) -> None:
    """One status change: the user's status and tier, an audit row and an event, together."""
    await store.set_user_kyc(conn, user_id, to_status, tier, now)
    await store.insert_audit(
        conn,
        user_id=user_id,
        submission_id=submission_id,
        from_status=from_status,
        to_status=to_status,
        actor=actor,
        reason=reason,
        at=now,
    )
    await events.publish(
        conn,
        events.KYC_STATUS_CHANGED,
        user_id,
        {
            "submission_id": submission_id,
            "from_status": from_status,
            "to_status": to_status,
            "tier": tier,
            "actor": actor,
        },
    )


def _check_birth_date(dob: date, today: date) -> None:
    if dob >= today or dob < date(today.year - 130, 1, 1):
        raise Unprocessable(
            "date_of_birth must be a real date in the past",
            errors=[FieldError(pointer="#/date_of_birth", detail="not a plausible birth date")],
        )


async def submit(
    uow: UnitOfWork, rt: UsersRuntime, provider: KycProvider, user_id: str, request: SubmitKyc
) -> KycSubmission:
    """Record a submission, let the provider decide it, and move the user's status twice:
    to `pending`, then to the decision."""
    now = utcnow()
    _check_birth_date(request.date_of_birth, now.date())
    conn = await uow.connection()
    user = await store.get_user_kyc(conn, user_id, for_update=True)
    if user is None:
        raise NotFound("No such user")
    current = user.kyc_status
    if current == "verified":
        raise Conflict("Your identity is already verified", code="already_verified")
    if current == "pending":
        raise Conflict("A submission is already being checked", code="kyc_pending")
    if current == "review":
        raise Conflict("Your submission is being reviewed", code="kyc_in_review")
    recent = await store.count_submissions_since(conn, user_id, now - timedelta(days=1))
    if recent >= MAX_SUBMISSIONS_PER_DAY:
        raise TooManyRequests(
            "Too many identity submissions; try again tomorrow",
            code="too_many_submissions",
            headers={"Retry-After": "86400"},
        )

    email_verified = user.email_verified_at is not None
    phone_verified = user.phone_verified_at is not None
    address = request.address.model_dump()
    applicant = KycApplicant(
        legal_name=request.legal_name,
        date_of_birth=request.date_of_birth,
        address=address,
        document_type=request.document_type,
        document_country=request.document_country,
        document_number=request.document_number,
        email_verified=email_verified,
        phone_verified=phone_verified,
    )
    verdict = await provider.assess(applicant, now.date())
    digest = document_hash(
        rt, request.document_type, request.document_country, request.document_number
    )

    checks = list(verdict.checks)
    if request.date_of_birth != user.date_of_birth:
        checks.append(
            Check("profile_match", "review", "The date of birth differs from the account's")
        )
    if await store.document_used_by_other(conn, digest, user_id):
        checks.append(
            Check("document_uniqueness", "review", "The document is used by another account")
        )
    if await store.had_sanctions_concern(conn, user_id):
        checks.append(
            Check("sanctions_history", "review", "An earlier submission had a sanctions concern")
        )
    outcome = _escalate(
        verdict, checks, email_verified=email_verified, phone_verified=phone_verified
    )

    submission_id = new_id("kyc")
    actor = f"system:{provider.name}"
    await store.insert_submission(
        conn,
        {
            "id": submission_id,
            "user_id": user_id,
            "legal_name": request.legal_name,
            "date_of_birth": request.date_of_birth,
            "address": address,
            "document_type": request.document_type,
            "document_country": request.document_country,
            "document_number_last4": request.document_number[-4:],
            "document_number_hash": digest,
            "now": now,
        },
    )
    await _transition(
        conn,
        user_id=user_id,
        submission_id=submission_id,
        from_status=current,
        to_status="pending",
        tier=0,
        actor=user_id,
        reason="submitted",
        now=now,
    )
    final = outcome.decision != "review"
    await store.record_outcome(
        conn,
        submission_id,
        status=outcome.decision,
        tier=outcome.tier,
        checks=[c.as_json() for c in outcome.checks],
        reason=outcome.reason,
        decided_by=actor if final else None,
        decided_at=now if final else None,
    )
    await _transition(
        conn,
        user_id=user_id,
        submission_id=submission_id,
        from_status="pending",
        to_status=outcome.decision,
        tier=outcome.tier,
        actor=actor,
        reason=outcome.reason,
        now=now,
    )
    row = await store.get_submission(conn, submission_id)
    assert row is not None
    return to_submission(row)


async def get_state(conn: AsyncConnection, user_id: str) -> KycState:
    user = await store.get_user_kyc(conn, user_id)
    if user is None:
        raise NotFound("No such user")
    latest = await store.latest_submission(conn, user_id)
    return KycState(
        status=user.kyc_status,
        tier=user.kyc_tier,
        can_submit=user.kyc_status in ("unverified", "rejected"),
        submission=to_submission(latest) if latest is not None else None,
    )


async def list_submissions(
    conn: AsyncConnection, user_id: str, limit: int, after: str | None
) -> list[KycSubmission]:
    return [
        to_submission(r) for r in await store.list_user_submissions(conn, user_id, limit, after)
    ]


async def get_submission(conn: AsyncConnection, user_id: str, submission_id: str) -> KycSubmission:
    """One of the caller's own submissions; anyone else's answers 404."""
    row = (
        await store.get_submission(conn, submission_id, user_id=user_id)
        if is_valid_id(submission_id, "kyc")
        else None
    )
    if row is None:
        raise NotFound("No such KYC submission")
    return to_submission(row)


async def review_queue(
    conn: AsyncConnection, limit: int, after: str | None
) -> list[AdminKycSubmission]:
    return [to_admin_submission(r) for r in await store.list_in_review(conn, limit, after)]


async def get_submission_for_admin(conn: AsyncConnection, submission_id: str) -> AdminKycSubmission:
    row = (
        await store.get_submission(conn, submission_id)
        if is_valid_id(submission_id, "kyc")
        else None
    )
    if row is None:
        raise NotFound("No such KYC submission")
    return to_admin_submission(row, await store.list_audit(conn, submission_id))


async def decide(
    uow: UnitOfWork,
    admin_id: str,
    submission_id: str,
    decision: Literal["verified", "rejected"],
    reason: str,
) -> AdminKycSubmission:
    """An administrator's decision on a submission in `review` (409 in any other state).
    Nobody decides their own submission (403)."""
    conn = await uow.connection()
    found = (
        await store.get_submission(conn, submission_id)
        if is_valid_id(submission_id, "kyc")
        else None
    )
    if found is None:
        raise NotFound("No such KYC submission")
    if found.user_id == admin_id:
        raise Forbidden("You cannot decide your own KYC submission", code="self_review_forbidden")
    # Lock order as in `submit`: the user, then the submission.
    user = await store.get_user_kyc(conn, found.user_id, for_update=True)
    row = await store.get_submission(conn, submission_id, for_update=True)
    assert user is not None and row is not None
    if row.status != "review":
        raise Conflict(
            f"Only a submission in review can be decided; this one is {row.status}",
            code="not_in_review",
        )
    now = utcnow()
    tier = tier_for(
        decision,
        email_verified=user.email_verified_at is not None,
        phone_verified=user.phone_verified_at is not None,
    )
    await store.record_outcome(
        conn,
        submission_id,
        status=decision,
        tier=tier,
        checks=None,
        reason=reason,
        decided_by=admin_id,
        decided_at=now,
    )
    await _transition(
        conn,
        user_id=row.user_id,
        submission_id=submission_id,
        from_status=user.kyc_status,
        to_status=decision,
        tier=tier,
        actor=admin_id,
        reason=reason,
        now=now,
    )
    return await get_submission_for_admin(conn, submission_id)


async def refresh_tier(conn: AsyncConnection, user_id: str) -> int:
    """Recompute a verified user's tier after their email or phone verification changed; a
    change is audited and published like any transition. Returns the tier."""
    user = await store.get_user_kyc(conn, user_id, for_update=True)
    if user is None:
        raise NotFound("No such user")
    tier = tier_for(
        user.kyc_status,
        email_verified=user.email_verified_at is not None,
        phone_verified=user.phone_verified_at is not None,
    )
    if tier != user.kyc_tier:
        latest = await store.latest_submission(conn, user_id)
        await _transition(
            conn,
            user_id=user_id,
            submission_id=latest.id if latest is not None else None,
            from_status=user.kyc_status,
            to_status=user.kyc_status,
            tier=tier,
            actor="system:kyc-tier",
            reason=f"tier {user.kyc_tier} -> {tier}: contact verification changed",
            now=utcnow(),
        )
    return tier
