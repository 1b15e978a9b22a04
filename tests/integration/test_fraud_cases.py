"""The review queue's admin API on real PostgreSQL: filters and cursor pages, assignment (to
oneself or another reviewer) with its audit trail, comments, a decided case refusing more, a
replayed decision (Idempotency-Key), and a case whose transfer is no longer held.

Cases are opened by the decision layer itself (`FraudRiskCheck` with stand-in features, rules
and model, as in test_fraud_decisions.py); the subjects are ids with no payment or transfer
behind them unless a test says otherwise (the HTTP flows with real ones are in
test_fraud_flows.py)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import text

from billfold.config import Settings
from billfold.fraud.cases import expiry_consumer
from billfold.fraud.service import FraudRiskCheck
from billfold.platform.bus.consumers import ConsumerSink
from billfold.platform.ids import new_id
from tests.conftest import SignedIn, idem, make_admin
from tests.integration.test_fraud_decisions import Rules, make_runtime, payment, transfer


async def open_cases(app: Any, settings: Settings, user_id: str, kinds: str) -> list[str]:
    """One review case per letter of `kinds` (p: payment, t: transfer), oldest first."""
    check = FraudRiskCheck(make_runtime(settings, app, rules=Rules(at=0, action="review")))
    subjects = []
    for kind in kinds:
        async with app.state.resources.engine.begin() as conn:
            if kind == "p":
                p = payment(user_id)
                assert (await check.payments.assess(conn, p)).action == "review"
                subjects.append(p.transaction_id)
            else:
                t = transfer(user_id)
                assert (await check.transfers.assess(conn, t)).action == "review"
                subjects.append(t.transfer_id)
    return subjects


def who() -> str:
    return new_id("usr")


async def get(client: httpx.AsyncClient, admin: SignedIn, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/admin/fraud/cases", params=params, headers=admin.headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def post(
    client: httpx.AsyncClient, admin: SignedIn, path: str, body: Any, key: str | None = None
) -> httpx.Response:
    headers = {**admin.headers, "Idempotency-Key": key or uuid.uuid4().hex}
    return await client.post(f"/v1/admin/fraud/cases{path}", json=body, headers=headers)


async def test_queue_filters_and_pages(
    client: httpx.AsyncClient, app: Any, settings: Settings, admin: SignedIn
) -> None:
    user = who()
    subjects = await open_cases(app, settings, user, "pptp")
    page = await get(client, admin, user_id=user)
    assert [c["subject_id"] for c in page["data"]] == subjects  # oldest first
    assert page["next_cursor"] is None
    assert all(c["status"] == "open" and c["user_id"] == user for c in page["data"])

    first = await get(client, admin, user_id=user, limit=3)
    assert [c["subject_id"] for c in first["data"]] == subjects[:3]
    rest = await get(client, admin, user_id=user, limit=3, cursor=first["next_cursor"])
    assert [c["subject_id"] for c in rest["data"]] == subjects[3:]
    assert rest["next_cursor"] is None

    transfers = await get(client, admin, user_id=user, subject_kind="transfer")
    assert [c["subject_id"] for c in transfers["data"]] == [subjects[2]]

    case_id = page["data"][1]["id"]
    r = await post(client, admin, f"/{case_id}/assign", {})
    assert r.status_code == 200, r.text
    assigned = await get(client, admin, user_id=user, status="assigned")
    assert [c["id"] for c in assigned["data"]] == [case_id]
    mine = await get(client, admin, assignee_id=admin.user["id"], user_id=user)
    assert [c["id"] for c in mine["data"]] == [case_id]
    still_open = await get(client, admin, user_id=user, status="open")
    assert len(still_open["data"]) == 3

    r = await client.get(
        "/v1/admin/fraud/cases", params={"status": "closed"}, headers=admin.headers
    )
    assert r.status_code == 422
    r = await client.get(
        "/v1/admin/fraud/cases", params={"cursor": "!!not-a-cursor"}, headers=admin.headers
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor"


async def test_assignment_moves_between_reviewers_with_an_audit_trail(
    client: httpx.AsyncClient, app: Any, settings: Settings, admin: SignedIn
) -> None:
    other = await make_admin(app, client)
    (subject,) = await open_cases(app, settings, who(), "p")
    case = (await get(client, admin, user_id=(await _user_of(app, subject))))["data"][0]
    r = await post(client, admin, f"/{case['id']}/assign", {"assignee_id": other.user["id"]})
    assert r.status_code == 200 and r.json()["assignee_id"] == other.user["id"]
    # Taking it again changes nothing; the other reviewer then takes it themselves.
    r = await post(client, admin, f"/{case['id']}/assign", {"assignee_id": other.user["id"]})
    assert r.status_code == 200
    r = await post(client, admin, f"/{case['id']}/assign", {})
    assert r.json()["assignee_id"] == admin.user["id"]
    audit = [(a["action"], a["actor_id"], a["detail"]) for a in r.json()["audit"]]
    assert audit == [
        ("opened", None, {"decision_id": r.json()["decision"]["id"]}),
        ("assigned", admin.user["id"], {"from": None, "to": other.user["id"]}),
        ("assigned", admin.user["id"], {"from": other.user["id"], "to": admin.user["id"]}),
    ]


async def _user_of(app: Any, subject_id: str) -> str:
    async with app.state.resources.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT user_id FROM fraud.cases WHERE subject_id = :s"), {"s": subject_id}
        )
        return str(found.scalar_one())


async def test_comments_and_a_decided_case(
    client: httpx.AsyncClient, app: Any, settings: Settings, admin: SignedIn
) -> None:
    user = who()
    await open_cases(app, settings, user, "t")
    case = (await get(client, admin, user_id=user))["data"][0]
    r = await post(client, admin, f"/{case['id']}/comments", {"body": "Looks like a mule."})
    assert r.status_code == 201 and r.json()["author_id"] == admin.user["id"]
    for bad in ({"body": ""}, {}, {"body": "x" * 4001}):
        r = await post(client, admin, f"/{case['id']}/comments", bad)
        assert r.status_code == 422, bad
    r = await post(client, admin, "/case_unknown/comments", {"body": "hello"})
    assert r.status_code == 404 and r.json()["code"] == "case_not_found"

    # A decision moves money: without an Idempotency-Key it is refused, and decides nothing.
    r = await client.post(
        f"/v1/admin/fraud/cases/{case['id']}/decision",
        json={"decision": "confirm_fraud"},
        headers=admin.headers,
    )
    assert (r.status_code, r.json()["code"]) == (428, "idempotency_key_required"), r.text
    assert (await get(client, admin, user_id=user))["data"][0]["status"] == "open"
    # A misspelt field or a lax boolean is refused, not silently ignored or taken for "true".
    for bad in (
        {"decision": "release", "unlock": True},
        {"decision": "release", "unlock_account": "yes"},
        {"decision": "release", "unlock_account": 1},
    ):
        r = await post(client, admin, f"/{case['id']}/decision", bad)
        assert (r.status_code, r.json()["code"]) == (422, "validation_failed"), bad
    assert (await get(client, admin, user_id=user))["data"][0]["status"] == "open"

    # The transfer behind this case is not held (there is none): the case is still decided, the
    # label recorded, and what became of the subject is said.
    key = uuid.uuid4().hex
    r = await post(client, admin, f"/{case['id']}/decision", {"decision": "confirm_fraud"}, key)
    assert r.status_code == 200, r.text
    decided = r.json()
    assert decided["outcome"] == "confirm_fraud" and decided["subject_status"] == "not_pending"
    assert decided["decision"]["label"] == "fraud" and decided["decided_by"] == admin.user["id"]
    # The same request again (same key) is the same answer, not a conflict.
    again = await post(client, admin, f"/{case['id']}/decision", {"decision": "confirm_fraud"}, key)
    assert again.status_code == 200 and again.json() == decided
    r = await post(client, admin, f"/{case['id']}/decision", {"decision": "release"})
    assert r.status_code == 409 and r.json()["code"] == "case_decided"
    assert r.json()["outcome"] == "confirm_fraud"
    # A comment after the decision is still welcome (what was learnt later).
    r = await post(client, admin, f"/{case['id']}/comments", {"body": "Chargeback came in."})
    assert r.status_code == 201
    final = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
    assert [a["action"] for a in final.json()["audit"]] == [
        "opened",
        "commented",
        "decided",
        "commented",
    ]


async def test_only_admins(
    client: httpx.AsyncClient, app: Any, settings: Settings, alice: SignedIn, admin: SignedIn
) -> None:
    user = who()
    await open_cases(app, settings, user, "p")
    case = (await get(client, admin, user_id=user))["data"][0]
    for method, path, body in (
        ("GET", "", None),
        ("GET", f"/{case['id']}", None),
        ("POST", f"/{case['id']}/assign", {}),
        ("POST", f"/{case['id']}/comments", {"body": "hi"}),
        ("POST", f"/{case['id']}/decision", {"decision": "release"}),
    ):
        r = await client.request(
            method, f"/v1/admin/fraud/cases{path}", json=body, headers=idem(**alice.headers)
        )
        assert r.status_code == 403, (method, path, r.text)
        r = await client.request(method, f"/v1/admin/fraud/cases{path}", json=body)
        assert r.status_code == 401, (method, path)
    unchanged = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
    assert unchanged.json()["status"] == "open" and unchanged.json()["comments"] == []


async def test_a_lapsed_payment_does_not_overwrite_a_claimed_decision(
    app: Any, settings: Settings
) -> None:
    """A release claimed (and perhaps applied: approve_review, then a crash) before the payment
    lapsed uncaptured: the expiry consumer leaves the claim for the release's retry to settle,
    instead of marking the case expired and refusing that retry."""
    user = who()
    (payment_id,) = await open_cases(app, settings, user, "p")
    engine = app.state.resources.engine
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE fraud.cases SET subject_status = 'releasing' WHERE subject_id = :s"),
            {"s": payment_id},
        )
    consumer = expiry_consumer()
    sink = ConsumerSink(engine, [consumer])
    event = {
        "id": new_id("evt"),
        "type": "billfold.transactions.payment.expired",
        "data": {"transaction_id": payment_id},
    }
    assert await sink.deliver(consumer, event)
    async with engine.connect() as conn:
        status = await conn.execute(
            text("SELECT subject_status FROM fraud.cases WHERE subject_id = :s"),
            {"s": payment_id},
        )
        assert status.scalar_one() == "releasing"
