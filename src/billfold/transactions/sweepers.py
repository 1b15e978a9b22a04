"""The worker's payment jobs: lapse authorizations, recover what a crash left half-done.

Each payment is handled in its own short transaction (SKIP LOCKED: several workers share the
work), and the network hears about it only after that transaction commits.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold import ledger
from billfold.platform.db import unit_of_work
from billfold.platform.observability import get_logger
from billfold.transactions import declines, events, store
from billfold.transactions.operations import advise_capture, ask_refund, cancel, finish_increment
from billfold.transactions.runtime import TransactionsRuntime
from billfold.transactions.service import (
    original_authorization,
    publish,
    reverse_quietly,
    settled_status,
)

log = get_logger("billfold.transactions.sweepers")

# A card capture's completion advice unacknowledged for this long is sent again.
ADVICE_RETRY_SECONDS = 60


async def expire_authorizations(
    engine: AsyncEngine, rt: TransactionsRuntime, *, batch: int = 200
) -> int:
    """Lapse payments past `expires_at`: what is not captured is released (the wallet hold
    voided, the card's remaining authorization reversed); a payment nothing was captured of is
    `expired`, one partly captured keeps its captures. A step-up nobody answered expires too."""
    done = 0
    skip: list[str] = []
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            row = await store.lock_next_expired(conn, skip)
            if row is None:
                break
            skip.append(row.id)
            release = row.authorized_amount - row.captured_amount - row.released_amount
            if row.status == "challenge_required" or row.captured_amount == 0:
                row = await cancel(conn, row, "expired")
            else:
                released = row.released_amount + release
                refunded = await store.succeeded_refunds(conn, row.id)
                status = settled_status(
                    row.authorized_amount, row.captured_amount, released, refunded
                )
                await store.update(
                    conn,
                    row.id,
                    {"status": status, "released_amount": released, "expires_at": None},
                )
                row = await store.get(conn, row.id)
                assert row is not None
                if row.source == "wallet" and row.hold_id is not None:
                    try:
                        await ledger.void_hold(conn, row.hold_id)
                    except ledger.HoldNotActive:
                        pass
                await publish(conn, events.PAYMENT_EXPIRED, row, released=release)
        if row.source == "card":
            await reverse_quietly(rt, original_authorization(row), release, "expiry", row.id)
        done += 1
    return done


async def recover_stuck_payments(
    engine: AsyncEngine, rt: TransactionsRuntime, *, batch: int = 200
) -> int:
    """Finish what a crash (or a lost connection) left between a payment's two transactions:

    - a payment still `authorizing` after the deadline (counted from when it entered
      `authorizing`) is `failed` (`interrupted`); its authorization, if the issuer made one,
      is reversed by the RRN written before the network was asked;
    - an increment still `pending` is `failed` and reversed the same way;
    - a card refund still `pending` (the network timed out) is asked again with the same
      refund id, which the issuer applies once;
    - a card capture whose completion advice was never acknowledged is advised again.
    """
    deadline = rt.settings.payment_authorizing_deadline_seconds
    done = 0
    skip: list[str] = []
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            row = await store.lock_next_stuck(conn, deadline, skip)
            if row is None:
                break
            skip.append(row.id)
            await store.update(
                conn, row.id, {"status": "failed", "decline_code": declines.INTERRUPTED.code}
            )
            row = await store.get(conn, row.id)
            assert row is not None
            await publish(conn, events.PAYMENT_FAILED, row)
        log.warning("payment left authorizing: failed", transaction_id=row.id)
        await reverse_quietly(rt, original_authorization(row), row.amount, "timeout", row.id)
        done += 1
    skip = []
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            inc = await store.lock_next_stuck_increment(conn, deadline, skip)
            if inc is None:
                break
            skip.append(inc.id)
        await finish_increment(engine, rt, inc.id, None, declines.INTERRUPTED, True)
        done += 1
    skip = []
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            ref = await store.lock_next_stuck_refund(conn, deadline, skip)
            if ref is None:
                break
            skip.append(ref.id)
        await ask_refund(engine, rt, ref.id)
        done += 1
    skip = []
    for _ in range(batch):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            cap = await store.lock_next_unadvised(conn, ADVICE_RETRY_SECONDS, skip)
            if cap is None:
                break
            skip.append(cap.id)
            payment = await store.get(conn, cap.transaction_id)
        assert payment is not None
        await advise_capture(engine, rt, payment, cap)
        done += 1
    return done
