"""Token endpoint: password grant with lockout, refresh rotation with reuse detection, JWKS."""

from __future__ import annotations

import time

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.conftest import make_settings, sign_up


async def _password(client, email, password, **extra):
    return await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": email, "password": password, **extra},
    )


async def _refresh(client, token):
    return await client.post(
        "/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": token}
    )


async def test_password_grant_issues_short_lived_es256_tokens(client, alice, settings):
    tokens = alice.tokens
    assert tokens["token_type"] == "Bearer"
    assert 0 < tokens["expires_in"] <= 900
    assert set(tokens["scope"].split()) == {"profile", "devices", "wallet", "pay"}
    jwks = (await client.get("/.well-known/jwks.json")).json()
    # An independent JOSE implementation verifies our token against the published JWKS.
    token = jose_jwt.decode(
        tokens["access_token"], KeySet.import_key_set(jwks), algorithms=["ES256"]
    )
    assert token.header["alg"] == "ES256"
    assert token.header["kid"] in {k["kid"] for k in jwks["keys"]}
    claims = token.claims
    assert claims["sub"] == alice.user["id"]
    assert claims["iss"] == settings.jwt_issuer and claims["aud"] == settings.jwt_audience
    assert claims["exp"] - claims["iat"] <= 900
    assert claims["sid"] == tokens["session_id"]
    assert all("d" not in k for k in jwks["keys"])  # no private parts published


async def test_json_token_request_is_accepted_too(client, alice):
    r = await client.post(
        "/v1/auth/token",
        json={"grant_type": "password", "username": alice.email, "password": alice.password},
    )
    assert r.status_code == 200, r.text


async def test_wrong_password_and_unknown_email_answer_alike(client, alice):
    wrong = await _password(client, alice.email, "definitely wrong password")
    unknown = await _password(client, "nobody-here@example.com", "definitely wrong password")
    for r in (wrong, unknown):
        assert r.status_code == 400
        assert r.json()["code"] == "invalid_grant"
        assert r.json()["error"] == "invalid_grant"
    assert wrong.json()["detail"] == unknown.json()["detail"]


async def test_repeated_failures_lock_sign_in_with_backoff(client):
    user = await sign_up(client)
    for _ in range(5):
        r = await _password(client, user.email, "wrong password attempt")
        assert r.status_code == 400
    r = await _password(client, user.email, user.password)
    assert r.status_code == 429
    assert r.json()["code"] == "too_many_attempts"
    assert int(r.headers["Retry-After"]) > 0


async def test_unsupported_grant_and_media_type(client):
    r = await client.post("/v1/auth/token", data={"grant_type": "client_credentials"})
    assert r.status_code == 400 and r.json()["code"] == "unsupported_grant_type"
    r = await client.post(
        "/v1/auth/token", content=b"grant_type=password", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = await client.post("/v1/auth/token", data={"grant_type": "password"})
    assert r.status_code == 422
    assert {e["pointer"] for e in r.json()["errors"]} == {"#/username", "#/password"}


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"grant_type": "password", "password": ' + b"1" * 5000 + b"}"],
    ids=["deeply-nested", "huge-integer"],
)
async def test_unparseable_json_token_request_is_400_not_500(client, body):
    r = await client.post(
        "/v1/auth/token", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "malformed_body"


async def test_refresh_rotates_and_reuse_revokes_the_family(client, alice):
    first = alice.tokens["refresh_token"]
    r1 = await _refresh(client, first)
    assert r1.status_code == 200, r1.text
    second = r1.json()["refresh_token"]
    assert second != first
    assert r1.json()["session_id"] == alice.tokens["session_id"]
    # The spent token comes back: someone has a copy. Revoke everything in its family.
    reused = await _refresh(client, first)
    assert reused.status_code == 400 and reused.json()["code"] == "invalid_grant"
    assert (await _refresh(client, second)).status_code == 400
    access = {"Authorization": f"Bearer {r1.json()['access_token']}"}
    r = await client.get("/v1/me", headers=access)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


async def test_refresh_token_garbage_and_narrowed_scope(client, alice):
    assert (await _refresh(client, "not-a-token")).status_code == 400
    r = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": alice.tokens["refresh_token"],
            "scope": "pay",
        },
    )
    assert r.status_code == 200 and r.json()["scope"] == "pay"
    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"})
    assert me.status_code == 403 and me.json()["code"] == "insufficient_scope"
    bad = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": r.json()["refresh_token"],
            "scope": "admin",
        },
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_scope"


async def test_logout_ends_the_session(client):
    user = await sign_up(client)
    r = await client.post("/v1/auth/logout", headers=user.headers)
    assert r.status_code == 204
    assert (await client.get("/v1/me", headers=user.headers)).status_code == 401
    assert (await _refresh(client, user.tokens["refresh_token"])).status_code == 400


async def test_a_remembered_verification_is_only_for_those_exact_bytes(client, app):
    """Verified tokens are remembered (the ES256 verify is a fifth of the edge's CPU), but a
    token differing in one character is verified afresh, and one whose session was revoked is
    refused however often it was accepted before."""
    user = await sign_up(client)
    for _ in range(3):
        assert (await client.get("/v1/me", headers=user.headers)).status_code == 200
    token = user.tokens["access_token"]
    head, body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    forged = {"Authorization": f"Bearer {head}.{body}.{flipped}"}
    assert (await client.get("/v1/me", headers=forged)).status_code == 401

    assert (await client.get("/v1/me", headers=user.headers)).status_code == 200
    await client.post("/v1/auth/logout", headers=user.headers)
    assert (await client.get("/v1/me", headers=user.headers)).status_code == 401


