"""SQL of the review queue: `fraud.cases`, their comments and their audit trail."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.events import Event, execute_with_event, with_event
from billfold.platform.pagination import fetch_page

_FIELDS = (
    "id, decision_id, subject_kind, subject_id, user_id, amount, currency, score, reasons, "
    "status, assignee_id, outcome, subject_status, decided_by, decided_at, created_at, updated_at"
)
_OPEN = with_event(
    "INSERT INTO fraud.cases (id, decision_id, subject_kind, subject_id, user_id, amount, "
    "currency, score, reasons) VALUES (:id, :decision_id, :subject_kind, :subject_id, :user_id, "
    ":amount, :currency, :score, :reasons) ON CONFLICT (subject_id) DO NOTHING RETURNING id"
)
_AUDIT = text(
    "INSERT INTO fraud.case_audit (case_id, actor_id, action, detail) "
    "VALUES (:case_id, :actor_id, :action, CAST(:detail AS jsonb))"
)


async def open_case(conn: AsyncConnection, values: dict[str, Any], event: Event) -> bool:
    """Open a case (and record its event and first audit row); False if the subject has one."""
    result = await execute_with_event(conn, _OPEN, values, event)
    if result.first() is None:
        return False
    await audit(conn, values["id"], None, "opened", {"decision_id": values["decision_id"]})
    return True


async def audit(
    conn: AsyncConnection,
    case_id: str,
    actor_id: str | None,
    action: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append to the case's audit trail (never updated nor deleted)."""
    await conn.execute(
        _AUDIT,
        {
            "case_id": case_id,
            "actor_id": actor_id,
            "action": action,
            "detail": json.dumps(detail or {}, separators=(",", ":"), default=str),
        },
    )


async def get(conn: AsyncConnection, case_id: str, *, for_update: bool = False) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    sql = text(f"SELECT {_FIELDS} FROM fraud.cases WHERE id = :id{lock}")
    return (await conn.execute(sql, {"id": case_id})).first()


async def by_subject(conn: AsyncConnection, subject_id: str) -> Row[Any] | None:
    sql = text(f"SELECT {_FIELDS} FROM fraud.cases WHERE subject_id = :s")
    return (await conn.execute(sql, {"s": subject_id})).first()


async def page(
    conn: AsyncConnection,
    *,
    status: str | None,
    assignee_id: str | None,
    user_id: str | None,
    subject_kind: str | None,
    limit: int,
    after: str | None,
) -> list[Row[Any]]:
    """The queue, oldest first (a reviewer works from the front); filters are optional."""
    query = (
        f"SELECT {_FIELDS} FROM fraud.cases WHERE "
        "(CAST(:status AS text) IS NULL OR status = :status) "
        "AND (CAST(:assignee AS text) IS NULL OR assignee_id = :assignee) "
        "AND (CAST(:user_id AS text) IS NULL OR user_id = :user_id) "
        "AND (CAST(:kind AS text) IS NULL OR subject_kind = :kind)"
    )
    params = {"status": status, "assignee": assignee_id, "user_id": user_id, "kind": subject_kind}
    return await fetch_page(conn, query, params, limit=limit, after=after, newest_first=False)


async def update(conn: AsyncConnection, case_id: str, values: dict[str, Any]) -> None:
    """Set columns of a case (names from this module's callers only, never from input)."""
    sets = ", ".join(f"{k} = :{k}" for k in values)
    await conn.execute(
        text(f"UPDATE fraud.cases SET {sets}, updated_at = now() WHERE id = :case_id"),
        {**values, "case_id": case_id},
    )


async def add_comment(conn: AsyncConnection, case_id: str, author_id: str, body: str) -> Row[Any]:
    sql = text(
        "INSERT INTO fraud.case_comments (case_id, author_id, body) VALUES (:c, :a, :b) "
        "RETURNING id, author_id, body, created_at"
    )
    return (await conn.execute(sql, {"c": case_id, "a": author_id, "b": body})).one()


async def comments(conn: AsyncConnection, case_id: str) -> list[Row[Any]]:
    sql = text(
        "SELECT id, author_id, body, created_at FROM fraud.case_comments "
        "WHERE case_id = :c ORDER BY id"
    )
    return list((await conn.execute(sql, {"c": case_id})).all())


async def audit_trail(conn: AsyncConnection, case_id: str) -> list[Row[Any]]:
    sql = text(
        "SELECT id, actor_id, action, detail, created_at FROM fraud.case_audit "
        "WHERE case_id = :c ORDER BY id"
    )
    return list((await conn.execute(sql, {"c": case_id})).all())
