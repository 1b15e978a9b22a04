"""The edge over HTTP: problem+json for every error, security headers, request ids, auth,
body limits, health, metrics and the OpenAPI document."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from billfold.platform.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE
from billfold.platform.ids import is_valid_id, new_id
from tests.conftest import PASSWORD, registration, sign_up

SECRET_PASSWORD = "Sup3r-Secret-Passw0rd-That-Must-Not-Leak"


def phone() -> str:
    """A valid German mobile number (+49 176 …) unique enough for one test database."""
    return f"+49176{secrets.randbelow(10**8):08d}"


async def signed_in(client: httpx.AsyncClient, **overrides: Any):
    return await sign_up(client, phone=phone(), **overrides)


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE), r.headers
    body = r.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == PROBLEM_TYPE_BASE + code
    assert isinstance(body["title"], str) and body["title"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["instance"] == r.request.url.path
    return body


# --- routing errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/v1/users/usr_01jd5z8k3xq7y2m4n6p8r0s2t4"),
        ("POST", "/v1/nothing-here"),
        ("DELETE", "/v2/me"),
    ],
)
async def test_unknown_route_is_404_problem(client, method, path):
    r = await client.request(method, path)
    body = assert_problem(r, 404, "not_found")
    assert body["title"] == "Not found"


async def test_wrong_method_is_405_problem_with_allow(client):
    r = await client.put("/v1/users", json={})
    assert_problem(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    r = await client.post("/healthz")
    assert_problem(r, 405, "method_not_allowed")


# --- validation -----------------------------------------------------------------------------


async def test_validation_error_is_422_with_field_pointers_and_no_password_echo(client):
    body = {
        "email": "not-an-email",
        "phone": "12345",
        "password": "sh0rt!",
        "name": "",
        "date_of_birth": "yesterday",
        "country": "ZZ",
        "surprise": SECRET_PASSWORD,
    }
    r = await client.post("/v1/users", json=body)
    problem = assert_problem(r, 422, "validation_failed")
    pointers = {e["pointer"]: e for e in problem["errors"]}
    for field in ("email", "phone", "password", "name", "date_of_birth", "country", "surprise"):
        assert f"#/{field}" in pointers, problem
        assert pointers[f"#/{field}"]["detail"]
        assert pointers[f"#/{field}"]["code"]
    assert pointers["#/surprise"]["code"] == "extra_forbidden"
    assert "sh0rt!" not in r.text
    assert SECRET_PASSWORD not in r.text


async def test_a_card_number_sent_as_a_member_name_is_not_echoed(client):
    """A PAN pasted into the wrong place (here: as a JSON key) must not come back in the
    problem's field pointer."""
    pan = "4111111111111111"
    r = await client.post("/v1/users", json={pan: "1", "card": {pan: pan}})
    assert_problem(r, 422, "validation_failed")
    assert pan not in r.text and pan[-4:] in r.text  # masked, not dropped


@pytest.mark.parametrize(
    "password",
    [SECRET_PASSWORD + "x" * 300, "aaaaaaaaaaaaaaaa", 1234567890123, ["list", SECRET_PASSWORD]],
)
async def test_bad_password_is_never_echoed(client, password):
    r = await client.post("/v1/users", json=registration(phone=phone(), password=password))
    problem = assert_problem(r, 422, "validation_failed")
    assert [e["pointer"] for e in problem["errors"]] == ["#/password"]
    assert SECRET_PASSWORD not in r.text
    assert "aaaaaaaaaaaaaaaa" not in r.text
    assert "1234567890123" not in r.text


async def test_missing_fields_point_at_each_field(client):
    r = await client.post("/v1/users", json={"email": "ada@example.com"})
    problem = assert_problem(r, 422, "validation_failed")
    missing = {e["pointer"] for e in problem["errors"] if e["code"] == "missing"}
    assert missing == {"#/phone", "#/password", "#/name", "#/date_of_birth", "#/country"}


async def test_nested_field_pointer(client):
    user = await signed_in(client)
    r = await client.patch(
        "/v1/me",
        json={"address": {"line1": "", "city": "Berlin", "postal_code": "10115", "country": "XX"}},
        headers=user.headers,
    )
    problem = assert_problem(r, 422, "validation_failed")
    pointers = {e["pointer"] for e in problem["errors"]}
    assert {"#/address/line1", "#/address/country"} <= pointers


async def test_query_parameter_errors_name_the_parameter(client):
    user = await signed_in(client)
    r = await client.get("/v1/sessions", params={"limit": "lots"}, headers=user.headers)
    problem = assert_problem(r, 422, "validation_failed")
    assert problem["errors"][0].get("parameter") == "limit"


