"""KYC submissions, their audit trail, and the user's KYC status and tier."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.pagination import fetch_page

_SUBMISSION_COLUMNS = (
    "id, user_id, legal_name, date_of_birth, address, document_type, document_country, "
    "document_number_last4, status, tier, checks, reason, decided_by, created_at, decided_at"
)


async def get_user_kyc(
    conn: AsyncConnection, user_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    """What KYC needs to know about a user; `for_update` serialises KYC changes per user."""
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(
                "SELECT id, date_of_birth, kyc_status, kyc_tier, email_verified_at, "
                f"phone_verified_at FROM users.users WHERE id = :id{lock}"
            ),
            {"id": user_id},
        )
    ).first()


async def set_user_kyc(
    conn: AsyncConnection, user_id: str, status: str, tier: int, now: datetime
) -> None:
    await conn.execute(
        text(
            "UPDATE users.users SET kyc_status = :status, kyc_tier = :tier, updated_at = :now "
            "WHERE id = :id"
        ),
        {"id": user_id, "status": status, "tier": tier, "now": now},
    )


async def insert_submission(conn: AsyncConnection, values: dict[str, Any]) -> None:
    params = dict(values)
    params["address"] = json.dumps(values["address"])
    await conn.execute(
        text(
            """
            INSERT INTO users.kyc_submissions (id, user_id, legal_name, date_of_birth, address,
                document_type, document_country, document_number_last4, document_number_hash,
                status, tier, created_at)
            VALUES (:id, :user_id, :legal_name, :date_of_birth, CAST(:address AS jsonb),
                :document_type, :document_country, :document_number_last4,
                :document_number_hash, 'pending', 0, :now)
            """
        ),
        params,
    )


async def record_outcome(
    conn: AsyncConnection,
    submission_id: str,
    *,
    status: str,
    tier: int,
    checks: list[dict[str, Any]] | None,
    reason: str | None,
    decided_by: str | None,
    decided_at: datetime | None,
) -> None:
    """Set a submission's status; `checks=None` keeps the checks already recorded."""
    await conn.execute(
        text(
            """
            UPDATE users.kyc_submissions
            SET status = :status, tier = :tier,
                checks = COALESCE(CAST(:checks AS jsonb), checks),
                reason = :reason, decided_by = :decided_by, decided_at = :decided_at
            WHERE id = :id
            """
        ),
        {
            "id": submission_id,
            "status": status,
            "tier": tier,
            "checks": None if checks is None else json.dumps(checks),
            "reason": reason,
            "decided_by": decided_by,
            "decided_at": decided_at,
        },
    )


async def get_submission(
    conn: AsyncConnection,
    submission_id: str,
    *,
    user_id: str | None = None,
    for_update: bool = False,
) -> Row[Any] | None:
    """One submission; with `user_id`, only if it belongs to that user."""
    lock = " FOR UPDATE" if for_update else ""
    return (
        await conn.execute(
            text(
                f"SELECT {_SUBMISSION_COLUMNS} FROM users.kyc_submissions "
                "WHERE id = :id AND (CAST(:uid AS text) IS NULL OR user_id = :uid)" + lock
            ),
            {"id": submission_id, "uid": user_id},
        )
    ).first()


async def latest_submission(conn: AsyncConnection, user_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            text(
                f"SELECT {_SUBMISSION_COLUMNS} FROM users.kyc_submissions WHERE user_id = :uid "
                "ORDER BY id DESC LIMIT 1"
            ),
            {"uid": user_id},
        )
    ).first()


async def list_user_submissions(
    conn: AsyncConnection, user_id: str, limit: int, after: str | None
) -> list[Row[Any]]:
    """Newest first."""
    return await fetch_page(
        conn,
        f"SELECT {_SUBMISSION_COLUMNS} FROM users.kyc_submissions WHERE user_id = :uid",
        {"uid": user_id},
        limit=limit,
        after=after,
    )


async def list_in_review(conn: AsyncConnection, limit: int, after: str | None) -> list[Row[Any]]:
    """The review queue, oldest first (ids are time-sortable)."""
    return await fetch_page(
        conn,
        f"SELECT {_SUBMISSION_COLUMNS} FROM users.kyc_submissions WHERE status = 'review'",
        {},
        limit=limit,
        after=after,
        newest_first=False,
    )


async def count_submissions_since(conn: AsyncConnection, user_id: str, since: datetime) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "SELECT count(*) FROM users.kyc_submissions "
                    "WHERE user_id = :uid AND created_at > :since"
                ),
                {"uid": user_id, "since": since},
            )
        ).scalar_one()
    )


async def document_used_by_other(conn: AsyncConnection, document_hash: bytes, user_id: str) -> bool:
    """Whether another user has a live (not rejected) submission with this document."""
    return bool(
        (
            await conn.execute(
                text(
                    """
                    SELECT EXISTS (
                        SELECT 1 FROM users.kyc_submissions
                        WHERE document_number_hash = :h AND user_id <> :uid
                          AND status <> 'rejected'
                    )
                    """
                ),
                {"h": document_hash, "uid": user_id},
            )
        ).scalar_one()
    )


async def had_sanctions_concern(conn: AsyncConnection, user_id: str) -> bool:
    """Whether an earlier submission of this user was rejected with a sanctions hit."""
    return bool(
        (
            await conn.execute(
                text(
                    """
                    SELECT EXISTS (
                        SELECT 1 FROM users.kyc_submissions s,
                             jsonb_array_elements(s.checks) AS c
                        WHERE s.user_id = :uid AND s.status = 'rejected'
                          AND c->>'name' = 'sanctions' AND c->>'result' <> 'pass'
                    )
                    """
                ),
                {"uid": user_id},
            )
        ).scalar_one()
    )


async def insert_audit(
    conn: AsyncConnection,
    *,
    user_id: str,
    submission_id: str | None,
    from_status: str,
    to_status: str,
    actor: str,
    reason: str | None,
    at: datetime,
) -> None:
    await conn.execute(
        text(
            """
            INSERT INTO users.kyc_audit (user_id, submission_id, from_status, to_status, actor,
                reason, at)
            VALUES (:uid, :sid, :from_status, :to_status, :actor, :reason, :at)
            """
        ),
        {
            "uid": user_id,
            "sid": submission_id,
            "from_status": from_status,
            "to_status": to_status,
            "actor": actor,
            "reason": reason,
            "at": at,
        },
    )


async def list_audit(conn: AsyncConnection, submission_id: str) -> list[Row[Any]]:
    return list(
        (
            await conn.execute(
                text(
                    "SELECT from_status, to_status, actor, reason, at FROM users.kyc_audit "
                    "WHERE submission_id = :sid ORDER BY id"
                ),
                {"sid": submission_id},
            )
        ).all()
    )
