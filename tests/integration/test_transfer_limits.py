"""Transfer limits over HTTP on real PostgreSQL: per transfer, per local day and month, by KYC
tier, with administrator overrides.

Tier 0 (a new user): 50.00 per transfer, 100.00 a day, 200.00 a month in USD, EUR, GBP, CHF,
CAD and AUD. A day and a month are the sender's own, in the time zone of their profile.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import SignedIn, fund, idem, set_kyc_tier, sign_up
from tests.integration.transfer_support import (
    Always,
    patch_me,
    risk,
    send,
    send_ok,
    snapshot,
    sql,
    usage,
)

PER_TRANSFER, DAILY, MONTHLY = 5_000, 10_000, 20_000
OFFERED = ["AUD", "CAD", "CHF", "EUR", "GBP", "USD"]


async def limits(client: httpx.AsyncClient, who: SignedIn, currency: str = "USD") -> Any:
    r = await client.get("/v1/transfers/limits", headers=who.headers)
    assert r.status_code == 200, r.text
    return next(c for c in r.json()["data"] if c["currency"] == currency)


async def exceeded(
    client: httpx.AsyncClient,
    app: Any,
    sender: SignedIn,
    recipient: SignedIn,
    amount: int,
    window: str,
    remaining: int,
    currency: str = "USD",
) -> None:
    """The transfer is refused with `limit_exceeded` naming the window, and changes nothing."""
    before = await snapshot(app, sender, recipient)
    r = await send(client, sender, amount, currency, user_id=recipient.user["id"])
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "limit_exceeded"
    assert (problem["limit"], problem["remaining"]) == (window, remaining), problem
    assert await snapshot(app, sender, recipient) == before


async def move_usage_back(app: Any, who: SignedIn, *, days: int = 0, months: int = 0) -> None:
    """Pretend the stored usage was counted `days`/`months` ago (the clock cannot be moved)."""
    await sql(
        app,
        "UPDATE p2p.transfer_limits SET"
        " usage_day = usage_day - make_interval(days => :d),"
        " usage_month = (usage_month - make_interval(months => :m))::date"
        " WHERE user_id = :u",
        d=days,
        m=months,
        u=who.user["id"],
    )


def local_midnight_after(zone: str, day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(), tzinfo=ZoneInfo(zone)).astimezone(UTC)


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


# --- the view --------------------------------------------------------------------------------------


async def test_a_new_user_sees_the_tier_0_limits(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    r = await client.get("/v1/transfers/limits", headers=alice.headers)
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["kyc_tier"] == 0 and view["timezone"] == "UTC"
    assert [c["currency"] for c in view["data"]] == OFFERED
    now = datetime.now(UTC)
    for c in view["data"]:
        assert c["per_transfer"] == PER_TRANSFER
        assert {k: c["daily"][k] for k in ("limit", "used", "remaining")} == {
            "limit": DAILY,
            "used": 0,
            "remaining": DAILY,
        }
        assert {k: c["monthly"][k] for k in ("limit", "used", "remaining")} == {
            "limit": MONTHLY,
            "used": 0,
            "remaining": MONTHLY,
        }
        assert parse(c["daily"]["resets_at"]) == local_midnight_after("UTC", now.date())
        first_of_next = (now.date().replace(day=1) + timedelta(days=32)).replace(day=1)
        assert parse(c["monthly"]["resets_at"]) == datetime.combine(first_of_next, time(), UTC)
    assert (await client.get("/v1/transfers/limits")).status_code == 401


async def test_usage_is_counted_per_currency(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    await fund(app, alice.user["id"], 10_000, "EUR")
    await send_ok(client, alice, 1_234, bob)
    await send_ok(client, alice, 99, bob, "EUR")
    usd, eur = await limits(client, alice), await limits(client, alice, "EUR")
    assert (usd["daily"]["used"], usd["daily"]["remaining"]) == (1_234, DAILY - 1_234)
    assert (usd["monthly"]["used"], usd["monthly"]["remaining"]) == (1_234, MONTHLY - 1_234)
    assert (eur["daily"]["used"], eur["monthly"]["used"]) == (99, 99)
    assert (await limits(client, alice, "GBP"))["daily"]["used"] == 0
    # Receiving uses nothing of the recipient's limits.
    assert (await limits(client, bob))["daily"]["used"] == 0


async def test_a_refused_transfer_uses_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    r = await send(client, alice, 1_000, user_id=bob.user["id"])
    assert r.json()["code"] == "insufficient_funds"
    assert await usage(app, alice) is None
    assert (await limits(client, alice))["daily"]["used"] == 0


# --- boundaries ------------------------------------------------------------------------------------


async def test_per_transfer_limit_boundary(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await exceeded(client, app, alice, bob, PER_TRANSFER + 1, "per_transfer", PER_TRANSFER)
    await send_ok(client, alice, PER_TRANSFER, bob)
    assert (await limits(client, alice))["daily"]["used"] == PER_TRANSFER


async def test_daily_limit_boundary(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await send_ok(client, alice, PER_TRANSFER - 1, bob)
    await exceeded(client, app, alice, bob, 2, "daily", 1)
    await send_ok(client, alice, 1, bob)  # exactly at the limit
    await exceeded(client, app, alice, bob, 1, "daily", 0)
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["daily"]["remaining"]) == (DAILY, 0)


async def test_monthly_limit_boundary(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    for _ in range(2):
        await send_ok(client, alice, PER_TRANSFER, bob)
        await send_ok(client, alice, PER_TRANSFER, bob)
        await move_usage_back(app, alice, days=1)  # "yesterday"
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["monthly"]["used"]) == (0, MONTHLY)
    assert view["monthly"]["remaining"] == 0
    await exceeded(client, app, alice, bob, 1, "monthly", 0)

    await move_usage_back(app, alice, months=1)
    await send_ok(client, alice, 1, bob)
    assert (await limits(client, alice))["monthly"]["used"] == 1


async def test_monthly_limit_counts_what_is_left(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await sql(
        app,
        "INSERT INTO p2p.transfer_limits (user_id, currency, used_today, usage_day,"
        " used_this_month, usage_month) VALUES (:u, 'USD', 0, current_date - 40, :m,"
        " date_trunc('month', now() AT TIME ZONE 'UTC')::date)",
        u=alice.user["id"],
        m=MONTHLY - 300,
    )
    await exceeded(client, app, alice, bob, 301, "monthly", 300)
    await send_ok(client, alice, 300, bob)


async def test_day_rollover_restarts_daily_usage(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await exceeded(client, app, alice, bob, 1, "daily", 0)
    await move_usage_back(app, alice, days=1)
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["daily"]["remaining"]) == (0, DAILY)
    assert view["monthly"]["used"] == DAILY  # the month goes on
    await send_ok(client, alice, 700, bob)
    row = await usage(app, alice)
    assert (row.used_today, row.used_this_month) == (700, DAILY + 700)
    assert row.usage_day == datetime.now(UTC).date()


async def test_month_rollover_restarts_both_windows(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await send_ok(client, alice, 4_000, bob)
    await move_usage_back(app, alice, days=31, months=1)
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["monthly"]["used"]) == (0, 0)
    await send_ok(client, alice, 1_000, bob)
    row = await usage(app, alice)
    assert (row.used_today, row.used_this_month) == (1_000, 1_000)
    assert row.usage_month == datetime.now(UTC).date().replace(day=1)


async def test_transfers_under_review_count_toward_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    with risk(app, Always("review")):
        r = await send(client, alice, PER_TRANSFER, user_id=bob.user["id"])
        assert r.status_code == 201 and r.json()["status"] == "pending"
    assert (await limits(client, alice))["daily"]["used"] == PER_TRANSFER


async def test_money_that_never_arrived_stops_counting(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    """Cancelled (escrow or review) and refused-on-review transfers give their amount back to
    today's and this month's usage; a completed transfer keeps counting."""
    from billfold import p2p
    from billfold.platform.db import unit_of_work

    async def made(amount: int, **recipient: str) -> dict[str, Any]:
        r = await send(client, alice, amount, **recipient)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    await fund(app, alice.user["id"], 100_000)
    await send_ok(client, alice, 1_000, bob)
    escrowed = await made(2_000, email="nobody-yet@example.org")
    with risk(app, Always("review")):
        held = await made(3_000, user_id=bob.user["id"])
        refused = await made(4_000, user_id=bob.user["id"])
    assert (await limits(client, alice))["daily"]["used"] == 10_000

    for transfer in (escrowed, held):
        r = await client.post(f"/v1/transfers/{transfer['id']}/cancel", headers=alice.headers)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    async with unit_of_work(app.state.resources.engine) as uow:
        await p2p.fail_pending(await uow.connection(), refused["id"], "fraud review")

    now = await limits(client, alice)
    assert (now["daily"]["used"], now["monthly"]["used"]) == (1_000, 1_000)
    # The windows are what they were counted in: a give-back for an older day touches nothing.
    await move_usage_back(app, alice, days=1)
    again = await made(500, email="nobody-yet@example.org")
    await move_usage_back(app, alice, days=1)
    r = await client.post(f"/v1/transfers/{again['id']}/cancel", headers=alice.headers)
    assert r.status_code == 200, r.text
    assert (await usage(app, alice)).used_today == 500  # the stored, older day keeps its 500


# --- the user's own day ----------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Pacific/Auckland", "America/Los_Angeles", "Asia/Kolkata"])
async def test_the_day_is_the_users_local_day(
    client: httpx.AsyncClient, app: Any, bob: SignedIn, zone: str
) -> None:
    alice = await sign_up(client, name="Alice Abroad")
    await patch_me(client, alice, timezone=zone)
    await fund(app, alice.user["id"], 10_000)
    before = datetime.now(ZoneInfo(zone)).date()
    await send_ok(client, alice, 100, bob)
    r = await client.get("/v1/transfers/limits", headers=alice.headers)
    after = datetime.now(ZoneInfo(zone)).date()
    view = r.json()
    assert view["timezone"] == zone
    usd = next(c for c in view["data"] if c["currency"] == "USD")
    # Stored under the user's local date, which resets at their next local midnight.
    row = await usage(app, alice)
    assert row.usage_day in (before, after)
    assert row.usage_month == row.usage_day.replace(day=1)
    resets = parse(usd["daily"]["resets_at"])
    assert resets == local_midnight_after(zone, after)
    local = resets.astimezone(ZoneInfo(zone))
    assert (local.hour, local.minute, local.second) == (0, 0, 0)
    assert timedelta(0) < resets - datetime.now(UTC) <= timedelta(hours=25)
    month_resets = parse(usd["monthly"]["resets_at"]).astimezone(ZoneInfo(zone))
    assert (month_resets.day, month_resets.hour, month_resets.minute) == (1, 0, 0)
    assert month_resets.date() == (after.replace(day=1) + timedelta(days=32)).replace(day=1)


async def test_auckland_and_los_angeles_reset_at_their_own_midnights(
    client: httpx.AsyncClient,
) -> None:
    kiwi = await sign_up(client, name="Kiri")
    angeleno = await sign_up(client, name="Angela")
    await patch_me(client, kiwi, timezone="Pacific/Auckland")
    await patch_me(client, angeleno, timezone="America/Los_Angeles")
    a = parse((await limits(client, kiwi))["daily"]["resets_at"])
    b = parse((await limits(client, angeleno))["daily"]["resets_at"])
    # 19 to 21 hours apart (daylight saving on either side), Auckland first.
    assert timedelta(hours=18) <= (b - a) % timedelta(days=1) <= timedelta(hours=22)
    assert a.astimezone(ZoneInfo("Pacific/Auckland")).time() == time()
    assert b.astimezone(ZoneInfo("America/Los_Angeles")).time() == time()


async def test_changing_time_zone_does_not_restart_the_day(
    client: httpx.AsyncClient, app: Any, bob: SignedIn
) -> None:
    # UTC+14 and UTC-11 are never on the same date: flipping between them must not be a way
    # to get a fresh daily limit over and over.
    alice = await sign_up(client, name="Alice Flip")
    await fund(app, alice.user["id"], 100_000)
    await patch_me(client, alice, timezone="Pacific/Kiritimati")
    await send_ok(client, alice, PER_TRANSFER, bob)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await exceeded(client, app, alice, bob, 1, "daily", 0)
    await patch_me(client, alice, timezone="Pacific/Pago_Pago")
    await exceeded(client, app, alice, bob, 1, "daily", 0)
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["daily"]["remaining"]) == (DAILY, 0)
    # The window ends when the day it was counted in has passed here too.
    kiritimati_day = datetime.now(ZoneInfo("Pacific/Kiritimati")).date()
    resets = parse(view["daily"]["resets_at"])
    assert resets == local_midnight_after("Pacific/Pago_Pago", kiritimati_day)
    await patch_me(client, alice, timezone="Pacific/Kiritimati")
    await exceeded(client, app, alice, bob, 1, "daily", 0)


async def test_money_that_never_arrived_is_given_back_after_a_time_zone_change(
    client: httpx.AsyncClient, app: Any, bob: SignedIn
) -> None:
    """The give-back goes to the day the transfer was counted in, not to the day its send time
    falls on in the sender's new time zone (UTC+14 and UTC-11 are never on the same date)."""
    alice = await sign_up(client, name="Alice Travels")
    await fund(app, alice.user["id"], 100_000)
    await patch_me(client, alice, timezone="Pacific/Kiritimati")
    r = await send(client, alice, PER_TRANSFER, email="nobody-yet@example.org")
    assert r.status_code == 201, r.text
    assert (await limits(client, alice))["daily"]["used"] == PER_TRANSFER
    await patch_me(client, alice, timezone="Pacific/Pago_Pago")
    cancelled = await client.post(f"/v1/transfers/{r.json()['id']}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200, cancelled.text
    view = await limits(client, alice)
    assert (view["daily"]["used"], view["monthly"]["used"]) == (0, 0)
    # The whole daily limit is there again.
    await send_ok(client, alice, PER_TRANSFER, bob)
    await send_ok(client, alice, PER_TRANSFER, bob)


# --- tiers and overrides ---------------------------------------------------------------------------


async def test_a_higher_kyc_tier_raises_the_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000_000)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await set_kyc_tier(app, alice.user["id"], 1)
    view = (await client.get("/v1/transfers/limits", headers=alice.headers)).json()
    assert view["kyc_tier"] == 1
    usd = next(c for c in view["data"] if c["currency"] == "USD")
    assert usd["per_transfer"] == 100_000
    assert (usd["daily"]["limit"], usd["daily"]["used"]) == (250_000, PER_TRANSFER)
    assert usd["monthly"]["limit"] == 1_000_000
    await exceeded(client, app, alice, bob, 100_001, "per_transfer", 100_000)
    await send_ok(client, alice, 100_000, bob)
    await send_ok(client, alice, 100_000, bob)
    await exceeded(client, app, alice, bob, 45_001, "daily", 45_000)
    await send_ok(client, alice, 45_000, bob)

    await set_kyc_tier(app, alice.user["id"], 2)
    usd = await limits(client, alice)
    assert (usd["per_transfer"], usd["daily"]["limit"], usd["monthly"]["limit"]) == (
        500_000,
        1_000_000,
        5_000_000,
    )
    await send_ok(client, alice, 500_000, bob)