@pytest.mark.parametrize(
    "raw",
    [b'{"email": ', b"{'single': 'quotes'}", b"not json at all", b'{"a": 1,}', b"\x00\x01"],
)
async def test_malformed_json_is_a_400_problem(client, raw):
    r = await client.post("/v1/users", content=raw, headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed_json")


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"\xff\xfe{", "application/json"),
        (b"[]", "application/json"),
        (b"null", "application/json"),
        (b'"a string"', "application/json"),
        (b"42", "application/json"),
        (b"email=a@b.c", "application/x-www-form-urlencoded"),
        (b"<xml/>", "text/xml"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (b'{"email": "\\ud800"}', "application/json"),
    ],
)
async def test_junk_bodies_answer_a_4xx_problem(client, app, raw, content_type):
    engine = app.state.resources.engine
    from sqlalchemy import text

    async with engine.connect() as conn:
        before = (await conn.execute(text("SELECT count(*) FROM users.users"))).scalar_one()
    r = await client.post("/v1/users", content=raw, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    assert r.json()["code"] in {"malformed_json", "validation_failed", "bad_request"}
    async with engine.connect() as conn:
        after = (await conn.execute(text("SELECT count(*) FROM users.users"))).scalar_one()
    assert after == before


# --- body size --------------------------------------------------------------------------------


async def test_declared_body_over_the_limit_is_413(client, settings):
    big = b"x" * (settings.max_body_bytes + 1)
    r = await client.post("/v1/users", content=big, headers={"content-type": "application/json"})
    problem = assert_problem(r, 413, "payload_too_large")
    assert str(settings.max_body_bytes) in problem["detail"]
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_declared_length_alone_is_checked_before_reading(client, settings):
    # A lying Content-Length is refused up front; the (small) body is never read.
    r = await client.post(
        "/v1/nowhere",
        content=b"{}",
        headers={"content-length": str(settings.max_body_bytes + 1), "content-type": "text/plain"},
    )
    assert_problem(r, 413, "payload_too_large")


async def test_non_numeric_content_length_is_400(client):
    r = await client.post("/v1/users", content=b"{}", headers={"content-length": "12abc"})
    assert_problem(r, 400, "bad_request")


@pytest.mark.parametrize("declared", ["\u00b2", "\u00b9\u00b2", "1\u00b3"])
async def test_non_ascii_digit_content_length_is_400_not_500(client, app, declared):
    # "²".isdigit() is True but int("²") raises: this was a raw 500. Sent as raw ASGI since
    # HTTP clients refuse such a header; the server hands it to us as latin-1 bytes.
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/users",
        "raw_path": b"/v1/users",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-length", declared.encode("latin-1")),
            (b"content-type", b"application/json"),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert start["status"] == 400, body
    assert b"bad_request" in body


async def test_streamed_body_over_the_limit_is_413(client, settings):
    async def chunks():
        sent = 0
        while sent <= settings.max_body_bytes:
            yield b" " * 65536
            sent += 65536

    r = await client.post(
        "/v1/users", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload_too_large")


async def test_streamed_body_over_the_limit_with_idempotency_key_is_413(client, settings):
    async def chunks():
        sent = 0
        while sent <= settings.max_body_bytes:
            yield b" " * 65536
            sent += 65536

    r = await client.post(
        "/v1/users",
        content=chunks(),
        headers={"content-type": "application/json", "idempotency-key": new_id("req")},
    )
    assert_problem(r, 413, "payload_too_large")


async def test_body_at_the_limit_is_read(client, settings):
    body = b'{"email": "x"}'
    padded = body + b" " * (settings.max_body_bytes - len(body))
    assert len(padded) == settings.max_body_bytes
    r = await client.post("/v1/users", content=padded, headers={"content-type": "application/json"})
    assert_problem(r, 422, "validation_failed")


# --- security headers and request ids ------------------------------------------------------------

API_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "cache-control": "no-store",
}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/healthz"), ("GET", "/nope"), ("GET", "/v1/me"), ("POST", "/v1/users")],
)
async def test_security_headers_on_success_and_error(client, method, path):
    r = await client.request(method, path, json={} if method == "POST" else None)
    for name, value in API_HEADERS.items():
        assert r.headers.get(name) == value, (name, r.headers)
    assert "permissions-policy" in r.headers
    assert r.headers["cross-origin-opener-policy"] == "same-origin"


