"""The Fraud Service end to end over HTTP with the real features (Redis), the shipped default rules
and the admin rule API: a normal payment is allowed, a card-testing burst is blocked, impossible
travel is challenged and resumes after step-up, a rule in shadow is logged but not enforced, a
review opens a case that a reviewer releases or confirms as fraud, and Redis being unavailable
falls back without a 5xx. Every decision is stored with its feature snapshot and versions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from billfold.fraud import FEATURE_NAMES
from billfold.fraud.features import RedisFeatures
from tests.conftest import SignedIn, free_port, fund, idem, sign_up
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import COFFEE, pay, payment_body, sql

pytestmark = pytest.mark.usefixtures("network_simulator")

TOKYO = {
    "id": "mch_tsukiji",
    "name": "Tsukiji Sushi",
    "mcc": "5812",
    "country": "JP",
    "city": "Tokyo",
    "latitude": 35.6655,
    "longitude": 139.7707,
}


@pytest.fixture
async def alice(client: httpx.AsyncClient) -> SignedIn:
    """A customer at home: registered in the US, paying US merchants (the suite's default
    users are registered in DE, and a first payment abroad is what the model finds unusual)."""
    return await sign_up(client, name="Alice Example", country="US")


@pytest.fixture
async def bob(client: httpx.AsyncClient) -> SignedIn:
    return await sign_up(client, name="Bob Example", country="US")


async def decisions(app: Any, subject_id: str) -> list[Any]:
    return await sql(
        app, "SELECT * FROM fraud.decisions WHERE subject_id = :s ORDER BY id", s=subject_id
    )


@asynccontextmanager
async def rule(
    client: httpx.AsyncClient, admin: SignedIn, expression: str, **fields: Any
) -> AsyncIterator[str]:
    """A rule created through the admin API for the block, disabled afterwards (the app and
    its database are shared by the session). Waits out the rule book's refresh."""
    rule_id = f"t_{uuid.uuid4().hex[:12]}"
    body = {
        "id": rule_id,
        "expression": expression,
        "reason_code": rule_id,
        "description": "A test rule",
        "state": "active",
        **fields,
    }
    r = await client.post("/v1/admin/fraud/rules", json=body, headers=idem(**admin.headers))
    assert r.status_code == 201, r.text
    await asyncio.sleep(1.1)
    try:
        yield rule_id
    finally:
        r = await client.post(
            f"/v1/admin/fraud/rules/{rule_id}/disable", headers=idem(**admin.headers)
        )
        assert r.status_code == 200, r.text
        await asyncio.sleep(1.1)


async def test_a_normal_payment_is_allowed_and_its_decision_stored(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 50_000)
    r = await pay(client, alice, payment_body(amount=1_250))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "authorized"
    (d,) = await decisions(app, r.json()["id"])
    assert d.action == "allow" and d.subject_kind == "payment" and d.user_id == alice.user["id"]
    assert d.rule_version and d.rule_version.startswith("rs_")
    assert set(d.features) == set(FEATURE_NAMES)
    assert d.features["amount"] == 1_250 and d.features["user_count_1m"] == 1
    assert not d.degraded
    (payment,) = await sql(
        app,
        "SELECT risk_action FROM transactions.transaction_details WHERE transaction_id = :i",
        i=r.json()["id"],
    )
    assert payment.risk_action == "allow"


