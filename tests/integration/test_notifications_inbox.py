"""The in-app inbox (list, read/unread, unread count, delivery log), its live Server-Sent
Events stream over a real socket, and the preferences API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from billfold import users
from billfold.notifications import StreamGate
from tests.conftest import SignedIn, free_port, fund
from tests.integration.notifications_support import harness, notifications_of
from tests.integration.transfer_support import send_ok


async def _inbox_item(app: Any, client: httpx.AsyncClient, alice: SignedIn, bob: SignedIn) -> str:
    """A transfer Alice → Bob, consumed and dispatched: Bob's new inbox item."""
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 150, bob)
    async with harness(app) as h:
        await h.deliver(transfer["id"])
        await h.dispatch()
    return str((await notifications_of(app, bob, "transfer_received"))[-1].id)


async def test_inbox_read_unread_and_the_delivery_log(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    first = await _inbox_item(app, client, alice, bob)
    second = await _inbox_item(app, client, alice, bob)
    r = await client.get("/v1/notifications", params={"limit": 1}, headers=bob.headers)
    assert r.status_code == 200
    page = r.json()
    assert [n["id"] for n in page["data"]] == [second] and page["next_cursor"]
    assert page["data"][0]["read"] is False and page["data"][0]["category"] == "transfers"
    assert "context" not in page["data"][0]["data"]
    r = await client.get(
        "/v1/notifications",
        params={"limit": 1, "cursor": page["next_cursor"]},
        headers=bob.headers,
    )
    assert [n["id"] for n in r.json()["data"]] == [first]

    unseen = await client.get(f"/v1/notifications/{first}", headers=bob.headers)
    assert unseen.json()["deliveries"][0]["status"] == "sent"  # told, not yet seen
    r = await client.post(f"/v1/notifications/{first}/read", headers=bob.headers)
    assert r.status_code == 200 and r.json()["read"] is True and r.json()["read_at"]
    count = await client.get("/v1/notifications/unread-count", headers=bob.headers)
    assert count.json() == {"unread": 1}
    unread = await client.get("/v1/notifications", params={"unread": "true"}, headers=bob.headers)
    assert [n["id"] for n in unread.json()["data"]] == [second]
    r = await client.post(f"/v1/notifications/{first}/unread", headers=bob.headers)
    assert r.json()["read"] is False
    r = await client.post("/v1/notifications/read-all", headers=bob.headers)
    assert r.json() == {"updated": 2}
    count = await client.get("/v1/notifications/unread-count", headers=bob.headers)
    assert count.json() == {"unread": 0}

    r = await client.get(f"/v1/notifications/{first}", headers=bob.headers)
    assert r.status_code == 200
    (delivery,) = r.json()["deliveries"]
    assert delivery["channel"] == "in_app" and delivery["target"] == "inbox"
    # Told by the dispatcher (`sent`), then `delivered` by the reads above.
    assert [e["status"] for e in delivery["log"]] == ["queued", "sending", "sent", "delivered"]
    assert delivery["log"][-1]["detail"] == "read" and delivery["status"] == "delivered"

    # Someone else's notification, or junk, is a 404; so is marking it.
    for path in (f"/v1/notifications/{first}", f"/v1/notifications/{first}/read"):
        method = client.get if path.endswith(first) else client.post
        r = await method(path, headers=alice.headers)
        assert r.status_code == 404 and r.json()["code"] == "notification_not_found"
    r = await client.get("/v1/notifications/not-an-id", headers=bob.headers)
    assert r.status_code == 404
    assert (await client.get("/v1/notifications")).status_code == 401


def _use_gate(monkeypatch: pytest.MonkeyPatch, app: Any, gate: StreamGate) -> None:
    """The app's streams go through `gate` for this test. Through the State's dict: the undo of
    `monkeypatch.setattr` on a starlette `State` deletes the attribute (it is not in the
    instance `__dict__`), leaving the session's app without a gate for every later test."""
    monkeypatch.setitem(app.state._state, "notification_streams", gate)


@pytest.fixture
async def served(app: Any) -> AsyncIterator[str]:
    """The test app on a real loopback socket (the ASGI transport buffers whole responses)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # it failed to start: say why
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """Read `count` SSE events (id + JSON data) from a streaming response."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("event: "):
            current["event"] = line[7:]
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "" and current:
            out.append(current)
            current = {}
            if len(out) == count:
                return out
    return out


async def test_the_stream_delivers_live_and_replays_after_a_reconnect(
    served: str, client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    async with httpx.AsyncClient(base_url=served, timeout=10) as http:
        async with http.stream("GET", "/v1/notifications/stream", headers=bob.headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            reader = asyncio.create_task(_events(response, 1))
            await asyncio.sleep(0.3)  # subscribed
            live = await _inbox_item(app, client, alice, bob)
            (event,) = await asyncio.wait_for(reader, 10)
        assert event["id"] == live and event["event"] == "notification"
        # Shown on the stream: delivered (recorded once the event went out).
        for _ in range(40):
            detail = await client.get(f"/v1/notifications/{live}", headers=bob.headers)
            (in_app,) = detail.json()["deliveries"]
            if in_app["status"] == "delivered":
                break
            await asyncio.sleep(0.05)
        assert (in_app["status"], in_app["log"][-1]["detail"]) == ("delivered", "streamed")
        assert event["data"]["title"] == "Money received"
        assert event["data"]["body"] == "Alice Example sent you $1.50."

        # Missed while away: replayed from the inbox after Last-Event-ID.
        missed = [await _inbox_item(app, client, alice, bob) for _ in range(2)]
        async with http.stream(
            "GET",
            "/v1/notifications/stream",
            headers={**bob.headers, "Last-Event-ID": live},
        ) as response:
            replayed = await asyncio.wait_for(_events(response, 2), 10)
        assert [e["id"] for e in replayed] == missed

        r = await http.get("/v1/notifications/stream")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"


async def test_preferences_defaults_changes_and_locks(
    client: httpx.AsyncClient, bob: SignedIn
) -> None:
    r = await client.get("/v1/me/notification-preferences", headers=bob.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    cats = {c["category"]: c for c in body["categories"]}
    assert cats["transfers"]["channels"] == {
        "push": True,
        "email": True,
        "sms": False,
        "in_app": True,
    }
    assert cats["security"]["locked_channels"] == ["push", "email", "in_app"]
    assert body["quiet_hours"] is None and body["timezone"] == "UTC"

    r = await client.put(
        "/v1/me/notification-preferences",
        json={
            "categories": [
                {"category": "payments", "channels": {"push": False, "email": True}},
                {"category": "security", "channels": {"sms": True}},
            ],
            "quiet_hours": {"start": "22:00", "end": "07:00"},
        },
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    cats = {c["category"]: c for c in r.json()["categories"]}
    assert cats["payments"]["channels"]["push"] is False
    assert cats["payments"]["channels"]["email"] is True
    assert cats["security"]["channels"]["sms"] is True
    assert r.json()["quiet_hours"] == {"start": "22:00", "end": "07:00"}

    # Leaving quiet_hours out keeps them; null switches them off.
    r = await client.put(
        "/v1/me/notification-preferences", json={"categories": []}, headers=bob.headers
    )
    assert r.json()["quiet_hours"] == {"start": "22:00", "end": "07:00"}
    r = await client.put(
        "/v1/me/notification-preferences", json={"quiet_hours": None}, headers=bob.headers
    )
    assert r.json()["quiet_hours"] is None

    # Security alerts stay on; nothing changed by the refused request.
    r = await client.put(
        "/v1/me/notification-preferences",
        json={
            "categories": [
                {"category": "payments", "channels": {"push": True}},
                {"category": "security", "channels": {"email": False}},
            ]
        },
        headers=bob.headers,
    )
    assert r.status_code == 422 and r.json()["code"] == "notification_preference_locked"
    r = await client.get("/v1/me/notification-preferences", headers=bob.headers)
    cats = {c["category"]: c for c in r.json()["categories"]}
    assert cats["payments"]["channels"]["push"] is False

    for bad in (
        {"categories": [{"category": "marketing", "channels": {"push": True}}]},
        {"categories": [{"category": "payments", "channels": {"fax": True}}]},
        {"categories": [{"category": "payments", "channels": {"push": "yes please"}}]},
        {"quiet_hours": {"start": "25:00", "end": "07:00"}},
        {"quiet_hours": {"start": "22:00"}},
        {"unknown": 1},
    ):
        r = await client.put("/v1/me/notification-preferences", json=bad, headers=bob.headers)
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"] == "application/problem+json"


async def test_streams_have_their_own_bounded_redis_pool_and_past_it_a_503(
    served: str,
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each open stream holds a pub/sub connection: they come from a pool of their own (named
    connections show it), at most `notifications_stream_limit` of them, never the API's."""
    name = f"sse-test-{uuid.uuid4().hex[:8]}"
    gate = StreamGate(app.state.resources.settings.redis_url, 1, client_name=name)
    _use_gate(monkeypatch, app, gate)
    redis = app.state.resources.redis

    async def stream_connections() -> int:
        return len([c for c in await redis.client_list() if c.get("name") == name])

    try:
        async with httpx.AsyncClient(base_url=served, timeout=10) as http:
            async with http.stream("GET", "/v1/notifications/stream", headers=bob.headers) as first:
                assert first.status_code == 200
                reader = asyncio.create_task(_events(first, 1))
                await asyncio.sleep(0.3)  # subscribed
                assert await stream_connections() == 1

                # Full: the next stream is refused at once, and says when to come back.
                full = await http.get("/v1/notifications/stream", headers=alice.headers)
                assert full.status_code == 503
                assert full.headers["content-type"] == "application/problem+json"
                assert full.json()["code"] == "stream_capacity"
                assert int(full.headers["retry-after"]) > 0
                # The API itself goes on (its Redis pool is not the streams').
                r = await http.get("/v1/notifications/unread-count", headers=alice.headers)
                assert r.status_code == 200

                # The open stream still works.
                live = await _inbox_item(app, client, alice, bob)
                (event,) = await asyncio.wait_for(reader, 10)
                assert event["id"] == live

            # Closed: its place (and connection) is free for the next one.
            for _ in range(50):
                if gate.open_streams == 0:
                    break
                await asyncio.sleep(0.1)
            assert gate.open_streams == 0
            async with http.stream(
                "GET", "/v1/notifications/stream", headers=alice.headers
            ) as again:
                assert again.status_code == 200
    finally:
        await gate.aclose()


async def _stream_end(response: httpx.Response) -> list[str]:
    """Every line of a stream until the server ends it."""
    return [line async for line in response.aiter_lines()]


async def test_a_live_stream_ends_when_its_session_is_revoked(
    served: str, app: Any, alice: SignedIn, bob: SignedIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream outlives the request the edge authenticated: a lock (or logout) that
    revokes the session must end it within the check tick, not leave it streaming."""
    gate = StreamGate(app.state.resources.settings.redis_url, 10, session_check_seconds=0.5)
    _use_gate(monkeypatch, app, gate)
    res = app.state.resources
    try:
        async with httpx.AsyncClient(base_url=served, timeout=10) as http:
            async with (
                http.stream("GET", "/v1/notifications/stream", headers=bob.headers) as locked,
                http.stream("GET", "/v1/notifications/stream", headers=alice.headers) as other,
            ):
                assert locked.status_code == 200 and other.status_code == 200
                ending = asyncio.create_task(_stream_end(locked))
                others = asyncio.create_task(_stream_end(other))
                await asyncio.sleep(0.3)  # subscribed
                async with res.engine.begin() as conn:
                    change = await users.lock_account(conn, bob.user["id"], reason="test", by=None)
                await users.deny_access_tokens(res.redis, res.settings, change)
                lines = await asyncio.wait_for(ending, 5)
                assert "event: session_ended" in lines
                assert 'data: {"reason": "session_revoked"}' in lines
                # Someone else's stream goes on.
                await asyncio.sleep(1.2)
                assert not others.done()
                others.cancel()
        for _ in range(50):
            if gate.open_streams == 0:
                break
            await asyncio.sleep(0.1)
        assert gate.open_streams == 0
    finally:
        await gate.aclose()


async def test_a_live_stream_ends_when_its_access_token_expires(
    served: str,
    client: httpx.AsyncClient,
    app: Any,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = StreamGate(app.state.resources.settings.redis_url, 10, session_check_seconds=30)
    _use_gate(monkeypatch, app, gate)
    claims = await app.state.users.tokens.keyring.decode(bob.tokens["access_token"])
    # The same session's token, but one that expires in two seconds.
    token, _ = await app.state.users.tokens.issue(
        user_id=bob.user["id"],
        session_id=claims["sid"],
        scopes=claims["scope"].split(),
        role="user",
        device_id=None,
        auth_method="pwd",
        extra={"exp": int(time.time()) + 2},
    )
    try:
        async with httpx.AsyncClient(base_url=served, timeout=10) as http:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.stream("GET", "/v1/notifications/stream", headers=headers) as s:
                assert s.status_code == 200
                lines = await asyncio.wait_for(_stream_end(s), 6)
        assert 'data: {"reason": "token_expired"}' in lines
    finally:
        await gate.aclose()


async def test_one_user_holds_only_a_few_live_streams(
    served: str,
    client: httpx.AsyncClient,
    app: Any,
    alice: SignedIn,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process-wide bound alone let one account (or one stolen token) take every slot and
    lock every other user out with 503s: one user gets `per_user` streams, then 429."""
    gate = StreamGate(app.state.resources.settings.redis_url, 10, per_user=2)
    _use_gate(monkeypatch, app, gate)
    url = "/v1/notifications/stream"
    try:
        async with httpx.AsyncClient(base_url=served, timeout=10) as http:
            async with http.stream("GET", url, headers=bob.headers) as first:
                async with http.stream("GET", url, headers=bob.headers) as second:
                    assert first.status_code == 200 and second.status_code == 200
                    third = await http.get(url, headers=bob.headers)
                    assert third.status_code == 429, third.text
                    assert third.headers["content-type"] == "application/problem+json"
                    assert third.json()["code"] == "too_many_streams"
                    assert int(third.headers["retry-after"]) > 0
                    # Everyone else still gets theirs.
                    async with http.stream("GET", url, headers=alice.headers) as other:
                        assert other.status_code == 200
                    assert gate.streams_of(bob.user["id"]) == 2
                # One closed: Bob may open another.
                for _ in range(50):
                    if gate.streams_of(bob.user["id"]) < 2:
                        break
                    await asyncio.sleep(0.1)
                async with http.stream("GET", url, headers=bob.headers) as again:
                    assert again.status_code == 200
        for _ in range(50):
            if gate.open_streams == 0:
                break
            await asyncio.sleep(0.1)
        assert gate.open_streams == 0 and gate.streams_of(bob.user["id"]) == 0
    finally:
        await gate.aclose()
