"""Helpers shared by the vault tests: fresh card numbers, rows and outbox events read by SQL."""

from __future__ import annotations

import secrets
from datetime import date
from typing import Any

from sqlalchemy import text

from billfold.vault import CryptogramRequest, LocalVault
from billfold.vault.emv import luhn_check_digit


def new_pan(prefix: str = "4", length: int = 16) -> str:
    """A random Luhn-valid card number (outside the token BIN range)."""
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)


def new_owner() -> str:
    from billfold.platform.ids import new_id

    return new_id("usr")


def purchase(token_id: str, **overrides: Any) -> CryptogramRequest:
    values: dict[str, Any] = {
        "token_id": token_id,
        "amount": 1234,
        "currency_numeric": "840",
        "country_numeric": "840",
        "transaction_date": date.today(),
        "unpredictable_number": secrets.token_hex(4).upper(),
        "channel": "ecommerce",
    }
    values.update(overrides)
    return CryptogramRequest(**values)


async def sql(vault: LocalVault, query: str, **params: Any) -> list[dict[str, Any]]:
    async with vault.engine.connect() as conn:
        result = await conn.execute(text(query), params)
        return [dict(r._mapping) for r in result]


async def sql_exec(vault: LocalVault, query: str, **params: Any) -> None:
    async with vault.engine.begin() as conn:
        await conn.execute(text(query), params)


async def events_of(vault: LocalVault, card_id: str) -> list[dict[str, Any]]:
    """The card's vault events in the order they were written."""
    return await sql(
        vault,
        "SELECT type, subject, source, data FROM platform.outbox"
        " WHERE aggregate_id = :card_id ORDER BY seq",
        card_id=card_id,
    )
