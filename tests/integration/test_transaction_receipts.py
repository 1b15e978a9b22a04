"""PDF receipts: one per capture and per refund, made by the receipts consumer (once, however
often an event is delivered) or at the first download, kept in the BlobStore (a directory, and
S3 on a real moto server), served only to the owner and readable by a PDF reader."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from pypdf import PdfReader
from sqlalchemy import text

from billfold.app import create_app
from billfold.config import Settings
from billfold.platform.bus.consumers import ConsumerSink
from billfold.transactions import events
from billfold.transactions.receipts import receipt_consumers
from tests.conftest import make_settings, sign_up
from tests.integration.history_support import add_transaction, source_ids
from tests.integration.test_blobs import BUCKET, REGION, _objects, aws_env, moto_url, s3

__all__ = ["aws_env", "moto_url", "s3"]  # module fixtures of the S3 tests, reused here


def pdf_text(data: bytes) -> str:
    assert data.startswith(b"%PDF-")
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


async def receipt_rows(app: Any, transaction_id: str) -> list[Any]:
    async with app.state.resources.engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT source_id, kind, amount, blob_key FROM transactions.receipts "
                "WHERE transaction_id = :t ORDER BY created_at, source_id"
            ),
            {"t": transaction_id},
        )
        return list(result.all())


async def test_receipt_pdf_has_amount_merchant_and_no_card_number(
    app: Any, client: httpx.AsyncClient
) -> None:
    me = await sign_up(client)
    txn = await add_transaction(
        app, me.user["id"], merchant="Starbucks Reserve", amount=1234, mcc="5814"
    )
    r = await client.get(f"/v1/transactions/{txn}/receipt", headers=me.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    (capture,) = (await source_ids(app, txn))["capture"]
    assert f'filename="receipt-{capture}.pdf"' in r.headers["content-disposition"]
    body = pdf_text(r.content)
    for expected in (
        "Payment receipt",
        "Starbucks Reserve",
        "$12.34",
        "USD",
        "Visa ending 4242",
        "A1B2C3",
        txn,
        capture,
        "Seattle, US",
    ):
        assert expected in body, (expected, body)
    assert not re.search(r"\d{12,19}", body)  # never a card number
    # Made once, on this first download, and then served from the blob store.
    rows = await receipt_rows(app, txn)
    assert [(x.source_id, x.kind, x.amount) for x in rows] == [(capture, "capture", 1234)]
    again = await client.get(f"/v1/transactions/{txn}/receipt", headers=me.headers)
    assert again.content == r.content
    detail = (await client.get(f"/v1/transactions/{txn}", headers=me.headers)).json()
    assert [x["source_id"] for x in detail["receipts"]] == [capture]


async def test_refund_receipt_in_the_users_locale_and_time_zone(
    app: Any, client: httpx.AsyncClient
) -> None:
    from datetime import UTC, datetime

    me = await sign_up(client)
    r = await client.patch(
        "/v1/me", json={"locale": "de_DE", "timezone": "Europe/Berlin"}, headers=me.headers
    )
    assert r.status_code == 200, r.text
    at = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)  # 1 April, 01:30 in Berlin
    txn = await add_transaction(
        app,
        me.user["id"],
        merchant="Bäckerei Müller",
        amount=2000,
        refunded=750,
        currency="EUR",
        card=None,
        created_at=at,
        city="Berlin",
        country="DE",
    )
    ids = await source_ids(app, txn)
    (refund,) = ids["refund"]
    r = await client.get(
        f"/v1/transactions/{txn}/receipt", params={"source_id": refund}, headers=me.headers
    )
    assert r.status_code == 200, r.text
    body = pdf_text(r.content)
    for expected in (
        "Refund receipt",
        "Bäckerei Müller",
        "7,50",
        "€",
        "01.04.2026",
        "01:30",
        "Europe/Berlin",
        "Wallet balance",
        refund,
    ):
        assert expected in body, (expected, body)
    cap = await client.get(
        f"/v1/transactions/{txn}/receipt",
        params={"source_id": ids["capture"][0]},
        headers=me.headers,
    )
    assert "20,00" in pdf_text(cap.content) and "Payment receipt" in pdf_text(cap.content)


async def test_receipts_only_for_the_owner_and_only_when_something_was_captured(
    app: Any, client: httpx.AsyncClient
) -> None:
    me, other = await sign_up(client), await sign_up(client)
    mine = await add_transaction(app, me.user["id"])
    theirs = await add_transaction(app, other.user["id"])
    pending = await add_transaction(app, me.user["id"], status="authorized")
    r = await client.get(f"/v1/transactions/{theirs}/receipt", headers=me.headers)
    assert r.status_code == 404 and r.json()["code"] == "transaction_not_found"
    r = await client.get(f"/v1/transactions/{pending}/receipt", headers=me.headers)
    assert r.status_code == 404 and r.json()["code"] == "receipt_not_found"
    # Another transaction's capture id, through my own transaction: not found either.
    other_capture = (await source_ids(app, theirs))["capture"][0]
    r = await client.get(
        f"/v1/transactions/{mine}/receipt",
        params={"source_id": other_capture},
        headers=me.headers,
    )
    assert r.status_code == 404 and r.json()["code"] == "receipt_not_found"
    assert await receipt_rows(app, theirs) == []
    r = await client.get(
        f"/v1/transactions/{mine}/receipt", params={"source_id": "x"}, headers=me.headers
    )
    assert r.status_code == 422


async def test_consumer_writes_each_receipt_once(app: Any, client: httpx.AsyncClient) -> None:
    me = await sign_up(client)
    txn = await add_transaction(app, me.user["id"], merchant="Coffee Corner", refunded=250)
    ids = await source_ids(app, txn)
    blobs = app.state.blobs
    sink = ConsumerSink(app.state.resources.engine, receipt_consumers(blobs))
    captured = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": events.PAYMENT_CAPTURED,
        "data": {"transaction_id": txn, "capture": {"id": ids["capture"][0]}},
    }
    refunded = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": events.PAYMENT_REFUNDED,
        "data": {"transaction_id": txn, "refund": {"id": ids["refund"][0]}},
    }
    for event in (captured, refunded, captured, refunded):  # redelivered: no second effect
        await sink(event)
    rows = await receipt_rows(app, txn)
    assert sorted((x.kind, x.source_id) for x in rows) == sorted(
        [("capture", ids["capture"][0]), ("refund", ids["refund"][0])]
    )
    for row in rows:
        stored = await blobs.get(row.blob_key)
        assert stored is not None and stored[1] == "application/pdf"
        assert "Coffee Corner" in pdf_text(stored[0])
    # The newest receipt is the refund's.
    r = await client.get(f"/v1/transactions/{txn}/receipt", headers=me.headers)
    assert "Refund receipt" in pdf_text(r.content)


async def test_receipts_in_s3(settings: Settings, s3: Any, moto_url: str, tmp_path: Path) -> None:
    prefix = f"rcpt-{uuid.uuid4().hex}"
    app_settings = make_settings(
        settings.database_url,
        settings.redis_url,
        tmp_path,
        secret_key=settings.secret_key,
        blob_store="s3",
        s3_bucket=BUCKET,
        s3_prefix=prefix,
        s3_endpoint_url=moto_url,
        s3_region=REGION,
    )
    app = create_app(app_settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            me = await sign_up(client)
            txn = await add_transaction(app, me.user["id"], merchant="Starbucks", amount=450)
            r = await client.get(f"/v1/transactions/{txn}/receipt", headers=me.headers)
            assert r.status_code == 200, r.text
            keys = _objects(s3, f"{prefix}/receipts/{me.user['id']}/{txn}/")
            assert len(keys) == 1 and keys[0].endswith(".pdf")
            obj = s3.get_object(Bucket=BUCKET, Key=keys[0])
            assert obj["ContentType"] == "application/pdf"
            assert obj["ServerSideEncryption"] == "AES256"
            stored = obj["Body"].read()
            assert stored == r.content
            assert "Starbucks" in pdf_text(stored) and "$4.50" in pdf_text(stored)
            # Lost from the bucket: made again from the database on the next download.
            s3.delete_object(Bucket=BUCKET, Key=keys[0])
            again = await client.get(f"/v1/transactions/{txn}/receipt", headers=me.headers)
            assert again.status_code == 200 and again.content == r.content
            assert _objects(s3, f"{prefix}/receipts/{me.user['id']}/{txn}/") == keys
