"""Idempotency-Key: a retry gets the first answer, never a second effect."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import text

from billfold.platform import idempotency
from billfold.platform.errors import PROBLEM_CONTENT_TYPE
from billfold.platform.ids import is_valid_id
from tests.conftest import registration, sign_up


def phone() -> str:
    return f"+49171{secrets.randbelow(10**8):08d}"


def body(**overrides: Any) -> dict[str, Any]:
    return registration(phone=phone(), **overrides)


def key() -> str:
    return f"test-{uuid.uuid4()}"


async def count_users(app: Any, email: str) -> int:
    async with app.state.resources.engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT count(*) FROM users.users WHERE email = :e"), {"e": email}
            )
        ).scalar_one()


async def records(app: Any, k: str) -> list[Any]:
    async with app.state.resources.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text("SELECT * FROM platform.idempotency_keys WHERE key = :k"), {"k": k}
                )
            ).all()
        )


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    problem = r.json()
    assert problem["code"] == code
    return problem


async def test_same_key_same_body_replays_the_stored_response(client, app):
    k, b = key(), body()
    first = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    second = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert second.status_code == 201, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    # The replay is a new request: its own request id, the edge's headers again.
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert is_valid_id(second.headers["x-request-id"], "req")
    assert second.headers["x-content-type-options"] == "nosniff"
    assert await count_users(app, b["email"]) == 1
    # A third retry is still the same answer.
    third = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert third.content == first.content
    assert await count_users(app, b["email"]) == 1


async def test_without_a_key_a_retry_is_a_new_request(client, app):
    b = body()
    first = await client.post("/v1/users", json=b)
    assert first.status_code == 201
    second = await client.post("/v1/users", json=b)
    assert_problem(second, 409, "contact_in_use")
    assert await count_users(app, b["email"]) == 1


async def test_same_key_different_body_is_422_idempotency_key_reuse(client, app):
    k, b = key(), body()
    first = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert first.status_code == 201
    other = body()
    r = await client.post("/v1/users", json=other, headers={"Idempotency-Key": k})
    assert_problem(r, 422, "idempotency_key_reuse")
    assert await count_users(app, other["email"]) == 0
    # Byte-level fingerprint: the same fields in another order are another request body.
    reordered = dict(reversed(list(b.items())))
    r = await client.post("/v1/users", json=reordered, headers={"Idempotency-Key": k})
    assert_problem(r, 422, "idempotency_key_reuse")
    # The original request still replays.
    r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"


async def test_same_key_on_another_route_is_reuse(client):
    alice = await sign_up(client, phone=phone())
    k = key()
    r = await client.post(
        "/v1/me/verifications",
        json={"channel": "email"},
        headers={**alice.headers, "Idempotency-Key": k},
    )
    assert r.status_code == 201, r.text
    r = await client.patch(
        "/v1/me", json={"channel": "email"}, headers={**alice.headers, "Idempotency-Key": k}
    )
    assert_problem(r, 422, "idempotency_key_reuse")


async def test_concurrent_duplicates_create_exactly_one(client, app):
    k, b = key(), body()
    responses = await asyncio.gather(
        *[client.post("/v1/users", json=b, headers={"Idempotency-Key": k}) for _ in range(10)]
    )
    created = [r for r in responses if r.status_code == 201]
    originals = [r for r in created if "idempotent-replayed" not in r.headers]
    replays = [r for r in created if r.headers.get("idempotent-replayed") == "true"]
    in_progress = [r for r in responses if r.status_code == 409]
    assert len(originals) == 1, [(r.status_code, r.text) for r in responses]
    assert len(originals) + len(replays) + len(in_progress) == 10
    assert in_progress, "argon2 hashing makes the duplicates overlap; some must see 409"
    for r in in_progress:
        assert_problem(r, 409, "idempotency_request_in_progress")
        assert r.headers["retry-after"] == "1"
    for r in replays:
        assert r.content == originals[0].content
    assert await count_users(app, b["email"]) == 1
    # Once the first has finished, a retry replays it.
    r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"
    assert r.content == originals[0].content


async def test_concurrent_duplicates_with_a_different_body_never_both_win(client, app):
    k = key()
    bodies = [body() for _ in range(6)]
    responses = await asyncio.gather(
        *[client.post("/v1/users", json=b, headers={"Idempotency-Key": k}) for b in bodies]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 1, [(r.status_code, r.text) for r in responses]
    assert set(codes) <= {201, 409, 422}
    total = sum([await count_users(app, b["email"]) for b in bodies])
    assert total == 1


async def test_failed_request_is_not_stored_and_the_key_can_be_retried(client, app):
    k = key()
    bad = body(date_of_birth="2999-01-01")  # the service refuses a birth date in the future
    r = await client.post("/v1/users", json=bad, headers={"Idempotency-Key": k})
    assert_problem(r, 422, "validation_failed")
    assert await records(app, k) == []
    invalid = body(email="not-an-email")  # refused by request validation
    r = await client.post("/v1/users", json=invalid, headers={"Idempotency-Key": k})
    assert_problem(r, 422, "validation_failed")
    assert await records(app, k) == []
    # Fixed and retried with the same key: it runs (errors roll back and are not kept).
    good = body()
    r = await client.post("/v1/users", json=good, headers={"Idempotency-Key": k})
    assert r.status_code == 201, r.text
    assert "idempotent-replayed" not in r.headers
    assert len(await records(app, k)) == 1
    assert await count_users(app, good["email"]) == 1


async def test_a_conflict_is_not_stored_either(client, app):
    taken = body()
    assert (await client.post("/v1/users", json=taken)).status_code == 201
    k = key()
    again = {**body(), "email": taken["email"]}
    r = await client.post("/v1/users", json=again, headers={"Idempotency-Key": k})
    assert_problem(r, 409, "contact_in_use")
    assert await records(app, k) == []
    r = await client.post("/v1/users", json=again, headers={"Idempotency-Key": k})
    assert_problem(r, 409, "contact_in_use")
    assert "idempotent-replayed" not in r.headers


async def test_keys_are_scoped_per_authenticated_user(client, app):
    alice = await sign_up(client, phone=phone(), name="Alice Scope")
    bob = await sign_up(client, phone=phone(), name="Bob Scope")
    k = key()
    payload = {"channel": "email"}
    ra = await client.post(
        "/v1/me/verifications", json=payload, headers={**alice.headers, "Idempotency-Key": k}
    )
    rb = await client.post(
        "/v1/me/verifications", json=payload, headers={**bob.headers, "Idempotency-Key": k}
    )
    assert ra.status_code == 201, ra.text
    assert rb.status_code == 201, rb.text
    assert "idempotent-replayed" not in rb.headers
    assert ra.json()["id"] != rb.json()["id"]
    rows = await records(app, k)
    assert {row.scope for row in rows} == {
        f"user:{alice.user['id']}",
        f"user:{bob.user['id']}",
    }
    # Each user's retry replays their own response, never the other's.
    ra2 = await client.post(
        "/v1/me/verifications", json=payload, headers={**alice.headers, "Idempotency-Key": k}
    )
    assert ra2.headers["idempotent-replayed"] == "true"
    assert ra2.content == ra.content
    # Anonymous use of the same key is a third scope.
    b = body()
    r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers


async def test_record_is_kept_for_24_hours_and_purged_after(client, app, settings):
    k, b = key(), body()
    r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": k})
    assert r.status_code == 201
    (row,) = await records(app, k)
    assert settings.idempotency_ttl_seconds == 24 * 3600
    assert row.expires_at - row.created_at == timedelta(hours=24)
    assert row.scope == "anonymous"
    assert row.method == "POST" and row.path == "/v1/users"
    assert row.status_code == 201
    # Stored sealed (bodies may carry tokens shown once), and it opens to the exact answer.
    assert r.content not in bytes(row.response_body)
    aad = f"idempotency\0anonymous\0{k}".encode()
    assert app.state.users.sealed.open(bytes(row.response_body), aad) == r.content
    stored_headers = {h[0].lower() for h in row.response_headers}
    assert "x-request-id" not in stored_headers and "set-cookie" not in stored_headers

    keep = key()
    assert (
        await client.post("/v1/users", json=body(), headers={"Idempotency-Key": keep})
    ).status_code == 201
    engine = app.state.resources.engine
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE platform.idempotency_keys SET expires_at = now() - interval '1 second' "
                "WHERE key = :k"
            ),
            {"k": k},
        )
    # An expired record is never replayed: the key is free again.
    other = body()
    r = await client.post("/v1/users", json=other, headers={"Idempotency-Key": k})
    assert r.status_code == 201, r.text
    assert "idempotent-replayed" not in r.headers
    assert r.json()["email"] == other["email"]
    (row,) = await records(app, k)
    assert row.expires_at > row.created_at + timedelta(hours=23)

    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE platform.idempotency_keys SET expires_at = now() - interval '1 second' "
                "WHERE key = :k"
            ),
            {"k": k},
        )
        purged = await idempotency.purge_expired(conn)
    assert purged >= 1
    assert await records(app, k) == []
    assert len(await records(app, keep)) == 1  # unexpired records stay


async def test_invalid_keys_are_422(client, app):
    b = body()
    for bad in ("x" * 256, "", "tab\there"):
        r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": bad})
        problem = assert_problem(r, 422, "invalid_idempotency_key")
        assert "255" in problem["detail"]
    assert await count_users(app, b["email"]) == 0
    r = await client.post("/v1/users", json=b, headers={"Idempotency-Key": "k" * 255})
    assert r.status_code == 201, r.text


async def test_key_is_ignored_on_the_token_endpoint_so_refresh_reuse_is_still_detected(client, app):
    """A replayed credential exchange would hand out the live rotated refresh token again and
    bypass reuse detection: the token endpoint never stores or replays a response."""
    alice = await sign_up(client, phone=phone())
    k = key()
    grant = {"grant_type": "refresh_token", "refresh_token": alice.tokens["refresh_token"]}
    r1 = await client.post("/v1/auth/token", data=grant, headers={"Idempotency-Key": k})
    assert r1.status_code == 200, r1.text
    assert await records(app, k) == []
    r2 = await client.post("/v1/auth/token", data=grant, headers={"Idempotency-Key": k})
    assert "idempotent-replayed" not in r2.headers
    assert_problem(r2, 400, "invalid_grant")  # the spent token came back: reuse detected
    assert r2.json().get("refresh_token") is None
    # ... and the family is revoked: the rotated token is dead too.
    again = await client.post(
        "/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": r1.json()["refresh_token"]},
    )
    assert again.status_code == 400
    # Even an invalid key is no error here: the header is not looked at.
    fresh = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": alice.email, "password": alice.password},
        headers={"Idempotency-Key": "tab\there"},
    )
    assert fresh.status_code == 200, fresh.text


async def test_key_is_ignored_on_reads(client):
    alice = await sign_up(client, phone=phone())
    k = key()
    r1 = await client.get("/v1/me", headers={**alice.headers, "Idempotency-Key": k})
    r2 = await client.get("/v1/me", headers={**alice.headers, "Idempotency-Key": k})
    assert r1.status_code == r2.status_code == 200
    assert "idempotent-replayed" not in r2.headers


async def test_stored_fingerprint_is_keyed_not_a_plain_hash_of_the_body(client, app):
    import hashlib
    import json as _json

    k, b = key(), body()
    raw = _json.dumps(b).encode()
    r = await client.post(
        "/v1/users", content=raw, headers={"Idempotency-Key": k, "content-type": "application/json"}
    )
    assert r.status_code == 201
    (row,) = await records(app, k)
    plain = hashlib.sha256(b"\0".join([b"POST", b"/v1/users", raw])).hexdigest()
    assert row.request_hash != plain  # the body holds a password: no offline guessing
    assert len(row.request_hash) == 64
