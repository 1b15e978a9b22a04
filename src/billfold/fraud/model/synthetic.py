"""A seeded, reproducible world of wallet users to train and evaluate the fraud model on.

Users live in real cities with their own habits (hours, merchant categories, amounts, devices,
friends); some register during the window, some travel, change phones, split bills with new
friends or have a payment declined: the legitimate noise a model must not flag. Injected into
that world are the fraud patterns the service must catch: account takeover, card testing,
mule fan-out and fan-in, impossible travel (a cloned card far away) and high-value bursts.

Every attempt is then replayed in time order through `FeatureState`, which computes the
`FEATURES` catalogue with the meaning the live feature store gives it (sliding windows that
include the attempt itself, declines learned after the fact, history from completed attempts
only), so a row here and a live snapshot are the same kind of thing.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from billfold.fraud.models import FeatureValue, mcc_risk

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
EARTH_RADIUS_KM = 6371.0088
# How long after an attempt its outcome (decline, completion) reaches the features, seconds.
OUTCOME_LAG = (0.5, 8.0)
# Below this the implied speed is not meaningful (two taps in the same shop a second apart).
MIN_TRAVEL_HOURS = 1 / 60

PATTERNS = (
    "legit",
    "account_takeover",
    "card_testing",
    "mule_fan_out",
    "mule_fan_in",
    "impossible_travel",
    "high_value_burst",
)


@dataclass(frozen=True, slots=True)
class City:
    name: str
    country: str
    lat: float
    lon: float
    tz: int  # hours from UTC (standard time is close enough for habits)


CITIES: tuple[City, ...] = (
    City("New York", "US", 40.7128, -74.0060, -5),
    City("San Francisco", "US", 37.7749, -122.4194, -8),
    City("Chicago", "US", 41.8781, -87.6298, -6),
    City("Austin", "US", 30.2672, -97.7431, -6),
    City("Seattle", "US", 47.6062, -122.3321, -8),
    City("Miami", "US", 25.7617, -80.1918, -5),
    City("Toronto", "CA", 43.6532, -79.3832, -5),
    City("Mexico City", "MX", 19.4326, -99.1332, -6),
    City("London", "GB", 51.5074, -0.1278, 0),
    City("Manchester", "GB", 53.4808, -2.2426, 0),
    City("Dublin", "IE", 53.3498, -6.2603, 0),
    City("Paris", "FR", 48.8566, 2.3522, 1),
    City("Berlin", "DE", 52.5200, 13.4050, 1),
    City("Madrid", "ES", 40.4168, -3.7038, 1),
    City("Amsterdam", "NL", 52.3676, 4.9041, 1),
    City("Warsaw", "PL", 52.2297, 21.0122, 1),
    City("Lagos", "NG", 6.5244, 3.3792, 1),
    City("Nairobi", "KE", -1.2921, 36.8219, 3),
    City("Dubai", "AE", 25.2048, 55.2708, 4),
    City("Mumbai", "IN", 19.0760, 72.8777, 5),
    City("Singapore", "SG", 1.3521, 103.8198, 8),
    City("Hong Kong", "HK", 22.3193, 114.1694, 8),
    City("Tokyo", "JP", 35.6762, 139.6503, 9),
    City("Sydney", "AU", -33.8688, 151.2093, 10),
    City("Sao Paulo", "BR", -23.5505, -46.6333, -3),
)
# Most users live in a few home markets; the rest of the world is where they travel to.
HOME_CITIES = CITIES[:16]
HOME_WEIGHTS = (14, 8, 6, 4, 4, 4, 4, 2, 12, 4, 3, 6, 6, 4, 3, 2)
# Where attackers pay from when they are not where the victim is.
ATTACK_CITIES = ("Lagos", "Warsaw", "Sao Paulo", "Hong Kong", "Mumbai", "Dubai", "Mexico City")


@dataclass(frozen=True, slots=True)
class Category:
    mcc: str
    median: int  # a typical amount in minor units
    spread: float  # lognormal sigma
    online: bool  # usually card-not-present / in-app


EVERYDAY: tuple[Category, ...] = (
    Category("5411", 4500, 0.6, False),  # groceries
    Category("5812", 3500, 0.5, False),  # restaurants
    Category("5814", 900, 0.4, False),  # fast food, coffee
    Category("5541", 5000, 0.3, False),  # fuel
    Category("4111", 300, 0.4, False),  # transit
    Category("4121", 1800, 0.5, False),  # taxis, ride hailing
    Category("5912", 2000, 0.6, False),  # pharmacy
    Category("5311", 6000, 0.7, False),  # department store
    Category("5651", 7000, 0.6, False),  # clothing
    Category("5942", 2500, 0.5, False),  # books
    Category("7832", 2400, 0.3, False),  # cinema
    Category("4900", 9000, 0.4, True),  # utilities
    Category("4814", 4500, 0.3, True),  # telecoms
    Category("5815", 299, 0.9, True),  # digital media: app stores, tiny amounts are normal
    Category("5818", 999, 0.6, True),  # streaming, games
    Category("5999", 3500, 0.8, True),  # online retail
    Category("5732", 15000, 0.9, True),  # electronics
    Category("5944", 20000, 0.8, False),  # jewelry
    Category("7995", 3000, 0.8, True),  # betting (some people bet, legitimately)
    Category("4511", 35000, 0.5, True),  # airlines
    Category("7011", 25000, 0.5, False),  # hotels
)
BY_MCC = {c.mcc: c for c in EVERYDAY}
# What fraudsters buy: resellable goods, quasi-cash, gift cards, wires.
CASH_OUT_MCCS = ("5732", "5944", "6051", "4829", "5947", "7995", "6540")
CARD_TESTING_MCCS = ("5815", "5818", "5999", "5947", "8398")
FOREIGN_ECOMMERCE = ("US", "GB", "IE", "CN", "NL", "HK")


@dataclass(slots=True)
class Attempt:
    """One payment or transfer attempt in the simulated world."""

    at: float  # epoch seconds, UTC
    user: str
    kind: str  # payment | transfer
    amount: int
    channel: str  # contactless | in_app | e_commerce | p2p
    device: str | None
    ip: str | None
    mcc: str = ""
    merchant_country: str = ""
    lat: float | None = None
    lon: float | None = None
    card: str | None = None
    recipient: str | None = None
    declined: bool = False  # the network (or the bank) said no; learnt after the check
    label: int = 0
    pattern: str = "legit"


@dataclass(slots=True)
class Profile:
    uid: str
    city: City
    registered: float
    kyc_tier: int
    devices: list[str]
    ips: list[str]
    cards: list[str]
    friends: list[str]
    categories: list[tuple[Category, float]]  # and the user's weight for each
    scale: float  # spends more or less than the median
    peaks: tuple[float, float]  # local hours of the day they are most active
    rate: float  # attempts per day
    p2p_share: float
    web_share: float = 0.0  # attempts from the web portal or an API client: no device
    country: str = ""  # the profile's country; an expat's differs from where they live

    @property
    def home_country(self) -> str:
        return self.country or self.city.country


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows in time order with their labels and the pattern that produced each."""

    rows: list[dict[str, FeatureValue]]
    labels: list[int]
    patterns: list[str]
    users: list[str]
    times: list[float]

    def __len__(self) -> int:
        return len(self.rows)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