async def test_security_headers_are_not_duplicated(client):
    r = await client.get("/healthz")
    names = [k.lower() for k, _ in r.headers.raw]
    assert names.count(b"x-frame-options") == 1
    assert names.count(b"x-request-id") == 1
    assert names.count(b"content-security-policy") == 1


async def test_docs_get_a_csp_that_lets_swagger_ui_load(client):
    r = await client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "swagger" in r.text.lower()
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    # The docs load only our own assets (they work offline and trust no CDN).
    assert "http" not in csp
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+\.(?:js|css))['"]""", r.text)
    assert assets and all(a.startswith("/static-offline-docs/") for a in assets)
    for asset in assets:
        got = await client.get(asset)
        assert got.status_code == 200 and len(got.content) > 1000
    assert r.headers["x-frame-options"] == "DENY"


async def test_valid_incoming_request_id_is_echoed(client):
    for rid in ("abc-123", "trace.id:42_x", "A" * 64, new_id("req")):
        r = await client.get("/healthz", headers={"X-Request-Id": rid})
        assert r.headers["x-request-id"] == rid
    r = await client.get("/nope", headers={"X-Request-Id": "client-trace-1"})
    assert r.headers["x-request-id"] == "client-trace-1"
    assert r.json()["request_id"] == "client-trace-1"


async def test_request_id_is_generated_when_absent(client):
    r1 = await client.get("/healthz")
    r2 = await client.get("/healthz")
    for r in (r1, r2):
        assert is_valid_id(r.headers["x-request-id"], "req")
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]


@pytest.mark.parametrize(
    "bad", ["", "has space", "A" * 65, "semi;colon", 'quote"d', "<script>", "ü-nicode"]
)
async def test_invalid_incoming_request_id_is_replaced(client, bad):
    r = await client.get("/nope", headers={"X-Request-Id": bad.encode("utf-8")})
    rid = r.headers["x-request-id"]
    assert rid != bad
    assert is_valid_id(rid, "req")
    assert r.json()["request_id"] == rid


# --- authentication ---------------------------------------------------------------------------


async def test_missing_bearer_is_401_with_www_authenticate(client):
    r = await client.get("/v1/me")
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer garbage",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c3JfMSJ9.",
        "Bearer a.b.c",
        "bearer " + "x" * 2000,
    ],
)
async def test_garbage_bearer_is_401_invalid_token(client, authorization):
    r = await client.get("/v1/me", headers={"Authorization": authorization})
    assert_problem(r, 401, "invalid_token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "garbage" not in r.text and "x" * 50 not in r.text


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token x"])
async def test_other_schemes_or_empty_bearer_are_401(client, authorization):
    r = await client.get("/v1/me", headers={"Authorization": authorization})
    assert r.status_code == 401
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_expired_bearer_is_401_invalid_token(client, app, settings):
    user = await signed_in(client)
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": user.user["id"],
        "sid": new_id("ses"),
        "scope": "profile",
        "role": "user",
        "iat": int(time.time()) - 7200,
        "nbf": int(time.time()) - 7200,
        "exp": int(time.time()) - 3600,
        "jti": new_id("evt"),
    }
    expired = await app.state.users.tokens.keyring.sign(claims)
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {expired}"})
    assert_problem(r, 401, "invalid_token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # The same claims with a future expiry are accepted: it is the expiry that failed.
    fresh = await app.state.users.tokens.keyring.sign({**claims, "exp": int(time.time()) + 600})
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {fresh}"})
    assert r.status_code == 200, r.text


async def test_token_for_another_audience_is_401(client, app, settings):
    user = await signed_in(client)
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": "someone-else",
        "sub": user.user["id"],
        "sid": new_id("ses"),
        "scope": "profile",
        "iat": now,
        "exp": now + 600,
        "jti": new_id("evt"),
    }
    token = await app.state.users.tokens.keyring.sign(claims)
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert_problem(r, 401, "invalid_token")


async def test_valid_bearer_is_accepted(client):
    user = await signed_in(client)
    r = await client.get("/v1/me", headers=user.headers)
    assert r.status_code == 200
    assert r.json()["id"] == user.user["id"]


async def test_public_routes_ignore_a_bad_bearer(client):
    r = await client.get("/healthz", headers={"Authorization": "Bearer garbage"})
    assert r.status_code == 200


# --- health, readiness, metrics ------------------------------------------------------------


async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_readyz_checks_database_and_redis(client):
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


