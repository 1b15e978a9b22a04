"""deploy/kong/kong.yml: a well-formed Kong 3.x declarative config that fronts every API path.

No Kong here (nor its JSON schema offline), so the structure is checked by hand against the
fields of Kong's entity and plugin schemas, and the config is checked against the app itself:
the routes the FastAPI app exposes and the limits in Settings.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from billfold.app import create_app
from billfold.config import Settings

KONG_YML = Path(__file__).resolve().parents[2] / "deploy" / "kong" / "kong.yml"

# Kong Gateway 3.x open-source bundled plugins (kong/constants.lua), the ones an edge may use.
BUNDLED_PLUGINS = frozenset(
    {
        "acl", "acme", "aws-lambda", "azure-functions", "basic-auth", "bot-detection",
        "correlation-id", "cors", "datadog", "file-log", "grpc-gateway", "grpc-web",
        "hmac-auth", "http-log", "ip-restriction", "jwt", "key-auth", "ldap-auth", "loggly",
        "oauth2", "opentelemetry", "post-function", "pre-function", "prometheus",
        "proxy-cache", "rate-limiting", "redirect", "request-size-limiting",
        "request-termination", "request-transformer", "response-ratelimiting",
        "response-transformer", "session", "statsd", "syslog", "tcp-log", "udp-log", "zipkin",
    }
)  # fmt: skip

TOP_LEVEL = frozenset(
    {
        "_format_version", "_transform", "_comment", "_workspace", "services", "routes",
        "upstreams", "targets", "plugins", "consumers", "certificates", "ca_certificates",
        "snis", "vaults", "key_sets", "keys", "acls", "basicauth_credentials",
        "jwt_secrets", "keyauth_credentials",
    }
)  # fmt: skip
SERVICE_FIELDS = frozenset(
    {
        "name", "protocol", "host", "port", "path", "url", "retries", "connect_timeout",
        "write_timeout", "read_timeout", "tags", "client_certificate", "tls_verify",
        "tls_verify_depth", "ca_certificates", "enabled", "routes", "plugins",
    }
)  # fmt: skip
ROUTE_FIELDS = frozenset(
    {
        "name", "protocols", "methods", "hosts", "paths", "headers",
        "https_redirect_status_code", "regex_priority", "strip_path", "path_handling",
        "preserve_host", "request_buffering", "response_buffering", "snis", "sources",
        "destinations", "tags", "service", "plugins", "expression", "priority",
    }
)  # fmt: skip
UPSTREAM_FIELDS = frozenset(
    {
        "name", "algorithm", "hash_on", "hash_fallback", "hash_on_header",
        "hash_fallback_header", "hash_on_cookie", "hash_on_cookie_path", "hash_on_query_arg",
        "hash_fallback_query_arg", "hash_on_uri_capture", "hash_fallback_uri_capture",
        "slots", "healthchecks", "tags", "host_header", "client_certificate",
        "use_srv_name", "targets",
    }
)  # fmt: skip
PLUGIN_FIELDS = frozenset(
    {
        "name", "config", "enabled", "protocols", "tags", "instance_name", "ordering",
        "service", "route", "consumer",
    }
)  # fmt: skip
# Config fields of the plugins this project uses (Kong 3.6+ schemas), to catch typos.
PLUGIN_CONFIG_FIELDS: dict[str, frozenset[str]] = {
    "rate-limiting": frozenset(
        {
            "second", "minute", "hour", "day", "month", "year", "limit_by", "header_name",
            "path", "policy", "fault_tolerant", "hide_client_headers", "error_code",
            "error_message", "sync_rate", "redis",
        }
    ),
    "request-size-limiting": frozenset(
        {"allowed_payload_size", "size_unit", "require_content_length"}
    ),
    "correlation-id": frozenset({"header_name", "generator", "echo_downstream"}),
    "ip-restriction": frozenset({"allow", "deny", "status", "message"}),
    "response-transformer": frozenset({"remove", "rename", "replace", "add", "append"}),
}  # fmt: skip
REDIS_FIELDS = frozenset(
    {
        "host", "port", "password", "username", "database", "timeout", "ssl", "ssl_verify",
        "server_name",
    }
)  # fmt: skip
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SIZE_UNITS = {"bytes": 1, "kilobytes": 2**10, "megabytes": 2**20}
PERIOD_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@pytest.fixture(scope="module")
def kong() -> dict[str, Any]:
    return yaml.safe_load(KONG_YML.read_text())


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every path the app serves; create_app connects to nothing until its lifespan runs."""
    settings = Settings(
        database_url="postgresql://x@127.0.0.1/x",
        redis_url="redis://127.0.0.1:1/0",
        secret_key=base64.b64encode(b"\0" * 32).decode(),
        data_dir=tmp_path_factory.mktemp("kong-app"),
    )
    app = create_app(settings)
    paths = set(app.openapi()["paths"])
    paths |= {p for r in app.routes if isinstance(p := getattr(r, "path", None), str)}
    return paths


