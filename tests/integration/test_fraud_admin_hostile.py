"""Hostile input on the fraud admin API is a 4xx problem, never a 500, and changes nothing:
NUL and other control characters in id paths, query filters and free text (PostgreSQL refuses
NUL outright), and datetimes whose offset overflows when converted to UTC (review 7, MUST-FIX 1).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from billfold.config import Settings
from tests.conftest import SignedIn
from tests.integration.test_fraud_cases import open_cases, who

CASES = "/v1/admin/fraud/cases"
RULES = "/v1/admin/fraud/rules"
LISTS = "/v1/admin/fraud/lists"
RULE = "card_testing_burst"

# (method, path, query, JSON body); `{case}` is a real open case, `{tag}` a unique list value.
HOSTILE: list[tuple[str, str, dict[str, str] | None, Any]] = [
    ("GET", CASES, {"user_id": "\x00"}, None),
    ("GET", CASES, {"assignee_id": "a\x00b"}, None),
    ("GET", CASES, {"user_id": "usr\x1b[2J"}, None),
    ("GET", CASES + "/%00", None, None),
    ("POST", CASES + "/{case}/assign", None, {"assignee_id": "\x00"}),
    ("POST", CASES + "/{case}/comments", None, {"body": "a\x00b"}),
    ("POST", CASES + "/{case}/comments", None, {"body": "bell\x07"}),
    ("POST", CASES + "/{case}/decision", None, {"decision": "release", "note": "\x00"}),
    ("POST", CASES + "/%00/decision", None, {"decision": "release"}),
    ("POST", CASES + "/%00/comments", None, {"body": "hi"}),
    ("POST", CASES + "/%00/assign", None, {}),
    ("GET", RULES + "/%00", None, None),
    ("POST", RULES + "/%00/promote", None, {}),
    ("POST", RULES + "/%00/rollback", None, {}),
    ("PATCH", RULES + "/%00", None, {"score": 1}),
    ("POST", RULES + "/backtest", None, {"rule_id": RULE, "since": "0001-01-01T00:00:00+14:00"}),
    ("POST", RULES + "/backtest", None, {"rule_id": RULE, "until": "9999-12-31T23:59:59-14:00"}),
    ("GET", LISTS, {"value": "\x00"}, None),
    ("DELETE", LISTS + "/%00", None, None),
    (
        "POST",
        LISTS,
        None,
        {"list": "block", "kind": "device", "value": "{tag}", "reason": "r\x00"},
    ),
    (
        "POST",
        LISTS,
        None,
        {"list": "block", "kind": "device", "value": "{tag}\x00", "reason": "r"},
    ),
    (
        "POST",
        LISTS,
        None,
        {
            "list": "block",
            "kind": "device",
            "value": "{tag}",
            "reason": "r",
            "expires_at": "9999-12-31T23:59:59-14:00",
        },
    ),
]


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


async def _state(client: httpx.AsyncClient, admin: SignedIn, case: str, tag: str) -> Any:
    """What a hostile request could have changed: the case, the rule, the list entries."""
    got = []
    for path, params in (
        (f"{CASES}/{case}", None),
        (f"{RULES}/{RULE}", None),
        (LISTS, {"value": tag}),
    ):
        r = await client.get(path, params=params, headers=admin.headers)
        assert r.status_code == 200, r.text
        got.append(r.json())
    return got


@pytest.mark.parametrize("group", ["cases", "rules", "lists"])
async def test_hostile_input_is_a_problem_and_changes_nothing(
    client: httpx.AsyncClient, app: Any, settings: Settings, admin: SignedIn, group: str
) -> None:
    user = who()
    await open_cases(app, settings, user, "t")
    r = await client.get(CASES, params={"user_id": user}, headers=admin.headers)
    names = {"case": r.json()["data"][0]["id"], "tag": f"dev-{uuid.uuid4().hex}"}
    before = await _state(client, admin, names["case"], names["tag"])
    prefix = {"cases": CASES, "rules": RULES, "lists": LISTS}[group]
    requests = [h for h in HOSTILE if h[1].startswith(prefix)]
    assert requests
    for method, path, params, body in requests:
        r = await client.request(
            method,
            _fill(path, names),
            params=params,
            json=_fill(body, names),
            headers={**admin.headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        what = f"{method} {path} {params} {body!r}"
        assert r.status_code in (404, 422), f"{what} -> {r.status_code} {r.text[:300]}"
        assert r.headers["content-type"].startswith("application/problem+json"), what
        assert r.json()["status"] == r.status_code, what
    assert await _state(client, admin, names["case"], names["tag"]) == before
