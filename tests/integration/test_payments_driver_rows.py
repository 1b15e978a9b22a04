"""The card payment's hot statements run on asyncpg's own connection (`DriverStatement`): the
key lookup and the insert in tx1, the conditional finish in tx2. What they answer must be the
payment exactly as SQLAlchemy's `store.get` reads it (same columns, same values, same Python
types: jsonb decoded, double precision a float, timestamptz aware), since views, events and the flow's
later steps use those rows; and the API must answer the same payment the same way whichever
statement produced the row."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from billfold.platform.events import outbox_written
from billfold.transactions import events as payment_events
from billfold.transactions import store
from tests.conftest import SignedIn
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import pay, payment_body

pytestmark = pytest.mark.usefixtures("network_simulator")


def _typed(row: Any) -> dict[str, tuple[type, Any]]:
    return {k: (type(v), v) for k, v in row._mapping.items()}


async def _get(app: Any, txn_id: str) -> Any:
    async with app.state.resources.engine.connect() as conn:
        row = await store.get(conn, txn_id)
    assert row is not None
    return row


async def _card_payment(client: httpx.AsyncClient, alice: SignedIn, key: str) -> dict[str, Any]:
    method = await add_card(client, alice)
    assert method["status"] == "verified", method
    r = await pay(client, alice, payment_body("card", method["id"], amount=4_321), key=key)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "authorized"
    return dict(r.json())


async def test_the_api_answers_the_same_payment_from_every_statement(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    key = uuid.uuid4().hex
    first = await _card_payment(client, alice, key)  # tx2's row (finish_authorizing)
    method_id = first["payment_method_id"]
    replay = await pay(client, alice, payment_body("card", method_id, amount=4_321), key=key)
    assert replay.status_code == 201, replay.text  # by_idempotency_key's row
    assert replay.headers.get("idempotent-replayed") == "true"
    got = await client.get(f"/v1/payments/{first['id']}", headers=alice.headers)
    assert got.status_code == 200, got.text  # SQLAlchemy's row
    assert first == replay.json() == got.json()
    assert first["merchant"]["latitude"] == 37.8044 and first["card"]["last4"]


async def test_driver_rows_are_sqlalchemys_rows_value_for_value(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    key = uuid.uuid4().hex
    txn_id = (await _card_payment(client, alice, key))["id"]
    expected = await _get(app, txn_id)
    assert expected.timings and isinstance(expected.latitude, float)
    assert expected.created_at.tzinfo is not None

    engine = app.state.resources.engine
    async with engine.connect() as conn:
        await conn.begin()
        await conn.execute(text("SELECT 1"))  # BEGIN sent: the lookup goes on the driver
        found = await store.by_idempotency_key(conn, alice.user["id"], key)
        assert await store.by_idempotency_key(conn, alice.user["id"], "no-such-key") is None
        await conn.rollback()
    assert found is not None
    assert found._fields == expected._fields
    assert _typed(found) == _typed(expected)
    assert found.status == "authorized" and found[0] == txn_id

    # tx2's statement on an autocommit connection: the payment put back to `authorizing` (as
    # tx1 leaves it) and finished again, its details and timings written by the same statement.
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(
            text("UPDATE transactions.transactions SET status = 'authorizing' WHERE id = :t"),
            {"t": txn_id},
        )
        values = {
            "status": "declined",
            "decline_code": "do_not_honor",
            "risk_action": "review",
            "risk_reasons": ["velocity", "new_device"],
            "stand_in": False,
            "timings": {"db": 1.5, "network": 2},
        }
        event = payment_events.event(
            payment_events.PAYMENT_DECLINED, {**dict(expected._mapping), **values}
        )
        finished = await store.finish_authorizing(conn, txn_id, values, event)
        assert outbox_written(conn)
    assert finished is not None
    now = await _get(app, txn_id)
    assert finished._fields == now._fields
    assert _typed(finished) == _typed(now)
    assert finished.risk_action == "review" and finished.stand_in is False
    assert finished.timings == {"db": 1.5, "network": 2}
    assert finished.updated_at.tzinfo is not None