def docs_paths() -> set[str]:
    """FastAPI's interactive docs: served by the app, deliberately not exposed at the edge."""
    return {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/static-offline-docs"}


def routes(kong: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for service in kong.get("services", []):
        yield from service.get("routes", [])
    yield from kong.get("routes", [])


def route_matches(route: dict[str, Any], path: str) -> bool:
    for p in route.get("paths", []):
        if p.startswith("~"):
            if re.match(p[1:], path):
                return True
        elif path.startswith(p):
            return True
    return False


def plugins(kong: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, plugin) for global, service and route plugins."""
    for p in kong.get("plugins", []):
        yield "global", p
    for service in kong.get("services", []):
        for p in service.get("plugins", []):
            yield f"service {service['name']}", p
        for route in service.get("routes", []):
            for p in route.get("plugins", []):
                yield f"route {route['name']}", p


def plugin(kong: dict[str, Any], name: str, where: str = "global") -> dict[str, Any]:
    found = [p for w, p in plugins(kong) if p["name"] == name and w == where]
    assert len(found) == 1, f"expected one {name} plugin on {where}, found {len(found)}"
    return found[0]["config"]


def per_minute(rate: str) -> float:
    """Settings' "requests/seconds" as requests per minute."""
    n, s = rate.split("/")
    return int(n) * 60 / int(s)


def default(field: str) -> Any:
    """A Settings default, independent of the BILLFOLD_* environment of this run."""
    return Settings.model_fields[field].default


def test_format_version_and_top_level(kong: dict[str, Any]) -> None:
    assert kong["_format_version"] == "3.0"
    assert isinstance(kong["_format_version"], str)
    assert set(kong) <= TOP_LEVEL, set(kong) - TOP_LEVEL


def test_services_point_at_an_upstream_with_targets(kong: dict[str, Any]) -> None:
    upstreams = {u["name"]: u for u in kong["upstreams"]}
    assert kong["services"]
    for service in kong["services"]:
        assert set(service) <= SERVICE_FIELDS, set(service) - SERVICE_FIELDS
        assert service["protocol"] in {"http", "https"}
        assert 1 <= service["port"] <= 65535
        for t in ("connect_timeout", "read_timeout", "write_timeout"):
            assert isinstance(service[t], int) and service[t] > 0
        upstream = upstreams[service["host"]]
        assert set(upstream) <= UPSTREAM_FIELDS, set(upstream) - UPSTREAM_FIELDS
        assert upstream["algorithm"] in {
            "round-robin",
            "consistent-hashing",
            "least-connections",
            "latency",
        }
        assert upstream["targets"], "an upstream without targets answers 503"
        for target in upstream["targets"]:
            host, _, port = target["target"].rpartition(":")
            assert host and 1 <= int(port) <= 65535
            assert 0 <= target.get("weight", 100) <= 65535
            assert int(port) == service["port"]


def test_upstream_health_checks_use_the_readiness_probe(
    kong: dict[str, Any], app_paths: set[str]
) -> None:
    for upstream in kong["upstreams"]:
        active = upstream["healthchecks"]["active"]
        assert active["http_path"] == "/readyz"
        assert active["http_path"] in app_paths
        assert 200 in active["healthy"]["http_statuses"]
        assert 503 in active["unhealthy"]["http_statuses"]


def test_routes_are_well_formed(kong: dict[str, Any]) -> None:
    names = [r["name"] for r in routes(kong)]
    assert len(names) == len(set(names)), "route names must be unique"
    for route in routes(kong):
        assert set(route) <= ROUTE_FIELDS, (route["name"], set(route) - ROUTE_FIELDS)
        assert route["paths"], route["name"]
        for p in route["paths"]:
            assert p.startswith(("/", "~/")), (route["name"], p)
            if p.startswith("~"):
                re.compile(p[1:])
        assert set(route.get("protocols", ["http", "https"])) <= {"http", "https"}
        assert set(route.get("methods", [])) <= HTTP_METHODS
        # The app serves its paths as they are: Kong must not rewrite them.
        assert route.get("strip_path") is False, route["name"]
        if "https_redirect_status_code" in route:
            assert route["https_redirect_status_code"] in {426, 301, 302, 307, 308}


def test_every_app_path_has_a_kong_route(kong: dict[str, Any], app_paths: set[str]) -> None:
    exposed = app_paths - docs_paths()
    assert {"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json"} <= exposed
    assert any(p.startswith("/v1/") for p in exposed)
    uncovered = sorted(p for p in exposed if not any(route_matches(r, p) for r in routes(kong)))
    assert not uncovered, f"app paths without a Kong route: {uncovered}"


def test_docs_are_not_exposed_and_no_route_is_dead(
    kong: dict[str, Any], app_paths: set[str]
) -> None:
    for p in docs_paths():
        assert not any(route_matches(r, p) for r in routes(kong)), p
    for route in routes(kong):
        assert any(route_matches(route, p) for p in app_paths), f"{route['name']} serves nothing"


def test_plugins_are_bundled_and_well_formed(kong: dict[str, Any]) -> None:
    for where, p in plugins(kong):
        assert p["name"] in BUNDLED_PLUGINS, (where, p["name"])
        assert set(p) <= PLUGIN_FIELDS, (where, set(p) - PLUGIN_FIELDS)
        config = p.get("config", {})
        assert isinstance(config, dict)
        known = PLUGIN_CONFIG_FIELDS.get(p["name"])
        if known is not None:
            assert set(config) <= known, (where, p["name"], set(config) - known)
    assert "cors" not in {p["name"] for _, p in plugins(kong)}, "CORS stays off"


def test_rate_limits_share_redis_and_are_never_stricter_than_the_app(
    kong: dict[str, Any],
) -> None:
    for where, p in plugins(kong):
        if p["name"] != "rate-limiting":
            continue
        config = p["config"]
        assert config["policy"] == "redis", where
        assert set(config["redis"]) <= REDIS_FIELDS
        assert config["redis"]["host"] and 1 <= config["redis"]["port"] <= 65535
        assert config["limit_by"] == "ip"
        assert any(config.get(period) for period in PERIOD_SECONDS), where

    def kong_per_minute(config: dict[str, Any]) -> float:
        return min(config[k] * 60 / s for k, s in PERIOD_SECONDS.items() if config.get(k))

    edge = plugin(kong, "rate-limiting")
    for kind in ("read", "write"):
        assert kong_per_minute(edge) >= per_minute(default(f"rate_limit_{kind}_ip"))
    auth = plugin(kong, "rate-limiting", "route billfold-v1-auth")
    assert kong_per_minute(auth) >= per_minute(default("rate_limit_auth_ip"))
    assert kong_per_minute(auth) < kong_per_minute(edge)


def test_body_size_limit_matches_the_app(kong: dict[str, Any]) -> None:
    config = plugin(kong, "request-size-limiting")
    limit = config["allowed_payload_size"] * SIZE_UNITS[config.get("size_unit", "megabytes")]
    max_body = default("max_body_bytes")
    # Never stricter than the app (its 413 is problem+json), and the same order of magnitude.
    assert max_body <= limit <= 2 * max_body
    assert limit >= default("avatar_max_bytes")


def test_correlation_id_is_the_apps_request_id(kong: dict[str, Any]) -> None:
    from billfold.gateway.middleware import _REQUEST_ID

    config = plugin(kong, "correlation-id")
    assert config["header_name"].lower() == "x-request-id"
    assert config["echo_downstream"] is True
    # The app keeps an incoming id only if it looks like one; Kong's must.
    assert config["generator"] == "uuid"
    assert _REQUEST_ID.match(str(uuid.uuid4()))


def test_metrics_are_internal_only(kong: dict[str, Any], app_paths: set[str]) -> None:
    metric_routes = [r for r in routes(kong) if route_matches(r, "/metrics")]
    assert len(metric_routes) == 1
    route = metric_routes[0]
    assert not any(route_matches(route, p) for p in app_paths - {"/metrics"})
    config = plugin(kong, "ip-restriction", f"route {route['name']}")
    assert config["allow"] and not config.get("deny")
    for cidr in config["allow"]:
        net = ipaddress.ip_network(cidr)
        assert net.is_private or net.is_loopback, cidr


def test_security_headers(kong: dict[str, Any]) -> None:
    added = plugin(kong, "response-transformer")["add"]["headers"]
    names = {h.split(":", 1)[0].strip().lower() for h in added}
    assert {
        "strict-transport-security",
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
    } <= names
