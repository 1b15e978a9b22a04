"""The vault's SQL (schema `vault`). Ciphertexts in, ciphertexts out: nothing here sees a PAN."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold.platform.driver import DriverStatement

# --- data keys --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrappedKey:
    id: str
    kek_version: int
    wrapped: bytes


_CURRENT_DATA_KEY = text(
    "SELECT id, kek_version, wrapped FROM vault.data_keys WHERE retired_at IS NULL"
)
_RETIRE_CURRENT_DATA_KEY = text(
    "UPDATE vault.data_keys SET retired_at = now() WHERE retired_at IS NULL"
)
# The partial unique index on "not retired" makes a second concurrent creator insert nothing.
_INSERT_DATA_KEY = text(
    """
    INSERT INTO vault.data_keys (id, kek_version, wrapped) VALUES (:id, :kek_version, :wrapped)
    ON CONFLICT DO NOTHING RETURNING id
    """
)
_DATA_KEY = text("SELECT id, kek_version, wrapped FROM vault.data_keys WHERE id = :id")
_LOCK_DATA_KEY = text(
    "SELECT id, kek_version, wrapped FROM vault.data_keys WHERE id = :id FOR UPDATE"
)
_DATA_KEYS_BELOW = text(
    """
    SELECT id FROM vault.data_keys WHERE kek_version < :kek_version AND id > :after
    ORDER BY id LIMIT :limit
    """
)
_REWRAP = text(
    """
    UPDATE vault.data_keys SET kek_version = :kek_version, wrapped = :wrapped, rewrapped_at = now()
    WHERE id = :id
    """
)
_KEK_VERSIONS = text(
    "SELECT kek_version, count(*) AS n FROM vault.data_keys GROUP BY kek_version ORDER BY 1"
)


async def current_data_key(conn: AsyncConnection) -> WrappedKey | None:
    row = (await conn.execute(_CURRENT_DATA_KEY)).first()
    return WrappedKey(row.id, row.kek_version, row.wrapped) if row else None


async def insert_data_key(conn: AsyncConnection, key: WrappedKey) -> bool:
    result = await conn.execute(
        _INSERT_DATA_KEY, {"id": key.id, "kek_version": key.kek_version, "wrapped": key.wrapped}
    )
    return result.first() is not None


async def retire_current_data_key(conn: AsyncConnection) -> None:
    await conn.execute(_RETIRE_CURRENT_DATA_KEY)


async def data_key(conn: AsyncConnection, key_id: str, *, lock: bool = False) -> WrappedKey | None:
    row = (await conn.execute(_LOCK_DATA_KEY if lock else _DATA_KEY, {"id": key_id})).first()
    return WrappedKey(row.id, row.kek_version, row.wrapped) if row else None


async def data_keys_below(
    conn: AsyncConnection, kek_version: int, *, after: str, limit: int
) -> list[str]:
    result = await conn.execute(
        _DATA_KEYS_BELOW, {"kek_version": kek_version, "after": after, "limit": limit}
    )
    return [r.id for r in result]


async def rewrap(conn: AsyncConnection, key_id: str, kek_version: int, wrapped: bytes) -> None:
    await conn.execute(_REWRAP, {"id": key_id, "kek_version": kek_version, "wrapped": wrapped})


async def data_keys_per_kek_version(conn: AsyncConnection) -> dict[int, int]:
    return {r.kek_version: r.n for r in await conn.execute(_KEK_VERSIONS)}


# --- cards ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardRow:
    id: str
    owner_id: str
    fingerprint: bytes
    bin: str
    last4: str
    data_key_id: str
    pan_sealed: bytes | None
    name_sealed: bytes | None
    expiry_month: int
    expiry_year: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


_CARD_COLUMNS = (
    "id, owner_id, fingerprint, bin, last4, data_key_id, pan_sealed, name_sealed, expiry_month, "
    "expiry_year, created_at, updated_at, deleted_at"
)
_INSERT_CARD = text(
    f"""
    INSERT INTO vault.cards (id, owner_id, fingerprint, bin, last4, data_key_id, pan_sealed,
                             name_sealed, expiry_month, expiry_year)
    VALUES (:id, :owner_id, :fingerprint, :bin, :last4, :data_key_id, :pan_sealed, :name_sealed,
            :expiry_month, :expiry_year)
    ON CONFLICT (owner_id, fingerprint) WHERE deleted_at IS NULL DO NOTHING
    RETURNING {_CARD_COLUMNS}
    """
)
_LIVE_CARD_BY_FINGERPRINT = text(
    f"""
    SELECT {_CARD_COLUMNS} FROM vault.cards
    WHERE owner_id = :owner_id AND fingerprint = :fingerprint AND deleted_at IS NULL
    """
)
_LIVE_CARD = text(f"SELECT {_CARD_COLUMNS} FROM vault.cards WHERE id = :id AND deleted_at IS NULL")
_LOCK_LIVE_CARD = text(
    f"SELECT {_CARD_COLUMNS} FROM vault.cards WHERE id = :id AND deleted_at IS NULL FOR UPDATE"
)
_UPDATE_CARD = text(
    f"""
    UPDATE vault.cards
    SET fingerprint = :fingerprint, bin = :bin, last4 = :last4, data_key_id = :data_key_id,
        pan_sealed = :pan_sealed, name_sealed = :name_sealed, expiry_month = :expiry_month,
        expiry_year = :expiry_year, updated_at = now()
    WHERE id = :id
    RETURNING {_CARD_COLUMNS}
    """
)
# The PAN and the name are wiped; the row stays for the audit trail's references.
_DELETE_CARD = text(
    """
    UPDATE vault.cards
    SET deleted_at = now(), updated_at = now(), delete_reason = :reason,
        pan_sealed = NULL, name_sealed = NULL
    WHERE id = :id AND deleted_at IS NULL
    """
)


def _card(row: Any) -> CardRow:
    return CardRow(**row._mapping)


async def insert_card(conn: AsyncConnection, **values: Any) -> CardRow | None:
    """None when the owner already has a live card with this fingerprint."""
    row = (await conn.execute(_INSERT_CARD, values)).first()
    return _card(row) if row else None


async def live_card_by_fingerprint(
    conn: AsyncConnection, owner_id: str, fingerprint: bytes
) -> CardRow | None:
    row = (
        await conn.execute(
            _LIVE_CARD_BY_FINGERPRINT, {"owner_id": owner_id, "fingerprint": fingerprint}
        )
    ).first()
    return _card(row) if row else None


async def live_card(conn: AsyncConnection, card_id: str, *, lock: bool = False) -> CardRow | None:
    row = (await conn.execute(_LOCK_LIVE_CARD if lock else _LIVE_CARD, {"id": card_id})).first()
    return _card(row) if row else None


async def update_card(conn: AsyncConnection, **values: Any) -> CardRow:
    row = (await conn.execute(_UPDATE_CARD, values)).one()
    return _card(row)


async def delete_card(conn: AsyncConnection, card_id: str, reason: str) -> None:
    await conn.execute(_DELETE_CARD, {"id": card_id, "reason": reason})


# --- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRow:
    id: str
    card_id: str
    owner_id: str
    token_reference_id: str
    token_bin: str
    issuer_key_id: str
    data_key_id: str
    dpan_sealed: bytes
    dpan_last4: str
    psn: str
    expiry_month: int
    expiry_year: int
    status: str
    device_id: str | None
    channels: list[str]
    merchant_id: str | None
    atc: int
    last_verified_atc: int
    created_at: datetime
    updated_at: datetime


_TOKEN_COLUMNS = (
    "id, card_id, owner_id, token_reference_id, token_bin, issuer_key_id, data_key_id, "
    "dpan_sealed, dpan_last4, psn, expiry_month, expiry_year, status, device_id, channels, "
    "merchant_id, atc, last_verified_atc, created_at, updated_at"
)
_INSERT_TOKEN = text(
    f"""
    INSERT INTO vault.tokens (id, card_id, owner_id, token_reference_id, token_bin, issuer_key_id,
                              data_key_id, dpan_sealed, dpan_index, dpan_last4, expiry_month,
                              expiry_year, status, device_id, channels, merchant_id)
    VALUES (:id, :card_id, :owner_id, :token_reference_id, :token_bin, :issuer_key_id,
            :data_key_id, :dpan_sealed, :dpan_index, :dpan_last4, :expiry_month, :expiry_year,
            'active', :device_id, CAST(:channels AS text[]), :merchant_id)
    ON CONFLICT (dpan_index) DO NOTHING
    RETURNING {_TOKEN_COLUMNS}
    """
)
# On the driver's connection (platform.driver): with _NEXT_ATC and _ACCEPT_ATC, the statements of
# every card payment's cryptogram and its verification, where SQLAlchemy's per-statement layers
# were most of the vault's CPU.
_TOKEN = DriverStatement(text(f"SELECT {_TOKEN_COLUMNS} FROM vault.tokens WHERE id = :id"))
_TOKEN_BY_DPAN = text(f"SELECT {_TOKEN_COLUMNS} FROM vault.tokens WHERE dpan_index = :dpan_index")
_CARD_TOKENS = text(
    f"SELECT {_TOKEN_COLUMNS} FROM vault.tokens WHERE card_id = :card_id ORDER BY id"
)
_SET_STATUS = text(
    f"""
    UPDATE vault.tokens
    SET status = :to_status, status_reason = :reason, updated_at = now(),
        deleted_at = CASE WHEN :to_status = 'deleted' THEN now() END
    WHERE id = :id AND status = ANY (CAST(:from_statuses AS text[]))
    RETURNING {_TOKEN_COLUMNS}
    """
)
_DELETE_CARD_TOKENS = text(
    f"""
    UPDATE vault.tokens
    SET status = 'deleted', status_reason = :reason, updated_at = now(), deleted_at = now()
    WHERE card_id = :card_id AND status <> 'deleted'
    RETURNING {_TOKEN_COLUMNS}
    """
)
# Atomic: concurrent cryptograms on one token each get their own ATC (the row lock orders them).
# One round trip on the happy path: the token is active, unexpired and used within its domain,
# or nothing changes (a refusal uses no ATC) and the caller reads the row to say why.
_NEXT_ATC = DriverStatement(
    text(
        f"""
    UPDATE vault.tokens SET atc = atc + 1
    WHERE id = :id AND status = 'active' AND atc < 65535
      AND expiry_year * 12 + expiry_month >= :month_index
      AND :channel = ANY (channels)
      AND (device_id IS NULL OR device_id = :device_id)
      AND (merchant_id IS NULL OR merchant_id = :merchant_id)
    RETURNING {_TOKEN_COLUMNS}
    """
    )
)
# Accepts an ATC only above every one accepted before (and one that was really issued).
# An ATC the vault issued is accepted once: above the highest accepted (the window slides up), or
# below it by less than ATC_WINDOW and not yet accepted (the bit says so). Atomic: of two
# verifications of one ATC, one sets the bit. The token must still be active: the caller's read
# of it is a separate statement (no transaction), and a suspension or deletion committed between
# the two must refuse the cryptogram, not accept it (the UPDATE re-reads a row changed under it).
ATC_WINDOW = 64
_ACCEPT_ATC = DriverStatement(
    text(
        """
    UPDATE vault.tokens SET
        verified_atcs = CASE
            WHEN :atc > last_verified_atc THEN
                CASE WHEN :atc - last_verified_atc >= 64 THEN 1::bigint
                     ELSE (verified_atcs << (:atc - last_verified_atc)) | 1::bigint END
            ELSE verified_atcs | (1::bigint << (last_verified_atc - :atc)) END,
        last_verified_atc = greatest(last_verified_atc, :atc)
    WHERE id = :id AND status = 'active' AND :atc BETWEEN 1 AND atc
      AND (:atc > last_verified_atc
           OR (last_verified_atc - :atc < 64
               AND verified_atcs & (1::bigint << (last_verified_atc - :atc)) = 0))
    RETURNING id
    """
    )
)


def _token(row: Mapping[Any, Any]) -> TokenRow:
    """From a row's mapping: SQLAlchemy's (`row._mapping`) or the driver's record, the same
    values either way (the statements are untyped `text()`, so SQLAlchemy converts nothing)."""
    values = dict(row)
    values["channels"] = list(values["channels"])
    return TokenRow(**values)


async def insert_token(conn: AsyncConnection, **values: Any) -> TokenRow | None:
    """None when the DPAN (by its index) is taken: the caller draws another."""
    row = (await conn.execute(_INSERT_TOKEN, values)).first()
    return _token(row._mapping) if row else None


async def token(conn: AsyncConnection, token_id: str) -> TokenRow | None:
    row = await _TOKEN.fetchrow(conn, {"id": token_id})
    return _token(row) if row is not None else None


async def token_by_dpan_index(conn: AsyncConnection, dpan_index: bytes) -> TokenRow | None:
    row = (await conn.execute(_TOKEN_BY_DPAN, {"dpan_index": dpan_index})).first()
    return _token(row._mapping) if row else None


async def card_tokens(conn: AsyncConnection, card_id: str) -> list[TokenRow]:
    return [_token(r._mapping) for r in await conn.execute(_CARD_TOKENS, {"card_id": card_id})]


async def set_token_status(
    conn: AsyncConnection, token_id: str, *, to: str, from_: tuple[str, ...], reason: str
) -> TokenRow | None:
    """None when the token is not in one of `from_` (the caller tells why)."""
    row = (
        await conn.execute(
            _SET_STATUS,
            {"id": token_id, "to_status": to, "from_statuses": list(from_), "reason": reason},
        )
    ).first()
    return _token(row._mapping) if row else None


async def delete_card_tokens(conn: AsyncConnection, card_id: str, reason: str) -> list[TokenRow]:
    result = await conn.execute(_DELETE_CARD_TOKENS, {"card_id": card_id, "reason": reason})
    return [_token(r._mapping) for r in result]


async def next_atc(
    conn: AsyncConnection,
    token_id: str,
    *,
    month_index: int,
    channel: str,
    device_id: str | None,
    merchant_id: str | None,
) -> TokenRow | None:
    """The token with its next ATC taken, or None (nothing changed) if it is not active, has
    expired (`month_index` = year * 12 + month of today), is used outside its domain or has
    exhausted its counter."""
    row = await _NEXT_ATC.fetchrow(
        conn,
        {
            "id": token_id,
            "month_index": month_index,
            "channel": channel,
            "device_id": device_id,
            "merchant_id": merchant_id,
        },
    )
    return _token(row) if row is not None else None


async def accept_atc(conn: AsyncConnection, token_id: str, atc: int) -> bool:
    return await _ACCEPT_ATC.fetchrow(conn, {"id": token_id, "atc": atc}) is not None


# --- issuer master keys -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuerKeyRow:
    id: str
    token_bin: str
    version: int
    data_key_id: str
    key_sealed: bytes


_ISSUER_KEY_COLUMNS = "id, token_bin, version, data_key_id, key_sealed"
_CURRENT_ISSUER_KEY = text(
    f"""
    SELECT {_ISSUER_KEY_COLUMNS} FROM vault.issuer_keys
    WHERE token_bin = :token_bin AND retired_at IS NULL
    """
)
_ISSUER_KEY = text(f"SELECT {_ISSUER_KEY_COLUMNS} FROM vault.issuer_keys WHERE id = :id")
_INSERT_ISSUER_KEY = text(
    """
    INSERT INTO vault.issuer_keys (id, token_bin, version, data_key_id, key_sealed)
    SELECT :id, :token_bin, coalesce(max(version), 0) + 1, :data_key_id, :key_sealed
    FROM vault.issuer_keys WHERE token_bin = :token_bin
    ON CONFLICT DO NOTHING
    RETURNING id
    """
)


def _issuer_key(row: Any) -> IssuerKeyRow:
    return IssuerKeyRow(**row._mapping)


async def current_issuer_key(conn: AsyncConnection, token_bin: str) -> IssuerKeyRow | None:
    row = (await conn.execute(_CURRENT_ISSUER_KEY, {"token_bin": token_bin})).first()
    return _issuer_key(row) if row else None


async def issuer_key(conn: AsyncConnection, key_id: str) -> IssuerKeyRow | None:
    row = (await conn.execute(_ISSUER_KEY, {"id": key_id})).first()
    return _issuer_key(row) if row else None


async def insert_issuer_key(
    conn: AsyncConnection, *, key_id: str, token_bin: str, data_key_id: str, key_sealed: bytes
) -> bool:
    """False when another process created the BIN's current key first."""
    result = await conn.execute(
        _INSERT_ISSUER_KEY,
        {
            "id": key_id,
            "token_bin": token_bin,
            "data_key_id": data_key_id,
            "key_sealed": key_sealed,
        },
    )
    return result.first() is not None


