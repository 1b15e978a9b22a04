"""SQL of the payment_methods schema (methods, micro_deposits, fundings)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.ids import is_valid_id

COLUMNS = (
    "m.id, m.user_id, m.type, m.status, m.nickname, m.fingerprint, m.last4, m.brand, "
    "m.expiry_month, m.expiry_year, m.cardholder_name, m.billing_address, m.vault_card_id, "
    "m.vault_token_id, m.token_last4, m.bank_country, m.routing_number, m.account_type, m.bic, "
    "m.bank_name, m.currency, m.is_default, m.failure_code, m.failure_reason, m.verified_at, "
    "m.removed_at, m.created_at, m.updated_at, "
    "d.status AS deposit_status, d.attempts AS deposit_attempts, "
    "d.max_attempts AS deposit_max_attempts, d.expires_at AS deposit_expires_at"
)
_FROM = (
    "payment_methods.methods m "
    "LEFT JOIN payment_methods.micro_deposits d ON d.payment_method_id = m.id"
)
_INSERT_COLUMNS = (
    "id",
    "user_id",
    "type",
    "status",
    "nickname",
    "fingerprint",
    "last4",
    "brand",
    "expiry_month",
    "expiry_year",
    "cardholder_name",
    "billing_address",
    "vault_card_id",
    "vault_token_id",
    "token_last4",
    "bank_country",
    "routing_number",
    "account_type",
    "bic",
    "bank_name",
    "account_sealed",
    "currency",
    "failure_code",
    "failure_reason",
    "verified_at",
)
_INSERT = text(
    f"""
    INSERT INTO payment_methods.methods ({", ".join(_INSERT_COLUMNS)})
    VALUES ({", ".join(":" + c if c != "billing_address" else "CAST(:billing_address AS jsonb)" for c in _INSERT_COLUMNS)})
    """
)


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Serialise one user's changes to their methods for this transaction (adds, defaults,
    removals): the live-fingerprint check and the default hand-over then see every earlier
    change committed. Other users never wait."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('payment_methods:' || :u, 11))"),
        {"u": user_id},
    )


async def insert(conn: AsyncConnection, values: dict[str, Any]) -> None:
    params = {c: values.get(c) for c in _INSERT_COLUMNS}
    if params["billing_address"] is not None:
        params["billing_address"] = json.dumps(params["billing_address"])
    await conn.execute(_INSERT, params)


async def get(
    conn: AsyncConnection,
    method_id: str,
    user_id: str,
    *,
    for_update: bool = False,
    include_removed: bool = False,
) -> Row[Any] | None:
    """The user's live (not removed) method; None for anyone else's, a removed one or junk.
    `include_removed`: a removed one too (what a top-up charged before its removal names)."""
    if not is_valid_id(method_id, "pm"):
        return None
    lock = " FOR UPDATE OF m" if for_update else ""
    live = "" if include_removed else " AND m.status <> 'removed'"
    sql = text(f"SELECT {COLUMNS} FROM {_FROM} WHERE m.id = :id AND m.user_id = :u{live}{lock}")
    return (await conn.execute(sql, {"id": method_id, "u": user_id})).first()


async def list_for_user(
    conn: AsyncConnection,
    user_id: str,
    *,
    type_: str | None,
    status: str | None,
    limit: int,
    after: str | None,
) -> list[Row[Any]]:
    sql = (
        f"SELECT {COLUMNS} FROM {_FROM} "
        "WHERE m.user_id = :u AND m.status <> 'removed' "
        "AND (CAST(:type AS text) IS NULL OR m.type = :type) "
        "AND (CAST(:status AS text) IS NULL OR m.status = :status) "
        "AND (CAST(:after AS text) IS NULL OR m.id < :after) "
        "ORDER BY m.id DESC LIMIT :limit"
    )
    params = {"u": user_id, "type": type_, "status": status, "after": after, "limit": limit}
    return list((await conn.execute(text(sql), params)).all())


async def live_of_vault_card(conn: AsyncConnection, card_id: str, user_id: str) -> list[Row[Any]]:
    """The user's live methods of a vault card, locked."""
    sql = text(
        f"SELECT {COLUMNS} FROM {_FROM} WHERE m.vault_card_id = :c AND m.user_id = :u "
        "AND m.status IN ('pending_verification', 'verified') FOR UPDATE OF m"
    )
    return list((await conn.execute(sql, {"c": card_id, "u": user_id})).all())


