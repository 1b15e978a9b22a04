"""SQL of the fraud rules, their versions, the block/allow lists and the change counters
(`fraud.rules`, `fraud.rule_versions`, `fraud.list_entries`, `fraud.rule_set`), and the read of
past decisions that a backtest replays."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

VERSION_COLUMNS = (
    "rule_id, version, expression, score, action, reason_code, description, state, note, "
    "based_on, created_by, created_at, state_changed_by, state_changed_at, activated_at"
)
ENTRY_COLUMNS = (
    "id, list, kind, value, reason, expires_at, created_by, created_at, removed_by, removed_at"
)

# --- change counters ----------------------------------------------------------------------------

_COUNTERS = text("SELECT rules_version, lists_version FROM fraud.rule_set")
_BUMP_RULES = text(
    "UPDATE fraud.rule_set SET rules_version = rules_version + 1, changed_at = now() "
    "RETURNING rules_version"
)
_BUMP_LISTS = text(
    "UPDATE fraud.rule_set SET lists_version = lists_version + 1, changed_at = now() "
    "RETURNING lists_version"
)


async def counters(conn: AsyncConnection) -> tuple[int, int]:
    """(rules_version, lists_version): each moves with every change of its kind."""
    row = (await conn.execute(_COUNTERS)).one()
    return int(row.rules_version), int(row.lists_version)


async def bump_rules(conn: AsyncConnection) -> int:
    """Mark the rules changed (in the change's transaction). The single row also serialises
    concurrent rule changes, which keeps version numbers and states consistent."""
    return int((await conn.execute(_BUMP_RULES)).scalar_one())


async def bump_lists(conn: AsyncConnection) -> int:
    return int((await conn.execute(_BUMP_LISTS)).scalar_one())


# --- rules --------------------------------------------------------------------------------------


async def insert_rule(
    conn: AsyncConnection, rule_id: str, actor: str | None, now: datetime
) -> bool:
    """A new rule name with version 1 to come; False if the name is taken."""
    result = await conn.execute(
        text(
            "INSERT INTO fraud.rules (id, latest_version, created_by, created_at, updated_at) "
            "VALUES (:id, 1, :actor, :now, :now) ON CONFLICT (id) DO NOTHING"
        ),
        {"id": rule_id, "actor": actor, "now": now},
    )
    return result.rowcount == 1


async def get_rule(
    conn: AsyncConnection, rule_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(
                "SELECT id, latest_version, created_by, created_at, updated_at "
                f"FROM fraud.rules WHERE id = :id{lock}"
            ),
            {"id": rule_id},
        )
    ).first()


async def next_version(conn: AsyncConnection, rule_id: str, now: datetime) -> int:
    """Allocate the rule's next version number (the rule row is locked by the caller)."""
    return int(
        (
            await conn.execute(
                text(
                    "UPDATE fraud.rules SET latest_version = latest_version + 1, "
                    "updated_at = :now WHERE id = :id RETURNING latest_version"
                ),
                {"id": rule_id, "now": now},
            )
        ).scalar_one()
    )


async def list_rules(
    conn: AsyncConnection, *, state: str | None, limit: int, after: str | None
) -> list[Row[Any]]:
    """Rules in name order; `state` keeps those with a version in that state (`disabled`: none
    active or in shadow)."""
    return await fetch_page(
        conn,
        """
        SELECT r.id, r.latest_version, r.created_by, r.created_at, r.updated_at
        FROM fraud.rules r
        WHERE (CAST(:state AS text) IS NULL
               OR (:state = 'disabled' AND NOT EXISTS (
                       SELECT 1 FROM fraud.rule_versions v
                       WHERE v.rule_id = r.id AND v.state <> 'disabled'))
               OR EXISTS (SELECT 1 FROM fraud.rule_versions v
                          WHERE v.rule_id = r.id AND v.state = :state))
        """,
        {"state": state},
        limit=limit,
        after=after,
        key="id",
        newest_first=False,
    )


async def insert_version(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    return (
        await conn.execute(
            text(
                f"""
                INSERT INTO fraud.rule_versions (rule_id, version, expression, score, action,
                    reason_code, description, state, note, based_on, created_by, created_at,
                    state_changed_by, state_changed_at, activated_at)
                VALUES (:rule_id, :version, :expression, :score, :action, :reason_code,
                    :description, :state, :note, :based_on, :actor, :now, :actor, :now,
                    CASE WHEN :state = 'active' THEN CAST(:now AS timestamptz) END)
                RETURNING {VERSION_COLUMNS}
                """
            ),
            values,
        )
    ).one()


async def versions_of(conn: AsyncConnection, rule_ids: Sequence[str]) -> list[Row[Any]]:
    """Every version of these rules, by rule then version."""
    return list(
        (
            await conn.execute(
                text(
                    f"SELECT {VERSION_COLUMNS} FROM fraud.rule_versions "
                    "WHERE rule_id = ANY(:ids) ORDER BY rule_id, version"
                ),
                {"ids": list(rule_ids)},
            )
        ).all()
    )


async def get_version(conn: AsyncConnection, rule_id: str, version: int) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {VERSION_COLUMNS} FROM fraud.rule_versions "
                "WHERE rule_id = :id AND version = :version"
            ),
            {"id": rule_id, "version": version},
        )
    ).first()


