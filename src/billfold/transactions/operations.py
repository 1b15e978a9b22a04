"""What follows an authorization: capture (partial, several), void, refund (partial, several),
incremental authorization, and the reviewer's decision on a payment held for review.

Each takes the payment's row lock first, so concurrent captures or refunds of one payment run
one after the other and never exceed what is authorized or captured (the table's CHECKs say the
same, whatever the code does). Each is idempotent per payment and Idempotency-Key. Card
operations talk to the network only with no transaction open: a capture's completion advice
and a void's reversal go after the commit (the client repeats an advice until acknowledged); a
refund or an increment reserves its amount in a first short transaction, asks the network, and
records the answer in a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger
from billfold.gateway import Principal
from billfold.network import Authorization, NetworkError, NetworkTimeout, WireError, new_rrn
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.errors import ProblemError
from billfold.platform.ids import new_id
from billfold.platform.money import Money
from billfold.platform.observability import get_logger
from billfold.transactions import declines, events, store
from billfold.transactions.models import (
    CaptureExceedsAuthorized,
    IncrementInProgress,
    NewCapture,
    NewIncrement,
    NewRefund,
    PaymentNotCapturable,
    PaymentNotFound,
    PaymentNotIncrementable,
    PaymentNotRefundable,
    PaymentNotVoidable,
    RefundExceedsCaptured,
    RefundInProgress,
)
from billfold.transactions.runtime import TransactionsRuntime
from billfold.transactions.service import (
    CAPTURABLE,
    POSTING_CAPTURE,
    POSTING_REFUND,
    SETTLEMENT,
    capturable,
    check_amount,
    check_card_amount,
    fingerprint,
    key_reused,
    merchant_of,
    original_authorization,
    publish,
    reverse_quietly,
    settled_status,
    tokenised_card,
)
from billfold.vault import TokenDomainViolation, TokenNotActive, TokenNotFound

log = get_logger("billfold.transactions")


@dataclass(frozen=True)
class Done:
    """An operation's own row (capture, refund, increment), the payment after it, and whether
    an earlier request with the same key made it."""

    item: Row[Any]
    payment: Row[Any]
    replayed: bool = False


async def _locked(conn: AsyncConnection, txn_id: str, user_id: str) -> Row[Any]:
    row = await store.get_for_user(conn, txn_id, user_id, for_update=True)
    if row is None:
        raise PaymentNotFound("No such payment")
    return row


async def _refetch(conn: AsyncConnection, txn_id: str) -> Row[Any]:
    row = await store.get(conn, txn_id)
    assert row is not None
    return row


def _still_open(row: Row[Any]) -> bool:
    """Authorized, not fully captured, not lapsed (the sweeper may not have come by yet)."""
    return row.status in CAPTURABLE and row.expires_at is not None and row.expires_at > utcnow()


async def _refunded(conn: AsyncConnection, row: Row[Any], adding: int = 0) -> int:
    if row.refunded_amount == 0 and adding == 0:
        return 0
    return await store.succeeded_refunds(conn, row.id) + adding


# --- capture ----------------------------------------------------------------------------------


async def capture(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    txn_id: str,
    body: NewCapture,
    *,
    idempotency_key: str,
) -> Done:
    """Capture `amount` (default: all that remains). A wallet payment commits that much of its
    hold to the settlement account; a card payment sends a completion advice after commit."""
    request_hash = fingerprint(rt, "/v1/payments/{id}/capture", body)
    if body.amount is not None:
        check_amount(body.amount)
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await _locked(conn, txn_id, principal.user_id)
        existing = await store.capture_by_key(conn, txn_id, idempotency_key)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise key_reused()
            return Done(existing, row, replayed=True)
        if not _still_open(row):
            detail = (
                "This payment is held for review; it can be captured once approved"
                if row.status == "review"
                else "Nothing of this payment can be captured"
            )
            raise PaymentNotCapturable(detail, extra={"payment_status": row.status})
        remaining = capturable(row)
        amount = body.amount if body.amount is not None else remaining
        if amount > remaining:
            raise CaptureExceedsAuthorized(
                f"At most {remaining} minor units of this payment can still be captured",
                extra={"capturable_amount": remaining},
            )
        final = body.final if body.final is not None else amount == remaining
        posting_id = None
        if row.source == "wallet":
            posting = await ledger.commit_hold(
                conn,
                row.hold_id,
                amount,
                credit=SETTLEMENT,
                kind=POSTING_CAPTURE,
                final=final,
                memo=row.merchant_name,
            )
            posting_id = posting.id
        captured = row.captured_amount + amount
        released_now = remaining - amount if final else 0
        released = row.released_amount + released_now
        done = captured + released == row.authorized_amount
        item = await store.insert_capture(
            conn,
            {
                "id": new_id("cap"),
                "transaction_id": txn_id,
                "amount": amount,
                "final": final,
                "posting_id": posting_id,
                "idempotency_key": idempotency_key,
                "request_hash": request_hash,
            },
        )
        status = settled_status(
            row.authorized_amount, captured, released, await _refunded(conn, row)
        )
        await store.update(
            conn,
            txn_id,
            {
                "status": status,
                "captured_amount": captured,
                "released_amount": released,
                "expires_at": None if done else row.expires_at,
            },
        )
        row = await _refetch(conn, txn_id)
        await publish(
            conn,
            events.PAYMENT_CAPTURED,
            row,
            capture={
                "id": item.id,
                "amount": amount,
                "final": final,
                "released": released_now,
                "posting_id": posting_id,
            },
        )
    if row.source == "card":
        await advise_capture(engine, rt, row, item)
    return Done(item, row)


async def advise_capture(
    engine: AsyncEngine, rt: TransactionsRuntime, payment: Row[Any], item: Row[Any]
) -> bool:
    """Send a card capture's completion advice (0220); True once the network has it."""
    try:
        await rt.network.complete(
            original_authorization(payment), amount=item.amount, final=item.final
        )
    except NetworkError as exc:
        log.warning("completion advice not delivered", capture_id=item.id, error=type(exc).__name__)
        return False
    async with unit_of_work(engine) as uow:
        await store.mark_advised(await uow.connection(), item.id)
    return True