async def test_admin_overrides_a_users_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    url = f"/v1/admin/users/{alice.user['id']}/transfer-limits/USD"
    r = await client.put(
        url, json={"per_transfer": 8_000, "daily": 12_000, "monthly": None}, headers=admin.headers
    )
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["kyc_tier"] == 0
    usd = next(c for c in view["data"] if c["currency"] == "USD")
    assert (usd["per_transfer"], usd["daily"]["limit"], usd["monthly"]["limit"]) == (
        8_000,
        12_000,
        MONTHLY,
    )
    # Only USD changed, and the user sees the same.
    assert (await limits(client, alice, "EUR"))["per_transfer"] == PER_TRANSFER
    assert (await limits(client, alice)) == usd

    await exceeded(client, app, alice, bob, 8_001, "per_transfer", 8_000)
    await send_ok(client, alice, 8_000, bob)
    await exceeded(client, app, alice, bob, 4_001, "daily", 4_000)
    await send_ok(client, alice, 4_000, bob)

    # Lowering a limit below what was used leaves nothing for today, without erasing usage.
    r = await client.put(url, json={"daily": 1_000}, headers=admin.headers)
    assert r.status_code == 200, r.text
    usd = await limits(client, alice)
    assert (usd["daily"]["limit"], usd["daily"]["used"], usd["daily"]["remaining"]) == (
        1_000,
        12_000,
        0,
    )
    assert usd["per_transfer"] == PER_TRANSFER  # a field left out is back to the default
    await exceeded(client, app, alice, bob, 1, "daily", 0)

    # Nulls restore the tier's defaults; the usage counted so far stays.
    r = await client.put(
        url, json={"per_transfer": None, "daily": None, "monthly": None}, headers=admin.headers
    )
    assert r.status_code == 200, r.text
    usd = await limits(client, alice)
    assert (usd["per_transfer"], usd["daily"]["limit"], usd["daily"]["used"]) == (
        PER_TRANSFER,
        DAILY,
        12_000,
    )
    # An override of zero stops transfers in that currency altogether.
    r = await client.put(url, json={"per_transfer": 0}, headers=admin.headers)
    assert r.status_code == 200, r.text
    await move_usage_back(app, alice, days=1)
    await exceeded(client, app, alice, bob, 1, "per_transfer", 0)


