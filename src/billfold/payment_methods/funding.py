"""Wallet funding: top-ups from a verified card or bank account, withdrawals to a bank account.

A top-up keeps its own idempotency (the edge's would hold a database connection, and the
transaction with it, for the whole request, across the network's answer), in three steps:

1. tx1 (short): the user's Idempotency-Key is locked and looked up; a new top-up is written
   `pending` with the key and the request's hash, and committed. A bank account's top-up (a
   simulated ACH debit that settles at once) is posted and `completed` right here.
2. No connection held: the PAN comes from the vault by the card's payment token (409
   `card_token_inactive` when it is suspended or deleted: a card the user or the issuer froze
   pays for nothing, top-ups included) and the network charges the card, with the funding id
   as the merchant's reference. An expired card is refused in tx1 (422 `card_expired`).
3. tx2 (short): an approval posts `ledger.top_up`, marks the top-up `completed` and publishes
   its event. If tx2 fails (a serialisation failure, a lock timeout), the approval is written
   down on its own so that nothing can charge the card again.

A decline (402), or a vault or network error before an answer (503: nothing was charged; the
client reverses a charge whose answer timed out), deletes the `pending` row: like every error
answer, it changed nothing and is not remembered, and the key may be used again. A retry with
the same key resumes or replays what the first request left: `completed` → the same answer;
`pending` with the approval on it → the credit is posted now and nothing is charged; `pending`
without an answer → 409 while the first request is at the network. The worker's `recover_fundings` completes approved top-ups left `pending` past
a deadline and fails those whose answer never came back (`topup_interrupted`: the process died
while the network answered; the charge, if the issuer made one, is found by its reference, the
funding id, in the network's settlement records).

Withdrawals (a simulated ACH credit, no network wait) commit in the request's one transaction
under the edge's idempotency: the funding row, the ledger posting and the events together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger
from billfold.config import Settings
from billfold.network import RESPONSE_CODES, Charge
from billfold.payment_methods import cards, events, store
from billfold.payment_methods.models import (
    BankAccountRequired,
    CardExpired,
    CardTokenInactive,
    CurrencyMismatch,
    Funding,
    FundingBalance,
    FundingView,
    PaymentDeclined,
    PaymentMethodNotFound,
    PaymentMethodNotVerified,
    TopUpInterrupted,
)
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.payment_methods.service import label, requester
from billfold.platform.clock import rfc3339
from billfold.platform.db import unit_of_work
from billfold.platform.errors import Conflict, FieldError, ProblemError, Unprocessable
from billfold.platform.ids import new_id
from billfold.platform.money import Money
from billfold.platform.observability import get_logger
from billfold.vault import TokenNotActive, TokenNotFound

log = get_logger("billfold.payment_methods.funding")

POINTER = "#/payment_method_id"
TOPUP_PATH = "/v1/wallet/topups"
# A top-up still `pending` this long after its last change was left behind by a crash or a lost
# connection: the network answers (or times out) within seconds.
PENDING_DEADLINE_SECONDS = 120.0
INTERRUPTED = "topup_interrupted"


@dataclass(frozen=True)
class Outcome:
    """A top-up as a request leaves it; `replayed` when an earlier request with the same key
    made it."""

    view: FundingView
    replayed: bool = False


async def _verified_method(conn: AsyncConnection, user_id: str, method_id: str) -> Row[Any]:
    row = await store.get(conn, method_id, user_id)
    if row is None:
        raise PaymentMethodNotFound(
            "No such payment method",
            errors=[FieldError(pointer=POINTER, detail="not one of your payment methods")],
        )
    if row.status != "verified":
        raise PaymentMethodNotVerified(
            "Verify this payment method before moving money with it",
            extra={"payment_method_status": row.status},
        )
    return row


def _same_currency(row: Row[Any], money: Money) -> None:
    if row.currency != money.currency:
        raise CurrencyMismatch(
            f"This bank account holds {row.currency}",
            errors=[FieldError(pointer="#/currency", detail=f"must be {row.currency}")],
        )


def _request_hash(rt: PaymentMethodsRuntime, body: Funding) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    ).encode()
    return rt.request_fingerprint(TOPUP_PATH, canonical)


# --- top-ups ----------------------------------------------------------------------------------


async def top_up(
    engine: AsyncEngine,
    rt: PaymentMethodsRuntime,
    user_id: str,
    body: Funding,
    *,
    idempotency_key: str,
) -> Outcome:
    """Charge the card (or debit the bank account) and credit the wallet, once per key."""
    money = Money(body.amount, body.currency)
    # Refused amounts must be refused before the card is charged, not after.
    ledger.check_amount(money, rt.settings.wallet_max_topup)
    request_hash = _request_hash(rt, body)
    row: Row[Any] | None = None
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        await store.lock_funding_key(conn, user_id, idempotency_key)
        existing = await store.funding_by_key(conn, user_id, idempotency_key)
        if existing is None:
            method = await _verified_method(conn, user_id, body.payment_method_id)
            row = await _begin(conn, rt, method, money, idempotency_key, request_hash)
        elif existing.request_hash != request_hash:
            raise Unprocessable(
                "This Idempotency-Key was used with a different request",
                code="idempotency_key_reuse",
            )
    if existing is not None:
        return await _again(engine, rt, existing)
    assert row is not None
    if row.status == "completed":
        return Outcome(view(row))
    return Outcome(await _charge(engine, rt, row))


async def _begin(
    conn: AsyncConnection,
    rt: PaymentMethodsRuntime,
    method: Row[Any],
    money: Money,
    key: str,
    request_hash: str,
) -> Row[Any]:
    """tx1: a card top-up written `pending`; a bank account's debited, posted and completed."""
    values: dict[str, Any] = {
        "id": new_id("top"),
        "user_id": method.user_id,
        "payment_method_id": method.id,
        "type": "topup",
        "amount": money.amount,
        "currency": money.currency,
        "idempotency_key": key,
        "request_hash": request_hash,
    }
    if method.type == "card":
        if cards.expiry_state(method.expiry_month, method.expiry_year) == "expired":
            raise CardExpired(
                "This card has expired; add its new expiry or another card",
                errors=[FieldError(pointer=POINTER, detail="the card has expired")],
            )
        return await store.insert_funding(conn, values | {"rail": "card", "status": "pending"})
    _same_currency(method, money)
    row = await store.insert_funding(conn, values | {"rail": "ach", "status": "pending"})
    return await _credit(conn, rt.settings, row, method)