# --- void -------------------------------------------------------------------------------------


async def void(
    engine: AsyncEngine, rt: TransactionsRuntime, principal: Principal, txn_id: str
) -> Row[Any]:
    """Cancel an authorization nothing was captured of: the wallet hold is released, a card's
    authorization reversed. Voiding a voided payment answers it again."""
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await _locked(conn, txn_id, principal.user_id)
        if row.status == "voided":
            return row
        if row.status not in ("authorized", "review") or row.captured_amount > 0:
            raise PaymentNotVoidable(
                "Only an authorization nothing was captured of can be voided"
                + (
                    "; capture with final=true to release the rest"
                    if row.status in CAPTURABLE
                    else ""
                ),
                extra={"payment_status": row.status},
            )
        row = await cancel(conn, row, "voided")
    if row.source == "card":
        await reverse_quietly(rt, original_authorization(row), row.released_amount, "void", row.id)
    return row


async def cancel(conn: AsyncConnection, row: Row[Any], status: str) -> Row[Any]:
    """Release all that is not captured (void, or an expiry with nothing captured); the caller
    holds the payment's row lock."""
    if row.source == "wallet" and row.hold_id is not None:
        try:
            await ledger.void_hold(conn, row.hold_id)
        except ledger.HoldNotActive:
            pass  # the ledger's own sweeper released it already
    await store.update(
        conn,
        row.id,
        {
            "status": status,
            "released_amount": row.authorized_amount - row.captured_amount,
            "expires_at": None,
        },
    )
    row = await _refetch(conn, row.id)
    await publish(conn, events.STATUS_EVENTS[status], row, released=row.released_amount)
    return row


# --- review -----------------------------------------------------------------------------------


async def approve_review(engine: AsyncEngine, txn_id: str) -> Row[Any]:
    """A reviewer (the Fraud Service's queue) lets a payment held for review go: it is
    `authorized` and may be captured. Anything but `review` is left as it is."""
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await store.get(conn, txn_id, for_update=True)
        if row is None:
            raise PaymentNotFound("No such payment")
        if row.status != "review":
            return row
        await store.update(conn, txn_id, {"status": "authorized"})
        row = await _refetch(conn, txn_id)
        await publish(conn, events.PAYMENT_REVIEW_APPROVED, row)
    return row


