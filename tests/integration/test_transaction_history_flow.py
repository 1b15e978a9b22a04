"""The history end to end with the real payment flow: payments made over HTTP (`POST
/v1/payments`, a wallet hold or a card through the ISO 8583 simulator), captured and refunded in
parts; their outbox events feed the receipts consumer; then search, one transaction, the
receipts, the CSV and the summary show them, and only to their owner."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from typing import Any

import httpx
from pypdf import PdfReader
from sqlalchemy import text

from billfold.platform.bus.consumers import ConsumerSink
from billfold.transactions import PAYMENT_CAPTURED, PAYMENT_REFUNDED, receipt_consumers
from tests.conftest import SignedIn, fund, sign_up
from tests.integration.payment_methods_support import add_card

STARBUCKS = {
    "id": "mch_starbucks_1912",
    "name": "Starbucks",
    "mcc": "5814",
    "country": "US",
    "city": "Seattle",
}


async def post(
    client: httpx.AsyncClient, who: SignedIn, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    r = await client.post(
        path, json=body, headers={**who.headers, "Idempotency-Key": uuid.uuid4().hex}
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def pdf_text(data: bytes) -> str:
    return "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(data)).pages)


async def deliver_receipt_events(app: Any, payment_id: str) -> int:
    """Hand the payment's committed capture/refund events, as the relay would, to the receipts
    consumer; twice, as a redelivery would. Returns how many there were."""
    async with app.state.resources.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT id, type, data FROM platform.outbox "
                    "WHERE subject = :s AND type = ANY(:types) ORDER BY seq"
                ),
                {"s": payment_id, "types": [PAYMENT_CAPTURED, PAYMENT_REFUNDED]},
            )
        ).all()
    sink = ConsumerSink(app.state.resources.engine, receipt_consumers(app.state.blobs))
    for _ in range(2):
        for row in rows:
            data = row.data if isinstance(row.data, dict) else json.loads(row.data)
            await sink({"id": row.id, "type": row.type, "data": data})
    return len(rows)


async def test_wallet_payment_through_history_receipts_csv_and_summary(
    app: Any, client: httpx.AsyncClient
) -> None:
    me, other = await sign_up(client), await sign_up(client)
    await fund(app, me.user["id"], 10_000)
    payment = await post(
        client,
        me,
        "/v1/payments",
        {
            "source": "wallet",
            "amount": 1_000,
            "currency": "USD",
            "merchant": STARBUCKS,
            "channel": "in_app",
            "description": "Flat white",
            "note": "with Sam",
        },
    )
    pid = payment["id"]
    assert payment["status"] == "authorized"
    await post(client, me, f"/v1/payments/{pid}/capture", {"amount": 600})
    await post(client, me, f"/v1/payments/{pid}/capture", {})
    refund = await post(client, me, f"/v1/payments/{pid}/refunds", {"amount": 250})
    assert await deliver_receipt_events(app, pid) == 3

    r = await client.get("/v1/transactions", params={"q": "starbuks"}, headers=me.headers)
    assert [t["id"] for t in r.json()["data"]] == [pid]
    r = await client.get("/v1/transactions", params={"q": "sam"}, headers=me.headers)
    assert [t["id"] for t in r.json()["data"]] == [pid]  # the note
    r = await client.get("/v1/transactions", params={"q": "starbuks"}, headers=other.headers)
    assert r.json()["data"] == []
    detail = (await client.get(f"/v1/transactions/{pid}", headers=me.headers)).json()
    assert detail["status"] == "partially_refunded"
    assert detail["captured_amount"] == 1_000 and detail["refunded_amount"] == 250
    assert [c["amount"] for c in detail["captures"]] == [600, 400]
    assert [x["id"] for x in detail["refunds"]] == [refund["id"]]
    assert sorted((x["kind"], x["amount"]) for x in detail["receipts"]) == [
        ("capture", 400),
        ("capture", 600),
        ("refund", 250),
    ]
    assert detail["card"] is None and detail["source"] == "wallet"

    newest = await client.get(f"/v1/transactions/{pid}/receipt", headers=me.headers)
    assert newest.status_code == 200
    body = pdf_text(newest.content)
    assert "Refund receipt" in body and "$2.50" in body and "Starbucks" in body
    assert "Wallet balance" in body and pid in body
    first_capture = detail["captures"][0]["id"]
    r = await client.get(
        f"/v1/transactions/{pid}/receipt", params={"source_id": first_capture}, headers=me.headers
    )
    assert "$6.00" in pdf_text(r.content) and "Payment receipt" in pdf_text(r.content)
    r = await client.get(f"/v1/transactions/{pid}/receipt", headers=other.headers)
    assert r.status_code == 404 and r.json()["code"] == "transaction_not_found"

    r = await client.get("/v1/transactions/export.csv", headers=me.headers)
    (row,) = list(csv.DictReader(io.StringIO(r.text)))
    assert (row["id"], row["amount"], row["captured"], row["refunded"]) == (
        pid,
        "10.00",
        "10.00",
        "2.50",
    )
    r = await client.get("/v1/transactions/export.csv", headers=other.headers)
    assert list(csv.DictReader(io.StringIO(r.text))) == []

    summary = (await client.get("/v1/transactions/summary", headers=me.headers)).json()
    assert summary["currencies"] == [
        {
            "currency": "USD",
            "total": 750,
            "categories": [
                {"category": "restaurants", "label": "Restaurants", "amount": 750, "count": 1}
            ],
        }
    ]
    theirs = (await client.get("/v1/transactions/summary", headers=other.headers)).json()
    assert theirs["currencies"] == []


async def test_card_payment_receipt_names_brand_and_last4_only(
    app: Any, client: httpx.AsyncClient, network_simulator: Any
) -> None:
    me = await sign_up(client)
    card = await add_card(client, me)
    assert card["status"] == "verified", card
    last4 = card["card"]["last4"]
    payment = await post(
        client,
        me,
        "/v1/payments",
        {
            "source": "card",
            "payment_method_id": card["id"],
            "amount": 4_321,
            "currency": "USD",
            "merchant": {**STARBUCKS, "name": "Coffee Corner", "id": "mch_corner"},
            "channel": "ecommerce",
        },
    )
    pid = payment["id"]
    assert payment["status"] == "authorized", payment
    await post(client, me, f"/v1/payments/{pid}/capture", {})
    assert await deliver_receipt_events(app, pid) == 1

    r = await client.get("/v1/transactions", params={"q": "coffe"}, headers=me.headers)
    (item,) = r.json()["data"]
    assert item["id"] == pid and item["card"] == {"brand": card["card"]["brand"], "last4": last4}
    receipt = await client.get(f"/v1/transactions/{pid}/receipt", headers=me.headers)
    body = pdf_text(receipt.content)
    assert "Coffee Corner" in body and "$43.21" in body
    assert f"ending {last4}" in body and (payment["auth_code"] or "-") in body
    # The card number is nowhere in it: only its last 4 digits.
    assert not re.search(r"\d{12,19}", body.replace(" ", ""))

    # A refund through the network: its receipt carries the issuer's approval of the refund.
    refund = await post(client, me, f"/v1/payments/{pid}/refunds", {"amount": 1_000})
    assert refund["status"] == "succeeded", refund
    assert await deliver_receipt_events(app, pid) == 2
    async with app.state.resources.engine.connect() as conn:
        refund_code = await conn.scalar(
            text("SELECT auth_code FROM transactions.refunds WHERE id = :r"), {"r": refund["id"]}
        )
    body = pdf_text(
        (await client.get(f"/v1/transactions/{pid}/receipt", headers=me.headers)).content
    )
    assert "Refund receipt" in body and "$10.00" in body and refund["id"] in body
    assert refund_code and refund_code in body


async def test_the_worker_makes_the_receipt_after_a_capture(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    """The real relay and consumer (`billfold worker`'s `run_background`, sharing the API's
    runtimes as `billfold up` does): a capture's receipt exists moments later, in the store."""
    import asyncio

    from billfold.jobs import run_background

    me = await sign_up(client)
    await fund(app, me.user["id"], 5_000)
    payment = await post(
        client,
        me,
        "/v1/payments",
        {
            "source": "wallet",
            "amount": 875,
            "currency": "USD",
            "merchant": {**STARBUCKS, "name": "Relay Roasters", "id": "mch_relay"},
            "channel": "contactless",
        },
    )
    await post(client, me, f"/v1/payments/{payment['id']}/capture", {})
    engine = app.state.resources.engine
    stop = asyncio.Event()
    runner = asyncio.create_task(run_background(engine, settings, stop, p2p_runtime=app.state.p2p))
    try:
        key = None
        for _ in range(200):
            async with engine.connect() as conn:
                key = await conn.scalar(
                    text("SELECT blob_key FROM transactions.receipts WHERE transaction_id = :t"),
                    {"t": payment["id"]},
                )
            if key is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
    assert key is not None, "the worker made no receipt"
    stored = await app.state.blobs.get(key)
    assert stored is not None and "Relay Roasters" in pdf_text(stored[0])
    assert "$8.75" in pdf_text(stored[0])