class _Window:
    """Timestamps (and amounts) of one key, pruned to the longest window asked."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()

    def add(self, at: float, amount: int = 0) -> None:
        self.events.append((at, amount))

    def stats(self, now: float, span: float) -> tuple[int, int]:
        events = self.events
        while events and events[0][0] <= now - DAY:
            events.popleft()
        count = total = 0
        for at, amount in reversed(events):
            if at <= now - span:
                break
            count += 1
            total += amount
        return count, total


class _Distinct:
    """Members of one key with the last time each was seen (a distinct count per window)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def add(self, member: str, at: float) -> None:
        self.seen[member] = at

    def count(self, now: float, span: float = DAY) -> int:
        return sum(1 for at in self.seen.values() if at > now - span)


@dataclass(slots=True)
class _History:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # Welford's running sum of squared deviations
    max: int = 0
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    last: tuple[float, float, float] | None = None  # lat, lon, at
    countries: set[str] = field(default_factory=set)
    recipients: set[str] = field(default_factory=set)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0


class FeatureState:
    """The features of the catalogue, computed from attempts replayed in time order.

    `snapshot` is what a live check sees (it records the attempt in the velocity windows first,
    so a burst counts itself); `outcome` is what the event consumers learn afterwards (a decline,
    or a completed payment/transfer that joins the user's history)."""

    def __init__(
        self, profiles: dict[str, Profile], enrolled: dict[tuple[str, str], float] | None = None
    ) -> None:
        self.profiles = profiles
        # When each (user, device) was enrolled: live, a device is known from its enrolment
        # event on (a login), so an attacker's phone is not "new" but only minutes old.
        self.enrolled = enrolled or {}
        self.windows: defaultdict[tuple[str, str], _Window] = defaultdict(_Window)
        self.distinct: defaultdict[tuple[str, str], _Distinct] = defaultdict(_Distinct)
        self.history: defaultdict[str, _History] = defaultdict(_History)

    def _window(self, kind: str, key: str | None, now: float, span: float) -> tuple[int, int]:
        if key is None:
            return 0, 0
        return self.windows[(kind, key)].stats(now, span)

    def snapshot(self, a: Attempt) -> dict[str, FeatureValue]:
        now, profile, hist = a.at, self.profiles[a.user], self.history[a.user]
        # Record the attempt first: the windows include the attempt being checked.
        self.windows[("user", a.user)].add(now, a.amount)
        if a.device:
            self.windows[("device", a.device)].add(now)
            self.distinct[("device_users", a.device)].add(a.user, now)
        if a.card:
            self.windows[("card", a.card)].add(now)
        if a.ip:
            self.windows[("ip", a.ip)].add(now)
            self.distinct[("ip_users", a.ip)].add(a.user, now)
        if a.recipient:
            self.windows[("recipient", a.recipient)].add(now)
            self.distinct[("recipient_senders", a.recipient)].add(a.user, now)
            self.distinct[("user_recipients", a.user)].add(a.recipient, now)

        user_1m = self._window("user", a.user, now, MINUTE)[0]
        user_1h, user_sum_1h = self._window("user", a.user, now, HOUR)
        user_24h, user_sum_24h = self._window("user", a.user, now, DAY)
        is_payment = a.kind == "payment"

        mean, std = hist.mean, hist.std
        zscore = (a.amount - mean) / max(std, 1.0) if hist.count else 0.0
        to_max = a.amount / hist.max if hist.max else 1.0

        has_location = a.lat is not None and a.lon is not None
        km = speed = 0.0
        if has_location and hist.last is not None:
            lat, lon, at = hist.last
            km = haversine_km(lat, lon, a.lat, a.lon)  # type: ignore[arg-type]
            speed = km / max((now - at) / HOUR, MIN_TRAVEL_HOURS)

        local_hour = int(((now / HOUR) + profile.city.tz) % 24)
        near = sum(hist.hours[(local_hour + d) % 24] for d in (-1, 0, 1))
        first_seen = self.enrolled.get((a.user, a.device)) if a.device else None
        if first_seen is not None and first_seen > now:
            first_seen = None

        return {
            "kind": a.kind,
            "is_payment": is_payment,
            "amount": a.amount,
            "currency": "USD",
            "channel": a.channel,
            "is_ecommerce": a.channel == "e_commerce",
            "mcc": a.mcc,
            "mcc_risk": mcc_risk(a.mcc),
            "merchant_country": a.merchant_country,
            "user_count_1m": user_1m,
            "user_count_1h": user_1h,
            "user_count_24h": user_24h,
            "user_sum_1h": user_sum_1h,
            "user_sum_24h": user_sum_24h,
            "user_declines_24h": self._window("user_declines", a.user, now, DAY)[0],
            "device_count_1h": self._window("device", a.device, now, HOUR)[0],
            "device_users_24h": self.distinct[("device_users", a.device)].count(now)
            if a.device
            else 0,
            "card_count_1m": self._window("card", a.card, now, MINUTE)[0],
            "card_count_1h": self._window("card", a.card, now, HOUR)[0],
            "card_declines_1h": self._window("card_declines", a.card, now, HOUR)[0],
            "ip_count_1h": self._window("ip", a.ip, now, HOUR)[0],
            "ip_users_24h": self.distinct[("ip_users", a.ip)].count(now) if a.ip else 0,
            "recipient_count_24h": self._window("recipient", a.recipient, now, DAY)[0],
            "recipient_senders_24h": self.distinct[("recipient_senders", a.recipient)].count(now)
            if a.recipient
            else 0,
            "user_recipients_24h": self.distinct[("user_recipients", a.user)].count(now),
            "history_count": hist.count,
            "amount_mean": round(mean, 2),
            "amount_std": round(std, 2),
            "amount_zscore": round(zscore, 4),
            "amount_to_max": round(to_max, 4),
            "has_location": has_location,
            "km_from_last": round(km, 3),
            "speed_kmh": round(speed, 3),
            "country_mismatch": bool(
                is_payment and a.merchant_country and a.merchant_country != profile.home_country
            ),
            "new_country": bool(
                is_payment
                and a.merchant_country
                and a.merchant_country not in hist.countries
                and a.merchant_country != profile.home_country
            ),
            "new_device": first_seen is None,
            "device_age_hours": round((now - first_seen) / HOUR, 3) if first_seen else 0.0,
            "new_recipient": bool(a.recipient and a.recipient not in hist.recipients),
            "account_age_days": round(max(0.0, now - profile.registered) / DAY, 4),
            "kyc_tier": profile.kyc_tier,
            "hour_of_day": local_hour,
            "hour_habit_share": round(near / hist.count, 4) if hist.count else 0.0,
            "stepped_up": False,
            "degraded": False,
        }

    def outcome(self, a: Attempt) -> None:
        """What the event consumers learn after the attempt: a decline, or a completion."""
        if a.declined:
            self.windows[("user_declines", a.user)].add(a.at)
            if a.card:
                self.windows[("card_declines", a.card)].add(a.at)
            return
        hist = self.history[a.user]
        hist.count += 1
        delta = a.amount - hist.mean
        hist.mean += delta / hist.count
        hist.m2 += delta * (a.amount - hist.mean)
        hist.max = max(hist.max, a.amount)
        tz = self.profiles[a.user].city.tz
        hist.hours[int(((a.at / HOUR) + tz) % 24)] += 1
        if a.lat is not None and a.lon is not None:
            hist.last = (a.lat, a.lon, a.at)
        if a.kind == "payment" and a.merchant_country:
            hist.countries.add(a.merchant_country)
        if a.recipient:
            hist.recipients.add(a.recipient)