async def reject_review(engine: AsyncEngine, rt: TransactionsRuntime, txn_id: str) -> Row[Any]:
    """A reviewer refuses a payment held for review: it is voided (hold released, card
    authorization reversed)."""
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await store.get(conn, txn_id, for_update=True)
        if row is None:
            raise PaymentNotFound("No such payment")
        if row.status != "review":
            return row
        row = await cancel(conn, row, "voided")
    if row.source == "card":
        await reverse_quietly(
            rt, original_authorization(row), row.released_amount, "review", txn_id
        )
    return row


# --- refund -----------------------------------------------------------------------------------


async def refund(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    txn_id: str,
    body: NewRefund,
    *,
    idempotency_key: str,
) -> Done:
    """Refund `amount` (default: all that is refundable) of what was captured. A wallet payment
    gets it back from the settlement account at once; a card refund asks the network (a timeout
    leaves it `pending`: the worker asks again with the same refund id, which the issuer applies
    once)."""
    request_hash = fingerprint(rt, "/v1/payments/{id}/refunds", body)
    if body.amount is not None:
        check_amount(body.amount)
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await _locked(conn, txn_id, principal.user_id)
        existing = await store.refund_by_key(conn, txn_id, idempotency_key)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise key_reused()
            if existing.status == "pending":
                raise RefundInProgress(
                    "This refund is still being processed; retry shortly",
                    headers={"Retry-After": "1"},
                )
            return Done(existing, row, replayed=True)
        refundable = row.captured_amount - row.refunded_amount
        if row.captured_amount == 0 or (body.amount is None and refundable == 0):
            raise PaymentNotRefundable(
                "Nothing of this payment was captured"
                if row.captured_amount == 0
                else "This payment is refunded in full already",
                extra={"payment_status": row.status},
            )
        amount = body.amount if body.amount is not None else refundable
        if amount > refundable:
            raise RefundExceedsCaptured(
                f"At most {refundable} minor units of this payment can still be refunded",
                extra={"refundable_amount": refundable},
            )
        refund_id = new_id("ref")
        values = {
            "id": refund_id,
            "transaction_id": txn_id,
            "amount": amount,
            "reason": body.reason,
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
        }
        if row.source == "wallet":
            posting = await ledger.move(
                conn,
                Money(amount, row.currency),
                debit=SETTLEMENT,
                credit=(row.user_id, "wallet"),
                kind=POSTING_REFUND,
                reference=txn_id,
                memo=f"Refund from {row.merchant_name}",
            )
            item = await store.insert_refund(
                conn, {**values, "status": "succeeded", "posting_id": posting.id}
            )
            row = await _apply_refund(conn, row, item, succeeded=True, reserved=False)
            return Done(item, row)
        item = await store.insert_refund(conn, {**values, "status": "pending", "posting_id": None})
        # Reserved now, so concurrent refunds never add up past what was captured.
        await store.update(conn, txn_id, {"refunded_amount": row.refunded_amount + amount})
    return await ask_refund(engine, rt, item.id)


async def ask_refund(engine: AsyncEngine, rt: TransactionsRuntime, refund_id: str) -> Done:
    """Ask the network for a pending card refund (again, after a timeout) and record the answer."""
    async with engine.connect() as conn:
        item = await store.get_refund(conn, refund_id)
        payment = await store.get(conn, item.transaction_id)
        await conn.rollback()
    assert payment is not None
    try:
        answer: Authorization | None = await rt.network.refund(
            original_authorization(payment), None, amount=item.amount, refund_id=item.id
        )
    except NetworkTimeout:
        return Done(item, payment)  # still pending: asked again by the worker
    except NetworkError:
        answer = None
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        payment = await store.get(conn, item.transaction_id, for_update=True)
        assert payment is not None
        current = await store.get_refund(conn, refund_id)
        if current.status != "pending":  # another worker recorded the answer first
            return Done(current, payment)
        if answer is not None and answer.approved:
            item = await store.finish_refund(
                conn,
                refund_id,
                {
                    "status": "succeeded",
                    "response_code": answer.response_code,
                    "auth_code": answer.auth_code,
                    "rrn": answer.rrn,
                },
            )
            payment = await _apply_refund(conn, payment, item, succeeded=True, reserved=True)
        else:
            decline = (
                declines.from_response_code(answer.response_code)
                if answer is not None
                else declines.NETWORK_UNAVAILABLE
            )
            item = await store.finish_refund(
                conn,
                refund_id,
                {
                    "status": "failed",
                    "response_code": answer.response_code if answer else None,
                    "failure_code": decline.code,
                },
            )
            payment = await _apply_refund(conn, payment, item, succeeded=False, reserved=True)
    return Done(item, payment)