async def live_with_fingerprint(conn: AsyncConnection, user_id: str, fingerprint: str) -> bool:
    sql = text(
        "SELECT 1 FROM payment_methods.methods WHERE user_id = :u AND fingerprint = :f "
        "AND status IN ('pending_verification', 'verified')"
    )
    return (await conn.execute(sql, {"u": user_id, "f": fingerprint})).first() is not None


async def recent_failures(
    conn: AsyncConnection, fingerprint: str, since: datetime, *, user_id: str | None = None
) -> int:
    """Failed verifications of the card with this fingerprint since `since`: the user's, or
    everyone's (the fingerprint is the same card for every owner)."""
    sql = text(
        "SELECT count(*) FROM payment_methods.methods WHERE fingerprint = :f "
        "AND (CAST(:u AS text) IS NULL OR user_id = :u) "
        "AND status IN ('failed', 'removed') AND failure_code IS NOT NULL AND created_at >= :since"
    )
    return int(
        (await conn.execute(sql, {"u": user_id, "f": fingerprint, "since": since})).scalar_one()
    )


async def default_of(conn: AsyncConnection, user_id: str) -> str | None:
    sql = text("SELECT id FROM payment_methods.methods WHERE user_id = :u AND is_default")
    return (await conn.execute(sql, {"u": user_id})).scalar_one_or_none()


async def set_default(conn: AsyncConnection, user_id: str, method_id: str | None) -> None:
    """Make `method_id` the user's only default (None: no default). Clears first, then sets, in
    one statement each: the unique index never sees two."""
    await conn.execute(
        text(
            "UPDATE payment_methods.methods SET is_default = false, updated_at = now() "
            "WHERE user_id = :u AND is_default AND id IS DISTINCT FROM :id"
        ),
        {"u": user_id, "id": method_id},
    )
    if method_id is not None:
        await conn.execute(
            text(
                "UPDATE payment_methods.methods SET is_default = true, updated_at = now() "
                "WHERE id = :id AND user_id = :u AND NOT is_default"
            ),
            {"u": user_id, "id": method_id},
        )


async def newest_verified(
    conn: AsyncConnection, user_id: str, *, excluding: str | None = None
) -> str | None:
    sql = text(
        "SELECT id FROM payment_methods.methods WHERE user_id = :u AND status = 'verified' "
        "AND id IS DISTINCT FROM :x ORDER BY verified_at DESC, id DESC LIMIT 1"
    )
    return (await conn.execute(sql, {"u": user_id, "x": excluding})).scalar_one_or_none()


async def update(conn: AsyncConnection, method_id: str, values: dict[str, Any]) -> None:
    """Set the given columns (names from code, values bound)."""
    if not values:
        return
    sets = []
    params: dict[str, Any] = {"id": method_id}
    for column, value in values.items():
        if column == "billing_address":
            sets.append("billing_address = CAST(:billing_address AS jsonb)")
            value = json.dumps(value) if value is not None else None
        else:
            sets.append(f"{column} = :{column}")
        params[column] = value
    sql = f"UPDATE payment_methods.methods SET {', '.join(sets)}, updated_at = now() WHERE id = :id"
    await conn.execute(text(sql), params)


# --- micro-deposits ---------------------------------------------------------------------------


async def insert_deposits(
    conn: AsyncConnection,
    method_id: str,
    amounts: tuple[int, int],
    currency: str,
    max_attempts: int,
    expires_at: datetime,
) -> None:
    await conn.execute(
        text(
            "INSERT INTO payment_methods.micro_deposits "
            "(payment_method_id, amount_1, amount_2, currency, status, max_attempts, expires_at) "
            "VALUES (:id, :a, :b, :c, 'pending', :m, :e)"
        ),
        {
            "id": method_id,
            "a": amounts[0],
            "b": amounts[1],
            "c": currency,
            "m": max_attempts,
            "e": expires_at,
        },
    )


async def deposits_for_update(conn: AsyncConnection, method_id: str) -> Row[Any] | None:
    sql = text(
        "SELECT payment_method_id, amount_1, amount_2, currency, status, attempts, max_attempts, "
        "expires_at, expires_at <= now() AS expired "
        "FROM payment_methods.micro_deposits WHERE payment_method_id = :id FOR UPDATE"
    )
    return (await conn.execute(sql, {"id": method_id})).first()


async def update_deposits(
    conn: AsyncConnection, method_id: str, *, status: str, attempts: int
) -> None:
    await conn.execute(
        text(
            "UPDATE payment_methods.micro_deposits SET status = :s, attempts = :a, "
            "updated_at = now() WHERE payment_method_id = :id"
        ),
        {"id": method_id, "s": status, "a": attempts},
    )


