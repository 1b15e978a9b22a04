"""SQL of the payment flow: transactions, their details, captures, refunds, increments."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row, result_tuple
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.driver import DriverStatement
from billfold.platform.events import Event, fetch_with_event, with_event
from billfold.platform.ids import is_valid_id

_T = (
    "t.id, t.user_id, t.source, t.payment_method_id, t.token_id, t.status, t.amount, t.currency, "
    "t.authorized_amount, t.captured_amount, t.released_amount, t.refunded_amount, "
    "t.merchant_id, t.merchant_name, t.mcc, t.category, t.channel, t.device_id, t.description, "
    "t.note, t.decline_code, t.hold_id, t.auth_code, t.rrn, t.stan, t.idempotency_key, "
    "t.request_hash, t.expires_at, t.created_at, t.updated_at, t.authorized_at"
)
_D = (
    "d.merchant_country, d.merchant_city, d.latitude, d.longitude, d.card_brand, d.card_last4, "
    "d.response_code, d.stand_in, d.risk_action, d.timings"
)
_FROM = (
    "transactions.transactions t JOIN transactions.transaction_details d ON d.transaction_id = t.id"
)
_SELECT = f"SELECT {_T}, {_D} FROM {_FROM}"
# The same columns as RETURNING lists of the two tables (for statements that write and answer
# the payment in one round trip) and as the select of CTEs named `t` and `d` that return them.
_T_RETURNING = ", ".join(c.strip().removeprefix("t.") for c in _T.split(","))
_D_RETURNING = "dd.transaction_id, " + ", ".join(
    "dd." + c.strip().removeprefix("d.") for c in _D.split(",")
)
_JOINED = f"SELECT {_T}, {_D} FROM t JOIN d ON d.transaction_id = t.id"
# A payment read or written on the driver's connection (`DriverStatement`) comes back as an
# asyncpg record; callers use SQLAlchemy's `Row` (attribute access, `_mapping`), so the record's
# values, in the order `_SELECT` lists them, become one. The values are the driver's either way
# (SQLAlchemy's text() results apply no conversion of their own).
_PAYMENT_COLUMNS = tuple(c.strip().split(".", 1)[1] for c in f"{_T}, {_D}".split(","))
_payment_row = result_tuple(_PAYMENT_COLUMNS)


def _as_row(record: Mapping[str, Any] | None) -> Row[Any] | None:
    return None if record is None else _payment_row(record.values())


# The authorization path's first transaction, which is most of a payment's database work:
# the key's lock, the transaction's clock and the MCC's category in one round trip, then the
# payment, its details and its first event in another.
_CLAIM = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(:k, 23)) AS locked, now() AS now, "
    "transactions.category_for_mcc(:mcc) AS category"
)


async def claim_key(conn: AsyncConnection, lock_key: str, mcc: str) -> tuple[datetime, str]:
    """Hold `lock_key` (an advisory lock until the transaction ends; a concurrent holder makes
    this wait) and answer the transaction's `now()` (what the payment's `created_at` will be)
    and the category of `mcc`. Read the key's payment in a statement after this one: this
    statement's snapshot may predate the commit of the holder it waited for."""
    row = (await conn.execute(_CLAIM, {"k": lock_key, "mcc": mcc})).one()
    return row.now, str(row.category)


_INSERT_WITH_EVENT = DriverStatement(
    with_event(
        _JOINED,
        ctes=f"""
    t AS (
        INSERT INTO transactions.transactions (
            id, user_id, source, payment_method_id, token_id, status, amount, currency,
            authorized_amount, merchant_id, merchant_name, mcc, category, channel, device_id,
            description, note, decline_code, hold_id, idempotency_key, request_hash, expires_at,
            rrn, authorized_at, created_at, updated_at)
        VALUES (
            :id, :user_id, :source, :payment_method_id, :token_id, :status, :amount, :currency,
            CAST(:authorized_amount AS bigint), :merchant_id, :merchant_name, :mcc, :category,
            :channel, :device_id, :description, :note, :decline_code, :hold_id,
            :idempotency_key, :request_hash, :expires_at,
            CAST(:rrn AS text), CASE WHEN CAST(:authorized_amount AS bigint) > 0 THEN now() END,
            now(), now())
        ON CONFLICT (user_id, idempotency_key) DO NOTHING
        RETURNING {_T_RETURNING}
    ),
    d AS (
        INSERT INTO transactions.transaction_details AS dd (
            transaction_id, merchant_country, merchant_city, latitude, longitude, card_brand,
            card_last4, risk_action, risk_score, risk_reasons, timings)
        SELECT t.id, :merchant_country, :merchant_city, :latitude, :longitude, :card_brand,
               :card_last4, :risk_action, :risk_score, :risk_reasons, CAST(:timings AS jsonb)
        FROM t
        RETURNING {_D_RETURNING}
    )""",
        only_if_rows=True,
    )
)