@dataclass(frozen=True, slots=True)
class WorldConfig:
    """The size and mix of the simulated world."""

    users: int = 2000
    days: int = 28
    seed: int = 7
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)
    new_user_share: float = 0.3  # register during the window (their first payments included)
    traveller_share: float = 0.15
    new_phone_share: float = 0.1
    decline_rate: float = 0.02
    expat_share: float = 0.12  # the profile's country is not where they live
    onboarding_share: float = 0.5  # of new users: a first session of several attempts
    micro_bursts_per_user: float = 0.08  # in-app purchase sprees
    # Fraud incidents per 1,000 users over the window, by pattern.
    account_takeovers: float = 12
    card_testers: float = 8
    mules_fan_out: float = 5
    mules_fan_in: float = 4
    impossible_travel: float = 10
    high_value_bursts: float = 8


class _World:
    def __init__(self, config: WorldConfig) -> None:
        self.c = config
        self.rng = random.Random(config.seed)
        self.t0 = config.start.timestamp()
        self.t1 = self.t0 + config.days * DAY
        self.profiles: dict[str, Profile] = {}
        self.attempts: list[Attempt] = []
        self.by_name = {c.name: c for c in CITIES}
        self.enrolled: dict[tuple[str, str], float] = {}
        self._ids = 0

    def enroll(self, user: str, device: str, at: float) -> None:
        """The user signs in on `device` at `at` (the first enrolment counts)."""
        self.enrolled.setdefault((user, device), at)

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:07d}"

    # The legitimate world.

    def make_profile(self, registered: float | None = None, city: City | None = None) -> Profile:
        r = self.rng
        if registered is None:
            registered = (
                r.uniform(self.t0, self.t1 - DAY)
                if r.random() < self.c.new_user_share
                else self.t0 - r.uniform(30, 1500) * DAY
            )
        city = city or r.choices(HOME_CITIES, weights=HOME_WEIGHTS)[0]
        picks = r.sample(EVERYDAY, k=r.randint(4, 9))
        categories = [(cat, r.uniform(0.3, 3.0)) for cat in picks]
        # Daily life: groceries and food for almost everyone.
        for mcc in ("5411", "5814"):
            if all(cat.mcc != mcc for cat, _ in categories):
                categories.append((BY_MCC[mcc], r.uniform(1.0, 3.0)))
        morning = r.uniform(7, 11)
        profile = Profile(
            uid=self.new_id("usr_"),
            city=city,
            registered=registered,
            kyc_tier=r.choices((0, 1, 2), weights=(2, 5, 3))[0],
            devices=[self.new_id("dev_") for _ in range(r.choice((1, 1, 1, 2)))],
            ips=[self.new_id("ip_") for _ in range(r.randint(1, 3))],
            cards=[self.new_id("card_") for _ in range(r.choice((1, 1, 2, 3)))],
            friends=[],
            categories=categories,
            scale=math.exp(r.gauss(0, 0.5)),
            peaks=(morning, r.uniform(max(morning + 4, 16), 22.5)),
            rate=max(0.3, r.lognormvariate(math.log(2.2), 0.5)),
            p2p_share=r.uniform(0.03, 0.25),
            web_share=r.uniform(0.05, 0.5) if r.random() < 0.4 else 0.0,
        )
        if r.random() < self.c.expat_share:
            # Registered with the passport's country, living (and paying) somewhere else.
            profile.country = r.choice(
                [c.country for c in HOME_CITIES if c.country != city.country]
            )
        self.profiles[profile.uid] = profile
        for device in profile.devices:
            self.enroll(profile.uid, device, registered)
        return profile

    def local_time(self, profile: Profile, day_start: float) -> float:
        r = self.rng
        hour = r.gauss(r.choice(profile.peaks), 1.6)
        if r.random() < 0.05:  # now and then, at any hour
            hour = r.uniform(0, 24)
        return day_start + (hour % 24 - profile.city.tz) * HOUR

    def amount(self, cat: Category, scale: float) -> int:
        return max(1, round(cat.median * scale * self.rng.lognormvariate(0, cat.spread)))

    def legit_life(self, p: Profile) -> None:
        r = self.rng
        start = max(self.t0, p.registered)
        device_switch = r.uniform(start, self.t1) if r.random() < self.c.new_phone_share else None
        new_device = self.new_id("dev_") if device_switch else None
        if device_switch and new_device:
            self.enroll(p.uid, new_device, device_switch - r.uniform(1 * MINUTE, 2 * HOUR))
        trip: tuple[float, float, City] | None = None
        flight = 0.0
        if r.random() < self.c.traveller_share:
            leave = r.uniform(start, self.t1 - 2 * DAY)
            away = r.choice([c for c in CITIES if c is not p.city])
            trip = (leave, leave + r.uniform(2, 7) * DAY, away)
            # Airliners fly ~800 km/h; with the airports on both ends nobody beats this.
            flight = (haversine_km(p.city.lat, p.city.lon, away.lat, away.lon) / 750 + 2) * HOUR
        mobile_ip = f"ip_carrier_{p.city.country}_{r.randint(0, 7)}"  # carrier NAT, shared
        weights = [w for _, w in p.categories]

        first = True
        day = math.floor((start - self.t0) / DAY)
        while self.t0 + day * DAY < self.t1:
            day_start = self.t0 + day * DAY
            n = _poisson(r, p.rate)
            if first and p.registered >= self.t0:
                n = max(n, 1)
            for _ in range(n):
                at = self.local_time(p, day_start)
                if first and p.registered >= self.t0:
                    # The newly registered pay within minutes or hours of signing up.
                    at = p.registered + r.uniform(30, 3 * HOUR)
                first = False
                if at < start or at >= self.t1:
                    continue
                device: str | None = p.devices[0] if r.random() < 0.9 else p.devices[-1]
                if device_switch and at >= device_switch:
                    device = new_device
                if r.random() < p.web_share:
                    device = None
                ip = r.choice(p.ips) if r.random() < 0.6 else mobile_ip
                city = p.city
                if trip and (trip[0] - flight <= at < trip[0] or trip[1] <= at < trip[1] + flight):
                    continue  # in the air
                if trip and trip[0] <= at < trip[1]:
                    city = trip[2]
                    ip = f"ip_roaming_{city.country}_{r.randint(0, 3)}"
                if r.random() < p.p2p_share:
                    self.legit_transfer(p, at, device, ip)
                else:
                    cat = r.choices([c for c, _ in p.categories], weights=weights)[0]
                    self.legit_payment(p, at, device, ip, cat, city)
            if trip and day_start <= trip[0] < day_start + DAY:
                # The flight out: paid at home, arriving hours later (never impossible travel).
                self.legit_payment(
                    p, trip[0] - flight - 2 * HOUR, p.devices[0], p.ips[0], BY_MCC["4511"]
                )
            day += 1

    def onboarding(self, p: Profile) -> None:
        """A new user's first session: trying the wallet out right after registering, a few
        payments (sometimes a token amount), a transfer to whoever invited them, now and then a
        card that is declined before the right one works."""
        r = self.rng
        at = p.registered + r.uniform(1, 30) * MINUTE
        device: str | None = p.devices[0] if r.random() < 0.6 else None  # else on the web
        ip = p.ips[0]
        weights = [w for _, w in p.categories]
        for _ in range(r.randint(2, 12)):
            at += r.uniform(5, 300)
            if r.random() < 0.25:
                self.legit_transfer(p, at, device, ip)
                continue
            cat = r.choices([c for c, _ in p.categories], weights=weights)[0]
            self.legit_payment(p, at, device, ip, cat, repeat=False)
            last = self.attempts[-1]
            if r.random() < 0.3:
                last.amount = r.choice((1, 10, 50, 100, r.randint(1, 500)))  # "does this work?"
            if r.random() < 0.1 and last.card is not None:
                last.declined = True  # a mistyped or empty card; then the right one
                at += r.uniform(10, 120)
                self.attempts.append(replace(last, at=at, card=r.choice(p.cards), declined=False))

    def micro_burst(self, p: Profile) -> None:
        """In-game and app-store purchases in a row: many small digital payments in minutes,
        the legitimate look-alike of card testing (one card, no declines, the user's phone)."""
        r = self.rng
        at = r.uniform(max(self.t0, p.registered), self.t1)
        card = r.choice(p.cards)
        for _ in range(r.randint(5, 25)):
            at += r.uniform(5, 60)
            self.attempts.append(
                Attempt(
                    at=at,
                    user=p.uid,
                    kind="payment",
                    amount=r.choice((99, 199, 299, 499, 999)),
                    channel="in_app",
                    device=p.devices[0],
                    ip=r.choice(p.ips),
                    mcc=r.choice(("5815", "5816", "5818")),
                    merchant_country=p.city.country if r.random() < 0.8 else "US",
                    card=card,
                )
            )

    def legit_payment(
        self,
        p: Profile,
        at: float,
        device: str | None,
        ip: str,
        cat: Category,
        city: City | None = None,
        *,
        repeat: bool = True,
    ) -> None:
        r = self.rng
        city = city or p.city
        online = cat.online or r.random() < 0.1
        channel = ("e_commerce" if r.random() < 0.7 else "in_app") if online else "contactless"
        lat = lon = None
        country = city.country
        if channel == "contactless" or (channel == "in_app" and r.random() < 0.5):
            lat = city.lat + r.gauss(0, 0.04)
            lon = city.lon + r.gauss(0, 0.04)
        elif channel == "e_commerce" and r.random() < 0.25:
            country = r.choice(FOREIGN_ECOMMERCE)
        card = r.choice(p.cards) if r.random() < 0.85 else None  # else the wallet balance
        amount = self.amount(cat, p.scale)
        self.attempts.append(
            Attempt(
                at=at,
                user=p.uid,
                kind="payment",
                amount=amount,
                channel=channel,
                device=device,
                ip=ip,
                mcc=cat.mcc,
                merchant_country=country,
                lat=lat,
                lon=lon,
                card=card,
                declined=card is not None and r.random() < self.c.decline_rate,
            )
        )
        if repeat and r.random() < 0.04:
            # A coffee run, a second round, a retry after a typo: a quick repeat.
            again = self.attempts[-1]
            self.attempts.append(
                replace(
                    again,
                    at=at + r.uniform(5, 90),
                    amount=self.amount(cat, p.scale),
                    declined=False,
                )
            )

    def legit_transfer(self, p: Profile, at: float, device: str | None, ip: str) -> None:
        r = self.rng
        if not p.friends or r.random() < 0.15:
            p.friends.append(
                r.choice(list(self.profiles)) if r.random() < 0.7 else self.new_id("usr_x")
            )
        splitting = r.random() < 0.05  # a bill split with several people at once
        recipients = (
            r.sample(p.friends, k=min(len(p.friends), r.randint(2, 4)))
            if splitting
            else [r.choice(p.friends)]
        )
        for i, recipient in enumerate(recipients):
            if recipient == p.uid:
                continue
            self.attempts.append(
                Attempt(
                    at=at + i * r.uniform(10, 60),
                    user=p.uid,
                    kind="transfer",
                    amount=max(100, round(r.lognormvariate(math.log(3000 * p.scale), 0.8))),
                    channel="p2p",
                    device=device,
                    ip=ip,
                    recipient=recipient,
                    declined=r.random() < self.c.decline_rate / 2,
                )
            )

    # The fraud.

    def victims(self, count: float, *, settled: bool = True) -> list[Profile]:
        pool = [p for p in self.profiles.values() if not settled or p.registered < self.t0]
        k = min(len(pool), _round_count(self.rng, count * self.c.users / 1000))
        return self.rng.sample(pool, k)

    def when(self, p: Profile) -> float:
        return self.rng.uniform(max(self.t0 + 2 * DAY, p.registered + DAY), self.t1 - HOUR)

    def fraud(self, a: Attempt, pattern: str) -> None:
        a.label, a.pattern = 1, pattern
        self.attempts.append(a)

    def account_takeover(self, victim: Profile) -> None:
        r = self.rng
        at = self.when(victim)
        ip = self.new_id("ip_atk")
        device: str | None = None  # a quarter use the stolen password on the web
        if r.random() >= 0.25:
            device = self.new_id("dev_atk")
            self.enroll(victim.uid, device, at - r.uniform(1, 20) * MINUTE)
        city = self.by_name[r.choice(ATTACK_CITIES)]
        base = max(2000, victim.scale * 8000)
        mules = [self.new_id("usr_mule") for _ in range(r.randint(1, 3))]
        for _ in range(r.randint(2, 6)):
            at += r.uniform(1, 25) * MINUTE
            if r.random() < 0.5:
                self.fraud(
                    Attempt(
                        at=at,
                        user=victim.uid,
                        kind="transfer",
                        amount=round(base * r.uniform(2, 12)),
                        channel="p2p",
                        device=device,
                        ip=ip,
                        recipient=r.choice(mules),
                    ),
                    "account_takeover",
                )
            else:
                in_person = r.random() < 0.2
                self.fraud(
                    Attempt(
                        at=at,
                        user=victim.uid,
                        kind="payment",
                        amount=round(base * r.uniform(1.5, 10)),
                        channel="contactless" if in_person else "e_commerce",
                        device=device,
                        ip=ip,
                        mcc=r.choice(CASH_OUT_MCCS),
                        merchant_country=city.country if r.random() < 0.7 else victim.city.country,
                        lat=city.lat if in_person else None,
                        lon=city.lon if in_person else None,
                        card=r.choice(victim.cards),
                        declined=r.random() < 0.2,
                    ),
                    "account_takeover",
                )

    def card_testing(self) -> None:
        r = self.rng
        at = r.uniform(self.t0 + DAY, self.t1 - HOUR)
        home = r.choice(HOME_CITIES)
        # Half the testers run a script against the API: no device at all.
        device = self.new_id("dev_ct") if r.random() < 0.5 else None
        ip = self.new_id("ip_ct")
        # A few fresh accounts on one device, each loaded with stolen cards.
        for _ in range(r.choice((1, 1, 2, 3))):
            tester = self.make_profile(registered=at - r.uniform(2, 120) * MINUTE, city=home)
            if device:
                self.enroll(tester.uid, device, tester.registered)
            tester.kyc_tier = r.choice((0, 0, 1))
            for card in [self.new_id("card_stolen") for _ in range(r.randint(1, 5))]:
                valid = r.random() < 0.3
                for _ in range(r.randint(3, 15)):
                    at += r.uniform(2, 40)
                    self.fraud(
                        Attempt(
                            at=at,
                            user=tester.uid,
                            kind="payment",
                            amount=r.randint(50, 300),
                            channel="e_commerce",
                            device=device,
                            ip=ip,
                            mcc=r.choice(CARD_TESTING_MCCS),
                            merchant_country=r.choice(FOREIGN_ECOMMERCE),
                            card=card,
                            declined=not valid or r.random() < 0.3,
                        ),
                        "card_testing",
                    )
                if valid and r.random() < 0.6:  # the card works: cash it out
                    at += r.uniform(1, 10) * MINUTE
                    self.fraud(
                        Attempt(
                            at=at,
                            user=tester.uid,
                            kind="payment",
                            amount=r.randint(20000, 150000),
                            channel="e_commerce",
                            device=device,
                            ip=ip,
                            mcc=r.choice(CASH_OUT_MCCS),
                            merchant_country=r.choice(FOREIGN_ECOMMERCE),
                            card=card,
                        ),
                        "card_testing",
                    )

    def mule_fan_out(self) -> None:
        r = self.rng
        at = r.uniform(self.t0 + DAY, self.t1 - 6 * HOUR)
        mule = self.make_profile(registered=at - r.uniform(0.2, 40) * DAY)
        mule.kyc_tier = r.choice((0, 1, 1, 2))
        device = mule.devices[0] if r.random() < 0.5 else self.new_id("dev_mule")
        self.enroll(mule.uid, device, at - r.uniform(1, 60) * MINUTE)
        ip = self.new_id("ip_mule")
        total = r.randint(100000, 1500000)
        recipients = [self.new_id("usr_out") for _ in range(r.randint(5, 25))]
        for recipient in recipients:
            at += r.uniform(0.5, 20) * MINUTE
            self.fraud(
                Attempt(
                    at=at,
                    user=mule.uid,
                    kind="transfer",
                    amount=max(1000, round(total / len(recipients) * r.uniform(0.6, 1.4))),
                    channel="p2p",
                    device=device,
                    ip=ip,
                    recipient=recipient,
                ),
                "mule_fan_out",
            )

    def mule_fan_in(self) -> None:
        r = self.rng
        mule = self.new_id("usr_mule")
        senders = self.victims(r.randint(5, 20) * 1000 / self.c.users, settled=False)
        start = r.uniform(self.t0 + DAY, self.t1 - DAY)
        for sender in senders:
            # Scam victims pay from their own phone: the signal is who receives, not who sends.
            self.fraud(
                Attempt(
                    at=start + r.uniform(0, 20) * HOUR,
                    user=sender.uid,
                    kind="transfer",
                    amount=round(max(5000, sender.scale * 3000) * r.uniform(3, 15)),
                    channel="p2p",
                    device=sender.devices[0],
                    ip=sender.ips[0],
                    recipient=mule,
                ),
                "mule_fan_in",
            )

    def impossible_travel(self, victim: Profile) -> None:
        r = self.rng
        at = self.when(victim)
        # The victim pays at home; minutes later the cloned card pays a world away.
        self.legit_payment(victim, at, victim.devices[0], victim.ips[0], BY_MCC["5814"])
        far = r.choice(
            [
                c
                for c in CITIES
                if haversine_km(c.lat, c.lon, victim.city.lat, victim.city.lon) > 1500
            ]
        )
        device = victim.devices[0] if r.random() < 0.4 else self.new_id("dev_clone")
        self.enroll(victim.uid, device, at + r.uniform(1, 5) * MINUTE)
        for _ in range(r.randint(1, 3)):
            at += r.uniform(5, 90) * MINUTE
            self.fraud(
                Attempt(
                    at=at,
                    user=victim.uid,
                    kind="payment",
                    amount=round(max(3000, victim.scale * 6000) * r.uniform(0.5, 6)),
                    channel="contactless",
                    device=device,
                    ip=self.new_id("ip_clone"),
                    mcc=r.choice(("5944", "5732", "5311", "5651", "6051")),
                    merchant_country=far.country,
                    lat=far.lat + r.gauss(0, 0.03),
                    lon=far.lon + r.gauss(0, 0.03),
                    card=r.choice(victim.cards),
                ),
                "impossible_travel",
            )

    def high_value_burst(self, victim: Profile) -> None:
        r = self.rng
        at = self.when(victim)
        hijacked = r.random() < 0.5  # a stolen session on the victim's own phone
        device = victim.devices[0] if hijacked else self.new_id("dev_hv")
        ip = victim.ips[0] if hijacked else self.new_id("ip_hv")
        self.enroll(victim.uid, device, at - r.uniform(1, 30) * MINUTE)
        for _ in range(r.randint(3, 7)):
            at += r.uniform(1, 12) * MINUTE
            mcc = r.choice(("5732", "5944", "5947", "5311", "6051"))
            self.fraud(
                Attempt(
                    at=at,
                    user=victim.uid,
                    kind="payment",
                    amount=round(max(5000, victim.scale * 10000) * r.uniform(2, 15)),
                    channel="e_commerce",
                    device=device,
                    ip=ip,
                    mcc=mcc,
                    merchant_country=victim.city.country if r.random() < 0.7 else "US",
                    card=r.choice(victim.cards),
                    declined=r.random() < 0.15,
                ),
                "high_value_burst",
            )

    def build(self) -> list[Attempt]:
        c = self.c
        for _ in range(c.users):
            self.make_profile()
        for p in list(self.profiles.values()):
            self.legit_life(p)
            if p.registered >= self.t0 and self.rng.random() < c.onboarding_share:
                self.onboarding(p)
            for _ in range(_round_count(self.rng, c.micro_bursts_per_user)):
                self.micro_burst(p)
        for victim in self.victims(c.account_takeovers):
            self.account_takeover(victim)
        for _ in range(_round_count(self.rng, c.card_testers * c.users / 1000)):
            self.card_testing()
        for _ in range(_round_count(self.rng, c.mules_fan_out * c.users / 1000)):
            self.mule_fan_out()
        for _ in range(_round_count(self.rng, c.mules_fan_in * c.users / 1000)):
            self.mule_fan_in()
        for victim in self.victims(c.impossible_travel):
            self.impossible_travel(victim)
        for victim in self.victims(c.high_value_bursts):
            self.high_value_burst(victim)
        self.attempts.sort(key=lambda a: a.at)
        return self.attempts


