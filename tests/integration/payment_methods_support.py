"""Helpers for tests that need cards and bank accounts: request bodies, a verified card, a
verified bank account (its micro-deposits read the way the user reads a bank statement), and
the wallet funding calls that now name a payment method."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import httpx
from schwifty import IBAN

from billfold import payment_methods
from billfold.network import TEST_CARD_RULES
from billfold.platform.db import unit_of_work
from tests.conftest import SignedIn

# Approved by the simulated network (any card without a rule; see billfold.network.simulated).
VISA = "4242424242424242"
CVV = "123"
ADDRESS = {
    "line1": "1 Infinite Loop",
    "city": "Cupertino",
    "region": "CA",
    "postal_code": "95014",
    "country": "US",
}


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def new_pan(prefix: str = "4", length: int = 16, suffix: str = "") -> str:
    """A random Luhn-valid number; with `suffix`, one ending in it (a simulator test card)."""
    if suffix:
        # Fix the check digit inside the random middle: try middles until the whole passes.
        while True:
            middle = "".join(
                str(secrets.randbelow(10)) for _ in range(length - len(prefix) - len(suffix))
            )
            pan = prefix + middle + suffix
            if luhn_digit(pan[:-1]) == pan[-1]:
                return pan
    # A random card must not end like one of the simulator's test cards (…9979 is "stolen").
    while True:
        body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - len(prefix) - 1))
        pan = body + luhn_digit(body)
        if pan[-4:] not in TEST_CARD_RULES:
            return pan


def card_body(pan: str | None = None, **overrides: Any) -> dict[str, Any]:
    card: dict[str, Any] = {
        "pan": pan or new_pan(),
        "expiry_month": 12,
        "expiry_year": 2031,
        "cvv": CVV,
        "cardholder_name": "Alice Example",
        "billing_address": ADDRESS,
    }
    card.update(overrides)
    return {"card": card}


def new_account_number() -> str:
    return str(secrets.randbelow(10**11) + 10**10)


def us_bank_body(**overrides: Any) -> dict[str, Any]:
    account: dict[str, Any] = {
        "routing_number": "021000021",
        "account_number": new_account_number(),
        "account_type": "checking",
    }
    account.update(overrides)
    return {"bank_account": account}


def new_iban(country: str = "DE") -> str:
    if country == "GB":
        return str(
            IBAN.generate(
                "GB", bank_code="NWBK601613", account_code=f"{secrets.randbelow(10**8):08d}"
            )
        )
    return str(
        IBAN.generate(
            "DE", bank_code="37040044", account_code=str(secrets.randbelow(10**9) + 10**9)
        )
    )


def iban_body(country: str = "DE", **overrides: Any) -> dict[str, Any]:
    account: dict[str, Any] = {"iban": new_iban(country)}
    account.update(overrides)
    return {"bank_account": account}


async def add(
    client: httpx.AsyncClient, who: SignedIn, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/payment-methods",
        json=body,
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


async def add_card(client: httpx.AsyncClient, who: SignedIn, **card: Any) -> dict[str, Any]:
    r = await add(client, who, card_body(**card))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def deposits(app: Any, who: SignedIn, method_id: str) -> tuple[int, int]:
    """The two amounts the simulated ACH deposited (what the user's bank statement shows)."""
    async with unit_of_work(app.state.resources.engine) as uow:
        found = await payment_methods.micro_deposit_amounts(
            await uow.connection(), method_id, who.user["id"]
        )
    assert found is not None
    return found


async def verify(
    client: httpx.AsyncClient, who: SignedIn, method_id: str, amounts: list[int]
) -> httpx.Response:
    return await client.post(
        f"/v1/payment-methods/{method_id}/verify",
        json={"amounts": amounts},
        headers={**who.headers, "Idempotency-Key": uuid.uuid4().hex},
    )


async def add_bank(
    client: httpx.AsyncClient, app: Any, who: SignedIn, currency: str = "USD"
) -> dict[str, Any]:
    """A verified bank account in `currency` (US for USD, German IBAN for EUR, British for GBP)."""
    body = us_bank_body() if currency == "USD" else iban_body("GB" if currency == "GBP" else "DE")
    r = await add(client, who, body)
    assert r.status_code == 201, r.text
    method = r.json()
    a, b = await deposits(app, who, method["id"])
    r = await verify(client, who, method["id"], [b, a])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "verified"
    return r.json()  # type: ignore[no-any-return]


class Funding:
    """Per user: one verified card (top-ups in any currency) and a verified bank account per
    currency (withdrawals), made on first use."""

    def __init__(self, client: httpx.AsyncClient, app: Any) -> None:
        self.client, self.app = client, app
        self._cards: dict[str, str] = {}
        self._banks: dict[tuple[str, str], str] = {}

    async def card(self, who: SignedIn) -> str:
        uid = who.user["id"]
        if uid not in self._cards:
            self._cards[uid] = (await add_card(self.client, who))["id"]
        return self._cards[uid]

    async def bank(self, who: SignedIn, currency: str = "USD") -> str:
        key = (who.user["id"], currency)
        if key not in self._banks:
            self._banks[key] = (await add_bank(self.client, self.app, who, currency))["id"]
        return self._banks[key]


async def topup(
    client: httpx.AsyncClient,
    who: SignedIn,
    method_id: str,
    amount: Any,
    currency: Any = "USD",
    key: str | None = None,
) -> httpx.Response:
    return await client.post(
        "/v1/wallet/topups",
        json={"payment_method_id": method_id, "amount": amount, "currency": currency},
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


async def withdraw(
    client: httpx.AsyncClient,
    who: SignedIn,
    method_id: str,
    amount: Any,
    currency: Any = "USD",
    key: str | None = None,
) -> httpx.Response:
    return await client.post(
        "/v1/wallet/withdrawals",
        json={"payment_method_id": method_id, "amount": amount, "currency": currency},
        headers={**who.headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )
