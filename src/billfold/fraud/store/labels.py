"""SQL of the analysts' labels: decisions a reviewer marked `fraud` or `legit` become training
examples for `billfold fraud train` (their feature snapshot is what the check saw)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

LABELS = {"fraud": 1, "legit": 0}


async def labelled(conn: AsyncConnection, limit: int = 200_000) -> list[tuple[dict[str, Any], int]]:
    """The newest `limit` labelled decisions as (features, 1 for fraud / 0 for legit); empty
    when the decisions table does not exist yet (a database migrated before fraud)."""
    sql = text(
        "SELECT features, label FROM fraud.decisions WHERE label IN ('fraud', 'legit') "
        "AND features IS NOT NULL ORDER BY created_at DESC LIMIT :limit"
    )
    try:
        async with conn.begin_nested():
            rows = (await conn.execute(sql, {"limit": limit})).all()
    except ProgrammingError:  # undefined table: nothing labelled yet
        return []
    out: list[tuple[dict[str, Any], int]] = []
    for features, label in rows:
        values = json.loads(features) if isinstance(features, str) else features
        if isinstance(values, dict):
            out.append((values, LABELS[label]))
    return out
