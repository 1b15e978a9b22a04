"""The fraud lock policy end to end: N blocked payments request a lock, the fraud consumer locks
the account through the users' public face (every session revoked), sign-ins of every kind are
refused with 403 `account_locked`, and an access token issued before the lock can no longer pay;
an administrator unlocks (directly, or by releasing a case with `unlock_account`). The policy's
count is exact under concurrency: the limit reached by concurrent blocks requests one lock."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import text as sa_text

from billfold import users
from billfold.fraud.events import USER_LOCK_REQUESTED, lock_consumer
from billfold.fraud.service import FraudRiskCheck
from billfold.platform.bus.consumers import ConsumerSink
from billfold.platform.ids import new_id
from tests.conftest import SignedIn, device_key, fund, idem, make_admin, sign_up
from tests.integration.payments_support import act, pay, payment_body, sql
from tests.integration.test_devices import _device_login, _enrol
from tests.integration.test_fraud_decisions import Rules, make_runtime, payment
from tests.integration.test_fraud_flows import rule
from tests.integration.test_passkeys import (
    authenticator,
    passkey_token,
    register,
    sign_in_options,
)
from tests.integration.transfer_support import outbox_events

pytestmark = pytest.mark.usefixtures("network_simulator")


async def lock_requests(app: Any, user_id: str) -> list[dict[str, Any]]:
    """The lock requests of `user_id` in the outbox, as consumers receive them."""
    return await outbox_events(app, USER_LOCK_REQUESTED, user_id)


async def deliver_lock_requests(app: Any, user_id: str) -> int:
    """Run the worker's `fraud.lock-accounts` consumer (with its inbox) on the user's requests."""
    consumer = lock_consumer(app.state.users.redis, app.state.users.settings)
    sink = ConsumerSink(app.state.resources.engine, [consumer])
    requests = await lock_requests(app, user_id)
    for event in requests:
        assert await sink.deliver(consumer, event)
    return len(requests)


async def account_events(app: Any, user_id: str) -> list[Any]:
    return await sql(
        app,
        "SELECT type, data FROM platform.outbox WHERE subject = :u "
        "AND type IN ('billfold.users.account.locked', 'billfold.users.account.unlocked') "
        "ORDER BY seq",
        u=user_id,
    )


async def password_grant(client: httpx.AsyncClient, who: SignedIn) -> httpx.Response:
    return await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": who.email, "password": who.password},
    )


async def test_blocked_payments_lock_the_account_and_an_unlock_restores_it(
    client: httpx.AsyncClient, app: Any, admin: SignedIn
) -> None:
    alice = await sign_up(client, name="Alice Example", country="US")
    user_id = alice.user["id"]
    await fund(app, user_id, 50_000)
    # A second session (another phone) and an enrolled device key: all must stop working.
    other = (await password_grant(client, alice)).json()
    key, pem = device_key()
    device = await _enrol(client, alice, public_key=pem)

    limit = app.state.fraud.settings.fraud_lock_after_blocks
    assert limit >= 2
    async with rule(client, admin, "amount == 6101 && is_payment", action="block"):
        for _ in range(limit):
            r = await pay(client, alice, payment_body(amount=6_101))
            assert r.status_code in (201, 202) and r.json()["status"] == "declined", r.text
    # Below the limit nothing was requested; at it, exactly one request.
    assert len(await lock_requests(app, user_id)) == 1
    # Not locked until the worker's consumer handles the request (the request is the record).
    r = await pay(client, alice, payment_body(amount=1_000))
    assert r.status_code == 201, r.text

    assert await deliver_lock_requests(app, user_id) == 1
    assert await deliver_lock_requests(app, user_id) == 1  # redelivered: the inbox makes it once
    (locked,) = await account_events(app, user_id)
    assert locked.type == "billfold.users.account.locked"
    assert locked.data["reason"] == "fraud_repeated_blocks" and locked.data["by"] is None
    revoked = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE type = 'billfold.users.session.revoked' "
        "AND subject = :u",
        u=user_id,
    )
    # Both password sessions (the device key opened none yet), each with its own event.
    assert len(revoked) == 2 and all(r.data["reason"] == "account_locked" for r in revoked)

    # The access token issued before the lock can no longer pay (nor read the wallet).
    before = await client.get("/v1/wallet", headers=alice.headers)
    r = await pay(client, alice, payment_body(amount=1_000))
    assert r.status_code == 401 and r.json()["code"] == "invalid_token", r.text
    assert before.status_code == 401
    # Every way of signing in says why it is refused, only once the credential checks out.
    r = await password_grant(client, alice)
    assert r.status_code == 403 and r.json()["code"] == "account_locked", r.text
    wrong = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": alice.email, "password": "not-the-password"},
    )
    assert wrong.status_code == 400 and wrong.json()["code"] == "invalid_grant"
    for refresh in (alice.tokens["refresh_token"], other["refresh_token"]):
        r = await client.post(
            "/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh}
        )
        assert r.status_code == 403 and r.json()["code"] == "account_locked", r.text
    r, _ = await _device_login(client, device["id"], key)
    assert r.status_code == 403 and r.json()["code"] == "account_locked", r.text
    # Unlocking needs an administrator; then the owner signs in and pays again.
    reason = {"reason": "customer verified by phone"}
    r = await client.post(
        f"/v1/admin/users/{user_id}/unlock", json=reason, headers=idem(**alice.headers)
    )
    assert r.status_code == 401
    r = await client.post(
        f"/v1/admin/users/{user_id}/unlock", json=reason, headers=idem(**admin.headers)
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "user_id": user_id,
        "status": "active",
        "changed": True,
        "revoked_sessions": 0,
    }
    again = await client.post(
        f"/v1/admin/users/{user_id}/unlock", json=reason, headers=idem(**admin.headers)
    )
    assert again.status_code == 200 and again.json()["changed"] is False
    types = [e.type for e in await account_events(app, user_id)]
    assert types == ["billfold.users.account.locked", "billfold.users.account.unlocked"]
    grant = await password_grant(client, alice)
    assert grant.status_code == 200, grant.text
    fresh = SignedIn(alice.user, grant.json(), alice.email, alice.password)
    r = await pay(client, fresh, payment_body(amount=1_000))
    assert r.status_code == 201 and r.json()["status"] == "authorized", r.text
    r, _ = await _device_login(client, device["id"], key)
    assert r.status_code == 200, r.text


async def test_admin_lock_route(client: httpx.AsyncClient, app: Any, admin: SignedIn) -> None:
    bob = await sign_up(client, name="Bob Example", country="US")
    body = {"reason": "account takeover reported by the customer"}
    r = await client.post(
        f"/v1/admin/users/{bob.user['id']}/lock", json=body, headers=idem(**bob.headers)
    )
    assert r.status_code == 403 and r.json()["code"] == "admin_required"
    r = await client.post(
        f"/v1/admin/users/{new_id('usr')}/lock", json=body, headers=idem(**admin.headers)
    )
    assert r.status_code == 404 and r.json()["code"] == "user_not_found"
    for bad in ({}, {"reason": ""}, {"reason": "a\x00b"}, {**body, "user": "usr_other"}):
        r = await client.post(
            f"/v1/admin/users/{bob.user['id']}/lock", json=bad, headers=idem(**admin.headers)
        )
        assert r.status_code == 422, bad
    # An administrator does not lock themselves out (nobody would be signed in to undo it).
    r = await client.post(
        f"/v1/admin/users/{admin.user['id']}/lock", json=body, headers=idem(**admin.headers)
    )
    assert (r.status_code, r.json()["code"]) == (409, "cannot_lock_self"), r.text
    assert (await client.get("/v1/wallet", headers=admin.headers)).status_code == 200
    r = await client.get("/v1/wallet", headers=bob.headers)
    assert r.status_code == 200  # nothing changed by the refused requests

    r = await client.post(
        f"/v1/admin/users/{bob.user['id']}/lock", json=body, headers=idem(**admin.headers)
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "locked" and r.json()["changed"] is True
    assert r.json()["revoked_sessions"] == 1
    r = await client.get("/v1/wallet", headers=bob.headers)
    assert r.status_code == 401  # the live access token is denied at once
    r = await client.post(
        f"/v1/admin/users/{bob.user['id']}/lock", json=body, headers=idem(**admin.headers)
    )
    assert r.json()["changed"] is False
    (locked,) = await account_events(app, bob.user["id"])
    assert locked.data == {
        "user_id": bob.user["id"],
        "reason": body["reason"],
        "by": admin.user["id"],
        "revoked_sessions": 1,
    }


async def test_concurrent_blocks_at_the_limit_request_exactly_one_lock(
    app: Any, settings: Any
) -> None:
    """Every round: `limit` checks of one user blocked at the same moment. Counted without a
    lock, each transaction sees its own block and the committed ones only: two that commit
    together both count limit-1 (no request) or both count the limit (two requests)."""
    engine = app.state.resources.engine
    limit = 3
    rt = make_runtime(
        settings, app, rules=Rules(at=0, action="block"), fraud_lock_after_blocks=limit
    )
    check = FraudRiskCheck(rt)

    async def blocked(user_id: str, gate: asyncio.Event) -> None:
        async with engine.begin() as conn:
            await gate.wait()
            assert (await check.payments.assess(conn, payment(user_id))).action == "block"
            await asyncio.sleep(0.01)  # the commit comes a little after the count

    for _ in range(6):
        user_id = new_id("usr")
        gate = asyncio.Event()
        tasks = [asyncio.create_task(blocked(user_id, gate)) for _ in range(limit + 2)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
        requests = await lock_requests(app, user_id)
        assert [r["data"]["blocks"] for r in requests] == [limit], requests


async def test_releasing_a_case_can_unlock_the_account(
    client: httpx.AsyncClient, app: Any, admin: SignedIn
) -> None:
    carol = await sign_up(client, name="Carol Example", country="US")
    user_id = carol.user["id"]
    await fund(app, user_id, 20_000)
    async with rule(client, admin, "amount == 4321 && is_payment", action="review"):
        r = await pay(client, carol, payment_body(amount=4_321))
    assert r.status_code == 202 and r.json()["status"] == "review", r.text
    payment_id = r.json()["id"]
    r = await client.post(
        f"/v1/admin/users/{user_id}/lock",
        json={"reason": "held while the case is reviewed"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200
    r = await client.get(
        "/v1/admin/fraud/cases", params={"user_id": user_id}, headers=admin.headers
    )
    (case,) = r.json()["data"]
    detail = (await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)).json()
    assert detail["account_status"] == "locked"
    decision = f"/v1/admin/fraud/cases/{case['id']}/decision"
    r = await client.post(
        decision,
        json={"decision": "confirm_fraud", "unlock_account": True},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 422  # unlocking goes with a release only
    r = await client.post(
        decision,
        json={"decision": "release", "unlock_account": True, "note": "verified"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200, r.text
    assert r.json()["account_status"] == "active" and r.json()["subject_status"] == "authorized"
    assert r.json()["audit"][-1]["detail"]["account_unlocked"] is True
    (unlocked,) = [e for e in await account_events(app, user_id) if e.type.endswith("unlocked")]
    assert unlocked.data["by"] == admin.user["id"] and case["id"] in unlocked.data["reason"]
    grant = await password_grant(client, carol)
    assert grant.status_code == 200
    fresh = SignedIn(carol.user, grant.json(), carol.email, carol.password)
    r = await act(client, fresh, payment_id, "capture")
    assert r.status_code == 201, r.text
    assert r.json()["payment"]["status"] == "captured"


async def test_only_active_administrators_are_assignees(
    client: httpx.AsyncClient, app: Any, admin: SignedIn
) -> None:
    dave = await sign_up(client, name="Dave Example", country="US")
    other_admin = await make_admin(app, client)
    async with rule(client, admin, "amount == 4322 && is_payment", action="review"):
        await fund(app, dave.user["id"], 10_000)
        r = await pay(client, dave, payment_body(amount=4_322))
    assert r.status_code == 202, r.text
    r = await client.get(
        "/v1/admin/fraud/cases", params={"user_id": dave.user["id"]}, headers=admin.headers
    )
    (case,) = r.json()["data"]
    assign = f"/v1/admin/fraud/cases/{case['id']}/assign"
    for nobody in (dave.user["id"], new_id("usr"), "usr_nope"):
        r = await client.post(assign, json={"assignee_id": nobody}, headers=idem(**admin.headers))
        assert r.status_code == 422 and r.json()["code"] == "invalid_assignee", r.text
    got = await client.get(f"/v1/admin/fraud/cases/{case['id']}", headers=admin.headers)
    assert got.json()["status"] == "open" and got.json()["assignee_id"] is None
    r = await client.post(
        assign, json={"assignee_id": other_admin.user["id"]}, headers=idem(**admin.headers)
    )
    assert r.status_code == 200 and r.json()["assignee_id"] == other_admin.user["id"]
    # A locked administrator takes no cases.
    r = await client.post(
        f"/v1/admin/users/{other_admin.user['id']}/lock",
        json={"reason": "left the team"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200
    r = await client.post(assign, json={}, headers=idem(**admin.headers))
    assert r.status_code == 200 and r.json()["assignee_id"] == admin.user["id"]
    r = await client.post(
        assign, json={"assignee_id": other_admin.user["id"]}, headers=idem(**admin.headers)
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_assignee"


async def test_a_locked_account_cannot_sign_in_with_a_passkey(
    client: httpx.AsyncClient, app: Any, admin: SignedIn
) -> None:
    erin = await sign_up(client, name="Erin Example", country="US")
    device = authenticator(app)
    await register(client, erin, device)
    r = await client.post(
        f"/v1/admin/users/{erin.user['id']}/lock",
        json={"reason": "phishing reported"},
        headers=idem(**admin.headers),
    )
    assert r.status_code == 200
    opts = await sign_in_options(client)  # a discoverable credential: no e-mail named
    r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
    assert r.status_code == 403 and r.json()["code"] == "account_locked", r.text
    r = await client.post(
        f"/v1/admin/users/{erin.user['id']}/unlock",
        json={"reason": "phishing cleared"},
        headers=idem(**admin.headers),
    )
    opts = await sign_in_options(client)
    r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
    assert r.status_code == 200, r.text


async def _wait_until_blocked_by(app: Any, pid: int) -> None:
    """Until some backend waits on a lock that the connection with backend `pid` holds."""
    for _ in range(200):
        (row,) = await sql(
            app,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE :p = ANY(pg_blocking_pids(pid))",
            p=pid,
        )
        if row.n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("nothing ever waited on the lock")


async def test_a_sign_in_in_flight_while_the_account_is_locked_gets_no_session(
    client: httpx.AsyncClient, app: Any
) -> None:
    """The password was checked while the account was active; the lock commits before the
    session does. The sign-in is refused, and no session outlives the lock (nor comes back with
    the unlock through its refresh token)."""
    alice = await sign_up(client, name="Alice Example", country="US")
    user_id = alice.user["id"]
    async with app.state.resources.engine.connect() as conn:
        tx = await conn.begin()
        pid = (await conn.execute(sa_text("SELECT pg_backend_pid()"))).scalar_one()
        change = await users.lock_account(conn, user_id, reason="test", by=None)
        grant = asyncio.create_task(password_grant(client, alice))
        await _wait_until_blocked_by(app, pid)
        await tx.commit()
    await users.deny_access_tokens(app.state.users.redis, app.state.users.settings, change)
    r = await grant
    assert r.status_code == 403 and r.json()["code"] == "account_locked", r.text
    live = await sql(
        app,
        "SELECT id FROM users.sessions WHERE user_id = :u AND revoked_at IS NULL",
        u=user_id,
    )
    assert live == []


async def test_blocks_after_a_lock_request_request_a_lock_again(app: Any, settings: Any) -> None:
    """Locked, unlocked by an administrator, and blocked again the same day: the count starts
    after the last request, so N more blocks (not N, within the window, exactly) request
    another lock."""
    engine = app.state.resources.engine
    limit = 3
    rt = make_runtime(
        settings, app, rules=Rules(at=0, action="block"), fraud_lock_after_blocks=limit
    )
    check = FraudRiskCheck(rt)
    user_id = new_id("usr")

    async def block() -> None:
        async with engine.begin() as conn:
            assert (await check.payments.assess(conn, payment(user_id))).action == "block"

    for _ in range(limit):
        await block()
    assert [r["data"]["blocks"] for r in await lock_requests(app, user_id)] == [limit]
    for _ in range(limit - 1):
        await block()
    assert len(await lock_requests(app, user_id)) == 1  # not yet N more
    await block()
    assert [r["data"]["blocks"] for r in await lock_requests(app, user_id)] == [limit, limit]