async def _again(engine: AsyncEngine, rt: PaymentMethodsRuntime, row: Row[Any]) -> Outcome:
    """A retry with the key of an earlier top-up: its answer, or the credit it still owes."""
    if row.status == "completed":
        return Outcome(view(row), replayed=True)
    if row.status == "failed":
        raise TopUpInterrupted(
            "This top-up was interrupted while the payment network answered; nothing was "
            "credited (a charge the issuer made is refunded by reconciliation). Use a new "
            "Idempotency-Key to try again"
        )
    if row.response_code is None:
        raise Conflict(
            "This top-up is still at the payment network; retry shortly",
            code="idempotency_request_in_progress",
            headers={"Retry-After": "1"},
        )
    # Approved at the network, not yet credited (tx2 failed): credit it, charge nothing.
    async with unit_of_work(engine) as uow:
        conn = await uow.connection()
        done = await _complete(conn, rt.settings, row.id)
    return Outcome(view(done), replayed=True)


async def _charge(engine: AsyncEngine, rt: PaymentMethodsRuntime, row: Row[Any]) -> FundingView:
    """Steps 2 and 3: the PAN and the network with no connection held, then tx2."""
    async with engine.connect() as conn:  # a plain read, no transaction kept open
        method = await store.get(conn, row.payment_method_id, row.user_id, include_removed=True)
        await conn.rollback()
    assert method is not None
    try:
        try:
            secret = await rt.vault.detokenize(
                token_id=method.vault_token_id,
                requester=requester(row.user_id),
                purpose="authorization",
            )
        except (TokenNotActive, TokenNotFound):
            raise CardTokenInactive(
                "This card's payment token is suspended or deleted; resume it or add the card "
                "again",
                errors=[FieldError(pointer=POINTER, detail="the card's token is not active")],
            ) from None
        try:
            charge = await rt.network.charge(
                secret, amount=row.amount, currency=row.currency, reference=row.id
            )
        finally:
            del secret
    except ProblemError:  # NetworkError included: nothing is charged
        await _forget(engine, row.id)
        raise
    try:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            if charge.approved:
                await _answer(conn, row.id, charge)
                done = await _complete(conn, rt.settings, row.id)
            else:
                await store.delete_unanswered_funding(conn, row.id)
                done = None
    except BaseException:
        if charge.approved:
            await _remember_approval(engine, row.id, charge)
        raise
    if done is None:
        raise _declined(charge.response_code)
    return view(done)


