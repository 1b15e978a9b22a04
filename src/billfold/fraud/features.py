"""Fraud features: what is known about a payment or transfer at the moment it is checked.

`RedisFeatures` is the live source. One Lua script call (one Redis round trip) records the
attempt in every sliding window it belongs to (user, device, card, IP, recipient) — idempotently:
the window members are keyed by the subject id, so a re-check of the same payment never counts
twice — and reads back every windowed value, the user's amount history, hour-of-day habit, last
location, seen countries, devices and recipients, and a short-lived copy of the user's profile.
Only when that copy has expired (or the device is unknown to Redis) does it read
PostgreSQL (`users.users`, `users.devices`) with the check's own connection.

`PostgresFeatures` is the fallback when Redis fails or is slower than its budget: the same
names, derived in one SQL statement from the payments', transfers' and users' tables
(`degraded` = True; IP windows and device sharing are not in PostgreSQL and read as this attempt
alone).

The outcome state (declines, completed-amount statistics, hours, countries, devices, recipients)
is kept current by the event `consumers` below; each update is idempotent in Redis itself (a
member keyed by the payment/transfer id, or that id added to the user's set of counted ones in
the same script as the counts), because the consumers' inbox commits in PostgreSQL, not in
Redis: a redelivered event changes nothing.
`rebuild` recreates the whole state from PostgreSQL (`billfold fraud rebuild-features`).

Conventions shared with the model's synthetic data (`billfold.fraud.model`):
- windows are (at - span, ...] and include the attempt itself;
- amount statistics are of the user's completed payments/transfers in the subject's currency;
  `history_count` is their number; mean, std (population) and z-score are 0 without history and
  `amount_to_max` is 1;
- `speed_kmh` = great-circle km from the previous location / the hours since (at least a
  minute); 0 without a previous location or without a location now;
- `hour_habit_share` = share of the completed history (any currency) whose UTC hour is within
  ±1 h of the attempt's UTC hour (0 without history); `hour_of_day` is the hour in the user's
  time zone;
- `new_country` is False for the profile's own country; `new_device` is True without a device;
  `new_recipient` is True only for a transfer to a known recipient never paid before (one to
  an e-mail/phone not resolved to a user has no recipient key: False, as in the model's data);
- the card key is the card fingerprint, else the payment method id (the rebuild keys cards by
  payment method, as the checks wired today carry no fingerprint);
- `mcc_risk` is `billfold.fraud.models.mcc_risk` (one table for the features and the model).

Key layout (under `<redis_prefix>fraud:`): per-user keys carry the user id as a hash tag
(`{usr_…}`) so the consumers' scripts stay on one cluster slot; the live snapshot touches keys
of several entities at once and therefore needs a non-clustered Redis (or a proxy that keeps a
script's keys together), which is what billfold deploys.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.config import Settings
from billfold.fraud.models import (
    FEATURE_NAMES,
    FeaturesUnavailable,
    FeatureValue,
    RiskSubject,
    mcc_risk,
)
from billfold.fraud.store import features as store
from billfold.fraud.store.features import Profile
from billfold.platform.bus.consumers import Consumer
from billfold.platform.observability import get_logger

log = get_logger(__name__)

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
# Windows live a little longer than the longest span they answer for.
WINDOW_TTL_MS = DAY_MS + HOUR_MS
# Outcome state (history, habits, seen things) is refreshed on every write; a user idle for
# longer starts again (rebuild restores it from PostgreSQL).
STATE_TTL_MS = 400 * DAY_MS
# What an attempt is remembered by (its card, recipient, time) for the outcome events.
SUBJECT_TTL_MS = 2 * DAY_MS
# A completed payment/transfer is counted once: its id is remembered far longer than any
# redelivery could come.
DONE_TTL_MS = 90 * DAY_MS
LOCATION_TTL_MS = 90 * DAY_MS
# The profile copy (account age, KYC tier, country, time zone) is short-lived and dropped by
# the users' events that change it.
PROFILE_TTL_SECONDS = 60
# The shortest time between two places that speed is computed over: GPS jitter within seconds
# is not a supersonic journey.
MIN_TRAVEL_HOURS = 1 / 60
EARTH_RADIUS_KM = 6371.0088


# `payment.*` events whose payment was authorized: it joins the user's history once.
PAYMENT_COMPLETED = frozenset(
    {
        "billfold.transactions.payment.authorized",
        "billfold.transactions.payment.captured",
        "billfold.transactions.payment.review_approved",
    }
)
PAYMENT_DECLINED = "billfold.transactions.payment.declined"
TRANSFER_COMPLETED = frozenset(
    {"billfold.p2p.transfer.completed", "billfold.p2p.transfer.pending_claim"}
)
TRANSFER_FAILED = "billfold.p2p.transfer.failed"
DECISION_MADE = "billfold.fraud.decision.made"
DEVICE_ENROLLED = "billfold.users.device.enrolled"
# Anything that may change the profile copy (country, time zone, KYC tier).
PROFILE_CHANGED = frozenset(
    {
        "billfold.users.user.registered",
        "billfold.users.profile.updated",
        "billfold.users.contact.verified",
        "billfold.users.kyc.status_changed",
    }
)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def card_key(subject: RiskSubject) -> str | None:
    """Which card the card windows count: its fingerprint (the same card on any account), else
    the payment method. `rebuild` keys by payment method: if checks start to carry the
    fingerprint, change `store.features` to match."""
    return subject.card_fingerprint or subject.payment_method_id


def recipient_key(subject: RiskSubject) -> str | None:
    """Who receives a transfer: the recipient's key, else their user id."""
    if subject.kind != "transfer":
        return None
    return subject.recipient_key or subject.recipient_id


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _from_ms(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _coord(x: float) -> str:
    # One spelling of a coordinate for the live state and the rebuild alike (members compare).
    return repr(float(x))


@dataclass(frozen=True, slots=True)
class RawState:
    """What the stores know, before it becomes features: both sources produce one, and
    `features_from` turns it into the catalogue, so their meanings cannot drift apart."""

    user_count_1m: int = 0
    user_count_1h: int = 0
    user_count_24h: int = 0
    user_sum_1h: int = 0
    user_sum_24h: int = 0
    user_declines_24h: int = 0
    device_count_1h: int = 0
    device_users_24h: int = 0
    card_count_1m: int = 0
    card_count_1h: int = 0
    card_declines_1h: int = 0
    ip_count_1h: int = 0
    ip_users_24h: int = 0
    recipient_count_24h: int = 0
    recipient_senders_24h: int = 0
    user_recipients_24h: int = 0
    hist_n: int = 0
    hist_sum: float = 0.0
    hist_sumsq: float = 0.0
    hist_max: int = 0
    # Completed payments/transfers (any currency) near this hour of the day, and all of them.
    hours_near: int = 0
    hours_total: int = 0
    prev_lat: float | None = None
    prev_lon: float | None = None
    prev_at: datetime | None = None
    country_seen: bool = False
    device_first_seen: datetime | None = None
    recipient_seen: bool = False
    profile: Profile | None = None


def features_from(
    subject: RiskSubject, raw: RawState, *, degraded: bool = False
) -> dict[str, FeatureValue]:
    """Every name of `FEATURE_NAMES` for `subject` from what a store knows (`raw`)."""
    at = subject.at
    is_payment = subject.kind == "payment"
    amount = subject.amount
    profile = raw.profile

    n = raw.hist_n
    mean = raw.hist_sum / n if n else 0.0
    std = math.sqrt(max(0.0, raw.hist_sumsq / n - mean * mean)) if n else 0.0
    zscore = (amount - mean) / max(std, 1.0) if n else 0.0
    to_max = amount / raw.hist_max if raw.hist_max > 0 else 1.0

    has_location = subject.latitude is not None and subject.longitude is not None
    km = speed = 0.0
    if (
        has_location
        and raw.prev_lat is not None
        and raw.prev_lon is not None
        and raw.prev_at is not None
    ):
        assert subject.latitude is not None and subject.longitude is not None
        km = haversine_km(raw.prev_lat, raw.prev_lon, subject.latitude, subject.longitude)
        hours = max((at - raw.prev_at).total_seconds() / 3600, MIN_TRAVEL_HOURS)
        speed = km / hours

    home = profile.country if profile else ""
    merchant_country = (subject.merchant_country or "").upper() if is_payment else ""
    country_mismatch = bool(merchant_country and home and merchant_country != home)
    new_country = bool(merchant_country) and not raw.country_seen and merchant_country != home

    first_seen = raw.device_first_seen if subject.device_id else None
    device_age = max(0.0, (at - first_seen).total_seconds() / 3600) if first_seen else 0.0

    channel = subject.channel or ("p2p" if not is_payment else "")
    local_hour = at.astimezone(_zone(profile.timezone if profile else "UTC")).hour
    account_age = max(0.0, (at - profile.created_at).total_seconds() / 86400) if profile else 0.0

    values: dict[str, FeatureValue] = {
        "kind": subject.kind,
        "is_payment": is_payment,
        "amount": amount,
        "currency": subject.currency,
        "channel": channel,
        "is_ecommerce": channel in ("ecommerce", "e_commerce"),
        "mcc": subject.mcc or "" if is_payment else "",
        "mcc_risk": mcc_risk(subject.mcc) if is_payment else 0.0,
        "merchant_country": merchant_country,
        "user_count_1m": raw.user_count_1m,
        "user_count_1h": raw.user_count_1h,
        "user_count_24h": raw.user_count_24h,
        "user_sum_1h": raw.user_sum_1h,
        "user_sum_24h": raw.user_sum_24h,
        "user_declines_24h": raw.user_declines_24h,
        "device_count_1h": raw.device_count_1h,
        "device_users_24h": raw.device_users_24h,
        "card_count_1m": raw.card_count_1m,
        "card_count_1h": raw.card_count_1h,
        "card_declines_1h": raw.card_declines_1h,
        "ip_count_1h": raw.ip_count_1h,
        "ip_users_24h": raw.ip_users_24h,
        "recipient_count_24h": raw.recipient_count_24h,
        "recipient_senders_24h": raw.recipient_senders_24h,
        "user_recipients_24h": raw.user_recipients_24h,
        "history_count": n,
        "amount_mean": round(mean, 4),
        "amount_std": round(std, 4),
        "amount_zscore": round(zscore, 4),
        "amount_to_max": round(to_max, 4),
        "has_location": has_location,
        "km_from_last": round(km, 3),
        "speed_kmh": round(speed, 3),
        "country_mismatch": country_mismatch,
        "new_country": new_country,
        "new_device": subject.device_id is None or first_seen is None,
        "device_age_hours": round(device_age, 4),
        "new_recipient": bool(recipient_key(subject)) and not raw.recipient_seen,
        "account_age_days": round(account_age, 4),
        "kyc_tier": profile.kyc_tier if profile else 0,
        "hour_of_day": local_hour,
        "hour_habit_share": (
            round(raw.hours_near / raw.hours_total, 4) if raw.hours_total else 0.0
        ),
        "stepped_up": subject.stepped_up,
        "degraded": degraded,
    }
    assert tuple(values) == FEATURE_NAMES, "the catalogue and the features drifted apart"
    return values


# --- Redis ---------------------------------------------------------------------------------

# KEYS: 1 user attempts, 2 user declines, 3 history, 4 hours, 5 countries, 6 devices,
# 7 recipients paid, 8 recipients attempted (24 h), 9 locations, 10 profile, 11 device attempts,
# 12 device users, 13 card attempts, 14 card declines, 15 IP attempts, 16 IP users,
# 17 recipient attempts, 18 recipient senders, 19 the subject.
# ARGV: 1 now ms, 2 subject id, 3 user, 4 amount, 5 currency, 6 device, 7 card, 8 ip,
# 9 recipient, 10 lat, 11 lon, 12 merchant country, 13 UTC hour, 14 window ttl ms,
# 15 state ttl ms, 16 subject ttl ms, 17 location ttl ms, 18 read ('1') or only record ('0').
# Absent entities are '' (their keys are placeholders and are not touched).
_SNAPSHOT_LUA = """
local now = tonumber(ARGV[1])
local sid, user, amount, cur = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local device, card, ip, rcpt = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local lat, lon, country, hour = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local wttl, sttl, subttl, lttl = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local reading = ARGV[18] == '1'
local M, H, D = 60000, 3600000, 86400000
local out = {}

local function trim(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - D))
end
local function record(key, member)
  trim(key)
  redis.call('ZADD', key, 'NX', now, member)
  redis.call('PEXPIRE', key, wttl)
end
local function distinct(key, member)
  trim(key)
  redis.call('ZADD', key, 'GT', now, member)
  redis.call('PEXPIRE', key, wttl)
end
local function count(key, span)
  return redis.call('ZCOUNT', key, '(' .. (now - span), '+inf')
end
local function str(v)
  if v then return v end
  return ''
end

-- The previous location is read before this attempt's own is written; a re-check of the same
-- attempt skips its own entry.
local prev = {'', '', ''}
if reading then
  local newest = redis.call('ZREVRANGE', KEYS[9], 0, 1, 'WITHSCORES')
  for i = 1, #newest, 2 do
    local psid, la, lo = string.match(newest[i], '^([^|]*)|([^|]*)|([^|]*)$')
    if psid ~= sid then
      prev = {la, lo, newest[i + 1]}
      break
    end
  end
end
if lat ~= '' then
  redis.call('ZADD', KEYS[9], 'NX', now, sid .. '|' .. lat .. '|' .. lon)
  redis.call('ZREMRANGEBYRANK', KEYS[9], 0, -4)
  redis.call('PEXPIRE', KEYS[9], lttl)
end

record(KEYS[1], sid .. '|' .. amount .. '|' .. cur)
if device ~= '' then
  record(KEYS[11], sid)
  distinct(KEYS[12], user)
end
if card ~= '' then record(KEYS[13], sid) end
if ip ~= '' then
  record(KEYS[15], sid)
  distinct(KEYS[16], user)
end
if rcpt ~= '' then
  record(KEYS[17], sid)
  distinct(KEYS[18], user)
  distinct(KEYS[8], rcpt)
end
redis.call('HSET', KEYS[19], 'user', user, 'card', card, 'rcpt', rcpt, 'at', now)
redis.call('PEXPIRE', KEYS[19], subttl)
if not reading then return 0 end

-- The user's counts and sums (in the subject's currency) in one pass over the day.
local c1m, c1h, c24, s1h, s24 = 0, 0, 0, 0, 0
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - D), '+inf', 'WITHSCORES')
for i = 1, #rows, 2 do
  local ts = tonumber(rows[i + 1])
  local a, c = string.match(rows[i], '^[^|]*|(%d+)|(%u+)$')
  c24 = c24 + 1
  if ts > now - H then c1h = c1h + 1 end
  if ts > now - M then c1m = c1m + 1 end
  if c == cur then
    s24 = s24 + tonumber(a)
    if ts > now - H then s1h = s1h + tonumber(a) end
  end
end
out[#out + 1] = c1m
out[#out + 1] = c1h
out[#out + 1] = c24
out[#out + 1] = s1h
out[#out + 1] = s24
out[#out + 1] = count(KEYS[2], D)
if device ~= '' then
  out[#out + 1] = count(KEYS[11], H)
  out[#out + 1] = count(KEYS[12], D)
else
  out[#out + 1] = 0
  out[#out + 1] = 0
end
if card ~= '' then
  out[#out + 1] = count(KEYS[13], M)
  out[#out + 1] = count(KEYS[13], H)
  out[#out + 1] = count(KEYS[14], H)
else
  out[#out + 1] = 0
  out[#out + 1] = 0
  out[#out + 1] = 0
end
if ip ~= '' then
  out[#out + 1] = count(KEYS[15], H)
  out[#out + 1] = count(KEYS[16], D)
else
  out[#out + 1] = 0
  out[#out + 1] = 0
end
if rcpt ~= '' then
  out[#out + 1] = count(KEYS[17], D)
  out[#out + 1] = count(KEYS[18], D)
else
  out[#out + 1] = 0
  out[#out + 1] = 0
end
out[#out + 1] = count(KEYS[8], D)
local hist = redis.call('HMGET', KEYS[3], cur .. ':n', cur .. ':sum', cur .. ':sumsq', cur .. ':max')
for i = 1, 4 do out[#out + 1] = str(hist[i]) end
local near = 0
for _, h in ipairs({(hour + 23) % 24, hour, (hour + 1) % 24}) do
  near = near + tonumber(redis.call('HGET', KEYS[4], tostring(h)) or '0')
end
out[#out + 1] = near
for i = 1, 3 do out[#out + 1] = prev[i] end
if country ~= '' then
  out[#out + 1] = redis.call('SISMEMBER', KEYS[5], country)
else
  out[#out + 1] = 0
end
if device ~= '' then
  out[#out + 1] = str(redis.call('HGET', KEYS[6], device))
else
  out[#out + 1] = ''
end
if rcpt ~= '' then
  out[#out + 1] = redis.call('SISMEMBER', KEYS[7], rcpt)
else
  out[#out + 1] = 0
end
local p = redis.call('HMGET', KEYS[10], 'created', 'kyc', 'country', 'tz')
for i = 1, 4 do out[#out + 1] = str(p[i]) end
local total = 0
for _, c in ipairs(redis.call('HVALS', KEYS[4])) do total = total + tonumber(c) end
out[#out + 1] = total
-- One string, fields split by NUL (no field can hold one: numbers, our own members, and
-- profile values from PostgreSQL text): a 32-element array reply costs the client ~0.1 ms of
-- parsing, a single bulk string almost nothing. Integers as %d, exact like an integer reply.
for i = 1, #out do
  if type(out[i]) == 'number' then out[i] = string.format('%d', out[i]) end
end
return table.concat(out, '\0')
"""

# A completed payment/transfer joins the user's history once: its id goes into the user's set
# of counted ones (kept for `DONE_TTL_MS`, far longer than any redelivery) in the same script
# as the counts. KEYS: 1 counted ids, 2 history, 3 hours, 4 countries, 5 devices, 6 recipients;
# ARGV: 1 amount, 2 currency, 3 UTC hour, 4 country, 5 device, 6 time ms, 7 recipient,
# 8 counted ttl ms, 9 state ttl ms, 10 the payment/transfer id.
_COMPLETE_LUA = """
local at = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (at - tonumber(ARGV[8])))
if redis.call('ZADD', KEYS[1], 'NX', at, ARGV[10]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
local amt, cur = tonumber(ARGV[1]), ARGV[2]
redis.call('HINCRBY', KEYS[2], cur .. ':n', 1)
redis.call('HINCRBY', KEYS[2], cur .. ':sum', amt)
redis.call('HINCRBYFLOAT', KEYS[2], cur .. ':sumsq', string.format('%.17g', amt * amt))
local m = tonumber(redis.call('HGET', KEYS[2], cur .. ':max') or '0')
if amt > m then redis.call('HSET', KEYS[2], cur .. ':max', amt) end
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
if ARGV[4] ~= '' then redis.call('SADD', KEYS[4], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[5], ARGV[5], ARGV[6]) end
if ARGV[7] ~= '' then redis.call('SADD', KEYS[6], ARGV[7]) end
for i = 2, 6 do redis.call('PEXPIRE', KEYS[i], ARGV[9]) end
return 1
"""


class Keys:
    """The Redis key of each piece of fraud state."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}fraud:"

    def user(self, user_id: str, what: str) -> str:
        return f"{self.base}{{{user_id}}}:{what}"

    def entity(self, kind: str, value: str | None, what: str) -> str:
        # An absent entity gets a placeholder key that the script never touches.
        return f"{self.base}{kind}:{value or '-'}:{what}"

    def subject(self, subject_id: str) -> str:
        return f"{self.base}subj:{subject_id}"

    def done(self, user_id: str) -> str:
        return self.user(user_id, "done")


def _int(v: Any) -> int:
    return int(v) if v not in (None, b"", "") else 0


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode()
    return "" if v is None else str(v)


def _opt_float(v: Any) -> float | None:
    s = _text(v)
    return float(s) if s else None


def _raw_from_reply(reply: bytes | str) -> tuple[RawState, bool]:
    """The snapshot script's answer (its fields split by NUL); also whether the profile copy
    was missing."""
    v: Sequence[Any] = reply.split(b"\0") if isinstance(reply, bytes) else reply.split("\0")
    if len(v) != 32:
        raise ValueError(f"the snapshot script answered {len(v)} fields, not 32")
    created, kyc, country, tz = (_text(x) for x in v[27:31])
    profile = (
        Profile(_from_ms(float(created)), int(kyc or 0), country, tz or "UTC") if created else None
    )
    prev_at = _opt_float(v[23])
    first_seen = _opt_float(v[25])
    raw = RawState(
        user_count_1m=_int(v[0]),
        user_count_1h=_int(v[1]),
        user_count_24h=_int(v[2]),
        user_sum_1h=_int(v[3]),
        user_sum_24h=_int(v[4]),
        user_declines_24h=_int(v[5]),
        device_count_1h=_int(v[6]),
        device_users_24h=_int(v[7]),
        card_count_1m=_int(v[8]),
        card_count_1h=_int(v[9]),
        card_declines_1h=_int(v[10]),
        ip_count_1h=_int(v[11]),
        ip_users_24h=_int(v[12]),
        recipient_count_24h=_int(v[13]),
        recipient_senders_24h=_int(v[14]),
        user_recipients_24h=_int(v[15]),
        hist_n=_int(v[16]),
        hist_sum=float(_text(v[17]) or 0),
        hist_sumsq=float(_text(v[18]) or 0),
        hist_max=_int(v[19]),
        hours_near=_int(v[20]),
        hours_total=_int(v[31]),
        prev_lat=_opt_float(v[21]),
        prev_lon=_opt_float(v[22]),
        prev_at=_from_ms(prev_at) if prev_at is not None else None,
        country_seen=bool(_int(v[24])),
        device_first_seen=_from_ms(first_seen) if first_seen is not None else None,
        recipient_seen=bool(_int(v[26])),
        profile=profile,
    )
    return raw, profile is None


class RedisFeatures:
    """The live `FeatureSource`: one Lua script call per check (see the module docstring).
    Redis errors and a reply slower than `budget_ms` raise `FeaturesUnavailable`."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "bf:",
        budget_ms: float = 50,
        profile_ttl_seconds: int = PROFILE_TTL_SECONDS,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.budget = budget_ms / 1000
        self.profile_ttl_ms = profile_ttl_seconds * 1000
        self._snapshot = redis.register_script(_SNAPSHOT_LUA)
        self._complete = redis.register_script(_COMPLETE_LUA)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> RedisFeatures:
        """The live features with the settings' key prefix and check budget."""
        return cls(redis, prefix=settings.redis_prefix, budget_ms=settings.fraud_check_budget_ms)

    def _script_call(self, subject: RiskSubject, *, read: bool) -> tuple[list[str], list[Any]]:
        k = self.keys
        user = subject.user_id
        card = card_key(subject) or ""
        rcpt = recipient_key(subject) or ""
        device, ip = subject.device_id or "", subject.ip or ""
        keys = [
            k.user(user, "att"),
            k.user(user, "dec"),
            k.user(user, "hist"),
            k.user(user, "hours"),
            k.user(user, "countries"),
            k.user(user, "devices"),
            k.user(user, "rcpts"),
            k.user(user, "rcpts24"),
            k.user(user, "loc"),
            k.user(user, "profile"),
            k.entity("dev", device, "att"),
            k.entity("dev", device, "users"),
            k.entity("card", card, "att"),
            k.entity("card", card, "dec"),
            k.entity("ip", ip, "att"),
            k.entity("ip", ip, "users"),
            k.entity("rcpt", rcpt, "att"),
            k.entity("rcpt", rcpt, "senders"),
            k.subject(subject.subject_id),
        ]
        located = subject.latitude is not None and subject.longitude is not None
        args: list[Any] = [
            _ms(subject.at),
            subject.subject_id,
            user,
            subject.amount,
            subject.currency,
            device,
            card,
            ip,
            rcpt,
            _coord(subject.latitude) if located and subject.latitude is not None else "",
            _coord(subject.longitude) if located and subject.longitude is not None else "",
            (subject.merchant_country or "").upper() if subject.kind == "payment" else "",
            subject.at.astimezone(UTC).hour,
            WINDOW_TTL_MS,
            STATE_TTL_MS,
            SUBJECT_TTL_MS,
            LOCATION_TTL_MS,
            "1" if read else "0",
        ]
        return keys, args

    async def snapshot(
        self, conn: AsyncConnection, subject: RiskSubject
    ) -> dict[str, FeatureValue]:
        """Record `subject` in its windows and return every feature (see `FeatureSource`)."""
        keys, args = self._script_call(subject, read=True)
        try:
            async with asyncio.timeout(self.budget):
                reply = await self._snapshot(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise FeaturesUnavailable(f"redis: {type(exc).__name__}") from exc
        try:
            raw, missing = _raw_from_reply(reply)
        except (ValueError, IndexError, TypeError) as exc:
            # State that does not parse (a key of another shape): the fallback knows better.
            raise FeaturesUnavailable(f"redis state: {type(exc).__name__}") from exc
        device = subject.device_id
        if missing or (device and raw.device_first_seen is None):
            raw = await self._fill_from_postgres(conn, subject, raw, missing)
        return features_from(subject, raw)

    async def _fill_from_postgres(
        self, conn: AsyncConnection, subject: RiskSubject, raw: RawState, missing: bool
    ) -> RawState:
        """The profile copy expired or the device is not known to Redis: ask PostgreSQL and keep
        the answer (best effort: a failed write only means asking again next time)."""
        profile, enrolled = await store.profile(conn, subject.user_id, subject.device_id)
        first_seen = raw.device_first_seen or enrolled
        k = self.keys
        try:
            async with asyncio.timeout(self.budget):
                pipe = self.redis.pipeline(transaction=False)
                if missing and profile is not None:
                    key = k.user(subject.user_id, "profile")
                    pipe.hset(
                        key,
                        mapping={
                            "created": _ms(profile.created_at),
                            "kyc": profile.kyc_tier,
                            "country": profile.country,
                            "tz": profile.timezone,
                        },
                    )
                    pipe.pexpire(key, self.profile_ttl_ms)
                if enrolled is not None and raw.device_first_seen is None and subject.device_id:
                    key = k.user(subject.user_id, "devices")
                    pipe.hsetnx(key, subject.device_id, _ms(enrolled))
                    pipe.pexpire(key, STATE_TTL_MS)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("fraud profile cache write failed", error=type(exc).__name__)
        return replace(
            raw, profile=profile if missing else raw.profile, device_first_seen=first_seen
        )

    async def record(self, subject: RiskSubject) -> None:
        """Record `subject` in its windows without reading anything (the rebuild's path)."""
        keys, args = self._script_call(subject, read=False)
        await self._snapshot(keys=keys, args=args)

    # --- Outcomes (event consumers; each call is idempotent on its own). ------------------

    async def completed(
        self,
        *,
        user_id: str,
        subject_id: str,
        amount: int,
        currency: str,
        at: datetime,
        country: str | None = None,
        device_id: str | None = None,
        recipient: str | None = None,
        client: Any = None,
    ) -> bool:
        """A payment/transfer succeeded: it joins the user's history, habits and seen
        countries/devices/recipients — once (False when it had already)."""
        k = self.keys
        keys = [
            k.done(user_id),
            k.user(user_id, "hist"),
            k.user(user_id, "hours"),
            k.user(user_id, "countries"),
            k.user(user_id, "devices"),
            k.user(user_id, "rcpts"),
        ]
        args: list[Any] = [
            amount,
            currency,
            at.astimezone(UTC).hour,
            (country or "").upper(),
            device_id or "",
            _ms(at),
            recipient or "",
            DONE_TTL_MS,
            STATE_TTL_MS,
            subject_id,
        ]
        result = await self._complete(keys=keys, args=args, client=client)
        return bool(result)

    async def declined(
        self, *, user_id: str, subject_id: str, at: datetime, card: str | None = None
    ) -> None:
        """A payment was declined or a transfer refused: it counts in the user's (and the
        card's) decline windows, once. Without `card`, the card the check recorded for
        `subject_id` is used."""
        k = self.keys
        if card is None:
            found = await self.redis.hget(k.subject(subject_id), "card")  # type: ignore[misc]
            card = _text(found) or None
        score = _ms(at)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(k.user(user_id, "dec"), {subject_id: score}, nx=True)
        pipe.pexpire(k.user(user_id, "dec"), WINDOW_TTL_MS)
        if card:
            pipe.zadd(k.entity("card", card, "dec"), {subject_id: score}, nx=True)
            pipe.pexpire(k.entity("card", card, "dec"), WINDOW_TTL_MS)
        await pipe.execute()

    async def record_decision(self, subject: RiskSubject, action: str) -> None:
        """A check blocked `subject`: count it as a decline now (a blocked transfer leaves no
        row and no event behind). Idempotent; other actions are not outcomes yet."""
        if action == "block":
            await self.declined(
                user_id=subject.user_id,
                subject_id=subject.subject_id,
                at=subject.at,
                card=card_key(subject) or "",
            )

    async def device_seen(self, user_id: str, device_id: str, at: datetime) -> None:
        """The user enrolled `device_id` at `at` (the first time wins)."""
        key = self.keys.user(user_id, "devices")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(key, device_id, _ms(at))
        pipe.pexpire(key, STATE_TTL_MS)
        await pipe.execute()

    async def forget_profile(self, user_id: str) -> None:
        """The user's profile changed: the next check reads it from PostgreSQL again."""
        await self.redis.delete(self.keys.user(user_id, "profile"))

    async def subject_info(self, subject_id: str) -> dict[str, str]:
        """What the check recorded about `subject_id` (user, card, rcpt, at), if still kept."""
        found = await self.redis.hgetall(self.keys.subject(subject_id))  # type: ignore[misc]
        return {_text(key): _text(value) for key, value in found.items()}


# --- PostgreSQL (the fallback) -------------------------------------------------------------


class PostgresFeatures:
    """The fallback `FeatureSource`: the same names from PostgreSQL in one statement, with
    `degraded` = True. It records nothing (the attempt has no row yet: it is added to the
    counts here, as the live windows include it). IP windows and device sharing are not kept in
    PostgreSQL: they count this attempt alone."""

    async def snapshot(
        self, conn: AsyncConnection, subject: RiskSubject
    ) -> dict[str, FeatureValue]:
        """Every feature of `subject`, derived with SQL on `conn`."""
        profile, enrolled = await store.profile(conn, subject.user_id, subject.device_id)
        card = card_key(subject)
        rcpt = recipient_key(subject)
        is_payment = subject.kind == "payment"
        row = await store.fallback_row(
            conn,
            {
                "user": subject.user_id,
                "sid": subject.subject_id,
                "at": subject.at,
                "currency": subject.currency,
                "device": subject.device_id or "",
                # PostgreSQL knows payments by their payment method, not the card fingerprint.
                "pm": subject.payment_method_id or "",
                "rcpt": rcpt or "",
                "country": (subject.merchant_country or "").upper() if is_payment else "",
                "hour": subject.at.astimezone(UTC).hour,
            },
        )
        same_currency = subject.amount
        device = subject.device_id
        firsts = [t for t in (enrolled, row.device_used_at) if t is not None]
        raw = RawState(
            user_count_1m=row.user_count_1m + 1,
            user_count_1h=row.user_count_1h + 1,
            user_count_24h=row.user_count_24h + 1,
            user_sum_1h=int(row.user_sum_1h) + same_currency,
            user_sum_24h=int(row.user_sum_24h) + same_currency,
            user_declines_24h=row.user_declines_24h,
            device_count_1h=row.device_count_1h + 1 if device else 0,
            device_users_24h=1 if device else 0,
            card_count_1m=row.card_count_1m + 1 if card else 0,
            card_count_1h=row.card_count_1h + 1 if card else 0,
            card_declines_1h=row.card_declines_1h if card else 0,
            ip_count_1h=1 if subject.ip else 0,
            ip_users_24h=1 if subject.ip else 0,
            recipient_count_24h=row.recipient_count_24h + 1 if rcpt else 0,
            recipient_senders_24h=row.recipient_other_senders_24h + 1 if rcpt else 0,
            user_recipients_24h=row.user_other_recipients_24h + (1 if rcpt else 0),
            hist_n=row.hist_n,
            hist_sum=float(row.hist_sum),
            hist_sumsq=float(row.hist_sumsq),
            hist_max=int(row.hist_max),
            hours_near=row.hours_near,
            hours_total=row.hours_total,
            prev_lat=row.prev_lat,
            prev_lon=row.prev_lon,
            prev_at=row.prev_at,
            country_seen=bool(row.country_seen),
            device_first_seen=min(firsts) if firsts else None,
            recipient_seen=bool(row.recipient_seen),
            profile=profile,
        )
        return features_from(subject, raw, degraded=True)


# --- Event consumers -----------------------------------------------------------------------


def _event_time(event: dict[str, Any]) -> datetime:
    value = event.get("time")
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return datetime.now(UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def consumers(features: RedisFeatures) -> list[Consumer]:
    """The consumers that keep the live outcome state current (run by the worker). Their
    effects are idempotent in Redis, so a redelivered event (the inbox commits in PostgreSQL,
    after Redis was written) changes nothing."""

    async def payments(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        if event["type"] == PAYMENT_DECLINED:
            await features.declined(
                user_id=data["user_id"], subject_id=data["transaction_id"], at=_event_time(event)
            )
            return
        merchant = data.get("merchant") or {}
        await features.completed(
            user_id=data["user_id"],
            subject_id=data["transaction_id"],
            amount=int(data["amount"]),
            currency=data["currency"],
            at=_parse_time(data.get("created_at")) or _event_time(event),
            country=merchant.get("country"),
            device_id=data.get("device_id"),
        )

    async def transfers(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        if event["type"] == TRANSFER_FAILED:
            await features.declined(
                user_id=data["sender_id"], subject_id=data["transfer_id"], at=_event_time(event)
            )
            return
        # The check knew the recipient (a contact's key for a transfer to an e-mail/phone) and
        # when the attempt was made; the event may not.
        info = await features.subject_info(data["transfer_id"])
        at = _from_ms(float(info["at"])) if info.get("at") else _event_time(event)
        await features.completed(
            user_id=data["sender_id"],
            subject_id=data["transfer_id"],
            amount=int(data["amount"]),
            currency=data["currency"],
            at=at,
            recipient=info.get("rcpt") or data.get("recipient_id"),
        )

    async def users(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        if event["type"] == DEVICE_ENROLLED:
            await features.device_seen(data["user_id"], data["device_id"], _event_time(event))
        else:
            await features.forget_profile(data["user_id"])

    async def decisions(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        subject_id, user_id = data.get("subject_id"), data.get("user_id")
        if data.get("action") == "block" and subject_id and user_id:
            await features.declined(user_id=user_id, subject_id=subject_id, at=_event_time(event))

    return [
        Consumer("fraud-features-payments", PAYMENT_COMPLETED | {PAYMENT_DECLINED}, payments),
        Consumer("fraud-features-transfers", TRANSFER_COMPLETED | {TRANSFER_FAILED}, transfers),
        Consumer("fraud-features-users", PROFILE_CHANGED | {DEVICE_ENROLLED}, users),
        Consumer("fraud-features-decisions", frozenset({DECISION_MADE}), decisions),
    ]


def feature_consumers(redis: Redis, settings: Settings) -> list[Consumer]:
    """`consumers` of the live features built from the process's Redis and settings."""
    return consumers(RedisFeatures.from_settings(redis, settings))


# --- Rebuild -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RebuildReport:
    deleted_keys: int
    completed: int
    attempts: int
    declines: int
    locations: int
    devices: int
    seconds: float

    def render(self) -> str:
        return (
            f"fraud features rebuilt in {self.seconds:.1f} s: {self.deleted_keys} keys removed; "
            f"{self.completed} completed payments/transfers, {self.attempts} attempts and "
            f"{self.declines} declines of the last 24 h, {self.locations} locations, "
            f"{self.devices} devices"
        )


async def _batched(
    rows: Any, size: int, apply: Callable[[Any, Any], Awaitable[Any]], redis: Redis
) -> int:
    """Apply `apply(pipe, row)` to every row, one pipeline per `size` rows."""
    n = 0
    pipe = redis.pipeline(transaction=False)
    async for row in rows:
        await apply(pipe, row)
        n += 1
        if n % size == 0:
            await pipe.execute()
            pipe = redis.pipeline(transaction=False)
    await pipe.execute()
    return n


async def rebuild(
    engine: AsyncEngine, features: RedisFeatures, *, now: datetime | None = None
) -> RebuildReport:
    """Recreate every piece of fraud state in Redis from PostgreSQL: the completed history
    (amount statistics, hours, countries, devices, recipients), the last 24 hours' attempts and
    declines, the newest locations and every enrolled device. What PostgreSQL never held (IP
    windows, the devices of transfers) starts empty; profile copies are read again on demand.
    Meant for a Redis that lost its state: it first removes whatever fraud state is there, so
    checks running meanwhile see partial windows until it finishes."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    since = now - timedelta(days=1)
    redis = features.redis
    deleted = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=f"{features.keys.base}*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += int(await redis.unlink(*batch))
            batch = []
    if batch:
        deleted += int(await redis.unlink(*batch))

    async with engine.connect() as conn:

        async def complete(pipe: Any, row: Any) -> None:
            await features.completed(
                user_id=row.user_id,
                subject_id=row.id,
                amount=int(row.amount),
                currency=row.currency,
                at=row.at,
                country=row.country,
                device_id=row.device,
                recipient=row.rcpt,
                client=pipe,
            )

        completed = await _batched(store.completed_history(conn), 500, complete, redis)

        async def location(pipe: Any, row: Any) -> None:
            key = features.keys.user(row.user_id, "loc")
            member = f"{row.id}|{_coord(row.latitude)}|{_coord(row.longitude)}"
            pipe.zadd(key, {member: _ms(row.at)}, nx=True)
            pipe.pexpire(key, LOCATION_TTL_MS)

        locations = await _batched(store.latest_locations(conn), 500, location, redis)

        async def attempt(pipe: Any, row: Any) -> None:
            subject = RiskSubject(
                kind=row.kind,
                subject_id=row.id,
                user_id=row.user_id,
                amount=int(row.amount),
                currency=row.currency,
                at=row.at,
                device_id=row.device,
                card_fingerprint=row.card,
                latitude=row.latitude,
                longitude=row.longitude,
                recipient_key=row.rcpt,
            )
            keys, args = features._script_call(subject, read=False)
            await features._snapshot(keys=keys, args=args, client=pipe)

        attempts = await _batched(store.recent_attempts(conn, since), 500, attempt, redis)

        async def decline(pipe: Any, row: Any) -> None:
            k = features.keys
            pipe.zadd(k.user(row.user_id, "dec"), {row.id: _ms(row.at)}, nx=True)
            pipe.pexpire(k.user(row.user_id, "dec"), WINDOW_TTL_MS)
            if row.card:
                pipe.zadd(k.entity("card", row.card, "dec"), {row.id: _ms(row.at)}, nx=True)
                pipe.pexpire(k.entity("card", row.card, "dec"), WINDOW_TTL_MS)

        declines = await _batched(store.recent_declines(conn, since), 500, decline, redis)

        async def device(pipe: Any, row: Any) -> None:
            key = features.keys.user(row.user_id, "devices")
            pipe.hset(key, row.device, _ms(row.first_seen))
            pipe.pexpire(key, STATE_TTL_MS)

        devices = await _batched(store.device_first_seen(conn), 500, device, redis)

    return RebuildReport(
        deleted_keys=deleted,
        completed=completed,
        attempts=attempts,
        declines=declines,
        locations=locations,
        devices=devices,
        seconds=time.perf_counter() - started,
    )
