"""Helpers for payment tests: request bodies, paying, the wallet's balance, a card's vault id (the
simulator keeps its holds by card), outbox events, a swappable risk check."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import text

from billfold.transactions import PaymentRisk, RiskDecision
from tests.conftest import SignedIn

COFFEE = {
    "id": "mch_bluebottle",
    "name": "Blue Bottle Coffee",
    "mcc": "5814",
    "country": "US",
    "city": "Oakland",
    "latitude": 37.8044,
    "longitude": -122.2712,
}


def payment_body(
    source: str = "wallet",
    method_id: str | None = None,
    amount: Any = 1_000,
    currency: Any = "USD",
    **overrides: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": source,
        "amount": amount,
        "currency": currency,
        "merchant": dict(COFFEE),
        "channel": "in_app",
        "description": "Flat white",
    }
    if method_id is not None:
        body["payment_method_id"] = method_id
    body.update(overrides)
    return body


async def pay(
    client: httpx.AsyncClient,
    who: SignedIn,
    body: dict[str, Any],
    key: str | None = None,
    **headers: str,
) -> httpx.Response:
    return await client.post(
        "/v1/payments",
        json=body,
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex, **headers},
    )


async def act(
    client: httpx.AsyncClient,
    who: SignedIn,
    payment_id: str,
    verb: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
) -> httpx.Response:
    """POST /v1/payments/{id}/{verb} (capture, void, refunds, increment, resume)."""
    return await client.post(
        f"/v1/payments/{payment_id}/{verb}",
        json=body if body is not None else {},
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


@dataclass(frozen=True)
class Balance:
    available: int
    held: int


async def balance(client: httpx.AsyncClient, who: SignedIn, currency: str = "USD") -> Balance:
    r = await client.get("/v1/wallet", headers=who.headers)
    assert r.status_code == 200, r.text
    for b in r.json()["balances"]:
        if b["currency"] == currency:
            return Balance(b["available"], b["held"])
    return Balance(0, 0)


async def sql(app: Any, query: str, **params: Any) -> list[Any]:
    async with app.state.resources.engine.connect() as conn:
        return list((await conn.execute(text(query), params)).all())


async def vault_card_id(app: Any, method_id: str) -> str:
    (row,) = await sql(
        app, "SELECT vault_card_id FROM payment_methods.methods WHERE id = :m", m=method_id
    )
    return str(row.vault_card_id)


async def events(app: Any, type_: str, subject: str) -> list[dict[str, Any]]:
    rows = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE type = :t AND subject = :s ORDER BY seq",
        t=type_,
        s=subject,
    )
    return [dict(r.data) for r in rows]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait until `check()` holds (advices and reversals reach the simulator asynchronously)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@dataclass
class Always:
    """A risk check that answers `action` (until stepped up, for `challenge`), and remembers
    what it was asked."""

    action: str
    seen: list[PaymentRisk] = field(default_factory=list)

    async def assess(self, conn: Any, payment: PaymentRisk) -> RiskDecision:
        self.seen.append(payment)
        if self.action == "challenge" and payment.stepped_up:
            return RiskDecision("allow")
        return RiskDecision(self.action, 900, ("test",))  # type: ignore[arg-type]


@contextmanager
def risk(app: Any, check: Any) -> Iterator[Any]:
    rt = app.state.transactions
    previous, rt.risk = rt.risk, check
    try:
        yield check
    finally:
        rt.risk = previous


def authorizations(simulator: Any, txn_id: str) -> list[Any]:
    """The 0100 authorizations the simulator received for one payment."""
    return [m for m in simulator.messages("0100") if m.private.get("TX") == txn_id]