async def insert_with_event(
    conn: AsyncConnection, values: dict[str, Any], event: Event
) -> Row[Any] | None:
    """Insert a payment (`values` with its `category`), its details and `event` in one
    statement; the payment as `get` reads it, or None (nothing written) when the user's
    Idempotency-Key is taken."""
    params = {**values, "timings": json.dumps(values.get("timings") or {})}
    return _as_row(await fetch_with_event(conn, _INSERT_WITH_EVENT, params, event))


_FINISH: dict[tuple[frozenset[str], frozenset[str]], DriverStatement] = {}


def _finish_statement(main: frozenset[str], details: frozenset[str]) -> DriverStatement:
    """The statement of `finish_authorizing` for these columns (a handful of shapes, each
    built and parsed once per process)."""
    found = _FINISH.get((main, details))
    if found is None:
        sets = "".join(f"{k} = :{k}, " for k in sorted(main))
        dsets = "".join(
            f"{k} = CAST(:{k} AS jsonb), " if k == "timings" else f"{k} = :{k}, "
            for k in sorted(details)
        )
        found = _FINISH[(main, details)] = DriverStatement(
            with_event(
                _JOINED,
                ctes=f"""
            t AS (
                UPDATE transactions.transactions SET {sets}updated_at = now()
                WHERE id = :id AND status = 'authorizing'
                RETURNING {_T_RETURNING}
            ),
            d AS (
                UPDATE transactions.transaction_details AS dd SET {dsets}updated_at = now()
                FROM t WHERE dd.transaction_id = t.id
                RETURNING {_D_RETURNING}
            )""",
                only_if_rows=True,
            )
        )
    return found


async def finish_authorizing(
    conn: AsyncConnection, txn_id: str, values: dict[str, Any], event: Event
) -> Row[Any] | None:
    """A payment still `authorizing` takes `values` (its own columns and its details') and
    `event` is written, in one statement (atomic without a transaction around it); the payment
    as `get` reads it. None, with nothing written, when it is no longer `authorizing`."""
    main = frozenset(k for k in values if k in _UPDATABLE)
    details = frozenset(k for k in values if k in _DETAILS)
    assert len(main) + len(details) == len(values), set(values) - _UPDATABLE - _DETAILS
    params = {**values, "id": txn_id}
    if "timings" in params:
        params["timings"] = json.dumps(params["timings"])
    statement = _finish_statement(main, details)
    return _as_row(await fetch_with_event(conn, statement, params, event))


async def get(conn: AsyncConnection, txn_id: str, *, for_update: bool = False) -> Row[Any] | None:
    if not is_valid_id(txn_id, "txn"):
        return None
    lock = " FOR UPDATE OF t" if for_update else ""
    sql = text(f"{_SELECT} WHERE t.id = :id{lock}")
    return (await conn.execute(sql, {"id": txn_id})).first()


