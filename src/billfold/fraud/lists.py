"""Block and allow lists: devices, IPs (addresses or networks), card fingerprints, recipients,
merchants and countries, kept in `fraud.list_entries` and checked with the rules.

A hit on a block list is a direct `block` (reason `block_list_<kind>`, 1000 points); a hit on an
allow list is an `allow` override (reason `allow_list_<kind>`) that `combine` honours over
everything but a direct block. Entries may expire; a removed entry is kept (who, when) and stops
matching at the next reload.

`ListSet` is the in-memory matcher (a `SubjectMatcher` for `rules.CompiledRules`): dict and set
lookups, plus a scan of the listed IP networks (few in practice). `load_lists` builds it from the
database; `RuleBook(lists=load_lists)` reloads it when `fraud.rule_set.lists_version` moves.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import phonenumbers
import pycountry
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.fraud.models import RiskSubject, RuleHit
from billfold.fraud.rules import PRINTABLE, UtcDateTime
from billfold.fraud.store import rules as store
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import Conflict, FieldError, NotFound, ProblemError
from billfold.platform.events import Event, record_event
from billfold.platform.ids import is_valid_id, new_id

ListName = Literal["block", "allow"]
ListKind = Literal["device", "ip", "card", "recipient", "merchant", "country"]
KINDS: tuple[str, ...] = ("device", "ip", "card", "recipient", "merchant", "country")
BLOCK_SCORE = 1000

SOURCE = "/billfold/fraud"
ENTRY_ADDED = "billfold.fraud.list.entry_added"
ENTRY_REMOVED = "billfold.fraud.list.entry_removed"

_WHAT = {
    "device": "device",
    "ip": "IP address",
    "card": "card",
    "recipient": "recipient",
    "merchant": "merchant",
    "country": "merchant's country",
}

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListEntry:
    id: str
    list: ListName
    kind: ListKind
    value: str
    reason: str
    expires_at: datetime | None = None


# The broadest network a list may hold: a /16 of IPv4 (65,536 addresses) or a /32 of IPv6 (an
# ISP's allocation). Anything wider (0.0.0.0/0, ::/0, a /8) would block, or on an allow list
# exempt from every rule, a large share of all customers at once: a typo, not a decision.
MIN_PREFIX = {4: 16, 6: 32}
# What the check compares list values with (`_subject_values`): the users' device ids, the
# vault's card fingerprints (hex HMAC-SHA256), user ids, and merchant ids as payments accept
# them (`transactions.models.Identifier`).
_DEVICE_ID = re.compile(r"dev_[A-Za-z0-9_]{1,60}")
_USER_ID = re.compile(r"usr_[A-Za-z0-9_]{1,60}")
_CARD_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_MERCHANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}")


class ListValueInvalid(ValueError):
    """A list value that is not of its kind, or (`code` `network_too_broad`) an IP network
    wider than `MIN_PREFIX` allows."""

    def __init__(self, detail: str, code: str = "validation_failed") -> None:
        super().__init__(detail)
        self.code = code


# IPv6 ranges that embed the whole IPv4 internet in their last 32 bits: IPv4-mapped addresses
# (how a dual-stack listener shows an IPv4 client) and the NAT64 well-known prefix. A /96 of one
# of them is all of IPv4, however long an IPv6 prefix it looks.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_EMBEDDING_IPV4 = (_IPV4_MAPPED, ipaddress.IPv6Network("64:ff9b::/96"))


def _unmapped(network: IpNetwork) -> IpNetwork:
    """An IPv4-mapped IPv6 network as the IPv4 network it is (stored and matched as IPv4)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        address = network.network_address.ipv4_mapped
        assert address is not None  # inside ::ffff:0:0/96
        return ipaddress.IPv4Network(f"{address}/{network.prefixlen - 96}")
    return network


def _ipv4_breadth(network: IpNetwork) -> int | None:
    """The IPv4 prefix length an IPv6 network covering embedded IPv4 amounts to (0 for one that
    contains a whole embedding range); None when it embeds no IPv4."""
    if isinstance(network, ipaddress.IPv4Network):
        return None
    for embedding in _EMBEDDING_IPV4:
        if network.overlaps(embedding):
            return max(0, network.prefixlen - 96)
    return None


