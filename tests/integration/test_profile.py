"""Profile, avatar and contact verification by one-time code."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image
from sqlalchemy import text

from tests.conftest import new_phone, registration, sign_up
from tests.support.one_time_codes import reveal_code


async def _latest_code(app, user_id: str) -> str:
    async with app.state.resources.engine.connect() as conn:
        data = (
            await conn.execute(
                text(
                    "SELECT data FROM platform.outbox WHERE subject = :u "
                    "AND type = 'billfold.users.verification.requested' ORDER BY seq DESC LIMIT 1"
                ),
                {"u": user_id},
            )
        ).scalar_one()
    return reveal_code(app, "billfold.users.verification.requested", data)


async def _email_code(client, app, user) -> tuple[dict, str, str]:
    """Start an email verification: the verification, its code (from the outbox), a wrong code."""
    v = (
        await client.post("/v1/me/verifications", json={"channel": "email"}, headers=user.headers)
    ).json()
    code = await _latest_code(app, user.user["id"])
    return v, code, "000000" if code != "000000" else "111111"


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def test_get_and_patch_profile(client, alice):
    r = await client.patch(
        "/v1/me",
        json={
            "name": "Alice Q. Example",
            "locale": "de-DE",
            "timezone": "Europe/Berlin",
            "address": {
                "line1": "Unter den Linden 1",
                "city": "Berlin",
                "postal_code": "10117",
                "country": "de",
            },
        },
        headers=alice.headers,
    )
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["name"] == "Alice Q. Example" and me["locale"] == "de_DE"
    assert me["timezone"] == "Europe/Berlin" and me["address"]["country"] == "DE"
    assert (await client.get("/v1/me", headers=alice.headers)).json() == me


async def test_bad_profile_input_changes_nothing(client, alice):
    before = (await client.get("/v1/me", headers=alice.headers)).json()
    for body in (
        {"timezone": "Mars/Olympus"},
        {"locale": "xx-NOPE"},
        {"name": None},
        {"email": "not-an-email"},
        {"kyc_tier": 2},
        {"address": {"line1": "x"}},
        # PostgreSQL cannot store a NUL character; these were 500s
        {"name": "Ada\u0000"},
        {"address": {"line1": "Main St 1\u0000", "city": "B", "postal_code": "1", "country": "DE"}},
    ):
        r = await client.patch("/v1/me", json=body, headers=alice.headers)
        assert r.status_code == 422, body
    assert (await client.get("/v1/me", headers=alice.headers)).json() == before


def test_time_zone_check_reads_the_tz_database_once(monkeypatch):
    # available_timezones() walks the tz database (~9 ms); it must not run per request.
    from billfold.users import models

    calls: list[int] = []
    real = models.available_timezones

    def counting() -> set[str]:
        calls.append(1)
        return real()

    monkeypatch.setattr(models, "available_timezones", counting)
    models._timezones.cache_clear()
    try:
        for _ in range(3):
            assert models.check_timezone("Europe/Berlin") == "Europe/Berlin"
        with pytest.raises(ValueError):
            models.check_timezone("Mars/Olympus")
        assert len(calls) == 1
    finally:
        models._timezones.cache_clear()


async def test_taken_email_on_patch_is_409(client, alice, bob):
    r = await client.patch("/v1/me", json={"email": bob.email}, headers=alice.headers)
    assert r.status_code == 409 and r.json()["code"] == "contact_in_use"
    assert (await client.get("/v1/me", headers=alice.headers)).json()["email"] == alice.email


async def test_verify_email_and_phone_with_codes(client, app):
    user = await sign_up(client)
    uid = user.user["id"]
    for channel in ("email", "phone"):
        r = await client.post(
            "/v1/me/verifications", json={"channel": channel}, headers=user.headers
        )
        assert r.status_code == 201, r.text
        v = r.json()
        assert v["status"] == "pending" and v["id"].startswith("vrf_")
        assert "*" in v["target"]  # masked
        code = await _latest_code(app, uid)
        ok = await client.post(
            f"/v1/me/verifications/{v['id']}/confirm", json={"code": code}, headers=user.headers
        )
        assert ok.status_code == 200 and ok.json()["status"] == "confirmed"
    me = (await client.get("/v1/me", headers=user.headers)).json()
    assert me["email_verified"] and me["phone_verified"]
    again = await client.post(
        "/v1/me/verifications", json={"channel": "email"}, headers=user.headers
    )
    assert again.status_code == 409 and again.json()["code"] == "already_verified"


async def test_wrong_codes_are_counted_and_exhaust_the_verification(client, app, settings):
    user = await sign_up(client)
    v, code, wrong = await _email_code(client, app, user)
    for left in range(settings.verification_max_attempts - 1, -1, -1):
        r = await client.post(
            f"/v1/me/verifications/{v['id']}/confirm", json={"code": wrong}, headers=user.headers
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_code"
        assert r.json()["attempts_left"] == left
    # Even the right code is now refused: the attempts were spent.
    r = await client.post(
        f"/v1/me/verifications/{v['id']}/confirm", json={"code": code}, headers=user.headers
    )
    assert r.status_code == 409 and r.json()["code"] == "verification_failed"
    bad = await client.post(
        f"/v1/me/verifications/{v['id']}/confirm", json={"code": "12ab"}, headers=user.headers
    )
    assert bad.status_code == 422


async def test_parallel_wrong_codes_cannot_exceed_the_attempt_limit(client, app, settings):
    """Each guess takes an attempt atomically before its code is compared: however many arrive
    at once, at most `verification_max_attempts` are compared; the rest are refused unread."""
    user = await sign_up(client)
    v, code, wrong = await _email_code(client, app, user)
    url = f"/v1/me/verifications/{v['id']}/confirm"
    answers = await asyncio.gather(
        *(client.post(url, json={"code": wrong}, headers=user.headers) for _ in range(30))
    )
    codes = [r.json()["code"] for r in answers]
    invalid = [r for r in answers if r.json()["code"] == "invalid_code"]
    assert len(invalid) == settings.verification_max_attempts, codes
    assert all(r.status_code == 422 for r in invalid)
    assert sorted(r.json()["attempts_left"] for r in invalid) == list(
        range(settings.verification_max_attempts)
    )
    rest = [r for r in answers if r not in invalid]
    assert {(r.status_code, r.json()["code"]) for r in rest} <= {(409, "verification_failed")}
    # The right code after the attempts are spent is refused, and nothing was verified.
    r = await client.post(url, json={"code": code}, headers=user.headers)
    assert r.status_code == 409 and r.json()["code"] == "verification_failed"
    assert (await client.get("/v1/me", headers=user.headers)).json()["email_verified"] is False


async def test_right_code_among_parallel_wrong_ones_is_one_of_the_counted_attempts(
    client, app, settings
):
    user = await sign_up(client)
    v, code, wrong = await _email_code(client, app, user)
    url = f"/v1/me/verifications/{v['id']}/confirm"
    bodies = [{"code": wrong}] * 29 + [{"code": code}]
    answers = await asyncio.gather(
        *(client.post(url, json=b, headers=user.headers) for b in bodies)
    )
    accepted = [r for r in answers if r.status_code == 200]
    invalid = [r for r in answers if r.json().get("code") == "invalid_code"]
    # At most the allowed number of codes were compared, the right one included if accepted.
    assert len(accepted) <= 1
    assert len(invalid) + len(accepted) <= settings.verification_max_attempts
    me = (await client.get("/v1/me", headers=user.headers)).json()
    assert me["email_verified"] is bool(accepted)


async def test_someone_elses_verification_is_404(client, alice, bob):
    v = (
        await client.post("/v1/me/verifications", json={"channel": "phone"}, headers=alice.headers)
    ).json()
    r = await client.post(
        f"/v1/me/verifications/{v['id']}/confirm", json={"code": "123456"}, headers=bob.headers
    )
    assert r.status_code == 404


async def test_changing_email_or_phone_requires_reverification(client, app):
    user = await sign_up(client)
    v = (
        await client.post("/v1/me/verifications", json={"channel": "email"}, headers=user.headers)
    ).json()
    code = await _latest_code(app, user.user["id"])
    await client.post(
        f"/v1/me/verifications/{v['id']}/confirm", json={"code": code}, headers=user.headers
    )
    assert (await client.get("/v1/me", headers=user.headers)).json()["email_verified"] is True
    new_email = registration()["email"]
    r = await client.patch(
        "/v1/me", json={"email": new_email, "phone": new_phone()}, headers=user.headers
    )
    assert r.status_code == 200
    assert r.json()["email"] == new_email
    assert r.json()["email_verified"] is False and r.json()["phone_verified"] is False


async def test_code_sent_before_an_email_change_cannot_verify_the_new_one(client, app):
    user = await sign_up(client)
    v = (
        await client.post("/v1/me/verifications", json={"channel": "email"}, headers=user.headers)
    ).json()
    code = await _latest_code(app, user.user["id"])
    await client.patch("/v1/me", json={"email": registration()["email"]}, headers=user.headers)
    r = await client.post(
        f"/v1/me/verifications/{v['id']}/confirm", json={"code": code}, headers=user.headers
    )
    assert r.status_code == 409 and r.json()["code"] == "verification_stale"


async def test_avatar_upload_and_download(client, alice):
    png = _png()
    r = await client.put(
        "/v1/me/avatar", files={"file": ("me.png", png, "image/png")}, headers=alice.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["avatar_url"] == "/v1/me/avatar"
    got = await client.get("/v1/me/avatar", headers=alice.headers)
    assert got.status_code == 200 and got.content == png
    assert got.headers["content-type"] == "image/png"


async def test_avatar_rejects_non_images_and_large_files(client, bob):
    r = await client.put(
        "/v1/me/avatar",
        files={"file": ("x.png", b"<?php echo 1; ?>", "image/png")},
        headers=bob.headers,
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_image"
    big = b"\x89PNG" + b"0" * 1_000_001
    r = await client.put(
        "/v1/me/avatar", files={"file": ("big.png", big, "image/png")}, headers=bob.headers
    )
    assert r.status_code == 413
    assert (await client.get("/v1/me/avatar", headers=bob.headers)).status_code == 404


async def test_me_requires_a_token(client):
    r = await client.get("/v1/me")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
