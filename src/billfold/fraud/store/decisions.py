"""SQL of `fraud.decisions`: one row per risk check, with its feature snapshot and versions.

The decision is written in the payment's/transfer's own transaction without a savepoint (two
round trips fewer on the check's hot path), so its statement must not fail on what it carries:
`insert` makes every value fit its column before sending (see `fit`) and refuses, before any
statement is sent, a value that cannot (an amount past bigint, an unknown action).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.driver import DriverStatement
from billfold.platform.events import Event, send_with_event, with_event

COLUMNS = (
    "id",
    "subject_kind",
    "subject_id",
    "user_id",
    "amount",
    "currency",
    "action",
    "score",
    "reasons",
    "explanations",
    "hits",
    "features",
    "rule_version",
    "model_version",
    "model_probability",
    "model_anomaly",
    "challenger",
    "degraded",
    "fallback",
    "stepped_up",
    "duration_ms",
)
_JSON = frozenset({"explanations", "hits", "features", "challenger"})
_VALUES = ", ".join(f"CAST(:{c} AS jsonb)" if c in _JSON else f":{c}" for c in COLUMNS)
# The decision and its event in one statement: one round trip on the payment's hot path, sent
# on the driver's connection (no result to read; SQLAlchemy's layers were most of its CPU).
_INSERT = DriverStatement(
    with_event(
        f"INSERT INTO fraud.decisions ({', '.join(COLUMNS)}) VALUES ({_VALUES}) RETURNING id"
    )
)
_SELECT = (
    "SELECT id, subject_kind, subject_id, user_id, amount, currency, action, score, reasons, "
    "explanations, hits, features, rule_version, model_version, model_probability, "
    "model_anomaly, challenger, degraded, fallback, stepped_up, duration_ms, label, "
    "labelled_at, created_at FROM fraud.decisions"
)


_TEXT = ("id", "subject_id", "user_id", "rule_version", "model_version")
_BIGINT = 2**63 - 1
# What the table's CHECK constraints allow.
_ALLOWED = {
    "subject_kind": frozenset({"payment", "transfer"}),
    "action": frozenset({"allow", "challenge", "review", "block"}),
    "fallback": frozenset({None, "features", "model", "error"}),
}


def fit_text(value: str) -> str:
    """`value` as PostgreSQL text can hold it: NUL (which it refuses) becomes U+FFFD and an
    unpaired surrogate (which UTF-8 cannot encode) becomes '?'."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def fit(value: Any) -> Any:
    """A JSON-able value that PostgreSQL's jsonb accepts: strings (and keys) through `fit_text`,
    NaN and infinities as null, tuples as lists; the same walk down lists and dicts."""
    if isinstance(value, str):
        return fit_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {fit_text(str(k)): fit(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fit(v) for v in value]
    return value


def _json(value: Any) -> str:
    try:
        dumped = json.dumps(
            value, separators=(",", ":"), default=str, allow_nan=False, ensure_ascii=False
        )
        # jsonb refuses the escape of NUL; an unpaired surrogate would fail the encoding.
        if "\\u0000" not in dumped:
            dumped.encode("utf-8")
            return dumped
    except (ValueError, UnicodeEncodeError):  # NaN or infinity; a surrogate
        pass
    return json.dumps(
        fit(value), separators=(",", ":"), default=lambda v: fit_text(str(v)), allow_nan=False
    )


def _params(values: dict[str, Any]) -> dict[str, Any]:
    params = {c: values.get(c) for c in COLUMNS}
    for c, allowed in _ALLOWED.items():
        if params[c] not in allowed:
            raise ValueError(f"{c} {params[c]!r} is not one of {sorted(map(str, allowed))}")
    amount, score, currency = params["amount"], params["score"], params["currency"]
    if not (isinstance(amount, int) and -_BIGINT <= amount <= _BIGINT):
        raise ValueError("amount is not a bigint")
    if not (isinstance(score, int) and 0 <= score <= 1000):
        raise ValueError("score is not within 0-1000")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isascii()):
        raise ValueError("currency is not three characters")
    for c in _TEXT:
        if params[c] is not None:
            params[c] = fit_text(str(params[c]))
    params["currency"] = fit_text(currency)
    params["reasons"] = [fit_text(str(r)) for r in params["reasons"] or ()]
    for c in _JSON:
        if params[c] is not None:
            params[c] = _json(params[c])
    return params


async def insert(conn: AsyncConnection, values: dict[str, Any], event: Event) -> None:
    """Write a decision (keys of `COLUMNS`; json columns as Python values) and its event, in one
    statement. The values are made to fit their columns first; one that cannot raises
    `ValueError` before anything is sent, so the caller's transaction is never aborted by the
    decision's values. The event's data must be fitted by the caller (`fit`)."""
    await send_with_event(conn, _INSERT, _params(values), event)


async def get(conn: AsyncConnection, decision_id: str) -> Row[Any] | None:
    result = await conn.execute(text(f"{_SELECT} WHERE id = :id"), {"id": decision_id})
    return result.first()


async def for_subject(conn: AsyncConnection, subject_id: str) -> list[Row[Any]]:
    """Every decision on one payment/transfer, oldest first (a challenge, then its resume)."""
    sql = text(f"{_SELECT} WHERE subject_id = :s ORDER BY id")
    return list((await conn.execute(sql, {"s": subject_id})).all())


async def blocks_since(conn: AsyncConnection, user_id: str, since: datetime) -> int:
    """The user's blocked checks after `since` (the lock policy's count)."""
    sql = text(
        "SELECT count(*) FROM fraud.decisions "
        "WHERE user_id = :u AND action = 'block' AND created_at > :since"
    )
    return int((await conn.execute(sql, {"u": user_id, "since": since})).scalar_one())


async def lock_count_start(conn: AsyncConnection, user_id: str) -> datetime | None:
    """When the lock policy last requested a lock of the user (its count starts after it)."""
    sql = text("SELECT counted_after FROM fraud.lock_policy WHERE user_id = :u")
    value = (await conn.execute(sql, {"u": user_id})).scalar_one_or_none()
    return value if isinstance(value, datetime) else None


async def restart_lock_count(conn: AsyncConnection, user_id: str) -> None:
    """The policy requested a lock: count the user's blocks again from now on. The clock, not
    the transaction's start: a block in flight (written, waiting for the policy's lock) has a
    `created_at` before this and belongs to the crossing just requested."""
    await conn.execute(
        text(
            "INSERT INTO fraud.lock_policy (user_id, counted_after) VALUES (:u, clock_timestamp()) "
            "ON CONFLICT (user_id) DO UPDATE SET counted_after = EXCLUDED.counted_after, "
            "requests = fraud.lock_policy.requests + 1"
        ),
        {"u": user_id},
    )


async def set_label(conn: AsyncConnection, decision_id: str, label: str) -> None:
    """An analyst's verdict (`fraud` | `legit`): the decision becomes a training example."""
    await conn.execute(
        text("UPDATE fraud.decisions SET label = :l, labelled_at = now() WHERE id = :id"),
        {"l": label, "id": decision_id},
    )
