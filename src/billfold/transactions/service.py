"""The payment authorization flow: `POST /v1/payments` and the resume after a step-up.

A card payment waits ~1.2 s for the network, and billfold must keep hundreds of them in flight,
so no database connection (or transaction) is held while it waits:

1. tx1 (short): the user's Idempotency-Key is claimed (an advisory lock on it, then a unique
   index as backstop: a duplicate finds the payment the first request made), the card's token
   is looked up, the risk check decides, and the payment is written `authorizing` with its event
   (payment, details and event in one statement).
2. No connection: the vault makes the cryptogram, the network authorizes.
3. tx2 (one statement, no BEGIN/COMMIT around it): the answer, the details and the per-step
   timings, and the event, only if the payment is still `authorizing`.

Round trips per card payment, as they cost CPU in every process: tx1 is BEGIN, claim, key
lookup, card token, insert, COMMIT; tx2 is one (see docs/performance.md).

A crash between 1 and 3 leaves `authorizing`; the worker's `recover_stuck_payments` fails such
rows after a deadline and reverses, by the RRN tx1 wrote (the network is told it, never asked
for it), whatever the issuer may have approved. A wallet-balance payment never leaves billfold: one transaction places a
ledger hold and writes the payment.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger, payment_methods, users
from billfold.gateway import Principal
from billfold.network import (
    MAX_NETWORK_AMOUNT,
    Authorization,
    Merchant,
    NetworkError,
    NetworkTimeout,
    TokenisedCard,
    WireError,
    country_numeric,
    currency_numeric,
    new_rrn,
)
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.errors import FieldError, ProblemError, Unprocessable
from billfold.platform.events import outbox_written, record_event, wake_relay
from billfold.platform.idempotency import request_fingerprint
from billfold.platform.ids import new_id
from billfold.platform.money import POINTS, Money
from billfold.platform.observability import get_logger
from billfold.transactions import declines, events, store
from billfold.transactions.models import (
    CaptureView,
    CardView,
    IncrementView,
    InvalidPaymentAmount,
    MerchantView,
    NewPayment,
    Payment,
    PaymentCurrencyNotSupported,
    PaymentInProgress,
    PaymentNotFound,
    PaymentNotResumable,
    RefundView,
    StepUpHint,
)
from billfold.transactions.risk import PaymentRisk, RiskDecision
from billfold.transactions.runtime import TransactionsRuntime
from billfold.vault import (
    CryptogramRequest,
    TokenDomainViolation,
    TokenNotActive,
    TokenNotFound,
)

log = get_logger("billfold.transactions")

STEP_UP_PURPOSE = "payment"
# Ledger: a wallet payment's hold is committed to this system account on capture (what billfold
# owes the merchants' acquirers) and refunds come back from it.
SETTLEMENT = (ledger.SYSTEM, "settlement")
POSTING_CAPTURE = "payment_capture"
POSTING_REFUND = "payment_refund"
# The ledger hold outlives the authorization by this much, so the payment's own sweeper (which
# writes the payment's event) releases it, not the ledger's generic hold sweeper.
HOLD_GRACE = timedelta(days=1)
# Statuses in which what is authorized and not yet captured may still be captured.
CAPTURABLE = frozenset({"authorized", "partially_captured", "partially_refunded"})


# --- timings ----------------------------------------------------------------------------------


@dataclass
class Timer:
    """Milliseconds per step of one authorization (auth, token, fraud, network, db,
    notify_enqueue): recorded in the payment's details and observed by the histograms.

    Steps nest: the time of a step taken inside another (the risk check inside a transaction)
    counts for the inner step only, so the steps add up to the request's own time."""

    ms: dict[str, float] = field(default_factory=dict)
    _open: list[tuple[str, float, float]] = field(default_factory=list)
    _nested: float = 0.0  # seconds of finished steps, for the enclosing step to leave out

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._open.append((name, started, self._nested))
        try:
            yield
        finally:
            _, _, nested_before = self._open.pop()
            elapsed = time.perf_counter() - started
            self.add(name, (elapsed - (self._nested - nested_before)) * 1000)
            self._nested = nested_before + elapsed

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = round(self.ms.get(name, 0.0) + ms, 3)

    def snapshot(self) -> dict[str, float]:
        """The steps so far, with what the outermost open step (a transaction) took until
        now: what a payment's details record before its transaction commits."""
        out = dict(self.ms)
        if len(self._open) == 1:
            name, started, nested_before = self._open[0]
            own = time.perf_counter() - started - (self._nested - nested_before)
            out[name] = round(out.get(name, 0.0) + own * 1000, 3)
        return out