async def _apply_refund(
    conn: AsyncConnection, row: Row[Any], item: Row[Any], *, succeeded: bool, reserved: bool
) -> Row[Any]:
    """The payment after a refund's outcome (`reserved`: its amount is already counted in
    `refunded_amount`), with the refund's event."""
    refunded = row.refunded_amount
    if succeeded and not reserved:
        refunded += item.amount
    elif not succeeded and reserved:
        refunded -= item.amount
    values: dict[str, Any] = {"refunded_amount": refunded}
    if succeeded:
        total = await store.succeeded_refunds(conn, row.id)
        values["status"] = settled_status(
            row.authorized_amount, row.captured_amount, row.released_amount, total
        )
    await store.update(conn, row.id, values)
    row = await _refetch(conn, row.id)
    refund_data = {
        "id": item.id,
        "amount": item.amount,
        "status": item.status,
        "reason": item.reason,
        "posting_id": item.posting_id,
        "failure_code": item.failure_code,
    }
    await publish(
        conn,
        events.PAYMENT_REFUNDED if succeeded else events.PAYMENT_REFUND_FAILED,
        row,
        refund=refund_data,
    )
    return row


# --- incremental authorization ----------------------------------------------------------------


async def increment(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    txn_id: str,
    body: NewIncrement,
    *,
    idempotency_key: str,
) -> Done:
    """Raise the authorization by `amount`. A wallet payment's hold grows (or the increment is
    declined when the balance is too low); a card asks the issuer with a fresh cryptogram."""
    request_hash = fingerprint(rt, "/v1/payments/{id}/increment", body)
    check_amount(body.amount)
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        row = await _locked(conn, txn_id, principal.user_id)
        existing = await store.increment_by_key(conn, txn_id, idempotency_key)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise key_reused()
            if existing.status == "pending":
                raise IncrementInProgress(
                    "This increment is still being processed; retry shortly",
                    headers={"Retry-After": "1"},
                )
            return Done(existing, row, replayed=True)
        if not _still_open(row):
            raise PaymentNotIncrementable(
                "Only an open authorization can be raised", extra={"payment_status": row.status}
            )
        if row.source == "card":
            check_card_amount(body.amount)
        values = {
            "id": new_id("inc"),
            "transaction_id": txn_id,
            "amount": body.amount,
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
        }
        if row.source == "wallet":
            return await _increment_wallet(conn, row, values)
        # Its network reference is committed before the network is asked: the recovery
        # sweeper reverses by it an increment a crash left unanswered.
        item = await store.insert_increment(conn, {**values, "status": "pending", "rrn": new_rrn()})
    return await _increment_card(engine, rt, principal, row, item)


async def _increment_wallet(conn: AsyncConnection, row: Row[Any], values: dict[str, Any]) -> Done:
    """The hold is swapped for a larger one in one step (a savepoint undoes the release when the
    balance cannot cover the larger one)."""
    amount = values["amount"]
    old = await ledger.get_hold(conn, row.hold_id)
    assert old is not None
    try:
        async with conn.begin_nested():
            remaining = await ledger.void_hold(conn, row.hold_id)
            hold = await ledger.place_hold(
                conn,
                row.user_id,
                Money(remaining + amount, row.currency),
                reference=row.id,
                expires_at=old.expires_at,
            )
    except ledger.InsufficientFunds:
        item = await store.insert_increment(
            conn,
            {
                **values,
                "status": "declined",
                "decline_code": declines.WALLET_INSUFFICIENT_FUNDS.code,
            },
        )
        await publish(conn, events.PAYMENT_INCREMENT_DECLINED, row, increment=_inc_data(item))
        return Done(item, row)
    item = await store.insert_increment(conn, {**values, "status": "approved", "hold_id": hold.id})
    await store.update(
        conn,
        row.id,
        {"authorized_amount": row.authorized_amount + amount, "hold_id": hold.id},
    )
    row = await _refetch(conn, row.id)
    await publish(conn, events.PAYMENT_INCREMENTED, row, increment=_inc_data(item))
    return Done(item, row)