async def test_a_normal_transfer_is_allowed(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    r = await client.post(
        "/v1/transfers",
        json={"recipient": {"user_id": bob.user["id"]}, "amount": 2_000, "currency": "USD"},
        headers=idem(**alice.headers),
    )
    assert r.status_code == 201 and r.json()["status"] == "completed", r.text
    (d,) = await decisions(app, r.json()["id"])
    assert d.action == "allow" and d.subject_kind == "transfer"
    assert d.features["new_recipient"] is True and d.features["kind"] == "transfer"


async def test_a_card_testing_burst_is_blocked(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, network_simulator: Any
) -> None:
    method = await add_card(client, alice)
    assert method["status"] == "verified", method
    answers = []
    for _ in range(6):
        body = payment_body("card", method["id"], amount=150, channel="ecommerce")
        r = await pay(client, alice, body)
        assert r.status_code in (201, 202), r.text
        answers.append((r.json()["status"], r.json().get("decline_code")))
    # Four go through; from the fifth attempt on the card within a minute, blocked before the
    # network is asked.
    assert [s for s, _ in answers[:4]] == ["authorized"] * 4
    assert answers[4:] == [("declined", "blocked")] * 2
    blocked = await sql(
        app,
        "SELECT reasons, features FROM fraud.decisions WHERE user_id = :u AND action = 'block'",
        u=alice.user["id"],
    )
    assert len(blocked) == 2
    assert all("card_testing_burst" in b.reasons for b in blocked)
    assert blocked[0].features["card_count_1m"] == 5


async def test_impossible_travel_is_challenged_then_resumes_after_step_up(
    client: httpx.AsyncClient, app: Any
) -> None:
    from tests.integration.test_mfa import verify_contact
    from tests.integration.test_transfers import _step_up_token

    dora = await sign_up(client, name="Dora Explorer", country="US")
    await verify_contact(app, client, dora, "email")
    await fund(app, dora.user["id"], 50_000)
    r = await pay(client, dora, payment_body(amount=900, merchant=dict(COFFEE)))
    assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
    # Minutes later, 8,000 km away.
    body = payment_body(amount=2_400, merchant=dict(TOKYO))
    key = uuid.uuid4().hex
    r = await pay(client, dora, body, key=key)
    assert r.status_code == 202, r.text
    p = r.json()
    assert p["status"] == "challenge_required"
    (d,) = await decisions(app, p["id"])
    assert d.action == "challenge" and "impossible_travel" in d.reasons
    assert d.features["km_from_last"] > 8_000 and d.features["speed_kmh"] > 900

    token = await _step_up_token(app, client, dora, purpose="payment", reference=p["id"])
    r = await pay(client, dora, body, key=key, **{"X-Step-Up-Token": token})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "authorized" and r.json()["id"] == p["id"]
    first, resumed = await decisions(app, p["id"])
    assert first.action == "challenge" and not first.stepped_up
    assert resumed.stepped_up and resumed.action == "allow"
    assert resumed.features["stepped_up"] is True


async def test_a_shadow_rule_is_logged_not_enforced(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 50_000)
    async with rule(client, admin, "amount == 7702", action="block", state="shadow") as rid:
        r = await pay(client, alice, payment_body(amount=7_702))
    assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
    (d,) = await decisions(app, r.json()["id"])
    assert d.action == "allow"
    (hit,) = [h for h in d.hits if h["rule_id"] == rid]
    assert hit["shadow"] is True and hit["action"] == "block"
    assert rid not in d.reasons


async def case_of(client: httpx.AsyncClient, admin: SignedIn, user_id: str) -> dict[str, Any]:
    r = await client.get(
        "/v1/admin/fraud/cases",
        params={"user_id": user_id, "status": "open"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    (case,) = r.json()["data"]
    return case  # type: ignore[no-any-return]


async def test_review_opens_a_case_and_release_completes_the_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 20_000)
    async with rule(client, admin, "amount == 4701 && !is_payment", action="review"):
        r = await client.post(
            "/v1/transfers",
            json={"recipient": {"user_id": bob.user["id"]}, "amount": 4_701, "currency": "USD"},
            headers=idem(**alice.headers),
        )
    assert r.status_code == 201 and r.json()["status"] == "pending", r.text
    transfer_id = r.json()["id"]
    case = await case_of(client, admin, alice.user["id"])
    assert case["subject_id"] == transfer_id and case["subject_kind"] == "transfer"
    assert case["amount"] == 4_701 and case["status"] == "open"

    got = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
    assert got.status_code == 200
    detail = got.json()
    assert detail["decision"]["action"] == "review"
    assert detail["decision"]["features"]["amount"] == 4_701
    assert [a["action"] for a in detail["audit"]] == ["opened"]

    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/assign", json={}, headers=idem(**admin.headers)
    )
    assert r.status_code == 200 and r.json()["status"] == "assigned"
    assert r.json()["assignee_id"] == admin.user["id"]
    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/comments",
        json={"body": "Called the customer: it is rent for Bob."},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 201
    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/decision",
        json={"decision": "release", "note": "confirmed with the customer"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200, r.text
    decided = r.json()
    assert decided["status"] == "decided" and decided["outcome"] == "release"
    assert decided["subject_status"] == "completed"
    assert decided["decision"]["label"] == "legit"
    assert [a["action"] for a in decided["audit"]] == ["opened", "assigned", "commented", "decided"]
    assert [c["body"] for c in decided["comments"]] == ["Called the customer: it is rent for Bob."]
    seen = await client.get(f"/v1/transfers/{transfer_id}", headers=bob.headers)
    assert seen.json()["status"] == "completed"
    wallet = await client.get("/v1/wallet", headers=bob.headers)
    assert {b["currency"]: b["available"] for b in wallet.json()["balances"]}["USD"] == 4_701

    # Decided once: a second decision (any) is a conflict, nothing moves again.
    for outcome in ("release", "confirm_fraud"):
        r = await client.post(
            f"/v1/admin/fraud/cases/{case['id']}/decision",
            json={"decision": outcome},
            headers=idem(**admin.headers),
        )
        assert r.status_code == 409 and r.json()["code"] == "case_decided"
    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/assign", json={}, headers=idem(**admin.headers)
    )
    assert r.status_code == 409
    events = await sql(
        app,
        "SELECT type FROM platform.outbox WHERE subject = :c ORDER BY seq",
        c=case["id"],
    )
    assert [e.type for e in events] == [
        "billfold.fraud.case.opened",
        "billfold.fraud.case.assigned",
        "billfold.fraud.case.commented",
        "billfold.fraud.case.decided",
    ]


async def test_confirmed_fraud_voids_the_payment_and_labels_the_decision(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 20_000)
    async with rule(client, admin, "amount == 7703 && is_payment", action="review"):
        r = await pay(client, alice, payment_body(amount=7_703))
    assert r.status_code == 202 and r.json()["status"] == "review", r.text
    payment_id = r.json()["id"]
    wallet = await client.get("/v1/wallet", headers=alice.headers)
    assert {b["currency"]: b["held"] for b in wallet.json()["balances"]}["USD"] == 7_703
    case = await case_of(client, admin, alice.user["id"])
    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/decision",
        json={"decision": "confirm_fraud"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200, r.text
    assert r.json()["subject_status"] == "voided" and r.json()["decision"]["label"] == "fraud"
    (row,) = await sql(app, "SELECT label FROM fraud.decisions WHERE subject_id = :s", s=payment_id)
    assert row.label == "fraud"
    wallet = await client.get("/v1/wallet", headers=alice.headers)
    usd = {b["currency"]: b for b in wallet.json()["balances"]}["USD"]
    assert usd["held"] == 0 and usd["available"] == 20_000


async def test_cases_need_an_admin_and_unknown_ones_are_404(
    client: httpx.AsyncClient, alice: SignedIn, admin: SignedIn
) -> None:
    r = await client.get("/v1/admin/fraud/cases", headers=alice.headers)
    assert r.status_code == 403
    r = await client.get("/v1/admin/fraud/cases/case_nope", headers=admin.headers)
    assert r.status_code == 404 and r.json()["code"] == "case_not_found"
    r = await client.post(
        "/v1/admin/fraud/cases/case_nope/decision",
        json={"decision": "maybe"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 422
    r = await client.get("/v1/admin/fraud/cases", params={"limit": 0}, headers=admin.headers)
    assert r.status_code == 422


async def test_redis_unavailable_falls_back_without_an_error(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 50_000)
    rt = app.state.fraud
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    live, rt.features = rt.features, RedisFeatures(dead, budget_ms=50)
    try:
        r = await pay(client, alice, payment_body(amount=1_100))
        t = await client.post(
            "/v1/transfers",
            json={"recipient": {"user_id": bob.user["id"]}, "amount": 900, "currency": "USD"},
            headers=idem(**alice.headers),
        )
    finally:
        rt.features = live
        await dead.aclose()
    assert r.status_code < 500 and t.status_code < 500, (r.text, t.text)
    for subject in (r.json()["id"], t.json().get("id")):
        if subject is None:
            continue
        (d,) = await decisions(app, subject)
        assert d.degraded and d.fallback == "features"
        assert "degraded_features" in d.reasons
        assert set(d.features) == set(FEATURE_NAMES)


async def test_a_contact_on_the_recipient_block_list_blocks_transfers_to_it(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, admin: SignedIn
) -> None:
    """An e-mail or phone on the block list stops money sent to that contact, however the
    sender writes it (case, spaces); another contact is not stopped."""
    await fund(app, alice.user["id"], 20_000)
    tag = uuid.uuid4().hex[:8]
    phone_tail = int(tag[:4], 16) % 100
    listed = {
        "email": (f"Mule.{tag}@Example.com", f"mule.{tag}@EXAMPLE.com"),
        "phone": (f"+49 151 234567{phone_tail:02d}", f"+49151234567{phone_tail:02d}"),
    }
    entries = []
    for kind, (value, _) in listed.items():
        r = await client.post(
            "/v1/admin/fraud/lists",
            json={"list": "block", "kind": "recipient", "value": value, "reason": f"mule {kind}"},
            headers=idem(**admin.headers),
        )
        assert r.status_code == 201, r.text
        entries.append(r.json()["id"])
    await asyncio.sleep(1.1)  # the rule book's refresh
    try:
        for kind, (_, sent_to) in listed.items():
            r = await client.post(
                "/v1/transfers",
                json={"recipient": {kind: sent_to}, "amount": 1_500, "currency": "USD"},
                headers=idem(**alice.headers),
            )
            assert (r.status_code, r.json()["code"]) == (422, "transfer_declined"), (kind, r.text)
        r = await client.post(
            "/v1/transfers",
            json={
                "recipient": {"email": f"friend.{tag}@example.com"},
                "amount": 1_500,
                "currency": "USD",
            },
            headers=idem(**alice.headers),
        )
        assert r.status_code == 201, r.text
        blocked = await sql(
            app,
            "SELECT reasons FROM fraud.decisions WHERE user_id = :u AND action = 'block'",
            u=alice.user["id"],
        )
        assert len(blocked) == 2
        assert all("block_list_recipient" in d.reasons for d in blocked)
    finally:
        for entry in entries:
            await client.delete(f"/v1/admin/fraud/lists/{entry}", headers=admin.headers)