async def test_override_keeps_working_across_a_tier_change(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    url = f"/v1/admin/users/{alice.user['id']}/transfer-limits/EUR"
    r = await client.put(url, json={"daily": 7_000}, headers=admin.headers)
    assert r.status_code == 200, r.text
    await set_kyc_tier(app, alice.user["id"], 1)
    eur = await limits(client, alice, "EUR")
    assert (eur["per_transfer"], eur["daily"]["limit"], eur["monthly"]["limit"]) == (
        100_000,
        7_000,
        1_000_000,
    )


async def test_overrides_are_for_administrators_only(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    url = f"/v1/admin/users/{alice.user['id']}/transfer-limits/USD"
    for who in (alice, bob):
        r = await client.put(url, json={"per_transfer": 1_000_000}, headers=who.headers)
        assert r.status_code == 403 and r.json()["code"] == "admin_required"
    assert (await client.put(url, json={"per_transfer": 1})).status_code == 401
    assert await usage(app, alice) is None


@pytest.mark.parametrize(
    ("path_user", "currency", "body", "status", "code"),
    [
        ("usr_" + "0" * 26, "USD", {"daily": 1}, 404, "user_not_found"),
        ("nobody", "USD", {"daily": 1}, 404, "user_not_found"),
        ("%00", "USD", {"daily": 1}, 404, "user_not_found"),
        ("alice", "usd", {"daily": 1}, 422, "validation_failed"),
        ("alice", "XYZ", {"daily": 1}, 422, "validation_failed"),
        ("alice", "JPY", {"daily": 1_000}, 422, "currency_not_supported"),
        (
            "alice",
            "PTS",
            {"per_transfer": 1, "daily": 1, "monthly": 1},
            422,
            "currency_not_supported",
        ),
        ("alice", "USD", {"daily": -1}, 422, "validation_failed"),
        ("alice", "USD", {"daily": 1.5}, 422, "validation_failed"),
        ("alice", "USD", {"daily": "100"}, 422, "validation_failed"),
        ("alice", "USD", {"daily": 2**63}, 422, "validation_failed"),
        ("alice", "USD", {"weekly": 1}, 422, "validation_failed"),
    ],
)
async def test_bad_overrides_are_refused(
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    admin: SignedIn,
    path_user: str,
    currency: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    user = alice.user["id"] if path_user == "alice" else path_user
    before = await snapshot(app, alice)
    r = await client.put(
        f"/v1/admin/users/{user}/transfer-limits/{currency}", json=body, headers=admin.headers
    )
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert await snapshot(app, alice) == before


async def test_points_stay_unsendable_whatever_the_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    # Even if limits for PTS existed (they cannot be set through the API), points are not sent.
    await fund(app, alice.user["id"], 1_000, "PTS")
    await sql(
        app,
        "INSERT INTO p2p.transfer_limits (user_id, currency, per_transfer_limit, daily_limit,"
        " monthly_limit) VALUES (:u, 'PTS', 1000, 1000, 1000)",
        u=alice.user["id"],
    )
    before = await snapshot(app, alice, bob)
    r = await send(client, alice, 10, "PTS", user_id=bob.user["id"])
    assert r.status_code == 422 and r.json()["code"] == "currency_not_supported", r.text
    assert await snapshot(app, alice, bob) == before


async def test_limit_usage_is_per_sender(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    await fund(app, bob.user["id"], 100_000)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await send_ok(client, alice, PER_TRANSFER, bob)
    await exceeded(client, app, alice, bob, 1, "daily", 0)
    await send_ok(client, bob, PER_TRANSFER, alice)
    assert (await limits(client, bob))["daily"]["used"] == PER_TRANSFER


async def test_idempotent_replay_does_not_count_twice(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100_000)
    headers = idem(**alice.headers)
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": PER_TRANSFER, "currency": "USD"}
    for _ in range(3):
        r = await client.post("/v1/transfers", json=body, headers=headers)
        assert r.status_code == 201, r.text
    assert (await limits(client, alice))["daily"]["used"] == PER_TRANSFER
