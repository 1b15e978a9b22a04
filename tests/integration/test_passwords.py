"""Password change (`/v1/me/password`) and reset (`/v1/auth/password-reset`) over HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from sqlalchemy import text

from billfold.users import passwords
from tests.conftest import PASSWORD, SignedIn, sign_up
from tests.integration.test_mfa import code_at, enable_totp, outbox
from tests.support.one_time_codes import reveal_code

NEW_PASSWORD = "a brand new passphrase 42"
REQUESTED = "billfold.users.password_reset.requested"


async def _grant(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post(
        "/v1/auth/token", data={"grant_type": "password", "username": email, "password": password}
    )


async def _second_session(client: httpx.AsyncClient, user: SignedIn) -> dict[str, Any]:
    r = await _grant(client, user.email, user.password)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def _refresh(client: httpx.AsyncClient, tokens: dict[str, Any]) -> httpx.Response:
    return await client.post(
        "/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )


async def _change(
    client: httpx.AsyncClient, user: SignedIn, current: str, new: str, **headers: str
) -> httpx.Response:
    return await client.post(
        "/v1/me/password",
        json={"current_password": current, "new_password": new},
        headers={**user.headers, **headers},
    )


async def _request_reset(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await client.post("/v1/auth/password-reset", json={"email": email})


async def _reset_code(app: Any, user_id: str, reset_id: str) -> str:
    events = await outbox(app, REQUESTED, user_id)
    return reveal_code(app, REQUESTED, next(e for e in events if e["reset_id"] == reset_id))


async def _start_reset(client: httpx.AsyncClient, app: Any, user: SignedIn) -> tuple[str, str]:
    r = await _request_reset(client, user.email)
    assert r.status_code == 202, r.text
    reset_id = r.json()["reset_id"]
    return reset_id, await _reset_code(app, user.user["id"], reset_id)


async def _confirm(
    client: httpx.AsyncClient, reset_id: str, code: str, new: str = NEW_PASSWORD
) -> httpx.Response:
    return await client.post(
        "/v1/auth/password-reset/confirm",
        json={"reset_id": reset_id, "code": code, "new_password": new},
    )


def _wrong(code: str) -> str:
    return "000000" if code != "000000" else "111111"


def _assert_no_secret(value: Any, *secrets: str) -> None:
    dumped = json.dumps(value) if not isinstance(value, str) else value
    for secret in secrets:
        assert secret not in dumped


# --- change ---------------------------------------------------------------------------------------


async def test_change_password_keeps_this_session_and_signs_out_the_others(client, app):
    user = await sign_up(client)
    other = await _second_session(client, user)

    r = await _change(client, user, PASSWORD, NEW_PASSWORD)
    assert r.status_code == 204, r.text
    assert r.content == b""

    assert (await _grant(client, user.email, PASSWORD)).status_code == 400
    assert (await _grant(client, user.email, NEW_PASSWORD)).status_code == 200
    # The other session is gone: its live access token and its refresh token.
    r = await client.get("/v1/me", headers=_bearer(other))
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"
    r = await _refresh(client, other)
    assert r.status_code == 400 and r.json()["code"] == "invalid_grant"
    # This one stays.
    assert (await client.get("/v1/me", headers=user.headers)).status_code == 200
    assert (await _refresh(client, user.tokens)).status_code == 200

    [changed] = await outbox(app, "billfold.users.password.changed", user.user["id"])
    assert changed == {
        "user_id": user.user["id"],
        "session_id": user.tokens["session_id"],
        "sessions_revoked": 1,
    }
    revoked = await outbox(app, "billfold.users.session.revoked", user.user["id"])
    assert [e["session_id"] for e in revoked] == [other["session_id"]]
    _assert_no_secret([changed, revoked], PASSWORD, NEW_PASSWORD)


async def test_wrong_current_password_changes_nothing(client):
    user = await sign_up(client)
    r = await _change(client, user, "not my password at all", NEW_PASSWORD)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "invalid_password"
    assert [e["pointer"] for e in problem["errors"]] == ["#/current_password"]
    _assert_no_secret(problem, "not my password at all", NEW_PASSWORD)
    assert (await _grant(client, user.email, PASSWORD)).status_code == 200
    assert (await _grant(client, user.email, NEW_PASSWORD)).status_code == 400


async def test_weak_or_unchanged_new_password_is_422_with_a_pointer(client, settings):
    user = await sign_up(client)
    for new in ("short", "aaaaaaaaaaaaaaa", PASSWORD):
        r = await _change(client, user, PASSWORD, new)
        assert r.status_code == 422, (new, r.text)
        assert r.json()["code"] == "validation_failed"
        assert [e["pointer"] for e in r.json()["errors"]] == ["#/new_password"]
        _assert_no_secret(r.json(), PASSWORD)
    # None of these was a password check, so none counted toward the lockout.
    for _ in range(settings.login_max_failures):
        assert (await _change(client, user, PASSWORD, PASSWORD)).status_code == 422
    assert (await _grant(client, user.email, PASSWORD)).status_code == 200


async def test_wrong_current_passwords_lock_sign_in_like_wrong_sign_ins(client, settings):
    user = await sign_up(client)
    for _ in range(settings.login_max_failures):
        r = await _change(client, user, "a wrong password", NEW_PASSWORD)
        assert r.status_code == 422 and r.json()["code"] == "invalid_password"
    # The attempt that reached the limit locked it: the right password is refused unchecked,
    # here and at sign-in.
    r = await _change(client, user, PASSWORD, NEW_PASSWORD)
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts"
    assert int(r.headers["retry-after"]) > 0
    r = await _grant(client, user.email, PASSWORD)
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts"


async def test_wrong_sign_ins_and_wrong_current_passwords_share_one_counter(client, settings):
    user = await sign_up(client)
    for _ in range(settings.login_max_failures - 1):
        assert (await _grant(client, user.email, "a wrong password")).status_code == 400
    assert (await _change(client, user, "a wrong password", NEW_PASSWORD)).status_code == 422
    assert (await _grant(client, user.email, PASSWORD)).status_code == 429

    # And the right current password ends the backoff, like a right sign-in.
    other = await sign_up(client)
    for _ in range(settings.login_max_failures - 1):
        assert (await _grant(client, other.email, "a wrong password")).status_code == 400
    assert (await _change(client, other, PASSWORD, NEW_PASSWORD)).status_code == 204
    for _ in range(settings.login_max_failures - 1):
        assert (await _grant(client, other.email, "a wrong password")).status_code == 400
    assert (await _grant(client, other.email, NEW_PASSWORD)).status_code == 200


async def test_password_change_ignores_idempotency_keys(client, app):
    user = await sign_up(client)
    key = f"pw-{uuid.uuid4().hex}"
    assert (
        await _change(client, user, PASSWORD, NEW_PASSWORD, **{"Idempotency-Key": key})
    ).status_code == 204
    # Not replayed: the old password is no longer the current one.
    r = await _change(client, user, PASSWORD, NEW_PASSWORD, **{"Idempotency-Key": key})
    assert r.status_code == 422 and r.json()["code"] == "invalid_password"
    async with app.state.resources.engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT count(*) FROM platform.idempotency_keys WHERE key = :k"), {"k": key}
            )
        ).scalar_one()
    assert stored == 0


async def test_change_needs_a_token(client):
    r = await client.post(
        "/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    assert r.status_code == 401


# --- reset ----------------------------------------------------------------------------------------


async def test_reset_answers_alike_for_known_and_unknown_emails(client, app):
    user = await sign_up(client)
    known = await _request_reset(client, user.email)
    unknown = await _request_reset(client, f"nobody-{uuid.uuid4().hex[:10]}@example.com")
    assert known.status_code == unknown.status_code == 202
    assert known.json().keys() == unknown.json().keys() == {"reset_id", "expires_in"}
    assert known.json()["expires_in"] == unknown.json()["expires_in"]
    assert len(known.json()["reset_id"]) == len(unknown.json()["reset_id"])
    assert set(known.headers) == set(unknown.headers)
    for name in ("content-type", "content-length", "cache-control"):
        assert known.headers[name] == unknown.headers[name]
    # Only the real account got a code, and only in the event.
    [event] = await outbox(app, REQUESTED, user.user["id"])
    code = reveal_code(app, REQUESTED, event)
    assert event["reset_id"] == known.json()["reset_id"] and len(code) == 6
    assert set(event) == {
        "user_id",
        "reset_id",
        "channel",
        "target",
        "sealed_code",
        "locale",
        "expires_in",
    }
    assert code not in known.text and code not in json.dumps(event)
    async with app.state.resources.engine.connect() as conn:
        carriers = (
            await conn.execute(
                text("SELECT count(*) FROM platform.outbox WHERE data->>'reset_id' = :r"),
                {"r": unknown.json()["reset_id"]},
            )
        ).scalar_one()
    assert carriers == 0


async def test_reset_sets_the_password_and_signs_out_everywhere(client, app):
    user = await sign_up(client)
    other = await _second_session(client, user)
    reset_id, code = await _start_reset(client, app, user)

    r = await _confirm(client, reset_id, code)
    assert r.status_code == 204, r.text
    assert r.content == b""

    assert (await _grant(client, user.email, PASSWORD)).status_code == 400
    assert (await _grant(client, user.email, NEW_PASSWORD)).status_code == 200
    for tokens in (user.tokens, other):
        r = await client.get("/v1/me", headers=_bearer(tokens))
        assert r.status_code == 401 and r.json()["code"] == "invalid_token"
        assert (await _refresh(client, tokens)).status_code == 400
    # Used: the same code cannot set a password again.
    r = await _confirm(client, reset_id, code, "yet another passphrase 7")
    assert r.status_code == 400 and r.json()["code"] == "invalid_reset"

    [done] = await outbox(app, "billfold.users.password.reset", user.user["id"])
    assert done == {"user_id": user.user["id"], "reset_id": reset_id, "sessions_revoked": 2}
    revoked = await outbox(app, "billfold.users.session.revoked", user.user["id"])
    assert {e["session_id"] for e in revoked} == {user.tokens["session_id"], other["session_id"]}
    assert {e["reason"] for e in revoked} == {"password_reset"}
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT type, data FROM platform.outbox WHERE subject = :u"),
                {"u": user.user["id"]},
            )
        ).all()
    for row in rows:
        _assert_no_secret(dict(row.data), PASSWORD, NEW_PASSWORD)
        if row.type != REQUESTED:
            _assert_no_secret(dict(row.data), code)


async def test_wrong_codes_count_down_then_the_reset_is_dead(client, app):
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    for left in range(passwords.RESET_MAX_ATTEMPTS - 1, -1, -1):
        r = await _confirm(client, reset_id, _wrong(code))
        assert r.status_code == 422 and r.json()["code"] == "invalid_code"
        assert r.json()["attempts_left"] == left
    r = await _confirm(client, reset_id, code)
    assert r.status_code == 400 and r.json()["code"] == "invalid_reset"
    assert (await _grant(client, user.email, PASSWORD)).status_code == 200


async def test_concurrent_wrong_codes_cannot_exceed_the_attempts(client, app):
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    answers = await asyncio.gather(*(_confirm(client, reset_id, _wrong(code)) for _ in range(20)))
    invalid = [r for r in answers if r.json()["code"] == "invalid_code"]
    assert len(invalid) == passwords.RESET_MAX_ATTEMPTS, [r.json()["code"] for r in answers]
    assert sorted(r.json()["attempts_left"] for r in invalid) == list(
        range(passwords.RESET_MAX_ATTEMPTS)
    )
    rest = [r for r in answers if r not in invalid]
    assert {(r.status_code, r.json()["code"]) for r in rest} == {(400, "invalid_reset")}
    r = await _confirm(client, reset_id, code)
    assert r.status_code == 400 and r.json()["code"] == "invalid_reset"
    assert (await _grant(client, user.email, PASSWORD)).status_code == 200


async def test_right_code_among_concurrent_wrong_ones_is_one_of_the_counted_attempts(client, app):
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    codes = [_wrong(code)] * 19 + [code]
    answers = await asyncio.gather(*(_confirm(client, reset_id, c) for c in codes))
    accepted = [r for r in answers if r.status_code == 204]
    invalid = [r for r in answers if r.status_code == 422]
    assert len(accepted) <= 1
    assert len(accepted) + len(invalid) <= passwords.RESET_MAX_ATTEMPTS
    ok = await _grant(client, user.email, NEW_PASSWORD if accepted else PASSWORD)
    assert ok.status_code == 200


async def test_decoy_unknown_and_expired_resets_reveal_nothing(client, app):
    # A decoy (unknown email) counts down exactly like a real reset with wrong codes.
    decoy = (await _request_reset(client, f"ghost-{uuid.uuid4().hex[:10]}@example.com")).json()
    for left in range(passwords.RESET_MAX_ATTEMPTS - 1, -1, -1):
        r = await _confirm(client, decoy["reset_id"], "123456")
        assert r.status_code == 422 and r.json()["attempts_left"] == left
    dead = await _confirm(client, decoy["reset_id"], "123456")
    assert dead.status_code == 400 and dead.json()["code"] == "invalid_reset"

    # Never issued, malformed, or expired: the answer of a dead reset.
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    rt = app.state.users
    await rt.redis.pexpire(rt.key("password-reset", reset_id), 1)
    await asyncio.sleep(0.05)
    for rid, c in (
        (reset_id, code),
        ("x" * 22, "123456"),
        (f"{reset_id}:attempts", "123456"),
        ("../../etc", "123456"),
    ):
        r = await _confirm(client, rid, c)
        assert (r.status_code, r.json()["code"]) == (400, "invalid_reset"), rid
        assert r.json().keys() == dead.json().keys()
        assert r.json()["detail"] == dead.json()["detail"]
    assert (await _grant(client, user.email, PASSWORD)).status_code == 200


async def test_reset_requests_are_limited_per_email_without_saying_so(client, app):
    user = await sign_up(client)
    answers = [await _request_reset(client, user.email) for _ in range(4)]
    assert {r.status_code for r in answers} == {202}
    assert len({frozenset(r.json()) for r in answers}) == 1
    events = await outbox(app, REQUESTED, user.user["id"])
    assert [e["reset_id"] for e in events] == [
        r.json()["reset_id"] for r in answers[: passwords.RESETS_PER_EMAIL_PER_WINDOW]
    ]
    # The one over the limit is a decoy: no code exists for it.
    code = reveal_code(app, REQUESTED, events[0])
    r = await _confirm(client, answers[-1].json()["reset_id"], code)
    assert r.status_code == 422 and r.json()["code"] == "invalid_code"


async def test_no_reset_for_an_inactive_account(client, app):
    user = await sign_up(client)
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text("UPDATE users.users SET status = 'locked' WHERE id = :u"), {"u": user.user["id"]}
        )
    r = await _request_reset(client, user.email)
    assert r.status_code == 202
    assert await outbox(app, REQUESTED, user.user["id"]) == []


async def test_a_password_change_kills_a_pending_reset(client, app):
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    assert (await _change(client, user, PASSWORD, NEW_PASSWORD)).status_code == 204
    r = await _confirm(client, reset_id, code, "someone else's passphrase")
    assert r.status_code == 400 and r.json()["code"] == "invalid_reset"
    assert (await _grant(client, user.email, NEW_PASSWORD)).status_code == 200


async def test_reset_ends_the_sign_in_lockout(client, app, settings):
    user = await sign_up(client)
    for _ in range(settings.login_max_failures):
        await _grant(client, user.email, "a wrong password")
    assert (await _grant(client, user.email, PASSWORD)).status_code == 429
    reset_id, code = await _start_reset(client, app, user)
    assert (await _confirm(client, reset_id, code)).status_code == 204
    assert (await _grant(client, user.email, NEW_PASSWORD)).status_code == 200


async def test_reset_does_not_bypass_two_factor(client, app):
    user = await sign_up(client)
    secret, _ = await enable_totp(client, user)
    reset_id, code = await _start_reset(client, app, user)
    assert (await _confirm(client, reset_id, code)).status_code == 204
    r = await _grant(client, user.email, NEW_PASSWORD)
    assert r.status_code == 403 and r.json()["code"] == "mfa_required"
    assert "access_token" not in r.json()
    ok = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "mfa_otp",
            "mfa_token": r.json()["mfa_token"],
            "otp": code_at(secret, 1),
        },
    )
    assert ok.status_code == 200, ok.text
    me = await client.get("/v1/me", headers=_bearer(ok.json()))
    assert me.json()["two_factor_enabled"] is True


async def test_weak_new_password_on_confirm_spends_no_attempt(client, app):
    user = await sign_up(client)
    reset_id, code = await _start_reset(client, app, user)
    r = await _confirm(client, reset_id, code, "short")
    assert r.status_code == 422 and r.json()["code"] == "validation_failed"
    assert [e["pointer"] for e in r.json()["errors"]] == ["#/new_password"]
    _assert_no_secret(r.json(), code)
    assert (await _confirm(client, reset_id, code)).status_code == 204
