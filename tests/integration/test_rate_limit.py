"""Rate limits in Redis: per IP and per user, per route class; 429 problem with RateLimit-*."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from billfold.app import create_app
from billfold.platform.errors import PROBLEM_CONTENT_TYPE
from tests.conftest import make_settings, registration, sign_up

AUTH_IP = 3
READ_IP = 6
READ_USER = 4


def phone() -> str:
    return f"+49170{secrets.randbelow(10**8):08d}"


_ips = iter(range(1, 10**6))


def fresh_ip() -> str:
    n = next(_ips)
    return f"198.51.{n // 250}.{n % 250 + 1}"


@pytest.fixture(scope="module")
async def limited(database_url, redis_url, data_dir, settings) -> AsyncIterator[Any]:
    application = create_app(
        make_settings(
            database_url,
            redis_url,
            data_dir,
            secret_key=settings.secret_key,  # same database, same sealed signing keys
            rate_limit_auth_ip=f"{AUTH_IP}/60",
            rate_limit_auth_user="1000/60",
            rate_limit_read_ip=f"{READ_IP}/60",
            rate_limit_read_user=f"{READ_USER}/60",
            rate_limit_write_ip="1000/60",
            rate_limit_write_user="1000/60",
        )
    )
    async with LifespanManager(application):
        yield application


class Caller:
    """Requests to the tightly limited app from one client address."""

    def __init__(self, application: Any, ip: str) -> None:
        self.ip = ip
        transport = httpx.ASGITransport(app=application, client=(ip, 40000))
        self.http = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.http

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()


def assert_rate_limited(r: httpx.Response, limit: int, window: int = 60) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    problem = r.json()
    assert problem["code"] == "rate_limited"
    assert problem["status"] == 429
    assert problem["type"].endswith("/rate_limited")
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= window
    assert r.headers["ratelimit-limit"] == str(limit)
    assert r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) >= 0
    assert r.headers["ratelimit-policy"] == f"{limit};w={window}"
    # An edge refusal still carries the edge's headers.
    assert r.headers["x-content-type-options"] == "nosniff"
    assert problem["request_id"] == r.headers["x-request-id"]


async def test_auth_quota_per_ip_then_429_with_headers(limited):
    async with Caller(limited, fresh_ip()) as c:
        remaining = []
        for _ in range(AUTH_IP):
            r = await c.post("/v1/users", json={})
            assert r.status_code == 422, r.text  # counted even when the request is refused
            assert r.headers["ratelimit-limit"] == str(AUTH_IP)
            assert r.headers["ratelimit-policy"] == f"{AUTH_IP};w=60"
            assert "retry-after" not in r.headers
            remaining.append(int(r.headers["ratelimit-remaining"]))
        assert remaining == [2, 1, 0]
        r = await c.post("/v1/users", json={})
        assert_rate_limited(r, AUTH_IP)
        # GCRA: 3 per 60 s frees one request every 20 s.
        assert 18 <= int(r.headers["retry-after"]) <= 21
        r = await c.post("/v1/auth/token", data={"grant_type": "password"})
        assert_rate_limited(r, AUTH_IP)


async def test_rate_limited_request_changes_nothing(limited):
    engine = limited.state.resources.engine
    async with Caller(limited, fresh_ip()) as c:
        for _ in range(AUTH_IP):
            await c.post("/v1/users", json={})
        body = registration(phone=phone())
        r = await c.post("/v1/users", json=body)
        assert_rate_limited(r, AUTH_IP)
    async with engine.connect() as conn:
        n = (
            await conn.execute(
                text("SELECT count(*) FROM users.users WHERE email = :e"), {"e": body["email"]}
            )
        ).scalar_one()
    assert n == 0


async def test_another_ip_is_not_limited(limited):
    async with Caller(limited, fresh_ip()) as a, Caller(limited, fresh_ip()) as b:
        for _ in range(AUTH_IP):
            await a.post("/v1/users", json={})
        assert (await a.post("/v1/users", json={})).status_code == 429
        r = await b.post("/v1/users", json={})
        assert r.status_code == 422
        assert r.headers["ratelimit-remaining"] == str(AUTH_IP - 1)


async def test_forwarded_for_is_not_trusted_by_default(limited):
    async with Caller(limited, fresh_ip()) as c:
        for i in range(AUTH_IP):
            await c.post("/v1/users", json={}, headers={"X-Forwarded-For": f"203.0.113.{i}"})
        r = await c.post("/v1/users", json={}, headers={"X-Forwarded-For": "203.0.113.99"})
        assert_rate_limited(r, AUTH_IP)


async def test_route_classes_are_independent(limited):
    async with Caller(limited, fresh_ip()) as c:
        for _ in range(AUTH_IP):
            await c.post("/v1/users", json={})
        assert (await c.post("/v1/users", json={})).status_code == 429
        # Reads and writes from the same address have their own buckets.
        r = await c.get("/v1/me")
        assert r.status_code == 401
        assert r.headers["ratelimit-limit"] == str(READ_IP)
        r = await c.patch("/v1/me", json={})
        assert r.status_code == 401
        assert r.headers["ratelimit-limit"] == "1000"
        # And exhausting reads leaves auth and writes as they were.
        for _ in range(READ_IP - 1):
            assert (await c.get("/v1/devices")).status_code == 401
        assert_rate_limited(await c.get("/v1/devices"), READ_IP)
        assert (await c.patch("/v1/me", json={})).status_code == 401
        assert (await c.post("/v1/users", json={})).status_code == 429


async def test_per_user_limit_follows_the_user_across_ips(limited):
    async with Caller(limited, fresh_ip()) as c:
        user = await sign_up(c, phone=phone())
    seen = []
    for i in range(READ_USER):
        async with Caller(limited, fresh_ip()) as c:
            r = await c.get("/v1/me", headers=user.headers)
            assert r.status_code == 200, r.text
            # The user's bucket is the tightest, so it is the one reported.
            assert r.headers["ratelimit-limit"] == str(READ_USER)
            seen.append(int(r.headers["ratelimit-remaining"]))
            assert i < READ_USER
    assert seen == [3, 2, 1, 0]
    async with Caller(limited, fresh_ip()) as c:
        r = await c.get("/v1/me", headers=user.headers)
        assert_rate_limited(r, READ_USER)
        # The same new address without the token is fine: it was the user that was limited.
        assert (await c.get("/v1/me")).status_code == 401
        # The user's writes are another class.
        r = await c.patch("/v1/me", json={"name": "Still Allowed"}, headers=user.headers)
        assert r.status_code == 200, r.text
    # Another user from the same addresses is not affected.
    async with Caller(limited, fresh_ip()) as c:
        other = await sign_up(c, phone=phone())
        assert (await c.get("/v1/me", headers=other.headers)).status_code == 200


async def test_a_refused_request_charges_no_bucket(limited):
    """When the IP bucket refuses, the user's bucket is not charged (and vice versa)."""
    async with Caller(limited, fresh_ip()) as c:
        user = await sign_up(c, phone=phone())
    ip = fresh_ip()
    async with Caller(limited, ip) as c:
        for _ in range(READ_IP):
            await c.get("/v1/devices")  # exhaust the address without the user
        assert (await c.get("/v1/me", headers=user.headers)).status_code == 429
        assert (await c.get("/v1/me", headers=user.headers)).status_code == 429
    async with Caller(limited, fresh_ip()) as c:
        r = await c.get("/v1/me", headers=user.headers)
        assert r.status_code == 200
        assert r.headers["ratelimit-remaining"] == str(READ_USER - 1)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
async def test_health_metrics_and_docs_are_never_limited(limited, path):
    async with Caller(limited, fresh_ip()) as c:
        for _ in range(READ_IP * 3):
            r = await c.get(path)
            assert r.status_code == 200, r.text
            assert "ratelimit-limit" not in r.headers
        # They do not use up the address's read quota either.
        r = await c.get("/v1/me")
        assert r.status_code == 401
        assert r.headers["ratelimit-remaining"] == str(READ_IP - 1)


async def test_refusals_are_counted_in_metrics(limited):
    async with Caller(limited, fresh_ip()) as c:
        for _ in range(AUTH_IP + 2):
            await c.post("/v1/users", json={})
        r = await c.get("/metrics")
    m = re.search(r'^billfold_rate_limited_total\{route_class="auth"\} (\S+)$', r.text, re.M)
    assert m, r.text
    assert float(m.group(1)) >= 2
