"""KYC over HTTP: submit, status, review queue, admin decisions, audit and events."""

from __future__ import annotations

import secrets
import uuid
from datetime import date
from typing import Any

import pytest
from sqlalchemy import text

from billfold.platform.db import unit_of_work
from billfold.platform.ids import new_id
from billfold.users import kyc
from billfold.users.events import KYC_STATUS_CHANGED
from tests.conftest import SignedIn, sign_up

_DE_CHARS = "0123456789CFGHJKLMNPRTVWXYZ"
SANCTIONED_DOB = "1961-03-14"  # Viktor Drazhenko, SMP-0001 in the shipped sample list


def passport_number() -> str:
    """A fresh, well-formed German passport number (each test needs its own document)."""
    return "C" + "".join(secrets.choice(_DE_CHARS) for _ in range(8))


def kyc_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "legal_name": "Ada Lovelace",
        "date_of_birth": "1990-05-17",  # the registration default in conftest
        "address": {
            "line1": "Unter den Linden 77",
            "city": "Berlin",
            "postal_code": "10117",
            "country": "DE",
        },
        "document_type": "passport",
        "document_country": "DE",
        "document_number": passport_number(),
    }
    body.update(overrides)
    return body


def state_of(app: Any) -> Any:
    """`app.state` of the FastAPI app, also when the fixture hands out asgi-lifespan's wrapper."""
    if hasattr(app, "state"):
        return app.state
    for cell in getattr(app, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "state"):
            return cell.cell_contents.state
    raise AssertionError("cannot find the FastAPI app behind the `app` fixture")


async def sql(app: Any, query: str, **params: Any) -> list[Any]:
    async with state_of(app).resources.engine.connect() as conn:
        return list((await conn.execute(text(query), params)).all())


async def audit_rows(app: Any, user_id: str) -> list[tuple[str, str, str]]:
    rows = await sql(
        app,
        "SELECT from_status, to_status, actor FROM users.kyc_audit WHERE user_id = :u ORDER BY id",
        u=user_id,
    )
    return [(r.from_status, r.to_status, r.actor) for r in rows]


async def kyc_events(app: Any, user_id: str) -> list[dict[str, Any]]:
    rows = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE type = :t AND subject = :u ORDER BY seq",
        t=KYC_STATUS_CHANGED,
        u=user_id,
    )
    return [r.data for r in rows]


async def submission_count(app: Any, user_id: str) -> int:
    rows = await sql(
        app, "SELECT count(*) AS n FROM users.kyc_submissions WHERE user_id = :u", u=user_id
    )
    return int(rows[0].n)


async def kyc_status(client: Any, who: SignedIn) -> tuple[str, int]:
    r = await client.get("/v1/me/kyc", headers=who.headers)
    assert r.status_code == 200, r.text
    return r.json()["status"], r.json()["tier"]


async def submit(client: Any, who: SignedIn, **overrides: Any) -> Any:
    return await client.post("/v1/me/kyc", json=kyc_body(**overrides), headers=who.headers)


async def in_review(client: Any) -> SignedIn:
    """A user whose submission went to review (a spelling variant of a listed name)."""
    who = await sign_up(client, date_of_birth=SANCTIONED_DOB)
    r = await submit(client, who, legal_name="Victor Drazenko", date_of_birth=SANCTIONED_DOB)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "review"
    return who


# --- submitting -----------------------------------------------------------------------------------


