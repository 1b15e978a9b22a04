"""TOTP two-factor and step-up (totp, sms, email, device signature) over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

import httpx
import jwt
import pyotp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from billfold.platform.errors import ProblemError
from billfold.users import mfa, verify_step_up
from tests.conftest import SignedIn, device_key, sign_up
from tests.support.one_time_codes import reveal_code

PROBLEM = "application/problem+json"


def valid_phone() -> str:
    # +49 151 is a German mobile range in which every 8-digit subscriber number is valid.
    return f"+49151{secrets.randbelow(10**8):08d}"


async def new_user(client: httpx.AsyncClient, **overrides: Any) -> SignedIn:
    return await sign_up(client, phone=valid_phone(), **overrides)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def code_at(secret: str, offset_steps: int = 0) -> str:
    totp = pyotp.TOTP(secret)
    return totp.at(time.time() + offset_steps * totp.interval)


def wrong_code(secret: str) -> str:
    valid = {code_at(secret, k) for k in (-1, 0, 1, 2)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444") if c not in valid)


async def outbox(app: Any, type_: str, user_id: str) -> list[dict[str, Any]]:
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT data FROM platform.outbox WHERE type = :t AND subject = :u ORDER BY seq"
                ),
                {"t": type_, "u": user_id},
            )
        ).all()
    return [dict(r.data) for r in rows]


async def step_up_code(app: Any, user_id: str, challenge_id: str) -> str:
    events = await outbox(app, "billfold.users.step_up.code_requested", user_id)
    event = next(e for e in events if e["challenge_id"] == challenge_id)
    return reveal_code(app, "billfold.users.step_up.code_requested", event)


async def enable_totp(client: httpx.AsyncClient, user: SignedIn) -> tuple[str, str]:
    """Turn TOTP on; returns the seed and the (now spent) code that confirmed it."""
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    used = code_at(secret)
    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": used}, headers=user.headers
    )
    assert r.status_code == 200, r.text
    return secret, used


async def verify_contact(app: Any, client: httpx.AsyncClient, user: SignedIn, channel: str) -> None:
    r = await client.post("/v1/me/verifications", json={"channel": channel}, headers=user.headers)
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    events = await outbox(app, "billfold.users.verification.requested", user.user["id"])
    event = next(e for e in events if e["verification_id"] == vid)
    code = reveal_code(app, "billfold.users.verification.requested", event)
    r = await client.post(
        f"/v1/me/verifications/{vid}/confirm", json={"code": code}, headers=user.headers
    )
    assert r.status_code == 200, r.text


async def totp_row(app: Any, user_id: str) -> Any:
    async with app.state.resources.engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT * FROM users.totp_factors WHERE user_id = :u"), {"u": user_id}
            )
        ).first()


# --- TOTP ----------------------------------------------------------------------------------------


async def test_totp_enrol_confirm(client, app):
    user = await new_user(client)
    r = await client.get("/v1/me/two-factor", headers=user.headers)
    assert r.json() == {"totp_enabled": False, "totp_pending": False, "confirmed_at": None}

    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    secret = body["secret"]
    assert body["issuer"] == "billfold"
    assert body["provisioning_uri"].startswith("otpauth://totp/billfold:")
    assert f"secret={secret}" in body["provisioning_uri"]
    row = await totp_row(app, user.user["id"])
    assert secret.encode() not in bytes(row.secret)  # sealed at rest
    assert row.confirmed_at is None

    # Starting again before confirming replaces the pending seed.
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 201
    old_secret, secret = secret, r.json()["secret"]
    assert secret != old_secret

    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": wrong_code(secret)}, headers=user.headers
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "invalid_code"
    assert r.json()["attempts_left"] == 4
    assert (await totp_row(app, user.user["id"])).confirmed_at is None

    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": "12345"}, headers=user.headers
    )
    assert r.status_code == 422
    assert r.json()["code"] == "validation_failed"

    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": code_at(secret)}, headers=user.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["totp_enabled"] is True
    me = await client.get("/v1/me", headers=user.headers)
    assert me.json()["two_factor_enabled"] is True
    enabled = await outbox(app, "billfold.users.two_factor.enabled", user.user["id"])
    assert len(enabled) == 1 and enabled[0]["method"] == "totp"
    assert secret not in str(enabled)

    # Enabled: a new enrolment is refused and the seed is unchanged.
    before = bytes((await totp_row(app, user.user["id"])).secret)
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 409
    assert r.json()["code"] == "totp_already_enabled"
    assert bytes((await totp_row(app, user.user["id"])).secret) == before


async def test_confirm_without_enrolment(client):
    user = await new_user(client)
    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": "123456"}, headers=user.headers
    )
    assert r.status_code == 409
    assert r.json()["code"] == "totp_enrolment_not_started"
    r = await client.delete("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 404


async def test_totp_replay_and_disable(client, app):
    user = await new_user(client)
    secret, used = await enable_totp(client, user)

    r = await client.request(
        "DELETE", "/v1/me/two-factor/totp", json={"code": used}, headers=user.headers
    )
    assert r.status_code == 422
    assert r.json()["code"] == "code_already_used"

    r = await client.delete("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 422
    assert r.json()["code"] == "code_required"

    r = await client.delete(
        "/v1/me/two-factor/totp", headers={**user.headers, "X-TOTP-Code": "abc"}
    )
    assert r.status_code == 422
    assert (await totp_row(app, user.user["id"])).confirmed_at is not None

    # The next step's code is inside the window and not used yet.
    r = await client.delete(
        "/v1/me/two-factor/totp", headers={**user.headers, "X-TOTP-Code": code_at(secret, 1)}
    )
    assert r.status_code == 204, r.text
    assert await totp_row(app, user.user["id"]) is None
    me = await client.get("/v1/me", headers=user.headers)
    assert me.json()["two_factor_enabled"] is False
    disabled = await outbox(app, "billfold.users.two_factor.disabled", user.user["id"])
    assert len(disabled) == 1


async def test_pending_enrolment_can_be_dropped_without_code(client, app):
    user = await new_user(client)
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 201
    r = await client.delete("/v1/me/two-factor/totp", headers=user.headers)
    assert r.status_code == 204
    assert await totp_row(app, user.user["id"]) is None
    assert await outbox(app, "billfold.users.two_factor.disabled", user.user["id"]) == []


async def test_totp_lockout_survives_rollback(client, app):
    user = await new_user(client)
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    secret = r.json()["secret"]
    bad = wrong_code(secret)
    for left in (4, 3, 2, 1):
        r = await client.post(
            "/v1/me/two-factor/totp/confirm", json={"code": bad}, headers=user.headers
        )
        assert r.status_code == 422
        assert r.json()["attempts_left"] == left
    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": bad}, headers=user.headers
    )
    assert r.status_code == 429
    assert r.json()["code"] == "too_many_attempts"
    assert int(r.headers["retry-after"]) > 0
    # Locked: even the right code is refused, and nothing changed.
    r = await client.post(
        "/v1/me/two-factor/totp/confirm", json={"code": code_at(secret)}, headers=user.headers
    )
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert (await totp_row(app, user.user["id"])).confirmed_at is None
    # Someone else is not affected.
    other = await new_user(client)
    await enable_totp(client, other)


async def test_totp_lockout_holds_for_concurrent_guesses(client):
    """Guesses sent at once are counted one after another: at most 4 are answered
    `invalid_code` before the lock, however many arrive together."""
    user = await new_user(client)
    r = await client.post("/v1/me/two-factor/totp", headers=user.headers)
    secret = r.json()["secret"]
    valid = {code_at(secret, k) for k in (-1, 0, 1, 2)}
    guesses = [f"{n:06d}" for n in range(100) if f"{n:06d}" not in valid][:12]
    url = "/v1/me/two-factor/totp/confirm"
    rs = await asyncio.gather(
        *(client.post(url, json={"code": g}, headers=user.headers) for g in guesses)
    )
    statuses = sorted(r.status_code for r in rs)
    assert statuses == [422] * 4 + [429] * 8, statuses


async def test_two_factor_routes_need_auth(client):
    r = await client.post("/v1/me/two-factor/totp")
    assert r.status_code == 401
    r = await client.post("/v1/auth/step-up/challenges", json={"method": "totp", "purpose": "x"})
    assert r.status_code == 401


# --- step-up -------------------------------------------------------------------------------------


async def start(
    client: httpx.AsyncClient, user: SignedIn, method: str, **extra: Any
) -> httpx.Response:
    body = {"method": method, "purpose": "payment", **extra}
    return await client.post("/v1/auth/step-up/challenges", json=body, headers=user.headers)


async def test_step_up_with_totp(client, app):
    user = await new_user(client)
    r = await start(client, user, "totp")
    assert r.status_code == 409
    assert r.json()["code"] == "totp_not_enabled"

    secret, used = await enable_totp(client, user)
    r = await start(client, user, "totp", reference="pay_123")
    assert r.status_code == 201, r.text
    challenge = r.json()
    assert challenge["method"] == "totp"
    assert challenge["reference"] == "pay_123"
    assert "signing_input" not in challenge and "expires_at" in challenge

    # The code used to confirm the enrolment is spent.
    url = f"/v1/auth/step-up/challenges/{challenge['id']}/verify"
    r = await client.post(url, json={"code": used}, headers=user.headers)
    assert r.status_code == 422
    assert r.json()["code"] == "code_already_used"
    r = await client.post(url, json={"signature": "AAAA"}, headers=user.headers)
    assert r.status_code == 422

    r = await client.post(url, json={"code": code_at(secret, 1)}, headers=user.headers)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["amr"] == ["otp"]
    assert result["expires_in"] == 300
    assert result["token_type"] == "step_up"
    token = result["step_up_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["token_use"] == "step_up"
    assert claims["sub"] == user.user["id"]
    assert claims["sid"] == user.tokens["session_id"]
    assert claims["purpose"] == "payment" and claims["reference"] == "pay_123"
    assert claims["exp"] - claims["iat"] == 300

    # The challenge is spent.
    r = await client.post(url, json={"code": code_at(secret, 1)}, headers=user.headers)
    assert r.status_code == 404

    # Not an access token.
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"
    rt = app.state.users
    with pytest.raises(ProblemError):
        await rt.tokens.verify(token)

    # verify_step_up: bound to session, purpose and reference; single use.
    principal = await rt.tokens.verify(user.tokens["access_token"])
    other = await new_user(client)
    other_principal = await rt.tokens.verify(other.tokens["access_token"])
    for args in (
        (principal, "transfer", "pay_123"),
        (principal, "payment", "pay_999"),
        (principal, "payment", None),
        (other_principal, "payment", "pay_123"),
    ):
        with pytest.raises(ProblemError) as exc:
            await verify_step_up(rt, token, *args)
        assert exc.value.status == 403
        assert exc.value.code == "invalid_step_up_token"
    with pytest.raises(ProblemError):
        await verify_step_up(rt, user.tokens["access_token"], principal, "payment", "pay_123")
    with pytest.raises(ProblemError):
        await verify_step_up(rt, token + "x", principal, "payment", "pay_123")

    verified = await verify_step_up(rt, token, principal, "payment", "pay_123")
    assert verified.user_id == user.user["id"]
    assert verified.session_id == user.tokens["session_id"]
    assert verified.amr == ("otp",) and verified.method == "totp"
    with pytest.raises(ProblemError) as exc:
        await verify_step_up(rt, token, principal, "payment", "pay_123")
    assert exc.value.code == "invalid_step_up_token"
    assert exc.value.to_problem()["step_up"]["purpose"] == "payment"


async def test_step_up_token_bound_to_session(client, app):
    user = await new_user(client)
    # A second session of the same user (signed in before TOTP was on: no second factor yet).
    t = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": user.email, "password": user.password},
    )
    second = {"Authorization": f"Bearer {t.json()['access_token']}"}
    secret, _ = await enable_totp(client, user)
    r = await start(client, user, "totp", purpose="sensitive_change")
    challenge_id = r.json()["id"]
    # The other session cannot answer this session's challenge.
    r = await client.post(
        f"/v1/auth/step-up/challenges/{challenge_id}/verify",
        json={"code": code_at(secret, 1)},
        headers=second,
    )
    assert r.status_code == 404
    r = await client.post(
        f"/v1/auth/step-up/challenges/{challenge_id}/verify",
        json={"code": code_at(secret, 1)},
        headers=user.headers,
    )
    assert r.status_code == 200
    token = r.json()["step_up_token"]
    rt = app.state.users
    second_principal = await rt.tokens.verify(t.json()["access_token"])
    with pytest.raises(ProblemError):
        await verify_step_up(rt, token, second_principal, "sensitive_change")
    principal = await rt.tokens.verify(user.tokens["access_token"])
    assert (await verify_step_up(rt, token, principal, "sensitive_change")).reference is None


@pytest.mark.parametrize("method", ["sms", "email"])
async def test_step_up_with_sent_code(client, app, method):
    user = await new_user(client)
    r = await start(client, user, method)
    assert r.status_code == 409
    assert r.json()["code"] == "contact_not_verified"

    await verify_contact(app, client, user, "phone" if method == "sms" else "email")
    r = await start(client, user, method, purpose="transfer", reference="p2p_abc")
    assert r.status_code == 201, r.text
    challenge = r.json()
    assert "*" in challenge["target"]
    code = await step_up_code(app, user.user["id"], challenge["id"])
    events = await outbox(app, "billfold.users.step_up.code_requested", user.user["id"])
    assert events[-1]["channel"] == method and events[-1]["purpose"] == "transfer"

    url = f"/v1/auth/step-up/challenges/{challenge['id']}/verify"
    bad = "000000" if code != "000000" else "111111"
    r = await client.post(url, json={"code": bad}, headers=user.headers)
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_code" and r.json()["attempts_left"] == 4

    other = await new_user(client)
    r = await client.post(url, json={"code": code}, headers=other.headers)
    assert r.status_code == 404

    r = await client.post(url, json={"code": code}, headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.json()["amr"] == [method]
    claims = jwt.decode(r.json()["step_up_token"], options={"verify_signature": False})
    assert claims["purpose"] == "transfer" and claims["reference"] == "p2p_abc"
    r = await client.post(url, json={"code": code}, headers=user.headers)
    assert r.status_code == 404


async def test_sent_code_attempts_are_limited(client, app):
    user = await new_user(client)
    await verify_contact(app, client, user, "email")
    r = await start(client, user, "email")
    challenge_id = r.json()["id"]
    code = await step_up_code(app, user.user["id"], challenge_id)
    bad = "000000" if code != "000000" else "111111"
    url = f"/v1/auth/step-up/challenges/{challenge_id}/verify"
    for left in (4, 3, 2, 1, 0):
        r = await client.post(url, json={"code": bad}, headers=user.headers)
        assert r.status_code == 422
        assert r.json()["attempts_left"] == left
    r = await client.post(url, json={"code": code}, headers=user.headers)
    assert r.status_code == 404


async def test_sent_code_attempts_hold_for_concurrent_guesses(client, app):
    """A request that read the challenge before the 5th wrong answer dropped it (a concurrent
    guess) must not be able to answer it, even with the right code."""
    user = await new_user(client)
    await verify_contact(app, client, user, "email")
    challenge_id = (await start(client, user, "email")).json()["id"]
    code = await step_up_code(app, user.user["id"], challenge_id)
    rt = app.state.users
    key = rt.key("step-up", challenge_id)
    record = json.loads(await rt.redis.get(key))  # read before the wrong answers
    bad = "000000" if code != "000000" else "111111"
    url = f"/v1/auth/step-up/challenges/{challenge_id}/verify"
    rs = await asyncio.gather(
        *(client.post(url, json={"code": bad}, headers=user.headers) for _ in range(5))
    )
    assert all(r.status_code == 422 for r in rs)
    with pytest.raises(ProblemError) as refused:
        await mfa._verify_sent_code(rt, key, challenge_id, record, code)
    assert refused.value.code == "invalid_code"


async def test_sent_codes_are_rate_limited(client, app):
    user = await new_user(client)
    await verify_contact(app, client, user, "email")
    for _ in range(5):
        r = await start(client, user, "email")
        assert r.status_code == 201
    r = await start(client, user, "email")
    assert r.status_code == 429
    assert r.json()["code"] == "too_many_codes"
    assert int(r.headers["retry-after"]) > 0
    assert len(await outbox(app, "billfold.users.step_up.code_requested", user.user["id"])) == 5


async def device_session(client: httpx.AsyncClient, user: SignedIn, pem: str) -> dict[str, str]:
    r = await client.post(
        "/v1/devices",
        json={"name": "Test phone", "platform": "ios", "public_key": pem},
        headers=user.headers,
    )
    assert r.status_code == 201, r.text
    t = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": user.email,
            "password": user.password,
            "device_id": r.json()["id"],
        },
    )
    assert t.status_code == 200, t.text
    return {"Authorization": f"Bearer {t.json()['access_token']}"}


async def test_step_up_with_device_signature(client, app):
    user = await new_user(client)
    # A session without a device key cannot use this method.
    r = await start(client, user, "device_signature")
    assert r.status_code == 409
    assert r.json()["code"] == "device_key_required"

    key, pem = device_key()
    headers = await device_session(client, user, pem)
    body = {"method": "device_signature", "purpose": "payment", "reference": "pay_1"}
    r = await client.post("/v1/auth/step-up/challenges", json=body, headers=headers)
    assert r.status_code == 201, r.text
    challenge = r.json()
    signature = key.sign(challenge["signing_input"].encode(), ec.ECDSA(hashes.SHA256()))
    url = f"/v1/auth/step-up/challenges/{challenge['id']}/verify"
    r = await client.post(url, json={"code": "123456"}, headers=headers)
    assert r.status_code == 422
    r = await client.post(url, json={"signature": b64url(signature)}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["amr"] == ["hwk"]
    claims = jwt.decode(r.json()["step_up_token"], options={"verify_signature": False})
    assert claims["did"] and claims["reference"] == "pay_1"
    r = await client.post(url, json={"signature": b64url(signature)}, headers=headers)
    assert r.status_code == 404

    # A signature by another key fails and spends the challenge.
    r = await client.post("/v1/auth/step-up/challenges", json=body, headers=headers)
    challenge = r.json()
    other_key, _ = device_key()
    forged = other_key.sign(challenge["signing_input"].encode(), ec.ECDSA(hashes.SHA256()))
    url = f"/v1/auth/step-up/challenges/{challenge['id']}/verify"
    r = await client.post(url, json={"signature": b64url(forged)}, headers=headers)
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_signature"
    good = key.sign(challenge["signing_input"].encode(), ec.ECDSA(hashes.SHA256()))
    r = await client.post(url, json={"signature": b64url(good)}, headers=headers)
    assert r.status_code == 404


async def test_step_up_bad_input(client):
    user = await new_user(client)
    for body in (
        {"method": "carrier_pigeon", "purpose": "payment"},
        {"method": "totp", "purpose": "Not A Purpose"},
        {"method": "totp"},
        {"method": "totp", "purpose": "payment", "reference": ""},
        {"method": "totp", "purpose": "payment", "extra": 1},
    ):
        r = await client.post("/v1/auth/step-up/challenges", json=body, headers=user.headers)
        assert r.status_code == 422, body
        assert r.headers["content-type"] == PROBLEM
    r = await client.post(
        "/v1/auth/step-up/challenges/nope/verify", json={"code": "123456"}, headers=user.headers
    )
    assert r.status_code == 404
    r = await client.post(
        "/v1/auth/step-up/challenges/" + "x" * 65 + "/verify",
        json={"code": "123456"},
        headers=user.headers,
    )
    assert r.status_code == 422


async def test_step_up_challenge_ids_cannot_reach_other_redis_keys(client):
    user = await new_user(client)
    secret, _ = await enable_totp(client, user)
    r = await start(client, user, "totp")
    challenge_id = r.json()["id"]
    for bad in (f"{challenge_id}:attempts", "a:b", "x" * 200, "%00"):
        r = await client.post(
            f"/v1/auth/step-up/challenges/{bad}/verify",
            json={"code": code_at(secret, 1)},
            headers=user.headers,
        )
        assert r.status_code in (404, 422), (bad, r.status_code)
        assert r.headers["content-type"].startswith("application/problem+json")
