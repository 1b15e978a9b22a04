"""Idempotency keys: a retried request gets the first answer, never a second effect.

The record is written in the same transaction as the request's effects, and a
transaction-scoped advisory lock on the key turns a concurrent duplicate into 409.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.clock import utcnow
from billfold.platform.errors import Conflict, Unprocessable
from billfold.platform.keys import SealedBox

MAX_KEY_LENGTH = 255

_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended(:scope || ' ' || :key, 7))")
_FIND = text(
    """
    SELECT request_hash, status_code, response_headers, response_body
    FROM platform.idempotency_keys
    WHERE scope = :scope AND key = :key AND expires_at > now()
    """
)
_SAVE = text(
    """
    INSERT INTO platform.idempotency_keys
        (scope, key, method, path, request_hash, status_code, response_headers, response_body,
         created_at, expires_at)
    VALUES (:scope, :key, :method, :path, :request_hash, :status_code,
            CAST(:response_headers AS jsonb), :response_body, :now, :expires_at)
    ON CONFLICT (scope, key) DO UPDATE SET
        method = EXCLUDED.method, path = EXCLUDED.path, request_hash = EXCLUDED.request_hash,
        status_code = EXCLUDED.status_code, response_headers = EXCLUDED.response_headers,
        response_body = EXCLUDED.response_body, created_at = EXCLUDED.created_at,
        expires_at = EXCLUDED.expires_at
    """
)
_PURGE = text("DELETE FROM platform.idempotency_keys WHERE expires_at <= now()")


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


def fingerprint_key(secret: str) -> bytes:
    """The HMAC key for request fingerprints, derived from the process secret."""
    return hashlib.sha256(b"billfold-idempotency\0" + secret.encode()).digest()


def request_fingerprint(method: str, path: str, body: bytes, key: bytes) -> str:
    """Keyed, so a stored fingerprint of a body that holds a password cannot be tested offline
    against guesses."""
    message = b"\0".join([method.encode(), path.encode(), body])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Unprocessable(
            "Idempotency-Key must be 1 to 255 printable characters",
            code="invalid_idempotency_key",
        )


def _aad(scope: str, key: str) -> bytes:
    return f"idempotency\0{scope}\0{key}".encode()


async def claim(
    conn: AsyncConnection, scope: str, key: str, fingerprint: str, sealed: SealedBox
) -> StoredResponse | None:
    """Lock the key for this transaction and return the stored response, if any."""
    locked = (await conn.execute(_LOCK, {"scope": scope, "key": key})).scalar_one()
    # Looked up after the lock attempt, so the read sees a first request that committed while
    # we asked. Unlocked: another request holds the key; if the first one has committed, that
    # is only a concurrent retry (replay it too), otherwise the first is still running.
    row = (await conn.execute(_FIND, {"scope": scope, "key": key})).first()
    if row is None:
        if not locked:
            raise Conflict(
                "A request with this Idempotency-Key is still being processed; retry later",
                code="idempotency_request_in_progress",
                headers={"Retry-After": "1"},
            )
        return None
    if row.request_hash != fingerprint:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request",
            code="idempotency_key_reuse",
        )
    return StoredResponse(
        status_code=row.status_code,
        headers=[tuple(h) for h in row.response_headers],  # type: ignore[misc]
        body=sealed.open(bytes(row.response_body), _aad(scope, key)),
    )


async def save(
    conn: AsyncConnection,
    *,
    scope: str,
    key: str,
    method: str,
    path: str,
    fingerprint: str,
    response: StoredResponse,
    ttl_seconds: int,
    sealed: SealedBox,
) -> None:
    """Store the response sealed: bodies may hold tokens or secrets shown only once."""
    now = utcnow()
    await conn.execute(
        _SAVE,
        {
            "scope": scope,
            "key": key,
            "method": method,
            "path": path,
            "request_hash": fingerprint,
            "status_code": response.status_code,
            "response_headers": json.dumps(response.headers),
            "response_body": sealed.seal(response.body, _aad(scope, key)),
            "now": now,
            "expires_at": now + timedelta(seconds=ttl_seconds),
        },
    )


async def purge_expired(conn: AsyncConnection) -> int:
    """Delete records past their retention (24 h by default); run by the worker."""
    result = await conn.execute(_PURGE)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