async def test_clean_identity_is_verified_audited_and_published(app, client, alice):
    assert await kyc_status(client, alice) == ("unverified", 0)
    number = passport_number()
    body = kyc_body(document_number=f" {number[:4].lower()}-{number[4:]} ")  # normalised
    r = await client.post("/v1/me/kyc", json=body, headers=alice.headers)
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["id"].startswith("kyc_")
    assert (sub["status"], sub["tier"]) == ("verified", 1)
    assert sub["document_type"] == "passport" and sub["document_country"] == "DE"
    assert {c["name"] for c in sub["checks"]} == {"age", "document_number", "address"}
    assert all(c["result"] == "pass" for c in sub["checks"])
    assert sub["reason"] is None and sub["decided_at"] is not None
    assert number not in r.text and "document_number" not in sub

    state = (await client.get("/v1/me/kyc", headers=alice.headers)).json()
    assert (state["status"], state["tier"], state["can_submit"]) == ("verified", 1, False)
    assert state["submission"]["id"] == sub["id"]
    me = (await client.get("/v1/me", headers=alice.headers)).json()
    assert (me["kyc_status"], me["kyc_tier"]) == ("verified", 1)

    uid = alice.user["id"]
    row = (
        await sql(
            app,
            "SELECT document_number_last4 AS last4, document_number_hash AS h, decided_by "
            "FROM users.kyc_submissions WHERE id = :id",
            id=sub["id"],
        )
    )[0]
    assert row.last4 == number[-4:]
    assert len(bytes(row.h)) == 32 and number.encode() not in bytes(row.h)
    assert row.decided_by == "system:builtin-kyc"
    assert await audit_rows(app, uid) == [
        ("unverified", "pending", uid),
        ("pending", "verified", "system:builtin-kyc"),
    ]
    events = await kyc_events(app, uid)
    assert [(e["from_status"], e["to_status"], e["tier"]) for e in events] == [
        ("unverified", "pending", 0),
        ("pending", "verified", 1),
    ]
    assert all(e["submission_id"] == sub["id"] and e["user_id"] == uid for e in events)
    assert number not in str(events)


async def test_verified_email_and_phone_give_tier_2(app, client, alice):
    await sql_exec(
        app,
        "UPDATE users.users SET email_verified_at = now(), phone_verified_at = now() WHERE id = :u",
        u=alice.user["id"],
    )
    r = await submit(client, alice)
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["tier"]) == ("verified", 2)
    assert await kyc_status(client, alice) == ("verified", 2)


async def sql_exec(app: Any, query: str, **params: Any) -> None:
    async with state_of(app).resources.engine.begin() as conn:
        await conn.execute(text(query), params)


async def test_refresh_tier_raises_tier_when_contacts_are_verified_later(app, client, alice):
    assert (await submit(client, alice)).json()["tier"] == 1
    uid = alice.user["id"]
    await sql_exec(
        app,
        "UPDATE users.users SET email_verified_at = now(), phone_verified_at = now() WHERE id = :u",
        u=uid,
    )
    async with unit_of_work(state_of(app).resources.engine) as uow:
        assert await kyc.refresh_tier(await uow.connection(), uid) == 2
    assert await kyc_status(client, alice) == ("verified", 2)
    assert (await audit_rows(app, uid))[-1] == ("verified", "verified", "system:kyc-tier")
    assert (await kyc_events(app, uid))[-1]["tier"] == 2
    async with unit_of_work(state_of(app).resources.engine) as uow:  # nothing changed: no new row
        assert await kyc.refresh_tier(await uow.connection(), uid) == 2
    assert len(await audit_rows(app, uid)) == 3


async def test_resubmission_after_verified_is_409_and_changes_nothing(app, client, alice):
    assert (await submit(client, alice)).status_code == 201
    before = (await audit_rows(app, alice.user["id"]), await kyc_events(app, alice.user["id"]))
    r = await submit(client, alice)
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "already_verified"
    assert await submission_count(app, alice.user["id"]) == 1
    assert before == (
        await audit_rows(app, alice.user["id"]),
        await kyc_events(app, alice.user["id"]),
    )


async def test_minor_is_rejected(app, client):
    today = date.today()
    dob = today.replace(year=today.year - 16, day=min(today.day, 28)).isoformat()
    teen = await sign_up(client, date_of_birth=dob)
    r = await submit(client, teen, date_of_birth=dob)
    assert r.status_code == 201, r.text
    sub = r.json()
    assert (sub["status"], sub["tier"]) == ("rejected", 0)
    age = next(c for c in sub["checks"] if c["name"] == "age")
    assert age["result"] == "fail" and "18" in age["reason"]
    assert "18" in sub["reason"]
    assert await kyc_status(client, teen) == ("rejected", 0)