def _inc_data(item: Row[Any]) -> dict[str, Any]:
    return {
        "id": item.id,
        "amount": item.amount,
        "status": item.status,
        "decline_code": item.decline_code,
    }


async def _increment_card(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    payment: Row[Any],
    item: Row[Any],
) -> Done:
    answer: Authorization | None = None
    decline: declines.Decline | None = None
    failed = False
    try:
        card = await tokenised_card(rt, payment, item.amount, principal.device_id)
    except (TokenNotActive, TokenNotFound):
        decline = declines.CARD_INACTIVE
    except TokenDomainViolation:
        decline = declines.CARD_NOT_ALLOWED_HERE
    except ProblemError:
        decline, failed = declines.SERVICE_UNAVAILABLE, True
    else:
        try:
            answer = await rt.network.increment(
                original_authorization(payment),
                card,
                amount=item.amount,
                merchant=merchant_of(payment),
                transaction_id=payment.id,
                rrn=item.rrn,
            )
        except NetworkTimeout:
            decline, failed = declines.NETWORK_TIMEOUT, True
        except NetworkError:
            decline, failed = declines.NETWORK_UNAVAILABLE, True
        except WireError as exc:
            # Not encodable, so nothing was sent: failed now, not `pending` until the sweeper.
            log.error("increment not encodable", transaction_id=payment.id, error=str(exc))
            decline, failed = declines.SERVICE_UNAVAILABLE, True
    return await finish_increment(engine, rt, item.id, answer, decline, failed)


async def finish_increment(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    increment_id: str,
    answer: Authorization | None,
    decline: declines.Decline | None,
    failed: bool,
) -> Done:
    """Record a card increment's answer. An approval for a payment that was voided or lapsed
    meanwhile is reversed, never left holding money, and so is whatever the issuer may have
    approved of an increment a crash left unanswered (`INTERRUPTED`, by its stored RRN)."""
    undo = False
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        txn_id = await store.increment_transaction(conn, increment_id)
        row = await store.get(conn, txn_id, for_update=True)
        assert row is not None
        current = await store.get_increment(conn, increment_id)
        if current.status != "pending":  # another worker recorded the answer first
            return Done(current, row)
        network = {}
        if answer is not None:
            network = {
                "response_code": answer.response_code,
                "auth_code": answer.auth_code,
                "stan": answer.stan,
                "rrn": answer.rrn,
            }
            if not answer.approved:
                decline = declines.from_response_code(answer.response_code)
        if answer is not None and answer.approved and not _still_open(row):
            undo, decline, failed = True, declines.INTERRUPTED, True
        if decline is None:
            item = await store.finish_increment(
                conn, increment_id, {"status": "approved", **network}
            )
            await store.update(
                conn, row.id, {"authorized_amount": row.authorized_amount + item.amount}
            )
            row = await _refetch(conn, row.id)
            await publish(conn, events.PAYMENT_INCREMENTED, row, increment=_inc_data(item))
        else:
            item = await store.finish_increment(
                conn,
                increment_id,
                {"status": "failed" if failed else "declined", "decline_code": decline.code}
                | network,
            )
            await publish(conn, events.PAYMENT_INCREMENT_DECLINED, row, increment=_inc_data(item))
    if undo and answer is not None:
        original = original_authorization(row)
        await reverse_quietly(rt, original, answer.amount, "late_increment", row.id)
    elif answer is None and decline is declines.INTERRUPTED and item.rrn:
        # Sent or not, answered or not: a reversal of an authorization the issuer never made
        # changes nothing there.
        unknown = Authorization("00", None, item.stan or "", item.rrn, item.amount, row.currency)
        await reverse_quietly(rt, unknown, item.amount, "timeout", row.id)
    return Done(item, row)
