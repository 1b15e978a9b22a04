"""Fraud rules and lists over HTTP and in PostgreSQL: the admin API (create, versions, shadow,
promote, rollback, disable, test, backtest), the block/allow lists, and the process's rule book
picking up every change.

Rules created here use expressions no real payment can meet (`kyc_tier == 7`) and are disabled
at the end, so tests that pay and transfer in the same database are never affected by them."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from billfold.fraud.lists import load_lists
from billfold.fraud.models import FEATURE_NAMES, RiskSubject
from billfold.fraud.rules import DEFAULT_RULES, NEUTRAL, RuleBook
from billfold.fraud.store import rules as store
from billfold.platform.ids import new_id
from tests.conftest import SignedIn, idem

RULES = "/v1/admin/fraud/rules"
LISTS = "/v1/admin/fraud/lists"
# Met only by features made up here: no user has KYC tier 7.
NEVER_LIVE = "kyc_tier == 7"


def rule_id() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def crafted(**overrides: Any) -> dict[str, Any]:
    features = dict(NEUTRAL)
    features.update(kyc_tier=7, amount=5_000, history_count=10)
    features.update(overrides)
    return features


async def create(client: httpx.AsyncClient, admin: SignedIn, **fields: Any) -> dict[str, Any]:
    body = {
        "id": rule_id(),
        "expression": f"{NEVER_LIVE} && amount >= 1000",
        "score": 300,
        "reason_code": "test_large_amount",
        "description": "A large amount (test rule)",
    }
    body.update(fields)
    r = await client.post(RULES, json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def outbox(app: Any, subject: str) -> list[tuple[str, dict[str, Any]]]:
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT type, data FROM platform.outbox WHERE subject = :s ORDER BY seq"),
                {"s": subject},
            )
        ).all()
    return [(r.type, r.data) for r in rows]


def states(view: dict[str, Any]) -> dict[int, str]:
    return {v["version"]: v["state"] for v in view["versions"]}


# --- the shipped rules --------------------------------------------------------------------------


async def test_the_migration_seeds_the_shipped_rules(app: Any) -> None:
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    f"SELECT {store.VERSION_COLUMNS} FROM fraud.rule_versions "
                    "WHERE version = 1 AND note LIKE 'shipped default%' ORDER BY rule_id"
                )
            )
        ).all()
    seeded = {r.rule_id: r for r in rows}
    assert set(seeded) == {s.rule_id for s in DEFAULT_RULES}
    for spec in DEFAULT_RULES:
        row = seeded[spec.rule_id]
        assert (row.expression, row.score, row.action, row.reason_code, row.description) == (
            spec.expression,
            spec.score,
            spec.action,
            spec.reason_code,
            spec.description,
        ), spec.rule_id
        if row.state_changed_at == row.created_at:  # untouched by another test
            assert row.state == spec.state


# --- who may call -------------------------------------------------------------------------------


async def test_only_administrators_manage_rules_and_lists(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    for method, path in [
        ("GET", RULES),
        ("POST", RULES),
        ("GET", f"{RULES}/card_testing_burst"),
        ("POST", f"{RULES}/card_testing_burst/disable"),
        ("POST", f"{RULES}/backtest"),
        ("GET", LISTS),
        ("POST", LISTS),
    ]:
        r = await client.request(method, path, json={}, headers=alice.headers)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["code"] == "admin_required"
        anonymous = await client.request(method, path, json={})
        assert anonymous.status_code == 401


# --- versions and states ------------------------------------------------------------------------


async def test_a_rule_moves_through_shadow_promote_rollback_and_disable(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    created = await create(client, admin)
    rid = created["id"]
    assert created["state"] == "shadow"
    assert (created["active_version"], created["shadow_version"]) == (None, 1)
    assert created["versions"][0]["created_by"] == admin.user["id"]

    promoted = (await client.post(f"{RULES}/{rid}/promote", headers=admin.headers)).json()
    assert promoted["state"] == "active"
    assert states(promoted) == {1: "active"}

    # An edit is a new version, in shadow beside the one in force; unchanged fields carry over.
    r = await client.patch(
        f"{RULES}/{rid}",
        json={"expression": f"{NEVER_LIVE} && amount >= 2000", "note": "fewer false positives"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    edited = r.json()
    assert states(edited) == {1: "active", 2: "shadow"}
    v2 = edited["versions"][1]
    assert v2["expression"].endswith("amount >= 2000")
    assert (v2["score"], v2["reason_code"], v2["based_on"], v2["note"]) == (
        300,
        "test_large_amount",
        1,
        "fewer false positives",
    )
    assert edited["versions"][0]["expression"].endswith("amount >= 1000")  # history kept

    promoted = (await client.post(f"{RULES}/{rid}/promote", headers=admin.headers)).json()
    assert states(promoted) == {1: "disabled", 2: "active"}

    # Rollback: by default the version in force before.
    rolled = (await client.post(f"{RULES}/{rid}/rollback", headers=admin.headers)).json()
    assert states(rolled) == {1: "active", 2: "disabled"}
    assert rolled["active_version"] == 1
    # ... and to a named version.
    r = await client.post(f"{RULES}/{rid}/rollback", json={"version": 2}, headers=admin.headers)
    assert states(r.json()) == {1: "disabled", 2: "active"}

    # Shadow the version in force: nothing of the rule is enforced, it is still evaluated.
    r = await client.post(f"{RULES}/{rid}/shadow", json={"version": 2}, headers=admin.headers)
    assert r.json()["state"] == "shadow"
    assert states(r.json()) == {1: "disabled", 2: "shadow"}

    # A direct edit to active replaces what is in force and leaves the shadow alone.
    r = await client.patch(
        f"{RULES}/{rid}", json={"score": 50, "state": "active"}, headers=admin.headers
    )
    assert states(r.json()) == {1: "disabled", 2: "shadow", 3: "active"}

    disabled = (await client.post(f"{RULES}/{rid}/disable", headers=admin.headers)).json()
    assert disabled["state"] == "disabled"
    assert set(states(disabled).values()) == {"disabled"}

    fetched = (await client.get(f"{RULES}/{rid}", headers=admin.headers)).json()
    assert fetched == disabled
    events = await outbox(app, f"rule/{rid}")
    assert [t for t, _ in events] == [
        "billfold.fraud.rule.created",
        "billfold.fraud.rule.state_changed",
        "billfold.fraud.rule.version_created",
        "billfold.fraud.rule.state_changed",
        "billfold.fraud.rule.state_changed",
        "billfold.fraud.rule.state_changed",
        "billfold.fraud.rule.state_changed",
        "billfold.fraud.rule.version_created",
        "billfold.fraud.rule.state_changed",
    ]
    first_promotion = events[1][1]
    assert first_promotion["change"] == "promote"
    assert first_promotion["changed"] == {"1": ["shadow", "active"]}
    assert first_promotion["actor"] == admin.user["id"]


async def test_bad_rules_and_bad_moves_are_refused_with_stable_codes(
    client: httpx.AsyncClient, admin: SignedIn
) -> None:
    base = {
        "id": rule_id(),
        "score": 100,
        "reason_code": "test_reason",
        "description": "test",
    }
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**base, "expression": "amount >"}, 422, "invalid_rule_expression"),
        ({**base, "expression": "balance > 5"}, 422, "invalid_rule_expression"),
        ({**base, "expression": "amount + 1"}, 422, "invalid_rule_expression"),
        ({**base, "expression": "mcc > 5"}, 422, "invalid_rule_expression"),
        ({**base, "expression": NEVER_LIVE, "score": 0}, 422, "validation_failed"),
        (
            {**base, "expression": NEVER_LIVE, "reason_code": "allow_list_x"},
            422,
            "validation_failed",
        ),
        ({**base, "expression": NEVER_LIVE, "id": "Bad Id"}, 422, "validation_failed"),
        ({**base, "expression": NEVER_LIVE, "action": "explode"}, 422, "validation_failed"),
        ({**base, "expression": NEVER_LIVE, "score": 1001}, 422, "validation_failed"),
        ({**base, "expression": NEVER_LIVE, "extra": 1}, 422, "validation_failed"),
    ]
    for body, status, code in cases:
        r = await client.post(RULES, json=body, headers=admin.headers)
        assert (r.status_code, r.json()["code"]) == (status, code), (body, r.text)
    bad = (await client.post(RULES, json=cases[1][0], headers=admin.headers)).json()
    assert bad["errors"][0]["pointer"] == "#/expression"
    assert "balance" in bad["detail"]
    # Nothing of the refused rules was stored.
    assert (await client.get(f"{RULES}/{base['id']}", headers=admin.headers)).status_code == 404

    made = await create(client, admin)
    rid = made["id"]
    again = await client.post(
        RULES, json={**base, "id": rid, "expression": NEVER_LIVE}, headers=admin.headers
    )
    assert (again.status_code, again.json()["code"]) == (409, "rule_exists")
    r = await client.patch(f"{RULES}/{rid}", json={"expression": "amount >"}, headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rule_expression")
    r = await client.patch(f"{RULES}/{rid}", json={"score": 0}, headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (422, "validation_failed")
    view = (await client.get(f"{RULES}/{rid}", headers=admin.headers)).json()
    assert view["latest_version"] == 1  # the refused edits made no version

    await client.post(f"{RULES}/{rid}/promote", headers=admin.headers)
    r = await client.post(f"{RULES}/{rid}/promote", headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (409, "no_such_version")
    r = await client.post(f"{RULES}/{rid}/rollback", headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (409, "no_such_version")
    r = await client.post(f"{RULES}/{rid}/promote", json={"version": 9}, headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (404, "rule_version_not_found")
    for path in (f"{RULES}/nope_{uuid.uuid4().hex[:6]}", f"{RULES}/{'x' * 65}"):
        r = await client.get(path, headers=admin.headers)
        assert r.status_code in (404, 422), r.text
    r = await client.patch(f"{RULES}/no_such_rule_here", json={"score": 5}, headers=admin.headers)
    assert (r.status_code, r.json()["code"]) == (404, "rule_not_found")
    await client.post(f"{RULES}/{rid}/disable", headers=admin.headers)


async def test_rules_are_listed_by_id_with_filters_and_cursor(
    client: httpx.AsyncClient, admin: SignedIn
) -> None:
    shadowed = await create(client, admin)
    everything: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(RULES, params=params, headers=admin.headers)).json()
        everything.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ids = [r["id"] for r in everything]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    assert {s.rule_id for s in DEFAULT_RULES} <= set(ids)
    assert shadowed["id"] in ids
    in_shadow = (
        await client.get(RULES, params={"state": "shadow", "limit": 100}, headers=admin.headers)
    ).json()["data"]
    assert shadowed["id"] in {r["id"] for r in in_shadow}
    assert all(r["shadow_version"] is not None for r in in_shadow)
    r = await client.get(RULES, params={"state": "sideways"}, headers=admin.headers)
    assert r.status_code == 422
    await client.post(f"{RULES}/{shadowed['id']}/disable", headers=admin.headers)
    disabled = (
        await client.get(RULES, params={"state": "disabled", "limit": 100}, headers=admin.headers)
    ).json()["data"]
    assert shadowed["id"] in {r["id"] for r in disabled}


# --- trying and backtesting ---------------------------------------------------------------------


async def test_an_expression_can_be_tried_on_given_features(
    client: httpx.AsyncClient, admin: SignedIn
) -> None:
    features = (await client.get(f"{RULES}/features", headers=admin.headers)).json()
    assert [f["name"] for f in features] == list(FEATURE_NAMES)
    r = await client.post(
        f"{RULES}/test",
        json={
            "expression": "speed_kmh > 900.0 && has_location",
            "features": {"speed_kmh": 1200, "has_location": True},
        },
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["matched"] is True
    assert r.json()["features_used"]["amount"] == 0
    r = await client.post(
        f"{RULES}/test",
        json={"expression": "amount / user_count_1h > 10", "features": {"amount": 50}},
        headers=admin.headers,
    )
    assert r.json()["matched"] is False
    assert "division by zero" in r.json()["error"]
    r = await client.post(
        f"{RULES}/test", json={"expression": "amount >", "features": {}}, headers=admin.headers
    )
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rule_expression")
    r = await client.post(
        f"{RULES}/test",
        json={"expression": "true", "features": {"password": "hunter2"}},
        headers=admin.headers,
    )
    assert (r.status_code, r.json()["code"]) == (422, "validation_failed")
    assert "hunter2" not in r.text
    r = await client.post(
        f"{RULES}/test",
        json={"expression": "true", "features": {"amount": {"nested": 1}}},
        headers=admin.headers,
    )
    assert r.status_code == 422


async def test_a_backtest_replays_past_decisions_against_their_labels(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    # Ten decisions in a window of their own (long ago, so no live decision falls in it).
    start = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 1000)
    rows = [
        # (action, label, card_count_1m, amount)
        ("allow", None, 1, 2_000),
        ("allow", "legit", 1, 300),
        ("allow", "legit", 6, 400),  # a legit burst (a false positive of the draft)
        ("block", "fraud", 8, 100),
        ("block", "fraud", 9, 100),
        ("review", "fraud", 2, 100),  # fraud the draft misses
        ("allow", None, 7, 900),
        ("challenge", None, 1, 50_000),
        ("allow", "legit", 2, 700),
        ("allow", None, 1, 800),
    ]
    ids = []
    async with app.state.resources.engine.begin() as conn:
        for i, (action, label, burst, amount) in enumerate(rows):
            decision_id = new_id("dec")
            ids.append(decision_id)
            snapshot = crafted(card_count_1m=burst, amount=amount, is_ecommerce=True)
            if i == 9:
                snapshot["card_count_1m"] = "garbled"  # an odd snapshot is a counted non-hit
            await conn.execute(
                text(
                    """
                    INSERT INTO fraud.decisions (id, subject_kind, subject_id, user_id, amount,
                        currency, action, score, features, label, created_at)
                    VALUES (:id, 'payment', :sid, 'usr_backtest', :amount, 'USD', :action, 0,
                        CAST(:features AS jsonb), :label, :at)
                    """
                ),
                {
                    "id": decision_id,
                    "sid": f"txn_backtest_{i}",
                    "amount": amount,
                    "action": action,
                    "features": json.dumps(snapshot),
                    "label": label,
                    "at": start + timedelta(minutes=i),
                },
            )
    window = {"since": start.isoformat(), "until": (start + timedelta(hours=1)).isoformat()}
    r = await client.post(
        f"{RULES}/backtest",
        json={"expression": "card_count_1m >= 5 && amount <= 1000", **window},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["evaluated"] == 10
    assert result["hits"] == 4  # rows 2, 3, 4, 6
    assert result["errors"] == 1
    assert result["hit_rate"] == 0.4
    assert result["fraud"] == {"total": 3, "hits": 2}
    assert result["legit"] == {"total": 3, "hits": 1}
    assert result["precision"] == 2 / 3
    assert result["recall"] == 2 / 3
    assert result["by_action"]["block"] == {"total": 2, "hits": 2}
    assert result["by_action"]["allow"] == {"total": 6, "hits": 2}
    assert result["sample_hits"] == [ids[6], ids[4], ids[3], ids[2]]  # newest first

    # A stored rule's version: by default the one in shadow.
    made = await create(client, admin, expression="card_count_1m >= 8")
    r = await client.patch(
        f"{RULES}/{made['id']}", json={"expression": "card_count_1m >= 2"}, headers=admin.headers
    )
    assert r.status_code == 200
    await client.post(f"{RULES}/{made['id']}/promote", json={"version": 1}, headers=admin.headers)
    r = await client.post(
        f"{RULES}/backtest", json={"rule_id": made["id"], **window}, headers=admin.headers
    )
    assert (r.json()["version"], r.json()["hits"]) == (2, 6)
    r = await client.post(
        f"{RULES}/backtest",
        json={"rule_id": made["id"], "version": 1, **window, "limit": 5},
        headers=admin.headers,
    )
    assert (r.json()["evaluated"], r.json()["hits"]) == (5, 0)  # the newest five: rows 9..5
    r = await client.post(
        f"{RULES}/backtest",
        json={"rule_id": made["id"], "version": 1, **window},
        headers=admin.headers,
    )
    assert (r.json()["evaluated"], r.json()["hits"]) == (10, 2)
    await client.post(f"{RULES}/{made['id']}/disable", headers=admin.headers)

    for body, code in [
        ({}, "validation_failed"),
        ({"expression": "true", "rule_id": made["id"]}, "validation_failed"),
        ({"expression": "amount >"}, "invalid_rule_expression"),
        ({"rule_id": "no_such_rule_here"}, "rule_not_found"),
        ({"rule_id": made["id"], "version": 99}, "rule_version_not_found"),
        ({"expression": "true", "limit": 10**6}, "validation_failed"),
    ]:
        r = await client.post(f"{RULES}/backtest", json=body, headers=admin.headers)
        assert r.json()["code"] == code, (body, r.text)


# --- the rule book of a process -----------------------------------------------------------------


async def test_the_rule_book_picks_up_rule_and_list_changes(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    book = RuleBook(lists=load_lists, refresh_seconds=0)
    lazy = RuleBook(lists=load_lists, refresh_seconds=3600)
    engine = app.state.resources.engine
    device = f"dev_test_{uuid.uuid4().hex[:8]}"
    subject = RiskSubject(
        kind="payment",
        subject_id="txn_x",
        user_id="usr_x",
        amount=5_000,
        currency="USD",
        at=datetime.now(UTC),
        device_id=device,
    )

    async def hits(rule_book: RuleBook) -> list[tuple[str, bool]]:
        async with engine.connect() as conn:
            rules = await rule_book.current(conn)
        return [(h.reason_code, h.shadow) for h in rules.evaluate(crafted(), subject)]

    async def version(rule_book: RuleBook) -> str:
        async with engine.connect() as conn:
            return (await rule_book.current(conn)).version

    assert await hits(book) == []
    before = await version(lazy)
    created = await create(client, admin, reason_code="test_book_reason")
    assert await hits(book) == [("test_book_reason", True)]
    assert await version(lazy) == before  # cached until its refresh is due
    lazy.invalidate()
    assert await version(lazy) != before

    await client.post(f"{RULES}/{created['id']}/promote", headers=admin.headers)
    assert await hits(book) == [("test_book_reason", False)]

    r = await client.post(
        LISTS,
        json={"list": "block", "kind": "device", "value": device, "reason": "stolen phone"},
        headers=admin.headers,
    )
    assert r.status_code == 201, r.text
    assert await hits(book) == [("test_book_reason", False), ("block_list_device", False)]
    await client.delete(f"{LISTS}/{r.json()['id']}", headers=admin.headers)
    await client.post(f"{RULES}/{created['id']}/disable", headers=admin.headers)
    assert await hits(book) == []


async def test_a_steady_stream_of_checks_never_waits_for_the_rule_book(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    now = [0.0]
    book = RuleBook(lists=load_lists, refresh_seconds=1.0, clock=lambda: now[0])
    engine = app.state.resources.engine

    class NoStatements:
        """A check's connection that must not be used: the book may only take its engine."""

        def __init__(self) -> None:
            self.engine = engine

        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the rule book used the check's connection")

    check: Any = NoStatements()
    async with engine.connect() as conn:
        first = await book.current(conn)  # the first load is the caller's
    created = await create(client, admin, reason_code="test_background_reason")
    now[0] = 0.4  # young: no I/O at all
    assert await book.current(check) is first
    await book.settled()
    now[0] = 0.6  # half old: answered at once, checked behind the caller's back
    assert await book.current(check) is first
    await book.settled()
    refreshed = await book.current(check)
    assert refreshed.version != first.version
    assert [h.reason_code for h in refreshed.evaluate(crafted())] == ["test_background_reason"]

    # Without checks in the second half, an old set is checked before it is used.
    await client.post(f"{RULES}/{created['id']}/disable", headers=admin.headers)
    now[0] = 1.7
    async with engine.connect() as conn:
        assert (await book.current(conn)).version == first.version