async def test_rejected_user_may_resubmit_and_lists_their_submissions(app, client, alice):
    r = await submit(client, alice, document_number="A01X00T47")  # DE passports start C-K
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["status"] == "rejected"
    assert "C, F, G, H, J or K" in first["reason"]
    state = (await client.get("/v1/me/kyc", headers=alice.headers)).json()
    assert state["can_submit"] is True
    r = await submit(client, alice)
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["status"] == "verified"
    assert await audit_rows(app, alice.user["id"]) == [
        ("unverified", "pending", alice.user["id"]),
        ("pending", "rejected", "system:builtin-kyc"),
        ("rejected", "pending", alice.user["id"]),
        ("pending", "verified", "system:builtin-kyc"),
    ]
    page = (await client.get("/v1/me/kyc/submissions", headers=alice.headers)).json()
    assert [s["id"] for s in page["data"]] == [second["id"], first["id"]]
    page1 = (
        await client.get("/v1/me/kyc/submissions", params={"limit": 1}, headers=alice.headers)
    ).json()
    assert [s["id"] for s in page1["data"]] == [second["id"]]
    page2 = (
        await client.get(
            "/v1/me/kyc/submissions",
            params={"limit": 1, "cursor": page1["next_cursor"]},
            headers=alice.headers,
        )
    ).json()
    assert [s["id"] for s in page2["data"]] == [first["id"]] and page2["next_cursor"] is None
    one = await client.get(f"/v1/me/kyc/submissions/{first['id']}", headers=alice.headers)
    assert one.status_code == 200 and one.json()["status"] == "rejected"


async def test_incomplete_address_is_rejected_with_reasons(client, alice):
    address = {"line1": "Postfach 12", "city": "Berlin", "postal_code": "1011", "country": "DE"}
    r = await submit(client, alice, address=address)
    assert r.status_code == 201, r.text
    check = next(c for c in r.json()["checks"] if c["name"] == "address")
    assert check["result"] == "fail"
    assert "PO box" in check["reason"] and "postal code" in check["reason"]


async def test_too_many_submissions_in_a_day_is_429(app, client, alice):
    for _ in range(kyc.MAX_SUBMISSIONS_PER_DAY):
        r = await submit(client, alice, document_number="A01X00T47")
        assert r.json()["status"] == "rejected"
    r = await submit(client, alice)
    assert r.status_code == 429
    assert r.json()["code"] == "too_many_submissions"
    assert "retry-after" in r.headers
    assert await submission_count(app, alice.user["id"]) == kyc.MAX_SUBMISSIONS_PER_DAY
    assert await kyc_status(client, alice) == ("rejected", 0)