def _poisson(r: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small rates of a day's payments.
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= r.random()
        if p <= limit:
            return k
        k += 1


def _round_count(r: random.Random, expected: float) -> int:
    whole = math.floor(expected)
    return whole + (1 if r.random() < expected - whole else 0)


@dataclass(frozen=True, slots=True)
class World:
    """The simulated attempts in time order, the users who made them, and their devices."""

    attempts: list[Attempt]
    profiles: dict[str, Profile]
    enrolled: dict[tuple[str, str], float]


def simulate(config: WorldConfig) -> World:
    """Build the world of `config` (same config, same world)."""
    world = _World(config)
    events = world.build()
    return World(events, world.profiles, world.enrolled)


def replay(world: World, seed: int = 0) -> Iterator[dict[str, FeatureValue]]:
    """Each attempt's features as a live check would have seen them, in time order. Outcomes
    reach the feature store a little later (outbox relay, consumer), as they do live: a quick
    second attempt does not see the first one in the history yet."""
    state = FeatureState(world.profiles, world.enrolled)
    rng = random.Random(seed)
    pending: list[tuple[float, int, Attempt]] = []
    for seq, a in enumerate(world.attempts):
        while pending and pending[0][0] <= a.at:
            state.outcome(heapq.heappop(pending)[2])
        row = state.snapshot(a)
        heapq.heappush(pending, (a.at + rng.uniform(*OUTCOME_LAG), seq, a))
        yield row


def generate(config: WorldConfig | None = None) -> Dataset:
    """The labelled feature rows of a simulated world (same config, same rows)."""
    config = config or WorldConfig()
    world = simulate(config)
    events = world.attempts
    rows = list(replay(world, config.seed))
    return Dataset(
        rows=rows,
        labels=[a.label for a in events],
        patterns=[a.pattern for a in events],
        users=[a.user for a in events],
        times=[a.at for a in events],
    )