def _network(value: str) -> str:
    try:
        network = _unmapped(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ListValueInvalid("an IP address or network (CIDR) such as 203.0.113.0/24") from None
    embedded = _ipv4_breadth(network)
    if embedded is not None and embedded < MIN_PREFIX[4]:
        raise ListValueInvalid(
            f"a network no wider than /{MIN_PREFIX[4]} of IPv4 (this IPv6 network embeds "
            f"a /{embedded} of IPv4)",
            code="network_too_broad",
        )
    minimum = MIN_PREFIX[network.version]
    if network.prefixlen < minimum:
        raise ListValueInvalid(
            f"a network no wider than /{minimum} for IPv{network.version} "
            f"(this one is a /{network.prefixlen})",
            code="network_too_broad",
        )
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


def _recipient(value: str) -> str:
    if _USER_ID.fullmatch(value):
        return value
    if _EMAIL.fullmatch(value):
        # As p2p normalises the address a transfer is sent to (`users.models.normalize_email`),
        # or the entry could never match it.
        try:
            return validate_email(value, check_deliverability=False).normalized.lower()
        except EmailNotValidError:
            raise ListValueInvalid("a valid e-mail address") from None
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        number = None
    if number is not None and phonenumbers.is_valid_number(number):
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    raise ListValueInvalid("a user id (usr_…), an e-mail address or an E.164 phone number")


def normalize(kind: str, value: str) -> str:
    """The stored form of a value, checked against its kind: an IP or network in canonical
    notation (a network given with host bits set is the network; no wider than `MIN_PREFIX`),
    a device id (`dev_…`), a card fingerprint (64 hex digits, lower case), a recipient (user
    id, e-mail in lower case, or E.164 phone), a merchant id, an ISO 3166-1 alpha-2 country in
    upper case. Raises `ListValueInvalid` (a ValueError)."""
    value = value.strip()
    if not value or not value.isprintable():
        raise ListValueInvalid("empty or not printable")
    if kind == "ip":
        return _network(value)
    if kind == "country":
        # ASCII first: upper-casing "ß" gives "SS" (South Sudan).
        if not value.isascii():
            raise ListValueInvalid("an ISO 3166-1 alpha-2 country code such as DE")
        value = value.upper()
        if len(value) != 2 or pycountry.countries.get(alpha_2=value) is None:
            raise ListValueInvalid("an ISO 3166-1 alpha-2 country code such as DE")
        return value
    if kind == "device" and not _DEVICE_ID.fullmatch(value):
        raise ListValueInvalid("a device id such as dev_01j…")
    if kind == "card":
        value = value.lower()
        if not _CARD_FINGERPRINT.fullmatch(value):
            raise ListValueInvalid("a card fingerprint (64 hexadecimal digits)")
    if kind == "merchant" and not _MERCHANT_ID.fullmatch(value):
        raise ListValueInvalid("a merchant id (letters, digits and . _ : -, at most 64)")
    if kind == "recipient":
        return _recipient(value)
    return value


def _subject_values(subject: RiskSubject) -> dict[str, tuple[str, ...]]:
    """What of the subject each kind of list is checked against."""
    recipients = tuple(
        v for v in (subject.recipient_id, subject.recipient_key, subject.recipient_contact) if v
    )
    return {
        "device": (subject.device_id,) if subject.device_id else (),
        "card": (subject.card_fingerprint,) if subject.card_fingerprint else (),
        "recipient": recipients,
        "merchant": (subject.merchant_id,) if subject.merchant_id else (),
        "country": (subject.merchant_country.upper(),) if subject.merchant_country else (),
    }


class ListSet:
    """Every live entry, indexed for the check of one subject."""

    def __init__(self, entries: Iterable[ListEntry]) -> None:
        self._exact: dict[tuple[str, str], list[ListEntry]] = {}
        self._networks: list[tuple[IpNetwork, ListEntry]] = []
        ids: list[str] = []
        for entry in entries:
            ids.append(f"{entry.id}:{entry.expires_at.isoformat() if entry.expires_at else ''}")
            network = _unmapped(ipaddress.ip_network(entry.value)) if entry.kind == "ip" else None
            if network is not None and network.num_addresses > 1:
                self._networks.append((network, entry))
            elif network is not None:  # an address (one stored IPv4-mapped is its IPv4)
                self._exact.setdefault(("ip", str(network.network_address)), []).append(entry)
            else:
                self._exact.setdefault((entry.kind, entry.value), []).append(entry)
        self.size = len(ids)
        self.digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]

    def match(self, subject: RiskSubject) -> list[RuleHit]:
        """A hit per matching entry still in force at `subject.at`."""
        if not self.size:
            return []
        found: list[ListEntry] = []
        for kind, values in _subject_values(subject).items():
            for value in values:
                found.extend(self._exact.get((kind, value), ()))
        if subject.ip:
            found.extend(self._ip_entries(subject.ip))
        return [_hit(e) for e in found if e.expires_at is None or e.expires_at > subject.at]

    def _ip_entries(self, ip: str) -> list[ListEntry]:
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            return []
        # An IPv4 client seen through a dual-stack listener (`::ffff:a.b.c.d`) is that IPv4
        # address, as the list stores it.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        found = list(self._exact.get(("ip", str(address)), ()))
        found.extend(
            e
            for network, e in self._networks
            if address.version == network.version and address in network
        )
        return found


def _hit(entry: ListEntry) -> RuleHit:
    blocked = entry.list == "block"
    what = _WHAT[entry.kind]
    return RuleHit(
        rule_id=entry.id,
        version=0,
        reason_code=f"{entry.list}_list_{entry.kind}",
        description=f"The {what} is on the {entry.list} list: {entry.reason}",
        score=BLOCK_SCORE if blocked else 0,
        action="block" if blocked else "allow",
    )