async def retire_state(
    conn: AsyncConnection,
    rule_id: str,
    state: str,
    actor: str | None,
    now: datetime,
    *,
    keep: int | None = None,
) -> None:
    """Disable the rule's version that is in `state` (at most one), unless it is `keep`."""
    await conn.execute(
        text(
            "UPDATE fraud.rule_versions SET state = 'disabled', state_changed_by = :actor, "
            "state_changed_at = :now WHERE rule_id = :id AND state = :state "
            "AND version IS DISTINCT FROM CAST(:keep AS integer)"
        ),
        {"id": rule_id, "state": state, "actor": actor, "now": now, "keep": keep},
    )


async def set_state(
    conn: AsyncConnection,
    rule_id: str,
    version: int,
    state: str,
    actor: str | None,
    now: datetime,
) -> None:
    """Move one version to `state` (the caller has retired the version holding it before)."""
    await conn.execute(
        text(
            "UPDATE fraud.rule_versions SET state = :state, state_changed_by = :actor, "
            "state_changed_at = :now, activated_at = CASE WHEN :state = 'active' "
            "THEN CAST(:now AS timestamptz) ELSE activated_at END "
            "WHERE rule_id = :id AND version = :version"
        ),
        {"id": rule_id, "version": version, "state": state, "actor": actor, "now": now},
    )


async def disable_all(conn: AsyncConnection, rule_id: str, actor: str | None, now: datetime) -> int:
    result = await conn.execute(
        text(
            "UPDATE fraud.rule_versions SET state = 'disabled', state_changed_by = :actor, "
            "state_changed_at = :now WHERE rule_id = :id AND state <> 'disabled'"
        ),
        {"id": rule_id, "actor": actor, "now": now},
    )
    return int(result.rowcount)


async def previously_active(conn: AsyncConnection, rule_id: str) -> Row[Any] | None:
    """The version that was in force most recently, other than the one in force now."""
    return (
        await conn.execute(
            text(
                f"SELECT {VERSION_COLUMNS} FROM fraud.rule_versions "
                "WHERE rule_id = :id AND state <> 'active' AND activated_at IS NOT NULL "
                "ORDER BY activated_at DESC, version DESC LIMIT 1"
            ),
            {"id": rule_id},
        )
    ).first()


async def live_versions(conn: AsyncConnection) -> list[Row[Any]]:
    """The versions that are evaluated: active and shadow ones, in a stable order."""
    return list(
        (
            await conn.execute(
                text(
                    f"SELECT {VERSION_COLUMNS} FROM fraud.rule_versions "
                    "WHERE state <> 'disabled' ORDER BY rule_id, version"
                )
            )
        ).all()
    )


