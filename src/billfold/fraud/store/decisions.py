"""SQL of `fraud.decisions`: one row per risk check, with its feature snapshot and versions."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, execute_with_event, with_event

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
# The decision and its event in one statement: one round trip on the payment's hot path.
_INSERT = with_event(
    f"INSERT INTO fraud.decisions ({', '.join(COLUMNS)}) VALUES ({_VALUES}) RETURNING id"
)
_SELECT = (
    "SELECT id, subject_kind, subject_id, user_id, amount, currency, action, score, reasons, "
    "explanations, hits, features, rule_version, model_version, model_probability, "
    "model_anomaly, challenger, degraded, fallback, stepped_up, duration_ms, label, "
    "labelled_at, created_at FROM fraud.decisions"
)


def _params(values: dict[str, Any]) -> dict[str, Any]:
    params = {c: values.get(c) for c in COLUMNS}
    for c in _JSON:
        if params[c] is not None:
            params[c] = json.dumps(params[c], separators=(",", ":"), default=str)
    return params


async def insert(conn: AsyncConnection, values: dict[str, Any], event: Event) -> None:
    """Write a decision (keys of `COLUMNS`; json columns as Python values) and its event."""
    await execute_with_event(conn, _INSERT, _params(values), event)


async def get(conn: AsyncConnection, decision_id: str) -> Row[Any] | None:
    result = await conn.execute(text(f"{_SELECT} WHERE id = :id"), {"id": decision_id})
    return result.first()


async def for_subject(conn: AsyncConnection, subject_id: str) -> list[Row[Any]]:
    """Every decision on one payment/transfer, oldest first (a challenge, then its resume)."""
    sql = text(f"{_SELECT} WHERE subject_id = :s ORDER BY id")
    return list((await conn.execute(sql, {"s": subject_id})).all())


async def blocks_since(conn: AsyncConnection, user_id: str, since: datetime) -> int:
    """The user's blocked checks since `since` (the lock policy's count)."""
    sql = text(
        "SELECT count(*) FROM fraud.decisions "
        "WHERE user_id = :u AND action = 'block' AND created_at >= :since"
    )
    return int((await conn.execute(sql, {"u": user_id, "since": since})).scalar_one())


async def set_label(conn: AsyncConnection, decision_id: str, label: str) -> None:
    """An analyst's verdict (`fraud` | `legit`): the decision becomes a training example."""
    await conn.execute(
        text("UPDATE fraud.decisions SET label = :l, labelled_at = now() WHERE id = :id"),
        {"l": label, "id": decision_id},
    )
