"""The card payment's fast path (docs/performance.md, "Card authorizations"): tx1 writes the
payment, its details and its first event in one statement, tx2 is one conditional statement
without BEGIN/COMMIT, and the admission gate queues a burst instead of failing it.

What these statements must still guarantee: each event describes the row as the database wrote
it (its `created_at` is the transaction's `now()`), and an answer that arrives after the payment
left `authorizing` writes nothing at all: no change and no event.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from billfold.platform.clock import rfc3339
from billfold.platform.events import outbox_written
from billfold.transactions import events as payment_events
from billfold.transactions import store
from billfold.transactions.admission import AdmissionGate
from tests.conftest import SignedIn
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import events, pay, payment_body, sql

pytestmark = pytest.mark.usefixtures("network_simulator")


async def _card(client: httpx.AsyncClient, who: SignedIn) -> str:
    method = await add_card(client, who)
    assert method["status"] == "verified", method
    return str(method["id"])


async def test_events_describe_the_rows_as_written(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    method = await _card(client, alice)
    r = await pay(client, alice, payment_body("card", method, amount=2_345))
    assert r.status_code == 201, r.text
    p = r.json()
    (row,) = await sql(
        app,
        "SELECT t.created_at, t.category, t.status, d.timings FROM transactions.transactions t "
        "JOIN transactions.transaction_details d ON d.transaction_id = t.id WHERE t.id = :t",
        t=p["id"],
    )
    (first,) = await events(app, payment_events.PAYMENT_AUTHORIZING, p["id"])
    (last,) = await events(app, payment_events.PAYMENT_AUTHORIZED, p["id"])
    for data in (first, last):
        assert data["created_at"] == rfc3339(row.created_at)
        assert data["category"] == row.category
        assert data["amount"] == 2_345 and data["captured_amount"] == 0
    assert first["status"] == "authorizing" and first["authorized_amount"] == 0
    assert last["status"] == row.status == "authorized" and last["authorized_amount"] == 2_345
    # tx2's own statement recorded the timings up to its write.
    assert row.timings["db"] > 0 and row.timings["network"] > 0


async def test_an_answer_for_a_payment_no_longer_authorizing_writes_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    method = await _card(client, alice)
    r = await pay(client, alice, payment_body("card", method, amount=1_111))
    assert r.status_code == 201, r.text
    txn_id = r.json()["id"]
    before = await sql(
        app, "SELECT count(*) AS n FROM platform.outbox WHERE subject = :t", t=txn_id
    )
    late = payment_events.event(
        payment_events.PAYMENT_DECLINED, {**_mapping(await _row(app, txn_id)), "status": "declined"}
    )
    async with app.state.resources.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        found = await store.finish_authorizing(
            conn, txn_id, {"status": "declined", "decline_code": "do_not_honor"}, late
        )
        assert found is None
        outbox_written(conn)
    after = await sql(app, "SELECT count(*) AS n FROM platform.outbox WHERE subject = :t", t=txn_id)
    assert after[0].n == before[0].n  # no event for a change that did not happen
    (row,) = await sql(
        app, "SELECT status, decline_code FROM transactions.transactions WHERE id = :t", t=txn_id
    )
    assert (row.status, row.decline_code) == ("authorized", None)


async def test_a_burst_beyond_the_admission_limit_queues(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = app.state.transactions
    monkeypatch.setattr(rt, "_admission", AdmissionGate(1, queue_limit=10))
    methods = [await _card(client, alice) for _ in range(3)]
    answers = await asyncio.gather(
        *(pay(client, alice, payment_body("card", m, amount=500)) for m in methods)
    )
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert {a.json()["status"] for a in answers} == {"authorized"}
    # every slot given back, nobody left waiting, nobody refused
    assert (rt.admission.working, rt.admission.waiting, rt.admission.refused) == (0, 0, 0)


async def test_a_payment_past_the_admission_queue_is_refused_429_and_changes_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = app.state.transactions
    gate = AdmissionGate(1, queue_limit=0)  # one payment at a time, none may wait
    monkeypatch.setattr(rt, "_admission", gate)
    method = await _card(client, alice)
    key = uuid.uuid4().hex
    count = "SELECT count(*) AS n FROM transactions.transactions WHERE user_id = :u"
    outbox = (
        "SELECT count(*) AS n FROM platform.outbox "
        "WHERE type LIKE 'billfold.transactions.%' AND data->>'user_id' = :u"
    )
    user_id = alice.user["id"]
    before = ((await sql(app, count, u=user_id))[0].n, (await sql(app, outbox, u=user_id))[0].n)
    async with gate.start():  # another payment is working
        # (a gate that queued it instead would wait for this slot forever: fail, not hang)
        r = await asyncio.wait_for(
            pay(client, alice, payment_body("card", method, amount=700), key=key), 10
        )
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["retry-after"] == "1"
    problem = r.json()
    assert problem["code"] == "overloaded" and problem["status"] == 429
    after = ((await sql(app, count, u=user_id))[0].n, (await sql(app, outbox, u=user_id))[0].n)
    assert after == before  # nothing written: no payment, no event
    assert gate.refused == 1 and gate.working == 0
    # The same key after Retry-After is a fresh attempt, and it goes through.
    again = await pay(client, alice, payment_body("card", method, amount=700), key=key)
    assert again.status_code == 201, again.text
    assert again.json()["status"] == "authorized"
    assert "idempotent-replayed" not in again.headers


async def _row(app: Any, txn_id: str) -> Any:
    async with app.state.resources.engine.connect() as conn:
        return await store.get(conn, txn_id)


def _mapping(row: Any) -> dict[str, Any]:
    return dict(row._mapping)