async def _answer(conn: AsyncConnection, funding_id: str, charge: Charge) -> None:
    """The approval on the top-up (locked); it stays `pending` until credited. A late approval of
    a top-up the recovery job gave up on is taken back to `pending`: the card was charged, so
    the wallet is credited."""
    row = await store.get_funding(conn, funding_id, for_update=True)
    assert row is not None
    if row.status not in ("pending", "failed"):
        return
    values: dict[str, Any] = {
        "response_code": charge.response_code,
        "authorization_code": charge.authorization_code,
        "network_reference": charge.network_reference,
        "status": "pending",
        "failure_code": None,
    }
    await store.update_funding(conn, funding_id, values)


async def _remember_approval(engine: AsyncEngine, funding_id: str, charge: Charge) -> None:
    """tx2 failed after the card was charged: keep the approval (own transaction) so a retry or
    the recovery job credits the wallet instead of charging again."""
    try:
        async with unit_of_work(engine) as uow:
            await _answer(await uow.connection(), funding_id, charge)
    except Exception:
        log.exception(
            "card charged, top-up not credited; the recovery job cannot tell",
            funding_id=funding_id,
            network_reference=charge.network_reference,
            authorization_code=charge.authorization_code,
        )


async def _forget(engine: AsyncEngine, funding_id: str) -> None:
    """Nothing was charged: the top-up leaves no trace, and its key is free again."""
    async with unit_of_work(engine) as uow:
        await store.delete_unanswered_funding(await uow.connection(), funding_id)


async def _complete(conn: AsyncConnection, settings: Settings, funding_id: str) -> Row[Any]:
    """Credit an approved top-up (locked here) once; one already completed is returned as is."""
    row = await store.get_funding(conn, funding_id, for_update=True)
    assert row is not None
    if row.status == "completed":
        return row
    assert row.status == "pending" and row.response_code is not None
    method = await store.get(conn, row.payment_method_id, row.user_id, include_removed=True)
    assert method is not None
    return await _credit(conn, settings, row, method)


async def _credit(
    conn: AsyncConnection, settings: Settings, row: Row[Any], method: Row[Any]
) -> Row[Any]:
    movement = await ledger.top_up(
        conn,
        row.user_id,
        Money(row.amount, row.currency),
        max_amount=settings.wallet_max_topup,
        reference=row.id,
        memo=f"Top-up from {label(method)}",
    )
    await store.update_funding(conn, row.id, _completed(movement))
    done = await store.get_funding(conn, row.id)
    assert done is not None
    await _publish(conn, done, method)
    return done


def _declined(response_code: str | None) -> PaymentDeclined:
    code = response_code or "05"
    reason = RESPONSE_CODES.get(code, "Declined")
    return PaymentDeclined(
        f"The card issuer declined the payment ({code}: {reason}); nothing was charged or credited",
        extra={"decline_code": code, "decline_reason": reason},
    )


