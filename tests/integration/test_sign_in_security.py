"""Two-factor at sign-in, recent authentication for new credentials, and lockout under load."""

from __future__ import annotations

import asyncio
import time

from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.conftest import device_key, registration, sign_up
from tests.integration.test_mfa import code_at, enable_totp, wrong_code


async def _password(client, user, **extra):
    return await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": user.email, "password": user.password, **extra},
    )


async def _claims(client, access_token):
    jwks = (await client.get("/.well-known/jwks.json")).json()
    return jose_jwt.decode(access_token, KeySet.import_key_set(jwks), algorithms=["ES256"]).claims


async def test_password_alone_is_not_enough_once_totp_is_on(client):
    user = await sign_up(client)
    secret, _ = await enable_totp(client, user)
    r = await _password(client, user)
    assert r.status_code == 403, r.text
    problem = r.json()
    assert problem["code"] == "mfa_required" and problem["methods"] == ["totp"]
    assert "access_token" not in problem and "refresh_token" not in problem
    mfa_token = problem["mfa_token"]

    wrong = await client.post(
        "/v1/auth/token",
        data={"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": wrong_code(secret)},
    )
    assert wrong.status_code == 422 and wrong.json()["code"] == "invalid_code"
    ok = await client.post(
        "/v1/auth/token",
        data={"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": code_at(secret, 1)},
    )
    assert ok.status_code == 200, ok.text
    claims = await _claims(client, ok.json()["access_token"])
    assert claims["amr"] == ["mfa"] and claims["sub"] == user.user["id"]
    # The mfa_token is spent, and a made-up one is refused.
    again = await client.post(
        "/v1/auth/token",
        data={"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": code_at(secret, 1)},
    )
    assert again.status_code == 400 and again.json()["code"] == "invalid_grant"
    bad = await client.post(
        "/v1/auth/token", data={"grant_type": "mfa_otp", "mfa_token": "nope", "otp": "123456"}
    )
    assert bad.status_code == 400


async def test_wrong_password_with_totp_on_is_still_a_plain_invalid_grant(client):
    user = await sign_up(client)
    await enable_totp(client, user)
    r = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": user.email, "password": "not the password"},
    )
    assert r.status_code == 400 and "mfa_token" not in r.text


async def test_refresh_keeps_the_time_of_the_real_sign_in(client, alice):
    first = await _claims(client, alice.tokens["access_token"])
    r = await client.post(
        "/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": alice.tokens["refresh_token"]},
    )
    assert r.status_code == 200
    refreshed = await _claims(client, r.json()["access_token"])
    assert refreshed["auth_time"] == first["auth_time"] <= refreshed["iat"]


async def _stale_token(app, user) -> dict[str, str]:
    """A valid access token of the user's session whose sign-in was an hour ago."""
    token, _ = await app.state.users.tokens.issue(
        user_id=user.user["id"],
        session_id=user.tokens["session_id"],
        scopes=["profile", "devices", "wallet", "pay"],
        role="user",
        device_id=None,
        auth_method="pwd",
        extra={"auth_time": int(time.time()) - 3600},
    )
    return {"Authorization": f"Bearer {token}"}


async def test_new_sign_in_credentials_need_a_recent_sign_in_or_step_up(client, app):
    user = await sign_up(client)
    secret, _ = await enable_totp(client, user)
    stale = await _stale_token(app, user)
    device = {"name": "attacker phone", "platform": "ios", "public_key": device_key()[1]}

    r = await client.post("/v1/devices", json=device, headers=stale)
    assert r.status_code == 403 and r.json()["code"] == "step_up_required"
    assert r.json()["step_up"]["purpose"] == "sensitive_change"
    r = await client.patch("/v1/me", json={"email": registration()["email"]}, headers=stale)
    assert r.status_code == 403
    # Harmless changes stay possible with an old sign-in.
    assert (
        await client.patch("/v1/me", json={"name": "Still Me"}, headers=stale)
    ).status_code == 200
    keyless = {"name": "tablet", "platform": "android"}
    assert (await client.post("/v1/devices", json=keyless, headers=stale)).status_code == 201
    devices = (await client.get("/v1/devices", headers=stale)).json()["data"]
    assert [d["name"] for d in devices] == ["tablet"]

    # Step-up for sensitive_change, then the same request goes through (once).
    ch = await client.post(
        "/v1/auth/step-up/challenges",
        json={"method": "totp", "purpose": "sensitive_change"},
        headers=stale,
    )
    assert ch.status_code == 201, ch.text
    v = await client.post(
        f"/v1/auth/step-up/challenges/{ch.json()['id']}/verify",
        json={"code": code_at(secret, 1)},
        headers=stale,
    )
    assert v.status_code == 200, v.text
    step_up = {**stale, "X-Step-Up-Token": v.json()["step_up_token"]}
    r = await client.post("/v1/devices", json=device, headers=step_up)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/devices", json={**device, "public_key": device_key()[1]}, headers=step_up
    )
    assert r.status_code == 403 and r.json()["code"] == "invalid_step_up_token"


async def test_concurrent_password_guesses_stop_at_the_limit(client, settings):
    user = await sign_up(client)
    guesses = await asyncio.gather(
        *(
            client.post(
                "/v1/auth/token",
                data={
                    "grant_type": "password",
                    "username": user.email,
                    "password": f"guess-{i}-xx",
                },
            )
            for i in range(20)
        )
    )
    statuses = [r.status_code for r in guesses]
    assert statuses.count(400) == settings.login_max_failures, statuses
    assert statuses.count(429) == 20 - settings.login_max_failures
    assert (await _password(client, user)).status_code == 429
