"""POST /v1/users: validation, duplicates without enumeration, concurrency."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from tests.conftest import registration


async def _count(app, sql: str, **params) -> int:
    async with app.state.resources.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def test_register_returns_the_user_without_secrets(client, app):
    body = registration(email="  Grace.Hopper@Example.COM ", handle="@Grace_H")
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 201, r.text
    user = r.json()
    assert user["id"].startswith("usr_")
    assert user["email"] == "grace.hopper@example.com"
    assert user["handle"] == "grace_h"
    assert user["kyc_status"] == "unverified" and user["kyc_tier"] == 0
    assert user["email_verified"] is False and user["phone_verified"] is False
    assert "password" not in r.text and body["password"] not in r.text
    async with app.state.resources.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT password_hash FROM users.users WHERE id = :id"), {"id": user["id"]}
            )
        ).one()
        event = (
            await conn.execute(
                text("SELECT type, subject FROM platform.outbox WHERE subject = :id"),
                {"id": user["id"]},
            )
        ).one()
    assert row.password_hash.startswith("$argon2id$")
    assert event.type == "billfold.users.user.registered"


async def test_invalid_fields_answer_422_with_pointers_and_change_nothing(client, app):
    body = registration(
        email="not-an-email",
        phone="0301234567",
        password="short",
        country="XX",
        date_of_birth="2999-01-01",
    )
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "validation_failed"
    pointers = {e["pointer"] for e in problem["errors"]}
    assert {"#/email", "#/phone", "#/password", "#/country"} <= pointers
    assert "short" not in r.text  # the password is never echoed
    assert await _count(app, "SELECT count(*) FROM users.users WHERE email = 'not-an-email'") == 0


async def test_future_birth_date_and_unknown_fields_are_refused(client):
    r = await client.post("/v1/users", json=registration(date_of_birth="2999-01-01"))
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "#/date_of_birth"
    r = await client.post("/v1/users", json={**registration(), "role": "admin"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "#/role"


async def test_nul_characters_are_422_not_500(client, app):
    body = registration(name="Ada\u0000Lovelace")
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_failed"
    sql = "SELECT count(*) FROM users.users WHERE email = :e"
    assert await _count(app, sql, e=body["email"]) == 0


async def test_amount_like_types_are_strict(client):
    r = await client.post("/v1/users", json={**registration(), "date_of_birth": 19900101})
    assert r.status_code == 422


async def test_duplicate_email_or_phone_is_409_without_saying_which(client):
    first = registration()
    assert (await client.post("/v1/users", json=first)).status_code == 201
    same_email = registration(email=first["email"].upper())
    same_phone = registration(phone=first["phone"])
    answers = []
    for body in (same_email, same_phone):
        r = await client.post("/v1/users", json=body)
        assert r.status_code == 409
        assert r.json()["code"] == "contact_in_use"
        answers.append(r.json()["detail"])
    assert answers[0] == answers[1]  # the same words whichever field collided


async def test_concurrent_registration_of_one_email_exactly_one_wins(client, app):
    email = registration()["email"]
    bodies = [registration(email=email) for _ in range(12)]
    results = await asyncio.gather(*(client.post("/v1/users", json=b) for b in bodies))
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 11, statuses
    assert await _count(app, "SELECT count(*) FROM users.users WHERE email = :e", e=email) == 1