async def test_idempotent_retry_replays_the_first_answer(app, client, alice):
    body = kyc_body()
    headers = {**alice.headers, "Idempotency-Key": uuid.uuid4().hex}
    first = await client.post("/v1/me/kyc", json=body, headers=headers)
    again = await client.post("/v1/me/kyc", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert await submission_count(app, alice.user["id"]) == 1


# --- sanctions, consistency and reuse -------------------------------------------------------------


async def test_sanctions_hit_is_rejected_without_tipping_off(app, client, admin):
    who = await sign_up(client, date_of_birth=SANCTIONED_DOB)
    r = await submit(client, who, legal_name="Viktor Drazhenko", date_of_birth=SANCTIONED_DOB)
    assert r.status_code == 201, r.text
    sub = r.json()
    assert (sub["status"], sub["tier"]) == ("rejected", 0)
    assert "sanctions" not in r.text.lower() and "SMP-0001" not in r.text
    assert sub["reason"] == "We could not verify your identity with these details"

    view = await client.get(f"/v1/admin/kyc/submissions/{sub['id']}", headers=admin.headers)
    assert view.status_code == 200, view.text
    sanctions = next(c for c in view.json()["checks"] if c["name"] == "sanctions")
    assert sanctions["result"] == "fail"
    assert sanctions["detail"]["matches"][0]["entry_id"] == "SMP-0001"
    assert sanctions["detail"]["matches"][0]["list"] == "OFAC-SDN sample"

    # Trying another spelling afterwards always lands in manual review.
    r = await submit(client, who, legal_name="Ada Lovelace", date_of_birth=SANCTIONED_DOB)
    assert r.json()["status"] == "review"
    view = await client.get(f"/v1/admin/kyc/submissions/{r.json()['id']}", headers=admin.headers)
    names = {c["name"]: c["result"] for c in view.json()["checks"]}
    assert names["sanctions_history"] == "review" and names["sanctions"] == "pass"


async def test_birth_date_other_than_the_accounts_goes_to_review(client, alice):
    r = await submit(client, alice, date_of_birth="1991-05-17")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "review"
    match = next(c for c in r.json()["checks"] if c["name"] == "profile_match")
    assert match["result"] == "review"


async def test_document_used_by_another_account_goes_to_review(client, alice, bob, admin):
    number = passport_number()
    assert (await submit(client, alice, document_number=number)).json()["status"] == "verified"
    r = await submit(client, bob, document_number=number)
    assert r.json()["status"] == "review"
    assert "another account" not in r.text  # the owner is not told about other accounts
    view = await client.get(f"/v1/admin/kyc/submissions/{r.json()['id']}", headers=admin.headers)
    names = {c["name"]: c["result"] for c in view.json()["checks"]}
    assert names["document_uniqueness"] == "review"


# --- review and admin decisions -------------------------------------------------------------------


async def test_review_then_admin_verifies(app, client, admin):
    who = await in_review(client)
    uid = who.user["id"]
    state = (await client.get("/v1/me/kyc", headers=who.headers)).json()
    assert (state["status"], state["tier"], state["can_submit"]) == ("review", 0, False)
    sub_id = state["submission"]["id"]
    assert "being reviewed" in state["submission"]["reason"]

    r = await submit(client, who)
    assert r.status_code == 409 and r.json()["code"] == "kyc_in_review"

    view = (await client.get(f"/v1/admin/kyc/submissions/{sub_id}", headers=admin.headers)).json()
    assert view["user_id"] == uid and view["status"] == "review"
    assert view["legal_name"] == "Victor Drazenko"
    assert len(view["document_number_last4"]) == 4
    assert "document_number" not in view
    assert [(h["from_status"], h["to_status"]) for h in view["history"]] == [
        ("unverified", "pending"),
        ("pending", "review"),
    ]

    r = await client.post(
        f"/v1/admin/kyc/submissions/{sub_id}/decision",
        json={"decision": "verified", "reason": "Different person: checked passport photo"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    decided = r.json()
    assert (decided["status"], decided["tier"], decided["decided_by"]) == (
        "verified",
        1,
        admin.user["id"],
    )
    assert decided["history"][-1]["actor"] == admin.user["id"]
    assert decided["history"][-1]["reason"] == "Different person: checked passport photo"
    assert await kyc_status(client, who) == ("verified", 1)
    assert (await audit_rows(app, uid))[-1] == ("review", "verified", admin.user["id"])
    last = (await kyc_events(app, uid))[-1]
    assert (last["from_status"], last["to_status"], last["actor"]) == (
        "review",
        "verified",
        admin.user["id"],
    )

    again = await client.post(
        f"/v1/admin/kyc/submissions/{sub_id}/decision",
        json={"decision": "rejected", "reason": "changed my mind"},
        headers=admin.headers,
    )
    assert again.status_code == 409 and again.json()["code"] == "not_in_review"
    assert await kyc_status(client, who) == ("verified", 1)


async def test_admin_rejection_allows_a_new_submission(client, admin):
    who = await in_review(client)
    sub_id = (await client.get("/v1/me/kyc", headers=who.headers)).json()["submission"]["id"]
    r = await client.post(
        f"/v1/admin/kyc/submissions/{sub_id}/decision",
        json={"decision": "rejected", "reason": "Internal note: document photo unreadable"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    state = (await client.get("/v1/me/kyc", headers=who.headers)).json()
    assert (state["status"], state["tier"], state["can_submit"]) == ("rejected", 0, True)
    assert "Internal note" not in str(state)
    r = await submit(client, who, date_of_birth=SANCTIONED_DOB)
    assert r.status_code == 201, r.text


async def test_decision_on_a_decided_submission_is_409(client, alice, admin):
    sub = (await submit(client, alice)).json()
    r = await client.post(
        f"/v1/admin/kyc/submissions/{sub['id']}/decision",
        json={"decision": "rejected", "reason": "not in review"},
        headers=admin.headers,
    )
    assert r.status_code == 409 and r.json()["code"] == "not_in_review"
    assert await kyc_status(client, alice) == ("verified", 1)


async def test_admin_cannot_decide_their_own_submission(app, client, admin):
    other = await in_review(client)
    other_sub = (await client.get("/v1/me/kyc", headers=other.headers)).json()["submission"]
    reviewer = await sign_up(client)
    await sql_exec(
        app, "UPDATE users.users SET role = 'admin' WHERE id = :u", u=reviewer.user["id"]
    )
    tokens = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": reviewer.email, "password": reviewer.password},
    )
    headers = {"Authorization": f"Bearer {tokens.json()['access_token']}"}
    # A birth date other than the account's sends the reviewer's own submission to review.
    r = await client.post("/v1/me/kyc", json=kyc_body(date_of_birth="1991-05-17"), headers=headers)
    assert r.json()["status"] == "review"
    own = r.json()["id"]
    r = await client.post(
        f"/v1/admin/kyc/submissions/{own}/decision",
        json={"decision": "verified", "reason": "it is me"},
        headers=headers,
    )
    assert r.status_code == 403 and r.json()["code"] == "self_review_forbidden"
    assert (await client.get("/v1/me/kyc", headers=headers)).json()["status"] == "review"
    # Someone else's case is theirs to decide, and the first admin may decide theirs.
    r = await client.post(
        f"/v1/admin/kyc/submissions/{other_sub['id']}/decision",
        json={"decision": "verified", "reason": "checked"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v1/admin/kyc/submissions/{own}/decision",
        json={"decision": "verified", "reason": "birth date typo in the profile"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text


async def test_review_queue_is_paginated_oldest_first(client, admin):
    mine = [
        (await client.get("/v1/me/kyc", headers=(await in_review(client)).headers)).json()[
            "submission"
        ]["id"]
        for _ in range(3)
    ]
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/admin/kyc/reviews", params=params, headers=admin.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= 2
        assert all(s["status"] == "review" for s in page["data"])
        seen += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)
    assert [s for s in seen if s in mine] == mine


async def test_review_queue_rejects_a_bad_cursor_and_limit(client, admin):
    r = await client.get("/v1/admin/kyc/reviews?cursor=%%%", headers=admin.headers)
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor"
    r = await client.get("/v1/admin/kyc/reviews?limit=1000", headers=admin.headers)
    assert r.status_code == 422
    assert r.json()["errors"][0]["parameter"] == "limit"


# --- who may see what -----------------------------------------------------------------------------


async def test_admin_routes_are_403_for_users_and_401_without_a_token(client, alice):
    sub = (await submit(client, alice)).json()
    routes = [
        ("GET", "/v1/admin/kyc/reviews", None),
        ("GET", f"/v1/admin/kyc/submissions/{sub['id']}", None),
        (
            "POST",
            f"/v1/admin/kyc/submissions/{sub['id']}/decision",
            {"decision": "rejected", "reason": "nope"},
        ),
    ]
    for method, url, body in routes:
        r = await client.request(method, url, json=body, headers=alice.headers)
        assert r.status_code == 403, (url, r.text)
        assert r.json()["code"] == "admin_required"
        r = await client.request(method, url, json=body)
        assert r.status_code == 401, (url, r.text)
    for method, url in (("GET", "/v1/me/kyc"), ("POST", "/v1/me/kyc")):
        r = await client.request(method, url, json=kyc_body() if method == "POST" else None)
        assert r.status_code == 401
    assert await kyc_status(client, alice) == ("verified", 1)


async def test_unknown_and_other_users_ids_are_404(client, alice, bob, admin):
    sub = (await submit(client, alice)).json()
    for bad in (new_id("kyc"), "kyc_nope", "usr_" + sub["id"][4:], "x" * 64):
        r = await client.get(f"/v1/admin/kyc/submissions/{bad}", headers=admin.headers)
        assert r.status_code == 404, (bad, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        r = await client.post(
            f"/v1/admin/kyc/submissions/{bad}/decision",
            json={"decision": "verified", "reason": "ok then"},
            headers=admin.headers,
        )
        assert r.status_code == 404
        r = await client.get(f"/v1/me/kyc/submissions/{bad}", headers=alice.headers)
        assert r.status_code == 404
    r = await client.get(f"/v1/me/kyc/submissions/{sub['id']}", headers=bob.headers)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert "document_type" not in r.json() and "checks" not in r.json()
    page = (await client.get("/v1/me/kyc/submissions", headers=bob.headers)).json()
    assert page == {"data": [], "next_cursor": None}
    state = (await client.get("/v1/me/kyc", headers=bob.headers)).json()
    assert state == {"status": "unverified", "tier": 0, "can_submit": True, "submission": None}


# --- bad input changes nothing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "pointer"),
    [
        ({"legal_name": ""}, "#/legal_name"),
        ({"legal_name": "R2D2 Droid"}, "#/legal_name"),
        ({"date_of_birth": "17/05/1990"}, "#/date_of_birth"),
        ({"date_of_birth": "2999-01-01"}, "#/date_of_birth"),
        ({"date_of_birth": "1800-01-01"}, "#/date_of_birth"),
        ({"document_type": "library_card"}, "#/document_type"),
        ({"document_country": "XX"}, "#/document_country"),
        ({"document_number": "C01X00T4!"}, "#/document_number"),
        ({"document_number": "C1"}, "#/document_number"),
        ({"document_number": 123456789}, "#/document_number"),
        ({"address": {"line1": "Unter den Linden 77", "country": "DE"}}, "#/address/city"),
        ({"address": "Berlin"}, "#/address"),
        ({"nationality": "DE"}, "#/nationality"),
    ],
)
async def test_bad_input_is_422_with_a_pointer_and_changes_nothing(
    app, client, alice, overrides, pointer
):
    body = kyc_body(**overrides)
    r = await client.post("/v1/me/kyc", json=body, headers=alice.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "validation_failed"
    assert pointer in [e.get("pointer") for e in problem["errors"]], problem
    if isinstance(body.get("document_number"), str):
        assert body["document_number"] not in r.text
    assert await kyc_status(client, alice) == ("unverified", 0)
    assert await submission_count(app, alice.user["id"]) == 0
    assert await audit_rows(app, alice.user["id"]) == []
    assert await kyc_events(app, alice.user["id"]) == []


async def test_missing_body_and_malformed_json_are_4xx(client, alice):
    r = await client.post("/v1/me/kyc", headers=alice.headers)
    assert r.status_code == 422
    r = await client.post(
        "/v1/me/kyc",
        content=b"{not json",
        headers={**alice.headers, "content-type": "application/json"},
    )
    assert r.status_code in (400, 422) and r.json()["code"] == "malformed_json"
    assert await kyc_status(client, alice) == ("unverified", 0)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"decision": "maybe", "reason": "hmm, unsure"}, "#/decision"),
        ({"decision": "review", "reason": "send back"}, "#/decision"),
        ({"decision": "verified"}, "#/reason"),
        ({"decision": "verified", "reason": "  "}, "#/reason"),
        ({"decision": "verified", "reason": "x" * 501}, "#/reason"),
    ],
)
async def test_bad_decision_is_422_and_changes_nothing(app, client, admin, body, pointer):
    who = await in_review(client)
    sub_id = (await client.get("/v1/me/kyc", headers=who.headers)).json()["submission"]["id"]
    r = await client.post(
        f"/v1/admin/kyc/submissions/{sub_id}/decision", json=body, headers=admin.headers
    )
    assert r.status_code == 422, r.text
    assert pointer in [e.get("pointer") for e in r.json()["errors"]]
    assert await kyc_status(client, who) == ("review", 0)
    assert len(await audit_rows(app, who.user["id"])) == 2


# --- a pluggable provider -------------------------------------------------------------------------


class AlwaysReview:
    name = "acme-kyc"

    async def assess(self, applicant: kyc.KycApplicant, today: date) -> kyc.KycDecision:
        check = kyc.Check("acme_liveness", "review", "Selfie needs a look")
        return kyc.KycDecision("review", 0, (check,), "Selfie needs a look")


async def test_a_plugged_in_provider_decides_and_is_the_audit_actor(app, client, alice):
    state_of(app).kyc_provider = AlwaysReview()
    try:
        r = await submit(client, alice)
    finally:
        del state_of(app).kyc_provider
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "review"
    assert [c["name"] for c in r.json()["checks"]] == ["acme_liveness"]
    assert (await audit_rows(app, alice.user["id"]))[-1] == ("pending", "review", "system:acme-kyc")