# --- shapes -----------------------------------------------------------------------------------


def merchant_of(row: Row[Any]) -> Merchant:
    return Merchant(
        id=row.merchant_id,
        name=row.merchant_name,
        mcc=row.mcc,
        country=row.merchant_country,
        city=row.merchant_city,
        latitude=row.latitude,
        longitude=row.longitude,
    )


def original_authorization(row: Row[Any]) -> Authorization:
    """The network's authorization of a card payment, as the advices that follow name it."""
    return Authorization(
        response_code=row.response_code or "00",
        auth_code=row.auth_code,
        stan=row.stan or "",
        rrn=row.rrn or "",
        amount=row.authorized_amount,
        currency=row.currency,
        stand_in=bool(row.stand_in),
    )


def capturable(row: Row[Any]) -> int:
    if row.status not in CAPTURABLE or row.expires_at is None:
        return 0
    return int(row.authorized_amount - row.captured_amount - row.released_amount)


def settled_status(authorized: int, captured: int, released: int, refunded: int) -> str:
    """The status of a payment with something captured, from its amounts (`refunded`: what
    refunds that succeeded gave back)."""
    if refunded > 0:
        done = captured + released == authorized and refunded == captured
        return "refunded" if done else "partially_refunded"
    return "captured" if captured + released == authorized else "partially_captured"


def mapping(row: Row[Any]) -> dict[str, Any]:
    return dict(row._mapping)