async def test_a_rule_book_without_changes_costs_no_reload(app: Any) -> None:
    book = RuleBook(lists=load_lists, refresh_seconds=0)
    async with app.state.resources.engine.connect() as conn:
        first = await book.current(conn)
        assert await book.current(conn) is first  # counters read, nothing moved


# --- lists --------------------------------------------------------------------------------------


async def test_list_entries_are_added_found_and_removed(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    tag = uuid.uuid4().hex[:6]
    network = f"198.51.{int(tag, 16) % 256}.0/24"
    r = await client.post(
        LISTS,
        json={
            "list": "block",
            "kind": "ip",
            "value": network.replace(".0/24", ".99/24"),
            "reason": "abuse from this range",
            "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
        },
        headers=admin.headers,
    )
    assert r.status_code == 201, r.text
    entry = r.json()
    assert entry["value"] == network  # stored as the network
    assert entry["id"].startswith("lst_")
    assert entry["created_by"] == admin.user["id"]

    again = await client.post(
        LISTS,
        json={"list": "block", "kind": "ip", "value": network, "reason": "again"},
        headers=admin.headers,
    )
    assert (again.status_code, again.json()["code"]) == (409, "list_entry_exists")
    assert again.json()["entry_id"] == entry["id"]
    # The same value on the other list is another entry.
    allowed = await client.post(
        LISTS,
        json={"list": "allow", "kind": "ip", "value": network, "reason": "our office"},
        headers=admin.headers,
    )
    assert allowed.status_code == 201

    for body in [
        {"list": "block", "kind": "ip", "value": "300.1.1.1", "reason": "x"},
        {"list": "block", "kind": "country", "value": "Germany", "reason": "x"},
        {"list": "grey", "kind": "ip", "value": "1.2.3.4", "reason": "x"},
        {"list": "block", "kind": "email", "value": "a@b.c", "reason": "x"},
        {"list": "block", "kind": "device", "value": "dev_1", "reason": ""},
        {
            "list": "block",
            "kind": "device",
            "value": "dev_1",
            "reason": "x",
            "expires_at": "2001-01-01T00:00:00Z",
        },
    ]:
        r = await client.post(LISTS, json=body, headers=admin.headers)
        assert (r.status_code, r.json()["code"]) == (422, "validation_failed"), (body, r.text)

    found = (
        await client.get(LISTS, params={"kind": "ip", "value": network}, headers=admin.headers)
    ).json()["data"]
    assert {e["id"] for e in found} == {entry["id"], allowed.json()["id"]}
    blocked_only = (
        await client.get(
            LISTS, params={"list": "block", "kind": "ip", "value": network}, headers=admin.headers
        )
    ).json()["data"]
    assert [e["id"] for e in blocked_only] == [entry["id"]]
    assert (await client.get(f"{LISTS}/{entry['id']}", headers=admin.headers)).json() == entry

    removed = await client.delete(f"{LISTS}/{entry['id']}", headers=admin.headers)
    assert removed.status_code == 200
    assert removed.json()["removed_by"] == admin.user["id"]
    assert removed.json()["removed_at"] is not None
    twice = await client.delete(f"{LISTS}/{entry['id']}", headers=admin.headers)
    assert twice.json() == removed.json()
    live = (
        await client.get(
            LISTS, params={"list": "block", "kind": "ip", "value": network}, headers=admin.headers
        )
    ).json()["data"]
    assert live == []
    history = (
        await client.get(
            LISTS,
            params={"list": "block", "kind": "ip", "value": network, "include_removed": True},
            headers=admin.headers,
        )
    ).json()["data"]
    assert [e["id"] for e in history] == [entry["id"]]
    # Listed again after removal: a new entry.
    back = await client.post(
        LISTS,
        json={"list": "block", "kind": "ip", "value": network, "reason": "back again"},
        headers=admin.headers,
    )
    assert back.status_code == 201
    assert back.json()["id"] != entry["id"]

    for path in (f"{LISTS}/lst_{'0' * 26}", f"{LISTS}/junk"):
        for method in ("GET", "DELETE"):
            r = await client.request(method, path, headers=admin.headers)
            assert (r.status_code, r.json()["code"]) == (404, "list_entry_not_found")

    events = await outbox(app, f"list_entry/{entry['id']}")
    assert [t for t, _ in events] == [
        "billfold.fraud.list.entry_added",
        "billfold.fraud.list.entry_removed",
    ]
    assert network not in json.dumps([d for _, d in events])  # the value stays out of events
    for leftover in (allowed.json()["id"], back.json()["id"]):
        await client.delete(f"{LISTS}/{leftover}", headers=admin.headers)


async def test_list_values_are_checked_per_kind_and_networks_are_not_too_broad(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    """A block list refuses what would stop a large share of all customers (0.0.0.0/0, ::/0,
    anything wider than a /16 of IPv4 or a /32 of IPv6), and so does an allow list (it would
    exempt them from every rule); each kind takes only values of its kind. Refused entries
    change nothing."""
    count = await _entries(app)
    too_broad = ["0.0.0.0/0", "::/0", "10.0.0.0/8", "192.168.0.0/15", "2001:db8::/31", "::/1"]
    for listed in ("block", "allow"):
        for value in too_broad:
            r = await client.post(
                LISTS,
                json={"list": listed, "kind": "ip", "value": value, "reason": "too much"},
                headers=idem(**admin.headers),
            )
            assert r.status_code == 422, (listed, value, r.text)
            assert r.json()["code"] == "network_too_broad"
            assert r.json()["errors"][0]["pointer"] == "#/value"
    bad = {
        "device": ["phone-1", "usr_01", "dev_", "dev_a b"],
        "card": ["4111111111111111", "fp_abc", "ab" * 31, "zz" * 32],
        "country": ["XX", "ZZ", "D", "DEU", "Germany", "1A"],
        "merchant": ["-shop", "a" * 65, "shop name"],
        "recipient": ["bob", "+1 555", "usr_", "@handle"],
        "ip": ["300.1.1.1", "1.2.3", "example.com"],
    }
    for kind, values in bad.items():
        for value in values:
            r = await client.post(
                LISTS,
                json={"list": "block", "kind": kind, "value": value, "reason": "x"},
                headers=idem(**admin.headers),
            )
            assert r.status_code == 422, (kind, value, r.text)
            assert r.json()["code"] == "validation_failed", (kind, value)
            assert len(value) < 6 or value not in r.json()["detail"]  # not echoed back
    assert await _entries(app) == count

    tag = uuid.uuid4().hex
    good = {
        ("ip", f"10.{int(tag[:2], 16)}.0.0/16"): f"10.{int(tag[:2], 16)}.0.0/16",
        ("ip", f"2001:db8:{tag[:4]}::/48"): f"2001:db8:{int(tag[:4], 16):x}::/48",
        ("device", f"dev_{tag[:26]}"): f"dev_{tag[:26]}",
        ("card", (tag * 2).upper()): tag * 2,
        ("country", "kp"): "KP",
        ("merchant", f"mch_{tag[:8]}:store-1"): f"mch_{tag[:8]}:store-1",
        ("recipient", f"Mule.{tag[:6]}@Example.com"): f"mule.{tag[:6]}@example.com",
        ("recipient", f"usr_{tag[:26]}"): f"usr_{tag[:26]}",
    }
    created = []
    for (kind, value), stored in good.items():
        r = await client.post(
            LISTS,
            json={"list": "block", "kind": kind, "value": value, "reason": "ok"},
            headers=idem(**admin.headers),
        )
        if r.status_code == 409:  # KP may be listed by another test of the session already
            assert kind == "country"
            continue
        assert r.status_code == 201, (kind, value, r.text)
        assert r.json()["value"] == stored
        created.append(r.json()["id"])
    for entry_id in created:
        await client.delete(f"{LISTS}/{entry_id}", headers=admin.headers)


async def _entries(app: Any) -> int:
    async with app.state.resources.engine.connect() as conn:
        found = await conn.execute(text("SELECT count(*) FROM fraud.list_entries"))
        return int(found.scalar_one())


async def test_a_new_rule_is_in_force_within_refresh_seconds_in_a_fresh_process(
    client: httpx.AsyncClient, settings: Any, admin: SignedIn
) -> None:
    """The documented promise on a cold process (its own app, fraud checks on as in
    production): after a first check loaded the book and background refreshes ran, a review
    rule created through the admin API holds the next transfer made `refresh_seconds` later."""
    from asgi_lifespan import LifespanManager

    from billfold.app import create_app
    from tests.conftest import fund, sign_up

    fresh = create_app(settings.model_copy(update={"fraud_enabled": True}))
    async with LifespanManager(fresh):
        transport = httpx.ASGITransport(app=fresh)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as own:
            alice = await sign_up(client, name="Alice Example", country="US")
            bob = await sign_up(client, name="Bob Example", country="US")
            await fund(fresh, alice.user["id"], 20_000)
            book = fresh.state.fraud.rules

            async def send(amount: int) -> str:
                r = await own.post(
                    "/v1/transfers",
                    json={
                        "recipient": {"user_id": bob.user["id"]},
                        "amount": amount,
                        "currency": "USD",
                    },
                    headers=idem(**alice.headers),
                )
                assert r.status_code == 201, r.text
                return str(r.json()["status"])

            for _ in range(3):  # the first load, then refreshes in the background
                await send(100)
                await asyncio.sleep(book.refresh_seconds * 0.6)
            amount = 4_000 + int(uuid.uuid4().hex[:2], 16)
            rule_id = f"t_{uuid.uuid4().hex[:12]}"
            r = await own.post(
                RULES,
                json={
                    "id": rule_id,
                    "expression": f"amount == {amount} && !is_payment",
                    "reason_code": rule_id,
                    "description": "A test rule",
                    "state": "active",
                    "action": "review",
                },
                headers=idem(**admin.headers),
            )
            assert r.status_code == 201, r.text
            try:
                await asyncio.sleep(book.refresh_seconds)
                assert await send(amount) == "pending"
            finally:
                await own.post(f"{RULES}/{rule_id}/disable", headers=idem(**admin.headers))
            await book.settled()


async def test_a_set_past_its_age_is_not_used_while_a_refresh_is_in_flight(
    app: Any, client: httpx.AsyncClient, admin: SignedIn
) -> None:
    """A slow refresh (holding the book's lock) may have read the counters before a change
    committed: a check that finds the set past `refresh_seconds` waits for it and checks
    again, instead of using the old set."""
    now = [0.0]
    book = RuleBook(lists=load_lists, refresh_seconds=1.0, clock=lambda: now[0])
    engine = app.state.resources.engine
    async with engine.connect() as conn:
        first = await book.current(conn)
    created = await create(client, admin, reason_code="test_in_flight_reason")
    try:
        now[0] = 1.5
        async with engine.connect() as conn:
            await book._lock.acquire()  # a refresh in flight
            waiting = asyncio.create_task(book.current(conn))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            book._lock.release()
            refreshed = await waiting
        assert refreshed.version != first.version
        assert [h.reason_code for h in refreshed.evaluate(crafted())] == ["test_in_flight_reason"]
    finally:
        await client.post(f"{RULES}/{created['id']}/disable", headers=idem(**admin.headers))