def _entry(row: Row[Any]) -> ListEntry:
    return ListEntry(row.id, row.list, row.kind, row.value, row.reason, row.expires_at)


async def load_lists(conn: AsyncConnection) -> ListSet:
    """Every entry in force now (or until a later expiry), as a matcher."""
    return ListSet(_entry(r) for r in await store.live_entries(conn, utcnow()))


# --- the admin API ------------------------------------------------------------------------------

Value = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=PRINTABLE),
]
Reason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=PRINTABLE),
]


class AddEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    list: ListName
    kind: ListKind
    value: Value = Field(
        description="A device id, an IP address or network (CIDR), a card fingerprint, a "
        "recipient (user id or contact key), a merchant id, or a country (ISO alpha-2)"
    )
    reason: Reason = Field(description="Why, in words a support agent can read")
    expires_at: UtcDateTime | None = Field(default=None, description="Stops matching at this time")


class RemoveEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Annotated[str, StringConstraints(max_length=500)] | None = None


class ListEntryView(BaseModel):
    id: str
    list: ListName
    kind: ListKind
    value: str
    reason: str
    expires_at: datetime | None
    created_by: str | None
    created_at: datetime
    removed_by: str | None
    removed_at: datetime | None


def _view(row: Row[Any]) -> ListEntryView:
    return ListEntryView.model_validate(row._asdict())


def _event(kind: str, row: Row[Any], actor: str, now: datetime, **extra: Any) -> Event:
    # The value itself stays out of the event: a card fingerprint or a contact key is not
    # for every consumer of the bus; the entry id leads to it.
    return Event(
        type=kind,
        source=SOURCE,
        subject=f"list_entry/{row.id}",
        aggregate_id=row.id,
        time=now,
        data={"entry_id": row.id, "list": row.list, "kind": row.kind, "actor": actor, **extra},
    )


async def add_entry(uow: UnitOfWork, actor: str, body: AddEntry) -> ListEntryView:
    """A new live entry; `409 list_entry_exists` (with its id) if the value is listed already."""
    try:
        value = normalize(body.kind, body.value)
    except ListValueInvalid as exc:
        raise ProblemError(
            f"Not a valid {body.kind} list value: it must be {exc}",
            status=422,
            code=exc.code,
            errors=[FieldError(pointer="#/value", detail=str(exc), code=exc.code)],
        ) from None
    now = utcnow()
    if body.expires_at is not None and body.expires_at <= now:
        raise ProblemError(
            "expires_at is in the past",
            status=422,
            code="validation_failed",
            errors=[FieldError(pointer="#/expires_at", detail="must be in the future")],
        )
    conn = await uow.connection()
    row = await store.insert_entry(
        conn,
        {
            "id": new_id("lst"),
            "list": body.list,
            "kind": body.kind,
            "value": value,
            "reason": body.reason,
            "expires_at": body.expires_at,
            "actor": actor,
            "now": now,
        },
    )
    if row is None:
        existing = await store.live_entry(conn, body.list, body.kind, value)
        raise Conflict(
            "This value is on the list already",
            code="list_entry_exists",
            extra={"entry_id": existing.id if existing is not None else None},
        )
    await store.bump_lists(conn)
    await record_event(conn, _event(ENTRY_ADDED, row, actor, now))
    return _view(row)


async def remove_entry(
    uow: UnitOfWork, actor: str, entry_id: str, body: RemoveEntry
) -> ListEntryView:
    """Stop matching an entry (kept, marked removed). Removing a removed entry answers it as is."""
    if not is_valid_id(entry_id, "lst"):
        raise NotFound("No such list entry", code="list_entry_not_found")
    conn = await uow.connection()
    now = utcnow()
    row = await store.remove_entry(conn, entry_id, actor, now)
    if row is None:
        existing = await store.get_entry(conn, entry_id)
        if existing is None:
            raise NotFound("No such list entry", code="list_entry_not_found")
        return _view(existing)
    await store.bump_lists(conn)
    await record_event(conn, _event(ENTRY_REMOVED, row, actor, now, note=body.note))
    return _view(row)


async def get_entry(conn: AsyncConnection, entry_id: str) -> ListEntryView:
    row = await store.get_entry(conn, entry_id) if is_valid_id(entry_id, "lst") else None
    if row is None:
        raise NotFound("No such list entry", code="list_entry_not_found")
    return _view(row)


async def list_entries(
    conn: AsyncConnection,
    *,
    list_name: ListName | None,
    kind: ListKind | None,
    value: str | None,
    include_removed: bool,
    limit: int,
    after: str | None,
) -> list[ListEntryView]:
    if value is not None and kind is not None:
        try:
            value = normalize(kind, value)
        except ValueError:
            return []
    rows = await store.list_entries(
        conn,
        list_name=list_name,
        kind=kind,
        value=value,
        include_removed=include_removed,
        limit=limit,
        after=after,
    )
    return [_view(r) for r in rows]