async def view(conn: AsyncConnection | None, row: Row[Any]) -> Payment:
    """The payment as its owner sees it; with `conn`, its captures, refunds and increments."""
    captures: list[CaptureView] = []
    refunds: list[RefundView] = []
    increments: list[IncrementView] = []
    if conn is not None and row.authorized_amount > 0:
        captures = [capture_view(c) for c in await store.captures(conn, row.id)]
        refunds = [refund_view(r, row.source) for r in await store.refunds(conn, row.id)]
        increments = [increment_view(i, row.source) for i in await store.increments(conn, row.id)]
    step_up = None
    if row.status == "challenge_required":
        step_up = StepUpHint(
            purpose=STEP_UP_PURPOSE,
            reference=row.id,
            challenge_url="/v1/auth/step-up/challenges",
            resume_url=f"/v1/payments/{row.id}/resume",
        )
    return Payment(
        id=row.id,
        status=row.status,
        source=row.source,
        payment_method_id=row.payment_method_id,
        card=CardView(brand=row.card_brand, last4=row.card_last4) if row.source == "card" else None,
        amount=row.amount,
        currency=row.currency,
        authorized_amount=row.authorized_amount,
        captured_amount=row.captured_amount,
        refunded_amount=row.refunded_amount,
        capturable_amount=capturable(row),
        refundable_amount=max(0, row.captured_amount - row.refunded_amount),
        merchant=MerchantView(
            id=row.merchant_id,
            name=row.merchant_name,
            mcc=row.mcc,
            category=row.category,
            country=row.merchant_country,
            city=row.merchant_city,
            latitude=row.latitude,
            longitude=row.longitude,
        ),
        channel=row.channel,
        device_id=row.device_id,
        description=row.description,
        note=row.note,
        decline_code=row.decline_code,
        decline_reason=declines.reason_for(row.decline_code, row.source),
        auth_code=row.auth_code,
        step_up=step_up,
        expires_at=row.expires_at,
        captures=captures,
        refunds=refunds,
        increments=increments,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def capture_view(row: Row[Any]) -> CaptureView:
    return CaptureView(id=row.id, amount=row.amount, final=row.final, created_at=row.created_at)


def refund_view(row: Row[Any], source: str = "card") -> RefundView:
    """A refund as its payment's owner sees it (`source`: the payment's, whose words a
    failure code takes)."""
    return RefundView(
        id=row.id,
        amount=row.amount,
        status=row.status,
        reason=row.reason,
        failure_code=row.failure_code,
        failure_reason=declines.reason_for(row.failure_code, source),
        created_at=row.created_at,
    )


def increment_view(row: Row[Any], source: str = "card") -> IncrementView:
    """An increment as its payment's owner sees it (`source`: the payment's; a wallet's
    `insufficient_funds` is about the wallet balance, not a card)."""
    return IncrementView(
        id=row.id,
        amount=row.amount,
        status=row.status,
        decline_code=row.decline_code,
        decline_reason=declines.reason_for(row.decline_code, source),
        created_at=row.created_at,
    )


async def get(conn: AsyncConnection, txn_id: str, user_id: str) -> Row[Any]:
    row = await store.get_for_user(conn, txn_id, user_id)
    if row is None:
        raise PaymentNotFound("No such payment")
    return row


async def publish(conn: AsyncConnection, type_: str, row: Row[Any], **extra: Any) -> None:
    await record_event(conn, events.event(type_, mapping(row), **extra))


# --- checks -----------------------------------------------------------------------------------


def fingerprint(rt: TransactionsRuntime, path: str, body: Any) -> str:
    """Keyed hash of a request's meaning (its parsed body, canonical): the same key with another
    request is refused (`idempotency_key_reuse`)."""
    canonical = json.dumps(
        body.model_dump(mode="json") if body is not None else None,
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return request_fingerprint("POST", path, canonical, rt.fingerprint_key)


def key_reused() -> Unprocessable:
    return Unprocessable(
        "This Idempotency-Key was used with a different request", code="idempotency_key_reuse"
    )


def check_amount(amount: int, pointer: str = "#/amount") -> None:
    if amount <= 0:
        raise InvalidPaymentAmount(
            "The amount must be a positive number of minor units",
            errors=[FieldError(pointer=pointer, detail="must be positive")],
        )


def check_card_amount(amount: int, pointer: str = "#/amount") -> None:
    """A card amount travels as 12 digits (ISO 8583 field 4, EMV 9F02): a larger one is refused
    before anything is written, not failed later as if the network were down."""
    if amount > MAX_NETWORK_AMOUNT:
        raise InvalidPaymentAmount(
            f"A card payment is at most {MAX_NETWORK_AMOUNT} minor units",
            errors=[FieldError(pointer=pointer, detail=f"must be at most {MAX_NETWORK_AMOUNT}")],
        )


def _codes(body: NewPayment) -> tuple[str, str]:
    """(currency, country) as ISO numeric codes, which the cryptogram is computed over."""
    if body.currency == POINTS:
        raise PaymentCurrencyNotSupported(
            "Loyalty points are redeemed, not spent at merchants",
            errors=[FieldError(pointer="#/currency", detail="not a payment currency")],
        )
    try:
        currency = currency_numeric(body.currency)
    except Exception:
        raise PaymentCurrencyNotSupported(
            "This currency cannot be paid in",
            errors=[FieldError(pointer="#/currency", detail="not a payment currency")],
        ) from None
    try:
        country = country_numeric(body.merchant.country)
    except Exception:
        raise Unprocessable(
            "Unknown merchant country",
            errors=[FieldError(pointer="#/merchant/country", detail="not an ISO 3166 country")],
        ) from None
    return currency, country


# --- paying -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A payment as a request leaves it; `replayed` when an earlier request with the same key
    made it."""

    row: Row[Any]
    replayed: bool = False


@dataclass
class _Context:
    """What the flow carries from tx1 to tx2 of a card payment."""

    row: Row[Any]  # as tx1 committed it (`authorizing`)
    principal: Principal
    decision: RiskDecision
    timer: Timer


async def pay(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    body: NewPayment,
    *,
    idempotency_key: str,
    step_up_token: str | None = None,
    ip: str | None = None,
    auth_ms: float | None = None,
) -> Outcome:
    """Authorize a payment (see the module docstring for the steps). A retry with the same
    Idempotency-Key answers the payment the first request made (409 `payment_in_progress` while
    it is still `authorizing`); a retry of a `challenge_required` payment with
    `X-Step-Up-Token` resumes it."""
    check_amount(body.amount)
    if body.source == "card":
        check_card_amount(body.amount)
    _codes(body)
    timer = Timer()
    if auth_ms is not None:
        timer.add("auth", auth_ms)
    request_hash = fingerprint(rt, "/v1/payments", body)
    txn_id = new_id("txn")
    # A payment's own work (tx1, the cryptogram; later tx2) runs inside the admission gate, the
    # wait for the network does not: the gate bounds the load on the database and vault pools
    # and on this event loop (a burst queues here, holding nothing; past its queue, 429
    # `overloaded` before anything is written), not the payments in flight.
    async with rt.admission.start():
        with timer.step("db"):
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                now, category = await store.claim_key(
                    conn, f"payment:{principal.user_id}:{idempotency_key}", body.merchant.mcc
                )
                existing = await store.by_idempotency_key(conn, principal.user_id, idempotency_key)
                if existing is None:
                    started = _Started(txn_id, idempotency_key, request_hash, now, category)
                    row = await _begin(conn, rt, principal, body, started, ip, timer)
        if existing is None and row.status == "authorizing":
            ctx = _Context(row, principal, _decision_of(row), timer)
            tokenised = await _cryptogram(rt, ctx)
    if existing is not None:
        return await _existing(engine, rt, principal, existing, request_hash, step_up_token, ip)
    if row.status != "authorizing":
        _observe(rt, row, timer)
        return Outcome(row)
    return Outcome(await _network_and_record(engine, rt, ctx, tokenised))


def _decision_of(row: Row[Any]) -> RiskDecision:
    return RiskDecision(row.risk_action or "allow")


async def _existing(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    row: Row[Any],
    request_hash: str,
    step_up_token: str | None,
    ip: str | None,
) -> Outcome:
    if row.request_hash != request_hash:
        raise key_reused()
    if row.status == "authorizing":
        raise PaymentInProgress(
            "This payment is still being authorized; retry shortly",
            headers={"Retry-After": "1"},
        )
    if row.status == "challenge_required" and step_up_token is not None:
        return Outcome(await resume(engine, rt, principal, row.id, step_up_token, ip=ip))
    return Outcome(row, replayed=True)


def _risk_input(
    row: dict[str, Any], principal: Principal, ip: str | None, stepped_up: bool
) -> PaymentRisk:
    return PaymentRisk(
        transaction_id=row["id"],
        user_id=row["user_id"],
        source=row["source"],
        payment_method_id=row["payment_method_id"],
        money=Money(row["amount"], row["currency"]),
        merchant_id=row["merchant_id"],
        merchant_name=row["merchant_name"],
        mcc=row["mcc"],
        category=row.get("category") or "other",
        merchant_country=row["merchant_country"],
        merchant_city=row["merchant_city"],
        latitude=row["latitude"],
        longitude=row["longitude"],
        channel=row["channel"],
        device_id=row["device_id"],
        session_device_id=principal.device_id,
        ip=ip,
        stepped_up=stepped_up,
    )


@dataclass(frozen=True)
class _Started:
    """What tx1 knows before it writes the payment: its id, the claimed key, the request's
    fingerprint, the transaction's clock (`created_at`) and the merchant's category."""

    txn_id: str
    idempotency_key: str
    request_hash: str
    now: datetime
    category: str


async def _begin(
    conn: AsyncConnection,
    rt: TransactionsRuntime,
    principal: Principal,
    body: NewPayment,
    started: _Started,
    ip: str | None,
    timer: Timer,
) -> Row[Any]:
    """tx1: the payment's first row. Declined, challenged and wallet payments are final here;
    an allowed or reviewed card payment is `authorizing`, for the network."""
    user_id = principal.user_id
    m = body.merchant
    idempotency_key, request_hash = started.idempotency_key, started.request_hash
    values: dict[str, Any] = {
        "id": started.txn_id,
        "user_id": user_id,
        "source": body.source,
        "payment_method_id": body.payment_method_id,
        "token_id": None,
        "amount": body.amount,
        "currency": body.currency,
        "authorized_amount": 0,
        "merchant_id": m.id,
        "merchant_name": m.name,
        "mcc": m.mcc,
        "channel": body.channel,
        "device_id": body.device_id or principal.device_id,
        "description": body.description,
        "note": body.note,
        "decline_code": None,
        "hold_id": None,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "expires_at": None,
        "merchant_country": m.country,
        "merchant_city": m.city,
        "latitude": m.latitude,
        "longitude": m.longitude,
        "card_brand": None,
        "card_last4": None,
        "rrn": None,
    }
    if body.source == "card":
        assert body.payment_method_id is not None
        with timer.step("token"):
            card = await payment_methods.card_token_for(conn, user_id, body.payment_method_id)
        values |= {"token_id": card.token_id, "card_brand": card.brand, "card_last4": card.last4}
    values["category"] = started.category
    with timer.step("fraud"):
        decision = await rt.risk.assess(conn, _risk_input(values, principal, ip, False))
    values |= {
        "risk_action": decision.action,
        "risk_score": decision.score,
        "risk_reasons": list(decision.reasons),
    }
    now = utcnow()
    if decision.action == "block":
        values |= {"status": "declined", "decline_code": declines.RISK_BLOCKED.code}
    elif decision.action == "challenge":
        expires = now + timedelta(seconds=rt.settings.payment_challenge_ttl_seconds)
        values |= {"status": "challenge_required", "expires_at": expires}
    elif body.source == "wallet":
        values |= await _hold_wallet(conn, rt, values, decision)
    else:
        # The network's reference is chosen (and committed) before the network is asked, so a
        # crash while it answers leaves a reference the recovery sweeper can reverse.
        values |= {"status": "authorizing", "rrn": new_rrn()}
    with timer.step("notify_enqueue"):
        # The event describes the row as the insert below writes it (`created_at` is this
        # transaction's now()), so both go in one statement.
        event = events.event(events.STATUS_EVENTS[values["status"]], _as_inserted(values, started))
    values["timings"] = timer.snapshot()
    row = await store.insert_with_event(conn, values, event)
    assert row is not None, "the advisory lock on the key admits one first request"
    return row


def _as_inserted(values: dict[str, Any], started: _Started) -> dict[str, Any]:
    """A new payment's columns as the database fills them in (what its first event says)."""
    return {
        **values,
        "captured_amount": 0,
        "released_amount": 0,
        "refunded_amount": 0,
        "created_at": started.now,
    }


async def _hold_wallet(
    conn: AsyncConnection, rt: TransactionsRuntime, values: dict[str, Any], decision: RiskDecision
) -> dict[str, Any]:
    """A wallet payment authorized (or held for review): a ledger hold on the balance, or a
    decline when the balance is too low."""
    expires = utcnow() + timedelta(seconds=rt.settings.payment_authorization_ttl_seconds)
    try:
        # A savepoint: a balance too low aborts the statement, and the decline is still written.
        async with conn.begin_nested():
            hold = await ledger.place_hold(
                conn,
                values["user_id"],
                Money(values["amount"], values["currency"]),
                reference=values["id"],
                expires_at=expires + HOLD_GRACE,
            )
    except ledger.InsufficientFunds:
        return {"status": "declined", "decline_code": declines.WALLET_INSUFFICIENT_FUNDS.code}
    return {
        "status": "review" if decision.action == "review" else "authorized",
        "hold_id": hold.id,
        "authorized_amount": values["amount"],
        "expires_at": expires,
    }


def _tokenised(crypto: Any, req: CryptogramRequest) -> TokenisedCard:
    return TokenisedCard(
        dpan=crypto.dpan,
        expiry_month=crypto.expiry_month,
        expiry_year=crypto.expiry_year,
        arqc=crypto.arqc,
        atc=crypto.atc,
        unpredictable_number=req.unpredictable_number,
        issuer_application_data=crypto.issuer_application_data,
        dynamic_cvv=crypto.dynamic_cvv,
        cryptogram_version=crypto.cryptogram_version,
        transaction_date=req.transaction_date,
        country_numeric=req.country_numeric,
        tvr=req.tvr,
        transaction_type=req.transaction_type,
        aip=crypto.application_interchange_profile,
        other_amount=req.other_amount,
        device_id=req.device_id,
        merchant_id=req.merchant_id,
    )


async def tokenised_card(
    rt: TransactionsRuntime, row: Row[Any], amount: int, session_device_id: str | None
) -> TokenisedCard:
    """A fresh cryptogram for `amount` on the payment's token, within the token's domain (this
    session's device, the payment's channel and merchant). Raises the vault's errors."""
    request = CryptogramRequest(
        token_id=row.token_id,
        amount=amount,
        currency_numeric=currency_numeric(row.currency),
        country_numeric=country_numeric(row.merchant_country),
        transaction_date=utcnow().date(),
        unpredictable_number=secrets.token_hex(4).upper(),
        channel=row.channel,
        device_id=session_device_id or row.device_id,
        merchant_id=row.merchant_id,
    )
    return _tokenised(await rt.vault.cryptogram(request), request)


async def _authorize_card(engine: AsyncEngine, rt: TransactionsRuntime, ctx: _Context) -> Row[Any]:
    """Steps 2 and 3: cryptogram and network with no connection held, then tx2."""
    return await _network_and_record(engine, rt, ctx, await _cryptogram(rt, ctx))


@dataclass(frozen=True)
class _Tokenised:
    """The cryptogram step's outcome: the card for the network, or why there is none."""

    card: TokenisedCard | None
    decline: declines.Decline | None = None
    failed: bool = False


async def _cryptogram(rt: TransactionsRuntime, ctx: _Context) -> _Tokenised:
    row = ctx.row
    try:
        with ctx.timer.step("token"):
            return _Tokenised(await tokenised_card(rt, row, row.amount, ctx.principal.device_id))
    except (TokenNotActive, TokenNotFound):
        return _Tokenised(None, declines.CARD_INACTIVE)
    except TokenDomainViolation:
        return _Tokenised(None, declines.CARD_NOT_ALLOWED_HERE)
    except ProblemError as exc:  # the vault process is unavailable
        log.warning("cryptogram failed", transaction_id=row.id, code=exc.code)
        return _Tokenised(None, declines.SERVICE_UNAVAILABLE, failed=True)


async def _network_and_record(
    engine: AsyncEngine, rt: TransactionsRuntime, ctx: _Context, tokenised: _Tokenised
) -> Row[Any]:
    """The network's answer for a tokenised card (none without one), then tx2."""
    timer, row, card = ctx.timer, ctx.row, tokenised.card
    authorization: Authorization | None = None
    decline, failed = tokenised.decline, tokenised.failed
    if card is not None:
        try:
            with timer.step("network"):
                async with rt.admission.network():
                    authorization = await rt.network.authorize(
                        card,
                        amount=row.amount,
                        currency=row.currency,
                        merchant=merchant_of(row),
                        channel=row.channel,
                        transaction_id=row.id,
                        rrn=row.rrn,
                    )
        except NetworkTimeout:
            # The client has already sent the 0420 reversal: nothing stays held on the card.
            decline, failed = declines.NETWORK_TIMEOUT, True
        except NetworkError:
            decline, failed = declines.NETWORK_UNAVAILABLE, True
        except WireError as exc:
            # The request could not be encoded, so nothing was sent: the payment fails now
            # rather than staying `authorizing` until the sweeper's deadline.
            log.error("authorization not encodable", transaction_id=row.id, error=str(exc))
            decline, failed = declines.SERVICE_UNAVAILABLE, True
    return await _record_answer(engine, rt, row.id, ctx, authorization, decline, failed)


async def _record_answer(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    txn_id: str,
    ctx: _Context,
    authorization: Authorization | None,
    decline: declines.Decline | None,
    failed: bool,
) -> Row[Any]:
    """tx2: the network's answer on the payment, its details and its event."""
    timer = ctx.timer
    late = False
    with timer.step("db"):
        # Ahead of every payment waiting to start: the answer is in, only its write is left.
        async with rt.admission.finish():
            row, late = await _write_answer(engine, txn_id, ctx, authorization, decline, failed, rt)
    if late:
        assert authorization is not None
        await reverse_quietly(rt, authorization, authorization.amount, "late_answer", txn_id)
        return row
    _observe(rt, row, timer)
    return row


async def _write_answer(
    engine: AsyncEngine,
    txn_id: str,
    ctx: _Context,
    authorization: Authorization | None,
    decline: declines.Decline | None,
    failed: bool,
    rt: TransactionsRuntime,
) -> tuple[Row[Any], bool]:
    timer = ctx.timer
    values: dict[str, Any] = {}
    if authorization is not None:
        values |= {
            "response_code": authorization.response_code,
            "stand_in": authorization.stand_in,
            "stan": authorization.stan,
            "rrn": authorization.rrn,
        }
        if authorization.approved:
            expires = utcnow() + timedelta(seconds=rt.settings.payment_authorization_ttl_seconds)
            values |= {
                "status": "review" if ctx.decision.action == "review" else "authorized",
                "authorized_amount": authorization.amount,
                "auth_code": authorization.auth_code,
                "expires_at": expires,
                "authorized_at": utcnow(),
            }
        else:
            decline = declines.from_response_code(authorization.response_code)
    if decline is not None:
        values |= {"status": "failed" if failed else "declined", "decline_code": decline.code}
    with timer.step("notify_enqueue"):
        # While it is `authorizing` nothing else changes the payment, so its event is tx1's row
        # with these values, written by the same statement as they are.
        event = events.event(events.STATUS_EVENTS[values["status"]], {**mapping(ctx.row), **values})
    values["timings"] = timer.snapshot()
    # One statement, atomic on its own: no BEGIN and COMMIT round trips around it.
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        row = await store.finish_authorizing(conn, txn_id, values, event)
        written = outbox_written(conn)  # the mark must not stay on the pooled connection
        if row is None:
            # The recovery sweeper already failed it (this request outlived the deadline): an
            # approval that arrives now is reversed, never left holding the user's money.
            row = await store.get(conn, txn_id)
            assert row is not None
            return row, authorization is not None and authorization.approved
    if written:
        wake_relay(engine)
    return row, False


def _observe(rt: TransactionsRuntime, row: Row[Any], timer: Timer) -> None:
    if rt.metrics is not None:
        rt.metrics.observe(timer.ms, row.source, row.status)


async def reverse_quietly(
    rt: TransactionsRuntime, original: Authorization, amount: int, reason: str, txn_id: str
) -> None:
    """Send a reversal after the payment's change committed. The network client repeats an
    unacknowledged 0420 itself; an error here is logged (the issuer's own authorization expiry
    is the last resort), never raised into an answer that already happened."""
    if amount <= 0:
        return
    if not original.rrn:
        log.warning(
            "no reversal: the network's reference of the authorization is unknown",
            transaction_id=txn_id,
        )
        return
    try:
        await rt.network.reverse(original, amount=amount, reason=reason)
    except NetworkError as exc:
        log.warning("reversal not delivered", transaction_id=txn_id, error=type(exc).__name__)


# --- step-up ----------------------------------------------------------------------------------


async def resume(
    engine: AsyncEngine,
    rt: TransactionsRuntime,
    principal: Principal,
    txn_id: str,
    step_up_token: str,
    *,
    ip: str | None = None,
) -> Row[Any]:
    """Continue a `challenge_required` payment once the user stepped up (purpose `payment`,
    reference the payment id). The risk check is asked again, told the user stepped up."""
    async with engine.connect() as conn:
        found = await store.get_for_user(conn, txn_id, principal.user_id)
        await conn.rollback()
    if found is None:
        raise PaymentNotFound("No such payment")
    if found.status != "challenge_required":
        raise PaymentNotResumable(
            "This payment is not waiting for a step-up",
            extra={"payment_status": found.status},
        )
    await users.verify_step_up(rt.users, step_up_token, principal, STEP_UP_PURPOSE, txn_id)
    timer = Timer()
    with timer.step("db"):
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            row = await store.get_for_user(conn, txn_id, principal.user_id, for_update=True)
            assert row is not None
            if row.status != "challenge_required":
                raise PaymentNotResumable(
                    "This payment is not waiting for a step-up",
                    extra={"payment_status": row.status},
                )
            with timer.step("fraud"):
                decision = await rt.risk.assess(
                    conn, _risk_input(mapping(row), principal, ip, True)
                )
            values: dict[str, Any] = {
                "risk_action": decision.action,
                "risk_score": decision.score,
                "risk_reasons": list(decision.reasons),
                "expires_at": None,
            }
            if decision.action == "block":
                values |= {"status": "declined", "decline_code": declines.RISK_BLOCKED.code}
            elif row.source == "wallet":
                values |= await _hold_wallet(conn, rt, mapping(row), decision)
            else:
                values |= {"status": "authorizing", "rrn": new_rrn()}  # as in `_begin`
            await store.update(conn, txn_id, values)
            row = await store.get(conn, txn_id)
            assert row is not None
            await publish(conn, events.STATUS_EVENTS[row.status], row, stepped_up=True)
    if row.status != "authorizing":
        _observe(rt, row, timer)
        return row
    return await _authorize_card(engine, rt, _Context(row, principal, decision, timer))