# --- lists --------------------------------------------------------------------------------------


async def insert_entry(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any] | None:
    """None when a live entry for the same (list, kind, value) exists."""
    return (
        await conn.execute(
            text(
                f"""
                INSERT INTO fraud.list_entries (id, list, kind, value, reason, expires_at,
                    created_by, created_at)
                VALUES (:id, :list, :kind, :value, :reason, :expires_at, :actor, :now)
                ON CONFLICT (list, kind, value) WHERE removed_at IS NULL DO NOTHING
                RETURNING {ENTRY_COLUMNS}
                """
            ),
            values,
        )
    ).first()


async def live_entry(
    conn: AsyncConnection, list_name: str, kind: str, value: str
) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {ENTRY_COLUMNS} FROM fraud.list_entries WHERE list = :list "
                "AND kind = :kind AND value = :value AND removed_at IS NULL"
            ),
            {"list": list_name, "kind": kind, "value": value},
        )
    ).first()


async def get_entry(conn: AsyncConnection, entry_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(f"SELECT {ENTRY_COLUMNS} FROM fraud.list_entries WHERE id = :id"),
            {"id": entry_id},
        )
    ).first()


async def remove_entry(
    conn: AsyncConnection, entry_id: str, actor: str | None, now: datetime
) -> Row[Any] | None:
    """Mark a live entry removed; None if it is not live (unknown or removed already)."""
    return (
        await conn.execute(
            text(
                "UPDATE fraud.list_entries SET removed_at = :now, removed_by = :actor "
                f"WHERE id = :id AND removed_at IS NULL RETURNING {ENTRY_COLUMNS}"
            ),
            {"id": entry_id, "actor": actor, "now": now},
        )
    ).first()


async def list_entries(
    conn: AsyncConnection,
    *,
    list_name: str | None,
    kind: str | None,
    value: str | None,
    include_removed: bool,
    limit: int,
    after: str | None,
) -> list[Row[Any]]:
    """Entries newest first, filtered."""
    return await fetch_page(
        conn,
        f"""
        SELECT {ENTRY_COLUMNS} FROM fraud.list_entries
        WHERE (CAST(:list AS text) IS NULL OR list = :list)
          AND (CAST(:kind AS text) IS NULL OR kind = :kind)
          AND (CAST(:value AS text) IS NULL OR value = :value)
          AND (:include_removed OR removed_at IS NULL)
        """,
        {"list": list_name, "kind": kind, "value": value, "include_removed": include_removed},
        limit=limit,
        after=after,
    )


async def live_entries(conn: AsyncConnection, now: datetime) -> list[Row[Any]]:
    """Every entry in force now or later (expired ones are left out; those expiring later are
    checked against the attempt's time)."""
    return list(
        (
            await conn.execute(
                text(
                    f"SELECT {ENTRY_COLUMNS} FROM fraud.list_entries WHERE removed_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > :now) ORDER BY id"
                ),
                {"now": now},
            )
        ).all()
    )


# --- past decisions, for backtests (the table is the decisions' own, fraud.decisions) ---------


async def past_decisions(
    conn: AsyncConnection,
    *,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[Row[Any]]:
    """The newest `limit` stored decisions in [since, until) with their feature snapshots."""
    return list(
        (
            await conn.execute(
                text(
                    """
                    SELECT id, action, score, label, features, created_at
                    FROM fraud.decisions
                    WHERE (CAST(:since AS timestamptz) IS NULL OR created_at >= :since)
                      AND (CAST(:until AS timestamptz) IS NULL OR created_at < :until)
                    ORDER BY created_at DESC, id DESC
                    LIMIT :limit
                    """
                ),
                {"since": since, "until": until, "limit": limit},
            )
        ).all()
    )
