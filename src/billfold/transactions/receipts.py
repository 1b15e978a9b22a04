"""PDF receipts: one per capture and one per refund, kept in the `BlobStore`.

The receipts consumer renders a receipt moments after a capture or refund event (idempotent by
the inbox, and by its deterministic blob key and `source_id` primary key); `receipt_pdf` serves
it to the owner and renders it on the spot if it is asked for before the consumer got to it.
A receipt names the card by brand and last 4 digits only: billfold never has a PAN outside
the vault, and the vault is not asked.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime
from reportlab.lib.pagesizes import A6
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import users
from billfold.platform.blobs import BlobStore
from billfold.platform.bus.consumers import Consumer
from billfold.platform.errors import NotFound
from billfold.platform.money import Money
from billfold.transactions import events

Kind = Literal["capture", "refund"]
PDF = "application/pdf"

# Helvetica (built into every PDF reader, nothing to ship) covers WinAnsi (Latin-1 and a few
# more); characters it lacks are drawn as "?" rather than as an empty box.
_WINANSI = "cp1252"
# Babel separates some currency amounts with a narrow no-break space, which WinAnsi lacks.
_SPACES = {"\u202f": " ", "\u2009": " ", "\u200f": "", "\u200e": ""}


@dataclass(frozen=True)
class ReceiptData:
    """Everything printed on a receipt (nothing secret: the card is brand + last 4)."""

    kind: Kind
    source_id: str  # the capture or refund id
    transaction_id: str
    merchant_name: str
    merchant_city: str | None
    merchant_country: str | None
    amount: int
    currency: str
    occurred_at: datetime
    card_brand: str | None  # None with card_last4 None: paid from the wallet balance
    card_last4: str | None
    auth_code: str | None
    locale: str
    time_zone: str


def _printable(value: str) -> str:
    for old, new in _SPACES.items():
        value = value.replace(old, new)
    return value.encode(_WINANSI, errors="replace").decode(_WINANSI)


def _locale(code: str) -> str:
    try:
        return str(Locale.parse(code))
    except (UnknownLocaleError, ValueError):
        return "en_US"


def receipt_lines(data: ReceiptData) -> list[tuple[str, str]]:
    """The receipt's label/value lines, formatted in the user's locale and time zone."""
    locale = _locale(data.locale)
    try:
        zone = ZoneInfo(data.time_zone)
    except (KeyError, ValueError):
        zone = ZoneInfo("UTC")
    amount = Money(data.amount, data.currency)
    when = format_datetime(data.occurred_at, "medium", tzinfo=zone, locale=locale)
    if data.card_last4:
        payment = f"{(data.card_brand or 'Card').title()} ending {data.card_last4}"
    else:
        payment = "Wallet balance"
    place = ", ".join(p for p in (data.merchant_city, data.merchant_country) if p)
    lines = [
        ("Merchant", data.merchant_name),
        ("Location", place or "-"),
        ("Amount refunded" if data.kind == "refund" else "Amount paid", amount.display(locale)),
        ("Currency", data.currency),
        ("Date", f"{when} ({zone.key})"),
        ("Paid with", payment),
        ("Authorization code", data.auth_code or "-"),
        ("Transaction", data.transaction_id),
        ("Refund" if data.kind == "refund" else "Capture", data.source_id),
    ]
    return [(label, _printable(value)) for label, value in lines]


def render_receipt(data: ReceiptData) -> bytes:
    """The receipt as a one-page PDF (A6). `invariant` output: the same data gives the same
    bytes, so a re-rendered receipt is the same file."""
    buffer = io.BytesIO()
    _, height = A6
    pdf = Canvas(buffer, pagesize=A6, invariant=True, pageCompression=0)
    title = "Refund receipt" if data.kind == "refund" else "Payment receipt"
    pdf.setTitle(f"billfold {title.lower()} {data.source_id}")
    pdf.setAuthor("billfold")
    y = height - 14 * mm
    pdf.setFont("Helvetica-Bold", 14)
    pdf.drawString(10 * mm, y, f"billfold - {title}")
    y -= 10 * mm
    for label, value in receipt_lines(data):
        pdf.setFont("Helvetica", 7)
        pdf.drawString(10 * mm, y, label)
        pdf.setFont("Helvetica-Bold", 9)
        pdf.drawString(10 * mm, y - 4 * mm, value[:60])
        y -= 10 * mm
    pdf.setFont("Helvetica", 6)
    pdf.drawString(10 * mm, 8 * mm, "Keep this receipt for your records.")
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def blob_key(user_id: str, transaction_id: str, source_id: str) -> str:
    return f"receipts/{user_id}/{transaction_id}/{source_id}.pdf"


# --- SQL ------------------------------------------------------------------------------------

_SOURCE = text(
    """
    SELECT s.kind, s.id AS source_id, s.amount, s.created_at AS occurred_at,
           t.id AS transaction_id, t.user_id, t.currency, t.merchant_name,
           coalesce(s.auth_code, t.auth_code) AS auth_code,
           d.merchant_city, d.merchant_country, d.card_brand, d.card_last4
    FROM (
        SELECT 'capture' AS kind, id, transaction_id, amount, created_at,
               CAST(NULL AS text) AS auth_code
        FROM transactions.captures WHERE id = :source_id
        UNION ALL
        -- A card refund carries the issuer's own approval code.
        SELECT 'refund', id, transaction_id, amount, created_at, auth_code
        FROM transactions.refunds WHERE id = :source_id AND status = 'succeeded'
    ) s
    JOIN transactions.transactions t ON t.id = s.transaction_id
    LEFT JOIN transactions.transaction_details d ON d.transaction_id = t.id
    """
)
_INSERT = text(
    """
    INSERT INTO transactions.receipts
        (source_id, transaction_id, kind, amount, currency, blob_key, created_at)
    VALUES (:source_id, :transaction_id, :kind, :amount, :currency, :blob_key, now())
    ON CONFLICT (source_id) DO NOTHING
    """
)
_GET = text(
    """
    SELECT r.source_id, r.blob_key FROM transactions.receipts r
    WHERE r.transaction_id = :transaction_id
      AND (CAST(:source_id AS text) IS NULL OR r.source_id = :source_id)
    ORDER BY r.created_at DESC, r.source_id DESC
    LIMIT 1
    """
)
# The newest capture or succeeded refund of a transaction (or the one asked for): what a
# receipt can be made of when the consumer has not made it yet.
_LATEST_SOURCE = text(
    """
    SELECT id FROM (
        SELECT id, created_at FROM transactions.captures WHERE transaction_id = :transaction_id
        UNION ALL
        SELECT id, created_at FROM transactions.refunds
        WHERE transaction_id = :transaction_id AND status = 'succeeded'
    ) s
    WHERE CAST(:source_id AS text) IS NULL OR id = :source_id
    ORDER BY created_at DESC, id DESC
    LIMIT 1
    """
)


async def write_receipt(conn: AsyncConnection, blobs: BlobStore, source_id: str) -> str | None:
    """Render and store the receipt of capture or refund `source_id`; its blob key, or None
    when there is no such capture or succeeded refund. Safe to repeat: the same key is
    rewritten with the same bytes and the row is inserted once."""
    row = (await conn.execute(_SOURCE, {"source_id": source_id})).first()
    if row is None:
        return None
    party = await users.get_party(conn, row.user_id)
    data = ReceiptData(
        kind=row.kind,
        source_id=row.source_id,
        transaction_id=row.transaction_id,
        merchant_name=row.merchant_name,
        merchant_city=row.merchant_city,
        merchant_country=row.merchant_country,
        amount=row.amount,
        currency=row.currency,
        occurred_at=row.occurred_at,
        card_brand=row.card_brand,
        card_last4=row.card_last4,
        auth_code=row.auth_code,
        locale=party.locale if party else "en_US",
        time_zone=party.timezone if party else "UTC",
    )
    # Rendering is CPU work (a few ms): off the event loop.
    pdf = await asyncio.to_thread(render_receipt, data)
    key = blob_key(row.user_id, row.transaction_id, row.source_id)
    # The blob first: if the row's transaction then fails, a retry rewrites the same key.
    await blobs.put(key, pdf, PDF)
    await conn.execute(
        _INSERT,
        {
            "source_id": row.source_id,
            "transaction_id": row.transaction_id,
            "kind": row.kind,
            "amount": row.amount,
            "currency": row.currency,
            "blob_key": key,
        },
    )
    return key


async def receipt_pdf(
    conn: AsyncConnection, blobs: BlobStore, transaction_id: str, source_id: str | None
) -> tuple[str, bytes]:
    """The receipt (source id, PDF bytes) of the caller's transaction — the caller checked the
    owner. The newest one unless `source_id` names a capture or refund; 404 `receipt_not_found`
    when the transaction has no capture or refund (yet)."""
    found = (
        await conn.execute(_GET, {"transaction_id": transaction_id, "source_id": source_id})
    ).first()
    key: str | None = found.blob_key if found else None
    source = found.source_id if found else None
    if found is None:
        latest = (
            await conn.execute(
                _LATEST_SOURCE, {"transaction_id": transaction_id, "source_id": source_id}
            )
        ).first()
        if latest is not None:
            source = latest.id
            key = await write_receipt(conn, blobs, latest.id)
    blob = await blobs.get(key) if key is not None else None
    if blob is None and source is not None:  # the row outlived its blob: render it again
        key = await write_receipt(conn, blobs, source)
        blob = await blobs.get(key) if key is not None else None
    if blob is None or source is None:
        raise NotFound(
            "This transaction has no receipt: nothing was captured or refunded yet",
            code="receipt_not_found",
        )
    return source, blob[0]


def source_of(event: dict[str, Any]) -> str | None:
    """The capture or refund id of a `payment.captured` / `payment.refunded` event."""
    data = event.get("data") or {}
    for member in ("capture", "refund"):
        value = data.get(member)
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return str(value["id"])
        if isinstance(value, str):
            return value
    return None


def receipt_consumers(blobs: BlobStore) -> list[Consumer]:
    """The worker's consumer that writes a receipt for every capture and succeeded refund."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        source_id = source_of(event)
        if source_id:
            await write_receipt(conn, blobs, source_id)

    types = frozenset({events.PAYMENT_CAPTURED, events.PAYMENT_REFUNDED})
    return [Consumer("transactions.receipts", types, handle)]