# --- detokenisation audit ---------------------------------------------------------------------

# The audit row and the card it reveals in one statement: no row is read for revealing without
# its audit row written by the same statement (and transaction). By token, the token must be in
# one of `statuses`; nothing is written when the card or token does not qualify.
_AUDITED_CARD = text(
    f"""
    WITH card AS (
        SELECT c.*, t.id AS via_token FROM vault.cards c
        LEFT JOIN vault.tokens t ON t.id = :token_id AND t.card_id = c.id
        WHERE c.deleted_at IS NULL
          AND CASE WHEN CAST(:token_id AS text) IS NULL THEN c.id = :card_id
                   ELSE c.id = (SELECT card_id FROM vault.tokens WHERE id = :token_id)
                        AND t.status = ANY (CAST(:statuses AS text[])) END
    ), audit AS (
        INSERT INTO vault.detokenizations (requester, purpose, card_id, token_id)
        SELECT :requester, :purpose, card.id, card.via_token FROM card
        RETURNING seq
    )
    SELECT {", ".join("card." + c.strip() for c in _CARD_COLUMNS.split(","))}, audit.seq
    FROM card, audit
    """
)


async def audited_card(
    conn: AsyncConnection,
    *,
    card_id: str | None,
    token_id: str | None,
    statuses: tuple[str, ...],
    requester: str,
    purpose: str,
) -> CardRow | None:
    """The live card to reveal, with its audit row written; None (nothing written) if the card
    is not live or, by token, the token is missing or not in `statuses`."""
    row = (
        await conn.execute(
            _AUDITED_CARD,
            {
                "card_id": card_id,
                "token_id": token_id,
                "statuses": list(statuses),
                "requester": requester,
                "purpose": purpose,
            },
        )
    ).first()
    if row is None:
        return None
    values = dict(row._mapping)
    values.pop("seq")
    return CardRow(**values)