async def test_metrics_count_requests_by_route_template(client):
    user = await signed_in(client)
    device_id = new_id("dev")
    session_id = new_id("ses")
    await client.get(f"/v1/devices/{device_id}", headers=user.headers)
    await client.delete(f"/v1/sessions/{session_id}", headers=user.headers)
    raw_unknown = f"/v1/nowhere/{new_id('usr')}"
    await client.get(raw_unknown)
    too_big = f"/v1/devices/{new_id('dev')}"
    await client.patch(too_big, headers={"content-length": "99999999"}, content=b"{}")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE billfold_http_requests_total counter" in r.text
    assert "billfold_http_request_duration_seconds_bucket" in r.text
    samples = _samples(r.text, "billfold_http_requests_total")
    routes = {labels["route"] for labels, _ in samples}
    assert "/v1/devices/{device_id}" in routes
    assert "/v1/sessions/{session_id}" in routes
    assert "/v1/users" in routes
    assert "/v1/auth/token" in routes
    assert "unmatched" in routes
    for labels, value in samples:
        assert set(labels) == {"method", "route", "status"}
        assert value >= 1
    # No raw ids in labels: they would make one time series per resource.
    assert device_id not in r.text
    assert session_id not in r.text
    assert raw_unknown not in r.text
    assert too_big not in r.text
    for route in routes:
        assert not re.search(r"_[0-7][0-9a-hjkmnp-tv-z]{25}", route), route
    statuses = {(lb["method"], lb["route"], lb["status"]) for lb, _ in samples}
    assert ("POST", "/v1/users", "201") in statuses
    assert ("GET", "/v1/devices/{device_id}", "404") in statuses


# --- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_lists_every_route(client, app):
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert routes
    for route in routes:
        if not route.include_in_schema:
            continue
        assert route.path_format in paths, route.path
        for method in route.methods:
            assert method.lower() in paths[route.path_format], (method, route.path)
    assert "Problem" in spec["components"]["schemas"]


async def test_every_route_documents_its_problem_responses(client):
    spec = (await client.get("/openapi.json")).json()
    problem_ref = "#/components/schemas/Problem"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            errors = {code: resp for code, resp in op["responses"].items() if code.startswith("4")}
            if path.startswith("/v1/"):
                assert errors, f"{where} documents no problem responses"
            if op.get("parameters") or op.get("requestBody"):
                assert "422" in errors, f"{where} takes input but documents no 422"
            for code, resp in errors.items():
                content = resp.get("content", {})
                assert PROBLEM_CONTENT_TYPE in content, f"{where} {code}: {content}"
                assert content[PROBLEM_CONTENT_TYPE].get("schema", {}).get("$ref") == problem_ref, (
                    f"{where} {code}: {content}"
                )
                # Errors are never served as plain application/json, so never documented so.
                assert "application/json" not in content, f"{where} {code}"
            protected = any("HTTPBearer" in s for s in op.get("security", []))
            if protected:
                assert "401" in errors, f"{where} needs a token but documents no 401"


async def test_openapi_and_docs_are_public(client):
    r = await client.get("/openapi.json", headers={"Authorization": "Bearer garbage"})
    assert r.status_code == 200
    assert (await client.get("/redoc")).status_code == 200


async def test_registration_with_the_shared_password_works(client):
    # Sanity check for the helpers above: a good body is a 201, not a validation error.
    r = await client.post("/v1/users", json=registration(phone=phone(), password=PASSWORD))
    assert r.status_code == 201, r.text
    assert is_valid_id(r.json()["id"], "usr")


async def test_trailing_slash_is_a_problem_not_a_redirect(client):
    r = await client.get("/v1/me/")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_every_route_tag_is_described(client):
    spec = (await client.get("/openapi.json")).json()
    described = {t["name"] for t in spec.get("tags", [])}
    used = {
        tag for ops in spec["paths"].values() for op in ops.values() for tag in op.get("tags", [])
    }
    assert used <= described


async def test_redis_outage_answers_a_503_problem_not_a_bare_500(
    settings, database_url, redis_url, data_dir
):
    # An app whose Redis is a closed port: authentication and rate limits cannot run.
    from asgi_lifespan import LifespanManager

    from billfold.app import create_app
    from tests.conftest import make_settings

    broken = make_settings(
        database_url, "redis://127.0.0.1:1/0", data_dir, secret_key=settings.secret_key
    )
    application = create_app(broken)
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/v1/me", headers={"Authorization": "Bearer x.y.z"})
            assert r.status_code == 503
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "service_unavailable"
            assert "Retry-After" in r.headers and "x-request-id" in r.headers
            assert (await c.get("/healthz")).status_code == 200
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unavailable"