async def get_for_user(
    conn: AsyncConnection, txn_id: str, user_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    """The user's payment; None for anyone else's or junk (the caller answers 404)."""
    row = await get(conn, txn_id, for_update=for_update)
    return row if row is not None and row.user_id == user_id else None


_BY_KEY = DriverStatement(text(f"{_SELECT} WHERE t.user_id = :u AND t.idempotency_key = :k"))


async def by_idempotency_key(conn: AsyncConnection, user_id: str, key: str) -> Row[Any] | None:
    """The user's payment with this Idempotency-Key. On the driver's connection once the
    transaction has begun (after `claim_key`, on the payment's hot path)."""
    return _as_row(await _BY_KEY.fetchrow(conn, {"u": user_id, "k": key}))


_UPDATABLE = frozenset(
    {
        "status",
        "token_id",
        "authorized_amount",
        "captured_amount",
        "released_amount",
        "refunded_amount",
        "decline_code",
        "hold_id",
        "auth_code",
        "rrn",
        "stan",
        "expires_at",
        "authorized_at",
    }
)
_DETAILS = frozenset(
    {"response_code", "stand_in", "risk_action", "risk_score", "risk_reasons", "timings"}
)


async def update(conn: AsyncConnection, txn_id: str, values: dict[str, Any]) -> None:
    """Set columns of a payment (and of its details); `updated_at` moves with every change."""
    main = {k: v for k, v in values.items() if k in _UPDATABLE}
    details = {k: v for k, v in values.items() if k in _DETAILS}
    assert len(main) + len(details) == len(values), set(values) - _UPDATABLE - _DETAILS
    sets = ", ".join(f"{k} = :{k}" for k in main)
    await conn.execute(
        text(
            f"UPDATE transactions.transactions SET {sets + ', ' if sets else ''}"
            "updated_at = now() WHERE id = :id"
        ),
        {**main, "id": txn_id},
    )
    if details:
        params = dict(details)
        if "timings" in params:
            params["timings"] = json.dumps(params["timings"])
        dsets = ", ".join(
            f"{k} = CAST(:{k} AS jsonb)" if k == "timings" else f"{k} = :{k}" for k in params
        )
        await conn.execute(
            text(
                f"UPDATE transactions.transaction_details SET {dsets}, updated_at = now() "
                "WHERE transaction_id = :id"
            ),
            {**params, "id": txn_id},
        )


async def set_status_if(conn: AsyncConnection, txn_id: str, expected: str, status: str) -> bool:
    """Move a payment from `expected` to `status`; False if it was not in `expected` (another
    request got there first)."""
    result = await conn.execute(
        text(
            "UPDATE transactions.transactions SET status = :status, updated_at = now() "
            "WHERE id = :id AND status = :expected"
        ),
        {"id": txn_id, "expected": expected, "status": status},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- the sweepers' work lists -----------------------------------------------------------------


async def lock_next_expired(conn: AsyncConnection, skip: list[str]) -> Row[Any] | None:
    """One authorization past its expiry, locked; rows another sweeper holds are skipped.
    `expires_at` is cleared whenever nothing is left to capture or confirm, so every row with
    one may lapse."""
    sql = text(
        f"""
        {_SELECT}
        WHERE t.expires_at <= now() AND t.status <> 'authorizing' AND t.id <> ALL (:skip)
        ORDER BY t.expires_at
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
        """
    )
    return (await conn.execute(sql, {"skip": skip})).first()


async def lock_next_stuck(
    conn: AsyncConnection, deadline_seconds: int, skip: list[str]
) -> Row[Any] | None:
    """One payment `authorizing` for longer than the deadline, locked (SKIP LOCKED).

    Measured from when it entered `authorizing` (`updated_at`: set by tx1 and by a resume after
    a step-up, and moved by nothing else while it is `authorizing`), not from `created_at`: a
    payment resumed after a long step-up is not stuck while the network answers it."""
    sql = text(
        f"""
        {_SELECT}
        WHERE t.status = 'authorizing'
          AND t.updated_at <= now() - make_interval(secs => :deadline)
          AND t.id <> ALL (:skip)
        ORDER BY t.updated_at
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
        """
    )
    return (await conn.execute(sql, {"deadline": deadline_seconds, "skip": skip})).first()


# --- captures ---------------------------------------------------------------------------------

_CAPTURE = (
    "id, transaction_id, amount, final, posting_id, idempotency_key, request_hash, created_at"
)


async def insert_capture(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    sql = text(
        f"""
        INSERT INTO transactions.captures (
            id, transaction_id, amount, final, posting_id, idempotency_key, request_hash)
        VALUES (:id, :transaction_id, :amount, :final, :posting_id, :idempotency_key,
                :request_hash)
        RETURNING {_CAPTURE}
        """
    )
    return (await conn.execute(sql, values)).one()


async def capture_by_key(conn: AsyncConnection, txn_id: str, key: str) -> Row[Any] | None:
    sql = text(
        f"SELECT {_CAPTURE} FROM transactions.captures "
        "WHERE transaction_id = :t AND idempotency_key = :k"
    )
    return (await conn.execute(sql, {"t": txn_id, "k": key})).first()


async def captures(conn: AsyncConnection, txn_id: str) -> list[Row[Any]]:
    sql = text(
        f"SELECT {_CAPTURE} FROM transactions.captures WHERE transaction_id = :t ORDER BY id"
    )
    return list((await conn.execute(sql, {"t": txn_id})).all())


# --- refunds ----------------------------------------------------------------------------------

_REFUND = (
    "id, transaction_id, amount, status, reason, posting_id, response_code, auth_code, rrn, "
    "failure_code, idempotency_key, request_hash, created_at, updated_at"
)


async def insert_refund(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    sql = text(
        f"""
        INSERT INTO transactions.refunds (
            id, transaction_id, amount, status, reason, posting_id, idempotency_key,
            request_hash)
        VALUES (:id, :transaction_id, :amount, :status, :reason, :posting_id,
                :idempotency_key, :request_hash)
        RETURNING {_REFUND}
        """
    )
    return (await conn.execute(sql, values)).one()


async def refund_by_key(conn: AsyncConnection, txn_id: str, key: str) -> Row[Any] | None:
    sql = text(
        f"SELECT {_REFUND} FROM transactions.refunds "
        "WHERE transaction_id = :t AND idempotency_key = :k"
    )
    return (await conn.execute(sql, {"t": txn_id, "k": key})).first()


async def get_refund(conn: AsyncConnection, refund_id: str) -> Row[Any]:
    sql = text(f"SELECT {_REFUND} FROM transactions.refunds WHERE id = :id")
    return (await conn.execute(sql, {"id": refund_id})).one()


async def finish_refund(conn: AsyncConnection, refund_id: str, values: dict[str, Any]) -> Row[Any]:
    """A pending refund's outcome (only a pending one changes)."""
    sql = text(
        f"""
        UPDATE transactions.refunds SET
            status = :status, response_code = :response_code, auth_code = :auth_code,
            rrn = :rrn, failure_code = :failure_code, updated_at = now()
        WHERE id = :id AND status = 'pending'
        RETURNING {_REFUND}
        """
    )
    params = {"response_code": None, "auth_code": None, "rrn": None, "failure_code": None}
    return (await conn.execute(sql, {**params, **values, "id": refund_id})).one()


async def refunds(conn: AsyncConnection, txn_id: str) -> list[Row[Any]]:
    sql = text(f"SELECT {_REFUND} FROM transactions.refunds WHERE transaction_id = :t ORDER BY id")
    return list((await conn.execute(sql, {"t": txn_id})).all())


async def succeeded_refunds(conn: AsyncConnection, txn_id: str) -> int:
    sql = text(
        "SELECT coalesce(sum(amount), 0) FROM transactions.refunds "
        "WHERE transaction_id = :t AND status = 'succeeded'"
    )
    return int((await conn.execute(sql, {"t": txn_id})).scalar_one())


async def lock_next_stuck_refund(
    conn: AsyncConnection, deadline_seconds: int, skip: list[str]
) -> Row[Any] | None:
    sql = text(
        f"""
        SELECT {_REFUND} FROM transactions.refunds
        WHERE status = 'pending' AND created_at <= now() - make_interval(secs => :deadline)
          AND id <> ALL (:skip)
        ORDER BY created_at LIMIT 1
        FOR UPDATE SKIP LOCKED
        """
    )
    return (await conn.execute(sql, {"deadline": deadline_seconds, "skip": skip})).first()


# --- increments -------------------------------------------------------------------------------

_INCREMENT = (
    "id, transaction_id, amount, status, hold_id, response_code, decline_code, auth_code, stan, "
    "rrn, idempotency_key, request_hash, created_at, updated_at"
)


async def insert_increment(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    sql = text(
        f"""
        INSERT INTO transactions.increments (
            id, transaction_id, amount, status, hold_id, decline_code, idempotency_key,
            request_hash, rrn)
        VALUES (:id, :transaction_id, :amount, :status, :hold_id, :decline_code,
                :idempotency_key, :request_hash, :rrn)
        RETURNING {_INCREMENT}
        """
    )
    # A card increment's `rrn` is written before the network is asked (see `new_rrn`).
    params = {"hold_id": None, "decline_code": None, "rrn": None, **values}
    return (await conn.execute(sql, params)).one()


async def increment_by_key(conn: AsyncConnection, txn_id: str, key: str) -> Row[Any] | None:
    sql = text(
        f"SELECT {_INCREMENT} FROM transactions.increments "
        "WHERE transaction_id = :t AND idempotency_key = :k"
    )
    return (await conn.execute(sql, {"t": txn_id, "k": key})).first()


async def finish_increment(
    conn: AsyncConnection, increment_id: str, values: dict[str, Any]
) -> Row[Any]:
    sql = text(
        f"""
        UPDATE transactions.increments SET
            status = :status, response_code = :response_code, decline_code = :decline_code,
            auth_code = :auth_code, stan = :stan,
            -- The RRN written before the network was asked stays when no answer names one.
            rrn = COALESCE(CAST(:rrn AS text), rrn), updated_at = now()
        WHERE id = :id AND status = 'pending'
        RETURNING {_INCREMENT}
        """
    )
    params = {
        "response_code": None,
        "decline_code": None,
        "auth_code": None,
        "stan": None,
        "rrn": None,
    }
    return (await conn.execute(sql, {**params, **values, "id": increment_id})).one()


async def get_increment(conn: AsyncConnection, increment_id: str) -> Row[Any]:
    sql = text(f"SELECT {_INCREMENT} FROM transactions.increments WHERE id = :id")
    return (await conn.execute(sql, {"id": increment_id})).one()


async def increment_transaction(conn: AsyncConnection, increment_id: str) -> str:
    sql = text("SELECT transaction_id FROM transactions.increments WHERE id = :id")
    return str((await conn.execute(sql, {"id": increment_id})).scalar_one())


async def increments(conn: AsyncConnection, txn_id: str) -> list[Row[Any]]:
    sql = text(
        f"SELECT {_INCREMENT} FROM transactions.increments WHERE transaction_id = :t ORDER BY id"
    )
    return list((await conn.execute(sql, {"t": txn_id})).all())


async def lock_next_stuck_increment(
    conn: AsyncConnection, deadline_seconds: int, skip: list[str]
) -> Row[Any] | None:
    sql = text(
        f"""
        SELECT {_INCREMENT} FROM transactions.increments
        WHERE status = 'pending' AND created_at <= now() - make_interval(secs => :deadline)
          AND id <> ALL (:skip)
        ORDER BY created_at LIMIT 1
        FOR UPDATE SKIP LOCKED
        """
    )
    return (await conn.execute(sql, {"deadline": deadline_seconds, "skip": skip})).first()


async def mark_advised(conn: AsyncConnection, capture_id: str) -> None:
    await conn.execute(
        text("UPDATE transactions.captures SET advised_at = now() WHERE id = :id"),
        {"id": capture_id},
    )


async def lock_next_unadvised(
    conn: AsyncConnection, older_than_seconds: int, skip: list[str]
) -> Row[Any] | None:
    """A card capture whose completion advice was never acknowledged (a crash after commit)."""
    sql = text(
        f"""
        SELECT {", ".join("c." + c.strip() for c in _CAPTURE.split(","))}
        FROM transactions.captures c
        JOIN transactions.transactions t ON t.id = c.transaction_id
        WHERE c.advised_at IS NULL AND t.source = 'card'
          AND c.created_at <= now() - make_interval(secs => :older)
          AND c.id <> ALL (:skip)
        ORDER BY c.created_at LIMIT 1
        FOR UPDATE OF c SKIP LOCKED
        """
    )
    return (await conn.execute(sql, {"older": older_than_seconds, "skip": skip})).first()