async def test_key_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(client, app, alice):
    keyring = app.state.users.tokens.keyring
    old_kid = jose_jwt.decode(
        alice.tokens["access_token"], KeySet.import_key_set(keyring.jwks()), algorithms=["ES256"]
    ).header["kid"]
    new_kid = await keyring.rotate()
    assert new_kid != old_kid
    assert (await client.get("/v1/me", headers=alice.headers)).status_code == 200
    fresh = await _password(client, alice.email, alice.password)
    jwks = (await client.get("/.well-known/jwks.json")).json()
    assert {old_kid, new_kid} <= {k["kid"] for k in jwks["keys"]}
    header = jose_jwt.decode(
        fresh.json()["access_token"], KeySet.import_key_set(jwks), algorithms=["ES256"]
    ).header
    assert header["kid"] == new_kid


async def test_tampered_and_foreign_tokens_are_refused(client, alice):
    token = alice.tokens["access_token"]
    head, body, sig = token.split(".")
    tampered = f"{head}.{body[:-2]}AA.{sig}"
    for bad in (tampered, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "garbage"):
        r = await client.get("/v1/me", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401
        assert "WWW-Authenticate" in r.headers


async def test_expired_token_is_refused(client, app, alice, database_url, redis_url, data_dir):
    tokens = app.state.users.tokens
    expired, _ = await tokens.issue(
        user_id=alice.user["id"],
        session_id=alice.tokens["session_id"],
        scopes=["profile"],
        role="user",
        device_id=None,
        auth_method="pwd",
        extra={"exp": int(time.time()) - 120},
    )
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"
    assert make_settings(database_url, redis_url, data_dir).access_token_ttl_seconds <= 900


async def test_due_rotation_makes_one_key_however_many_replicas_notice(app, settings):
    import asyncio

    from sqlalchemy import text

    from billfold.users import KeyRing

    engine = app.state.resources.engine
    replicas = [KeyRing(engine, app.state.users.sealed, settings) for _ in range(4)]
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE users.signing_keys SET created_at = created_at - interval '2 days' "
                "WHERE retired_at IS NULL"
            )
        )
    for ring in replicas:
        await ring.reload()
    made = await asyncio.gather(*(r.rotate(if_older_than=86400) for r in replicas))
    assert len([k for k in made if k is not None]) == 1
    async with engine.connect() as conn:
        live = (
            await conn.execute(
                text("SELECT count(*) FROM users.signing_keys WHERE retired_at IS NULL")
            )
        ).scalar_one()
    assert live == 1
    await app.state.users.tokens.keyring.reload()


async def test_concurrent_refresh_grants_at_the_reload_boundary_do_not_exhaust_the_pool(
    client, app
):
    """Signing does no I/O: with the periodic key reload due, 40 refresh grants at once (more
    than the request pool) all succeed promptly; a reload on the hot path used to wait for a
    connection the waiting requests held (30 s stall, then 500s)."""
    import asyncio

    user = await sign_up(client)
    refresh_tokens = [user.tokens["refresh_token"]]
    for _ in range(39):
        r = await _password(client, user.email, user.password)
        assert r.status_code == 200, r.text
        refresh_tokens.append(r.json()["refresh_token"])
    keyring = app.state.users.tokens.keyring
    keyring._loaded_at = 0  # the periodic reload is overdue
    started = time.monotonic()
    answers = await asyncio.wait_for(
        asyncio.gather(*(_refresh(client, t) for t in refresh_tokens)), timeout=25
    )
    elapsed = time.monotonic() - started
    assert [r.status_code for r in answers] == [200] * 40
    assert elapsed < 10, elapsed


async def test_keys_rotated_elsewhere_are_picked_up_in_the_background_and_on_unknown_kid(
    client, app, alice, settings
):
    import asyncio

    from billfold.users import KeyRing

    keyring = app.state.users.tokens.keyring
    other = KeyRing(app.state.resources.engine, app.state.users.sealed, settings)
    await other.reload()
    new_kid = await other.rotate()
    # A token of the other replica's new key verifies at once: an unknown kid reloads.
    token = await other.sign(
        {
            "iss": settings.jwt_issuer,
            "aud": settings.jwt_audience,
            "sub": alice.user["id"],
            "sid": alice.tokens["session_id"],
            "iat": int(time.time()),
            "exp": int(time.time()) + 60,
            "jti": "background-reload",
        }
    )
    assert (await keyring.decode(token))["jti"] == "background-reload"
    # The background loop makes it the signing key without any request doing I/O for it.
    keyring._active = next(k for k in keyring._keys.values() if k.kid != new_kid)
    refresher = asyncio.create_task(keyring.run(interval=0.01))
    try:
        for _ in range(500):
            if keyring._active.kid == new_kid:
                break
            await asyncio.sleep(0.01)
    finally:
        refresher.cancel()
    assert keyring._active.kid == new_kid
    fresh = await _password(client, alice.email, alice.password)
    header = jose_jwt.decode(
        fresh.json()["access_token"], KeySet.import_key_set(keyring.jwks()), algorithms=["ES256"]
    ).header
    assert header["kid"] == new_kid
