"""One transaction per request: everything a request writes commits together, or nothing does."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends
from sqlalchemy import text

from billfold.app import create_app
from billfold.gateway import get_uow
from billfold.platform.db import UnitOfWork, unit_of_work
from billfold.platform.errors import Conflict
from billfold.platform.events import Event, record_event
from billfold.platform.ids import is_valid_id
from tests.conftest import make_settings, registration, sign_up

Uow = Annotated[UnitOfWork, Depends(get_uow)]


def phone() -> str:
    return f"+49160{secrets.randbelow(10**8):08d}"


async def scalar(engine: Any, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def inbox_count(engine: Any, consumer: str) -> int:
    return await scalar(
        engine, "SELECT count(*) FROM platform.inbox WHERE consumer = :c", c=consumer
    )


# --- through the API --------------------------------------------------------------------------


async def test_failed_request_changes_nothing(client, app):
    alice = await sign_up(client, phone=phone(), name="Alice Before")
    bob = await sign_up(client, phone=phone(), name="Bob Owner")
    engine = app.state.resources.engine

    async def snapshot() -> tuple[Any, int]:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT * FROM users.users WHERE id = :id"), {"id": alice.user["id"]}
                )
            ).one()
            events = (
                await conn.execute(
                    text("SELECT count(*) FROM platform.outbox WHERE subject = :id"),
                    {"id": alice.user["id"]},
                )
            ).scalar_one()
        return row, events

    before = await snapshot()
    r = await client.patch(
        "/v1/me",
        json={"name": "Alice After", "email": bob.email, "timezone": "Europe/Berlin"},
        headers=alice.headers,
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "contact_in_use"
    assert await snapshot() == before
    me = (await client.get("/v1/me", headers=alice.headers)).json()
    assert me["name"] == "Alice Before"
    assert me["email"] == alice.email


async def test_successful_request_commits_the_row_and_its_event_together(client, app):
    body = registration(phone=phone())
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    engine = app.state.resources.engine
    async with engine.connect() as conn:
        user = (
            await conn.execute(text("SELECT * FROM users.users WHERE id = :id"), {"id": user_id})
        ).one()
        events = (
            await conn.execute(
                text("SELECT * FROM platform.outbox WHERE subject = :id ORDER BY seq"),
                {"id": user_id},
            )
        ).all()
    assert user.email == body["email"]
    registered = [e for e in events if e.type == "billfold.users.user.registered"]
    assert len(registered) == 1
    event = registered[0]
    # CloudEvents 1.0 attributes: id, source, type, subject, time, data.
    assert is_valid_id(event.id, "evt")
    assert event.source == "/billfold/users"
    assert event.subject == user_id
    assert event.aggregate_id == user_id
    assert isinstance(event.time, datetime) and event.time.tzinfo is not None
    assert event.data["user_id"] == user_id
    assert event.data["country"] == body["country"]
    assert "password" not in str(event.data)
    assert event.published_at is None or event.published_at >= event.time


async def test_event_envelope_is_cloudevents_1_0():
    e = Event(
        type="billfold.users.user.registered",
        source="/billfold/users",
        subject="usr_x",
        data={"user_id": "usr_x"},
    )
    env = e.envelope()
    assert env["specversion"] == "1.0"
    assert env["datacontenttype"] == "application/json"
    assert {"id", "type", "source", "subject", "time", "data"} <= set(env)
    assert env["time"].endswith("Z")
    assert is_valid_id(env["id"], "evt")


# --- a second app with routes that write and then fail ------------------------------------


@pytest.fixture(scope="module")
async def probe(
    database_url, redis_url, data_dir, settings
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    # Same database, so the same secret key: the JWT signing keys there are sealed with it.
    application = create_app(
        make_settings(database_url, redis_url, data_dir, secret_key=settings.secret_key)
    )
    after_commit_ran: list[str] = []
    application.state.after_commit_ran = after_commit_ran

    async def write(uow: UnitOfWork, consumer: str) -> None:
        conn = await uow.connection()
        await conn.execute(
            text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, :e)"),
            {"c": consumer, "e": f"evt-{uuid.uuid4().hex}"},
        )
        await record_event(
            conn,
            Event(type="billfold.test.probe.written", source="/tests", subject=consumer, data={}),
        )

    @application.post("/v1/_probe/{consumer}/ok", status_code=201)
    async def ok(consumer: str, uow: Uow) -> dict[str, str]:
        await write(uow, consumer)
        return {"status": "written"}

    @application.post("/v1/_probe/{consumer}/conflict")
    async def conflict(consumer: str, uow: Uow) -> dict[str, str]:
        await write(uow, consumer)
        raise Conflict("written, then refused", code="probe_conflict")

    @application.post("/v1/_probe/{consumer}/crash")
    async def crash(consumer: str, uow: Uow) -> dict[str, str]:
        await write(uow, consumer)
        raise RuntimeError("written, then crashed with a secret: hunter2")

    @application.post("/v1/_probe/{consumer}/twice", status_code=201)
    async def twice(consumer: str, uow: Uow) -> dict[str, str]:
        await write(uow, consumer)
        await write(uow, consumer)
        return {"status": "written twice"}

    @application.post("/v1/_probe/{consumer}/after-commit-fails", status_code=201)
    async def after_commit_fails(consumer: str, uow: Uow) -> dict[str, str]:
        await write(uow, consumer)

        async def redis_down() -> None:
            raise ConnectionError("Redis is down")

        async def still_runs() -> None:
            after_commit_ran.append(consumer)

        uow.after_commit(redis_down)
        uow.after_commit(still_runs)
        return {"status": "written"}

    @application.post("/v1/_probe/{consumer}/duplicate")
    async def duplicate(consumer: str, uow: Uow) -> dict[str, str]:
        # The second write violates the inbox primary key: the first must not survive.
        conn = await uow.connection()
        sql = text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, 'same')")
        await conn.execute(sql, {"c": consumer})
        await conn.execute(sql, {"c": consumer})
        return {"status": "unreachable"}

    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c, application


def consumer_name() -> str:
    return f"probe-{uuid.uuid4().hex[:12]}"


async def outbox_count(engine: Any, subject: str) -> int:
    return await scalar(
        engine, "SELECT count(*) FROM platform.outbox WHERE subject = :s", s=subject
    )


async def test_handler_that_writes_then_succeeds_commits_everything(probe):
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    r = await client.post(f"/v1/_probe/{c}/twice")
    assert r.status_code == 201, r.text
    assert await inbox_count(engine, c) == 2
    assert await outbox_count(engine, c) == 2


async def test_failing_after_commit_callback_does_not_turn_a_committed_change_into_an_error(
    probe,
):
    """The transaction committed: a callback failing afterwards (Redis down while writing the
    denylist) is logged, the other callbacks still run, and the client gets the success."""
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    r = await client.post(f"/v1/_probe/{c}/after-commit-fails")
    assert r.status_code == 201, r.text
    assert await inbox_count(engine, c) == 1
    assert c in application.state.after_commit_ran


async def test_handler_that_writes_then_raises_a_problem_changes_nothing(probe):
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    r = await client.post(f"/v1/_probe/{c}/conflict")
    assert r.status_code == 409
    assert r.json()["code"] == "probe_conflict"
    assert await inbox_count(engine, c) == 0
    assert await outbox_count(engine, c) == 0


async def test_handler_that_writes_then_crashes_is_a_500_problem_and_changes_nothing(probe):
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    r = await client.post(f"/v1/_probe/{c}/crash")
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "internal_error"
    assert "hunter2" not in r.text and "RuntimeError" not in r.text
    assert await inbox_count(engine, c) == 0
    assert await outbox_count(engine, c) == 0


async def test_database_error_mid_request_changes_nothing(probe):
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    r = await client.post(f"/v1/_probe/{c}/duplicate")
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    assert await inbox_count(engine, c) == 0


async def test_failed_request_with_idempotency_key_changes_nothing_and_is_not_stored(probe):
    client, application = probe
    engine = application.state.resources.engine
    c = consumer_name()
    k = f"uow-{uuid.uuid4()}"
    r = await client.post(f"/v1/_probe/{c}/conflict", headers={"Idempotency-Key": k})
    assert r.status_code == 409
    assert await inbox_count(engine, c) == 0
    stored = await scalar(
        engine, "SELECT count(*) FROM platform.idempotency_keys WHERE key = :k", k=k
    )
    assert stored == 0
    r = await client.post(f"/v1/_probe/{c}/ok", headers={"Idempotency-Key": k})
    assert r.status_code == 201
    r = await client.post(f"/v1/_probe/{c}/ok", headers={"Idempotency-Key": k})
    assert r.headers["idempotent-replayed"] == "true"
    assert await inbox_count(engine, c) == 1


async def test_connections_are_returned_after_failures(probe):
    client, application = probe
    engine = application.state.resources.engine
    for _ in range(25):  # more than the pool holds: a leaked connection would hang here
        c = consumer_name()
        assert (await client.post(f"/v1/_probe/{c}/conflict")).status_code == 409
    for _ in range(2):
        assert (await client.post(f"/v1/_probe/{consumer_name()}/crash")).status_code == 500
    assert engine.pool.checkedout() == 0


# --- the unit_of_work context manager for commands and jobs ---------------------------------


async def test_unit_of_work_commits_on_success(app):
    engine = app.state.resources.engine
    c = consumer_name()
    called: list[str] = []

    async def after() -> None:
        called.append("after")
        # After commit, another connection sees the row.
        called.append(str(await inbox_count(engine, c)))

    async with unit_of_work(engine) as uow:
        assert not uow.active  # begun lazily
        conn = await uow.connection()
        assert uow.active
        assert await uow.connection() is conn  # one connection per unit
        await conn.execute(
            text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, 'e1')"), {"c": c}
        )
        uow.after_commit(after)
        assert await inbox_count(engine, c) == 0  # not visible before commit
        assert called == []
    assert not uow.active
    assert called == ["after", "1"]
    assert await inbox_count(engine, c) == 1


async def test_unit_of_work_after_commit_failures_are_logged_not_raised(app):
    engine = app.state.resources.engine
    c = consumer_name()
    called: list[str] = []

    async def broken() -> None:
        raise ConnectionError("Redis is down")

    async def after() -> None:
        called.append("after")

    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        await conn.execute(
            text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, 'e1')"), {"c": c}
        )
        uow.after_commit(broken)
        uow.after_commit(after)
    assert called == ["after"]
    assert await inbox_count(engine, c) == 1


async def test_unit_of_work_rolls_back_on_exception(app):
    engine = app.state.resources.engine
    c = consumer_name()
    called: list[str] = []

    async def after() -> None:
        called.append("after")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            await conn.execute(
                text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, 'e1')"),
                {"c": c},
            )
            await record_event(
                conn, Event(type="billfold.test.rolled_back", source="/t", subject=c, data={})
            )
            uow.after_commit(after)
            raise Boom
    assert not uow.active
    assert called == []
    assert await inbox_count(engine, c) == 0
    assert await outbox_count(engine, c) == 0


async def test_unit_of_work_rolls_back_on_cancellation(app):
    import asyncio

    engine = app.state.resources.engine
    c = consumer_name()
    started = asyncio.Event()

    async def job() -> None:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            await conn.execute(
                text("INSERT INTO platform.inbox (consumer, event_id) VALUES (:c, 'e1')"),
                {"c": c},
            )
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(job())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await inbox_count(engine, c) == 0


async def test_unit_of_work_that_never_touches_the_database_opens_nothing(app):
    engine = app.state.resources.engine
    before = engine.pool.checkedout()
    async with unit_of_work(engine) as uow:
        assert not uow.active
    assert engine.pool.checkedout() == before


async def test_database_errors_do_not_carry_bound_values(app):
    """A failed statement is logged with its exception; the values (password hashes, personal
    data, one-time codes) must not be part of it."""
    secret = "argon2-hash-that-must-not-be-logged"
    with pytest.raises(Exception) as failed:  # any driver error will do
        async with unit_of_work(app.state.resources.engine) as uow:
            conn = await uow.connection()
            # PostgreSQL refuses the NUL; its message does not quote the value, SQLAlchemy's did
            await conn.execute(text("SELECT CAST(:v AS text)"), {"v": secret + "\x00"})
    assert "invalid byte sequence" in str(failed.value)
    assert secret not in str(failed.value)