async def lock_next_expired_deposits(conn: AsyncConnection, skip: list[str]) -> Row[Any] | None:
    """The next bank account whose micro-deposits ran out of time, locked with its deposits;
    rows another worker holds are skipped (never waited for)."""
    sql = text(
        f"SELECT {COLUMNS} FROM {_FROM} "
        "WHERE d.status = 'pending' AND d.expires_at <= now() "
        "AND m.status = 'pending_verification' AND NOT (m.id = ANY(:skip)) "
        "ORDER BY d.expires_at LIMIT 1 FOR UPDATE OF m, d SKIP LOCKED"
    )
    return (await conn.execute(sql, {"skip": skip})).first()


async def deposit_amounts(conn: AsyncConnection, method_id: str) -> tuple[int, int] | None:
    sql = text(
        "SELECT amount_1, amount_2 FROM payment_methods.micro_deposits "
        "WHERE payment_method_id = :id"
    )
    row = (await conn.execute(sql, {"id": method_id})).first()
    return (int(row.amount_1), int(row.amount_2)) if row is not None else None


# --- fundings ---------------------------------------------------------------------------------

_FUNDING_COLUMNS = (
    "id",
    "user_id",
    "payment_method_id",
    "type",
    "rail",
    "status",
    "amount",
    "currency",
    "posting_id",
    "response_code",
    "authorization_code",
    "network_reference",
    "failure_code",
    "idempotency_key",
    "request_hash",
    "balance_posted",
    "balance_held",
    "balance_available",
    "completed_at",
)
_FUNDING_SELECT = f"SELECT {', '.join(_FUNDING_COLUMNS)}, created_at, updated_at"
_INSERT_FUNDING = text(
    f"""
    INSERT INTO payment_methods.fundings ({", ".join(_FUNDING_COLUMNS)})
    VALUES ({", ".join(":" + c for c in _FUNDING_COLUMNS)})
    RETURNING {", ".join(_FUNDING_COLUMNS)}, created_at, updated_at
    """
)


async def insert_funding(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    return (await conn.execute(_INSERT_FUNDING, {c: values.get(c) for c in _FUNDING_COLUMNS})).one()


async def lock_funding_key(conn: AsyncConnection, user_id: str, key: str) -> None:
    """Serialise the requests that carry one user's Idempotency-Key for this transaction: the
    second finds the top-up the first wrote (the unique index is the backstop)."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 29))"),
        {"k": f"payment_methods:topup:{user_id}:{key}"},
    )


async def funding_by_key(conn: AsyncConnection, user_id: str, key: str) -> Row[Any] | None:
    sql = text(
        f"{_FUNDING_SELECT} FROM payment_methods.fundings "
        "WHERE user_id = :u AND idempotency_key = :k"
    )
    return (await conn.execute(sql, {"u": user_id, "k": key})).first()


async def get_funding(
    conn: AsyncConnection, funding_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    lock = " FOR UPDATE" if for_update else ""
    sql = text(f"{_FUNDING_SELECT} FROM payment_methods.fundings WHERE id = :id{lock}")
    return (await conn.execute(sql, {"id": funding_id})).first()


async def update_funding(conn: AsyncConnection, funding_id: str, values: dict[str, Any]) -> None:
    """Set the given columns (names from code, values bound)."""
    sets = ", ".join(f"{c} = :{c}" for c in values)
    await conn.execute(
        text(f"UPDATE payment_methods.fundings SET {sets}, updated_at = now() WHERE id = :id"),
        {**values, "id": funding_id},
    )


async def delete_unanswered_funding(conn: AsyncConnection, funding_id: str) -> None:
    """Drop a card top-up that charged nothing (declined, or no answer from the network or the
    vault); one approved or completed is never touched."""
    await conn.execute(
        text(
            "DELETE FROM payment_methods.fundings WHERE id = :id "
            "AND status IN ('pending', 'failed') AND response_code IS NULL"
        ),
        {"id": funding_id},
    )


async def lock_next_stuck_funding(
    conn: AsyncConnection, older_than_seconds: float, skip: list[str]
) -> Row[Any] | None:
    """The next top-up still `pending` after the deadline, locked; rows a request or another
    worker holds are skipped (never waited for)."""
    sql = text(
        f"{_FUNDING_SELECT} FROM payment_methods.fundings "
        "WHERE status = 'pending' AND updated_at < now() - make_interval(secs => :s) "
        "AND NOT (id = ANY(:skip)) ORDER BY updated_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    return (await conn.execute(sql, {"s": older_than_seconds, "skip": skip})).first()