async def recover_fundings(
    engine: AsyncEngine,
    settings: Settings,
    *,
    older_than_seconds: float = PENDING_DEADLINE_SECONDS,
    batch: int = 200,
) -> int:
    """Finish top-ups a crash (or a lost database) left `pending` past the deadline (worker
    job): one the network approved is credited now; one without an answer is `failed`
    (`topup_interrupted`) and logged for reconciliation by its reference. One transaction each;
    rows a request still holds are skipped, and one that fails is logged and left for the next
    run (it does not hold up the others)."""
    done = 0
    skip: list[str] = []
    for _ in range(batch):
        current: str | None = None
        try:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                row = await store.lock_next_stuck_funding(conn, older_than_seconds, skip)
                if row is None:
                    break
                current = row.id
                skip.append(row.id)
                if row.response_code is not None:
                    await _complete(conn, settings, row.id)
                    log.warning("top-up credited by the recovery job", funding_id=row.id)
                else:
                    await store.update_funding(
                        conn, row.id, {"status": "failed", "failure_code": INTERRUPTED}
                    )
                    log.warning(
                        "top-up interrupted at the payment network: reconcile by reference",
                        funding_id=row.id,
                    )
        except Exception:
            if current is None:  # could not even look: the database is the problem
                raise
            log.exception("could not recover a top-up; will retry", funding_id=current)
            continue
        done += 1
    return done


# --- withdrawals ------------------------------------------------------------------------------


async def withdraw(
    conn: AsyncConnection, rt: PaymentMethodsRuntime, user_id: str, body: Funding
) -> FundingView:
    """Debit the wallet's available balance and credit the bank account (simulated ACH)."""
    money = Money(body.amount, body.currency)
    limit = rt.settings.wallet_max_topup
    ledger.check_amount(money, limit)
    method = await _verified_method(conn, user_id, body.payment_method_id)
    if method.type != "bank_account":
        raise BankAccountRequired(
            "Money leaves the wallet only to a verified bank account, not to a card",
            errors=[FieldError(pointer=POINTER, detail="must be a bank account")],
        )
    _same_currency(method, money)
    funding_id = new_id("wdl")
    movement = await ledger.withdraw(
        conn,
        user_id,
        money,
        max_amount=limit,
        reference=funding_id,
        memo=f"Withdrawal to {label(method)}",
    )
    row = await store.insert_funding(
        conn,
        {
            "id": funding_id,
            "user_id": user_id,
            "payment_method_id": method.id,
            "type": "withdrawal",
            "rail": "ach",
            "amount": money.amount,
            "currency": money.currency,
            **_completed(movement),
        },
    )
    await _publish(conn, row, method)
    return view(row)


# --- shared -----------------------------------------------------------------------------------


def _completed(movement: ledger.Movement) -> dict[str, Any]:
    b = movement.balance
    return {
        "status": "completed",
        "posting_id": movement.id,
        "balance_posted": b.posted,
        "balance_held": b.held,
        "balance_available": b.available,
        "completed_at": movement.created_at,
    }


async def _publish(conn: AsyncConnection, row: Row[Any], method: Row[Any]) -> None:
    await events.publish(
        conn,
        events.TOPUP_COMPLETED if row.type == "topup" else events.WITHDRAWAL_COMPLETED,
        row.id,
        row.user_id,
        {
            "funding_id": row.id,
            "payment_method_id": method.id,
            "type": method.type,
            "brand": method.brand,
            "last4": method.last4,
            "rail": row.rail,
            "amount": row.amount,
            "currency": row.currency,
            "posting_id": row.posting_id,
            "created_at": rfc3339(row.completed_at),
        },
    )


def view(row: Row[Any]) -> FundingView:
    """A completed top-up or withdrawal, as its request answered (a replay answers the same)."""
    return FundingView(
        id=row.id,
        type=row.type,
        payment_method_id=row.payment_method_id,
        rail=row.rail,
        amount=row.amount,
        currency=row.currency,
        posting_id=row.posting_id,
        authorization_code=row.authorization_code,
        balance=FundingBalance(
            currency=row.currency,
            available=row.balance_available,
            posted=row.balance_posted,
            held=row.balance_held,
        ),
        created_at=row.completed_at,
    )
