"""Cards and bank accounts: add, verify, list, update, default, remove.

A card's PAN goes straight to the vault; this service keeps the vault's card and token ids and
what a wallet shows (brand, last4, expiry). It is verified at once by a zero-amount account
verification with the CVV (the PAN comes back from the vault for that, audited as
`account_verification`); the CVV lives only in this request's memory. A bank account's number is
sealed under the process key and verified by two micro-deposits the user confirms.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold.gateway import Principal
from billfold.payment_methods import banks, cards, events, store
from billfold.payment_methods.models import (
    BankAccountView,
    BillingAddress,
    CardExpired,
    CardRequired,
    CardToken,
    CardView,
    InvalidAccountNumber,
    InvalidBic,
    InvalidCardNumber,
    InvalidCvv,
    InvalidExpiry,
    InvalidIban,
    InvalidMicroDeposits,
    InvalidRoutingNumber,
    MicroDepositsExpired,
    MicroDepositsView,
    NewBankAccount,
    NewCard,
    NewPaymentMethod,
    PaymentMethod,
    PaymentMethodExists,
    PaymentMethodNotFound,
    PaymentMethodNotPending,
    PaymentMethodNotVerified,
    TooManyCardAttempts,
    UnsupportedCardBrand,
    UpdatePaymentMethod,
)
from billfold.payment_methods.runtime import PaymentMethodsRuntime
from billfold.platform.bus.consumers import Consumer
from billfold.platform.clock import rfc3339, utcnow
from billfold.platform.db import UnitOfWork, unit_of_work
from billfold.platform.errors import FieldError, Unprocessable
from billfold.platform.ids import new_id
from billfold.platform.observability import get_logger
from billfold.vault import CardInput, CardNotFound, TokenDomain, VaultedCard

log = get_logger("billfold.payment_methods")

# A user may fail to verify the same card this many times a day (a CVV is 3-4 digits: without a
# cap, adding the card again and again would guess it).
MAX_CARD_FAILURES_PER_DAY = 3
# And all users together this many times (card testing spreads the guesses over many accounts).
# The price: someone failing on purpose with a stolen number locks its owner out for a day too.
MAX_CARD_FAILURES_PER_DAY_ALL_USERS = 5
MICRO_DEPOSITS_FAILED = "micro_deposits_failed"
MICRO_DEPOSITS_EXPIRED = "micro_deposits_expired"


def requester(user_id: str) -> str:
    """Who asks the vault for a PAN, as its audit log records it."""
    return f"payment_methods:{user_id}"


def label(row: Row[Any]) -> str:
    """How a method is named to its owner: `Visa ••4242`, `Bank ••6789`."""
    name = (row.brand or "card").capitalize() if row.type == "card" else "Bank account"
    return f"{name} ••{row.last4}"


def view(row: Row[Any]) -> PaymentMethod:
    card = bank = deposits = None
    if row.type == "card":
        card = CardView(
            brand=row.brand,
            last4=row.last4,
            expiry_month=row.expiry_month,
            expiry_year=row.expiry_year,
            cardholder_name=row.cardholder_name,
            billing_address=(
                BillingAddress(**row.billing_address) if row.billing_address else None
            ),
            fingerprint=row.fingerprint,
            token_id=row.vault_token_id,
            token_last4=row.token_last4,
        )
    else:
        bank = BankAccountView(
            country=row.bank_country,
            last4=row.last4,
            routing_number=row.routing_number,
            account_type=row.account_type,
            bic=row.bic,
            bank_name=row.bank_name,
            currency=row.currency,
            fingerprint=row.fingerprint,
        )
        if row.deposit_status is not None:
            deposits = MicroDepositsView(
                status=row.deposit_status,
                attempts_left=max(0, row.deposit_max_attempts - row.deposit_attempts),
                expires_at=row.deposit_expires_at,
            )
    return PaymentMethod(
        id=row.id,
        type=row.type,
        status=row.status,
        nickname=row.nickname,
        is_default=row.is_default,
        card=card,
        bank_account=bank,
        micro_deposits=deposits,
        failure_code=row.failure_code,
        failure_reason=row.failure_reason,
        verified_at=row.verified_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _summary(row: Row[Any]) -> dict[str, Any]:
    """What events say about a method: never a number, only what the owner is shown."""
    return {
        "payment_method_id": row.id,
        "type": row.type,
        "status": row.status,
        "brand": row.brand,
        "last4": row.last4,
        "currency": row.currency,
    }


async def get(conn: AsyncConnection, method_id: str, user_id: str) -> Row[Any]:
    row = await store.get(conn, method_id, user_id)
    if row is None:
        raise PaymentMethodNotFound("No such payment method")
    return row


async def _refetch(conn: AsyncConnection, method_id: str, user_id: str) -> Row[Any]:
    row = await store.get(conn, method_id, user_id)
    assert row is not None
    return row


# --- adding -----------------------------------------------------------------------------------


async def add(
    conn: AsyncConnection, rt: PaymentMethodsRuntime, principal: Principal, body: NewPaymentMethod
) -> Row[Any]:
    """Add a card (verified at once) or a bank account (micro-deposits sent)."""
    if (body.card is None) == (body.bank_account is None):
        raise Unprocessable(
            "Give exactly one of card or bank_account",
            errors=[FieldError(pointer="#", detail="exactly one of card or bank_account")],
        )
    if body.card is not None:
        return await _add_card(conn, rt, principal, body.card, body.nickname)
    assert body.bank_account is not None
    return await _add_bank_account(conn, rt, principal.user_id, body.bank_account, body.nickname)


def _field(pointer: str, detail: str) -> list[FieldError]:
    return [FieldError(pointer=pointer, detail=detail)]


def check_card(card: NewCard) -> tuple[str, str]:
    """The PAN's digits and its brand, or the first problem with the card (never echoing it)."""
    pan = cards.normalise_pan(card.pan)
    if pan is None or not cards.luhn_valid(pan):
        raise InvalidCardNumber(
            "The card number is not valid: check the digits",
            errors=_field("#/card/pan", "not a valid card number"),
        )
    brand = cards.brand_of(pan)
    if brand is None:
        raise UnsupportedCardBrand(
            "Cards of this brand are not accepted",
            errors=_field(
                "#/card/pan",
                "accepted: Visa, Mastercard, American Express, Discover, JCB, Diners Club, "
                "UnionPay, Maestro",
            ),
        )
    state = cards.expiry_state(card.expiry_month, card.expiry_year)
    if state == "invalid":
        pointer = (
            "#/card/expiry_month" if not 1 <= card.expiry_month <= 12 else "#/card/expiry_year"
        )
        raise InvalidExpiry(
            "The expiry date is not valid", errors=_field(pointer, "not a valid expiry date")
        )
    if state == "expired":
        raise CardExpired(
            "The card has expired", errors=_field("#/card/expiry_year", "the card has expired")
        )
    if not cards.cvv_valid(pan, card.cvv):
        digits = 4 if brand == "amex" else 3
        raise InvalidCvv(
            f"The CVV of this card is {digits} digits",
            errors=_field("#/card/cvv", f"must be {digits} digits"),
        )
    return pan, brand


async def _add_card(
    conn: AsyncConnection,
    rt: PaymentMethodsRuntime,
    principal: Principal,
    card: NewCard,
    nickname: str | None,
) -> Row[Any]:
    user_id = principal.user_id
    pan, brand = check_card(card)
    await store.lock_user(conn, user_id)
    vaulted = await rt.vault.vault_card(
        CardInput(
            pan=pan,
            expiry_month=card.expiry_month,
            expiry_year=card.expiry_year,
            cardholder_name=card.cardholder_name,
        ),
        owner_id=user_id,
    )
    del pan
    if await store.live_with_fingerprint(conn, user_id, vaulted.fingerprint):
        # The vault handed back the card it already keeps for this user: nothing to undo.
        raise PaymentMethodExists("You have already added this card")
    # From here on the vault holds a card (and maybe a token) this transaction may never
    # commit: any failure deletes it again, so no live number outlives a request that failed
    # (a network timeout during verification, the insert, ...).
    try:
        return await _verify_card(conn, rt, principal, card, nickname, vaulted, brand)
    except Exception as exc:
        reason = (
            "verification_attempts_exhausted"
            if isinstance(exc, TooManyCardAttempts)
            else "not_added"
        )
        await _discard(rt, vaulted.card_id, reason)
        raise


async def _discard(rt: PaymentMethodsRuntime, card_id: str, reason: str) -> None:
    """Delete a vault card this service no longer keeps; one already gone is fine. A vault that
    cannot be reached leaves it behind: logged (by id), never raised over the first error."""
    try:
        await rt.vault.delete_card(card_id, reason=reason)
    except CardNotFound:
        pass
    except Exception:
        log.exception("vault card left behind; delete it by id", vault_card_id=card_id)


async def _verify_card(
    conn: AsyncConnection,
    rt: PaymentMethodsRuntime,
    principal: Principal,
    card: NewCard,
    nickname: str | None,
    vaulted: VaultedCard,
    brand: str,
) -> Row[Any]:
    user_id = principal.user_id
    since = utcnow() - timedelta(days=1)
    mine = await store.recent_failures(conn, vaulted.fingerprint, since, user_id=user_id)
    everyone = await store.recent_failures(conn, vaulted.fingerprint, since)
    if mine >= MAX_CARD_FAILURES_PER_DAY or everyone >= MAX_CARD_FAILURES_PER_DAY_ALL_USERS:
        raise TooManyCardAttempts(
            "This card failed verification too often today; try again tomorrow",
            headers={"Retry-After": str(24 * 3600)},
        )

    secret = await rt.vault.detokenize(
        card_id=vaulted.card_id, requester=requester(user_id), purpose="account_verification"
    )
    verification = await rt.network.verify_account(secret, card.cvv)
    del secret

    method_id = new_id("pm")
    now = utcnow()
    values: dict[str, Any] = {
        "id": method_id,
        "user_id": user_id,
        "type": "card",
        "nickname": nickname,
        "fingerprint": vaulted.fingerprint,
        "last4": vaulted.last4,
        "brand": brand,
        "expiry_month": vaulted.expiry_month,
        "expiry_year": vaulted.expiry_year,
        "cardholder_name": card.cardholder_name,
        "billing_address": card.billing_address.model_dump(),
        "vault_card_id": vaulted.card_id,
    }
    if verification.approved:
        # Bound to the caller's device when the session has one: cryptograms for this token
        # are then made for that phone only.
        token = await rt.vault.issue_token(
            vaulted.card_id, domain=TokenDomain(device_id=principal.device_id)
        )
        values |= {
            "status": "verified",
            "vault_token_id": token.token_id,
            "token_last4": token.dpan_last4,
            "verified_at": now,
        }
    else:
        # Nothing to keep a failed card's number for.
        await rt.vault.delete_card(vaulted.card_id, reason="account_verification_failed")
        values |= {
            "status": "failed",
            "failure_code": verification.response_code,
            "failure_reason": verification.reason,
        }
    await store.insert(conn, values)
    row = await _refetch(conn, method_id, user_id)
    await events.publish(conn, events.ADDED, method_id, user_id, _summary(row))
    if verification.approved:
        await events.publish(
            conn,
            events.VERIFIED,
            method_id,
            user_id,
            {**_summary(row), "method": "account_verification", "token_id": row.vault_token_id},
        )
        await _default_if_none(conn, user_id, method_id)
    else:
        await events.publish(
            conn,
            events.VERIFICATION_FAILED,
            method_id,
            user_id,
            {
                **_summary(row),
                "method": "account_verification",
                "failure_code": row.failure_code,
                "failure_reason": row.failure_reason,
            },
        )
    return await _refetch(conn, method_id, user_id)


def _check_bank_account(
    account: NewBankAccount,
) -> tuple[str, str, dict[str, Any]]:
    """(country, normalised account for the fingerprint and the sealed copy, row values)."""
    if account.iban is not None:
        mixed = [
            name
            for name in ("routing_number", "account_number", "account_type")
            if getattr(account, name) is not None
        ]
        if mixed:
            raise Unprocessable(
                "Give an IBAN or a US routing and account number, not both",
                errors=[
                    FieldError(pointer=f"#/bank_account/{n}", detail="not with iban") for n in mixed
                ],
            )
        iban = banks.check_iban(account.iban)
        if iban is None:
            raise InvalidIban(
                "The IBAN is not valid: check its country, length and check digits",
                errors=_field("#/bank_account/iban", "not a valid IBAN"),
            )
        bic = iban.bic
        if account.bic is not None:
            bic = banks.check_bic(account.bic)
            if bic is None or banks.bic_country(bic) != iban.country:
                raise InvalidBic(
                    "The BIC is not valid for this IBAN",
                    errors=_field("#/bank_account/bic", "not a valid BIC for the IBAN's country"),
                )
        return (
            iban.country,
            f"iban:{iban.compact}",
            {
                "last4": iban.compact[-4:],
                "bic": bic,
                "bank_name": iban.bank_name,
                "account": iban.compact,
            },
        )
    missing = [
        name for name in ("routing_number", "account_number") if getattr(account, name) is None
    ]
    if missing:
        raise Unprocessable(
            "Give an iban, or a routing_number and an account_number",
            errors=[FieldError(pointer=f"#/bank_account/{n}", detail="required") for n in missing],
        )
    if account.bic is not None:
        raise Unprocessable(
            "A BIC goes with an IBAN",
            errors=_field("#/bank_account/bic", "only with iban"),
        )
    routing, number = account.routing_number or "", account.account_number or ""
    if not banks.routing_number_valid(routing):
        raise InvalidRoutingNumber(
            "The routing number is not a valid ABA routing number",
            errors=_field("#/bank_account/routing_number", "not a valid ABA routing number"),
        )
    if not banks.account_number_valid(number):
        raise InvalidAccountNumber(
            "A US account number is 4 to 17 digits",
            errors=_field("#/bank_account/account_number", "must be 4 to 17 digits"),
        )
    return (
        "US",
        f"us:{routing}:{number}",
        {
            "last4": number[-4:],
            "routing_number": routing,
            "account_type": account.account_type or "checking",
            "account": number,
        },
    )


async def _add_bank_account(
    conn: AsyncConnection,
    rt: PaymentMethodsRuntime,
    user_id: str,
    account: NewBankAccount,
    nickname: str | None,
) -> Row[Any]:
    country, normalised, details = _check_bank_account(account)
    currency = account.currency or banks.currency_of(country)
    if currency is None or currency == "PTS":
        raise Unprocessable(
            "Say which currency this account holds",
            code="currency_not_supported",
            errors=_field("#/bank_account/currency", "required for this country"),
        )
    fingerprint = rt.bank_fingerprint(normalised)
    await store.lock_user(conn, user_id)
    if await store.live_with_fingerprint(conn, user_id, fingerprint):
        raise PaymentMethodExists("You have already added this bank account")
    method_id = new_id("pm")
    clear = details.pop("account")
    await store.insert(
        conn,
        {
            "id": method_id,
            "user_id": user_id,
            "type": "bank_account",
            "status": "pending_verification",
            "nickname": nickname,
            "fingerprint": fingerprint,
            "bank_country": country,
            "currency": currency,
            "account_sealed": rt.seal_account(method_id, clear),
            **details,
        },
    )
    del clear
    # Two small deposits the user finds on their bank statement (the simulated ACH credits them
    # at once); amounts from the OS's CSPRNG, never guessable from one another.
    amounts = (secrets.randbelow(99) + 1, secrets.randbelow(99) + 1)
    expires_at = utcnow() + timedelta(seconds=rt.settings.micro_deposit_ttl_seconds)
    await store.insert_deposits(
        conn, method_id, amounts, currency, rt.settings.micro_deposit_max_attempts, expires_at
    )
    row = await _refetch(conn, method_id, user_id)
    await events.publish(conn, events.ADDED, method_id, user_id, _summary(row))
    await events.publish(
        conn,
        events.MICRO_DEPOSITS_SENT,
        method_id,
        user_id,
        {**_summary(row), "count": 2, "expires_at": rfc3339(expires_at)},
    )
    return row


# --- micro-deposits ---------------------------------------------------------------------------


async def verify_micro_deposits(
    uow: UnitOfWork, user_id: str, method_id: str, amounts: list[int]
) -> Row[Any]:
    """Confirm the two deposits (any order). The attempt is counted, and a method out of
    attempts or time is failed, in a transaction of its own that commits whatever this request
    answers: parallel guesses each spend one attempt."""
    outcome: str
    attempts_left = 0
    async with uow.engine.begin() as side:
        row = await store.get(side, method_id, user_id, for_update=True)
        if row is None:
            raise PaymentMethodNotFound("No such payment method")
        if row.type != "bank_account" or row.status != "pending_verification":
            raise PaymentMethodNotPending(
                f"This payment method is {row.status.replace('_', ' ')}; only a bank account "
                "awaiting verification takes micro-deposit amounts",
                extra={"payment_method_status": row.status},
            )
        deposits = await store.deposits_for_update(side, method_id)
        assert deposits is not None
        attempts = deposits.attempts + 1
        if deposits.expired:
            outcome = "expired"
            await store.update_deposits(
                side, method_id, status="expired", attempts=deposits.attempts
            )
            await _fail(
                side, row, MICRO_DEPOSITS_EXPIRED, "The time to confirm the deposits ran out"
            )
        elif sorted(amounts) == sorted((deposits.amount_1, deposits.amount_2)):
            outcome = "right"
            await store.update_deposits(side, method_id, status="pending", attempts=attempts)
        else:
            attempts_left = deposits.max_attempts - attempts
            outcome = "wrong"
            exhausted = attempts_left <= 0
            await store.update_deposits(
                side, method_id, status="failed" if exhausted else "pending", attempts=attempts
            )
            if exhausted:
                await _fail(
                    side, row, MICRO_DEPOSITS_FAILED, "The deposit amounts were wrong too often"
                )
    if outcome == "expired":
        raise MicroDepositsExpired(
            "The time to confirm these deposits is over; add the bank account again",
            extra={"payment_method_status": "failed"},
        )
    if outcome == "wrong":
        raise InvalidMicroDeposits(
            "These are not the amounts we deposited"
            + ("" if attempts_left else "; no attempts are left, add the bank account again"),
            extra={
                "attempts_left": attempts_left,
                "payment_method_status": "pending_verification" if attempts_left else "failed",
            },
        )
    conn = await uow.connection()
    await store.lock_user(conn, user_id)
    row = await store.get(conn, method_id, user_id, for_update=True)
    if row is None:
        raise PaymentMethodNotFound("No such payment method")
    if row.status != "pending_verification":  # a parallel request confirmed it first
        raise PaymentMethodNotPending(
            f"This payment method is {row.status.replace('_', ' ')}",
            extra={"payment_method_status": row.status},
        )
    await store.update_deposits(conn, method_id, status="confirmed", attempts=row.deposit_attempts)
    await store.update(conn, method_id, {"status": "verified", "verified_at": utcnow()})
    row = await _refetch(conn, method_id, user_id)
    await events.publish(
        conn, events.VERIFIED, method_id, user_id, {**_summary(row), "method": "micro_deposits"}
    )
    await _default_if_none(conn, user_id, method_id)
    return await _refetch(conn, method_id, user_id)


async def _fail(conn: AsyncConnection, row: Row[Any], code: str, reason: str) -> None:
    await store.update(
        conn, row.id, {"status": "failed", "failure_code": code, "failure_reason": reason}
    )
    await events.publish(
        conn,
        events.VERIFICATION_FAILED,
        row.id,
        row.user_id,
        {
            **_summary(row),
            "status": "failed",
            "method": "micro_deposits",
            "failure_code": code,
            "failure_reason": reason,
        },
    )


async def expire_micro_deposits(engine: AsyncEngine, *, batch: int = 200) -> int:
    """Fail the bank accounts whose micro-deposits were not confirmed in time (worker job; the
    verify route also fails a late one when it is asked). One transaction per account, each
    taking the next due one no other worker holds; one that fails is logged and skipped."""
    expired = 0
    failed: list[str] = []
    for _ in range(batch):
        current: str | None = None
        try:
            async with unit_of_work(engine) as uow:
                conn = await uow.connection()
                row = await store.lock_next_expired_deposits(conn, failed)
                if row is None:
                    break
                current = row.id
                await store.update_deposits(
                    conn, row.id, status="expired", attempts=row.deposit_attempts
                )
                await _fail(
                    conn, row, MICRO_DEPOSITS_EXPIRED, "The time to confirm the deposits ran out"
                )
            expired += 1
        except Exception:
            if current is None:  # could not even look: the database is the problem
                raise
            log.exception("could not expire micro-deposits; will retry", payment_method=current)
            failed.append(current)
    return expired


async def micro_deposit_amounts(
    conn: AsyncConnection, method_id: str, user_id: str
) -> tuple[int, int] | None:
    """What the user's bank statement shows (the simulated ACH's credits): for the demo and
    tests, never for an API."""
    row = await store.get(conn, method_id, user_id)
    if row is None:
        return None
    return await store.deposit_amounts(conn, method_id)


# --- changing ---------------------------------------------------------------------------------


async def _default_if_none(conn: AsyncConnection, user_id: str, method_id: str) -> None:
    """A user's first verified method becomes their default."""
    if await store.default_of(conn, user_id) is None:
        await _change_default(conn, user_id, method_id, None)


async def _change_default(
    conn: AsyncConnection, user_id: str, new: str | None, previous: str | None
) -> None:
    """Make `new` the user's default (None: no default any more) and say so."""
    await store.set_default(conn, user_id, new)
    await events.publish(
        conn,
        events.DEFAULT_CHANGED,
        new or previous or user_id,
        user_id,
        {"payment_method_id": new, "previous_payment_method_id": previous},
    )


async def update(
    conn: AsyncConnection, method_id: str, user_id: str, body: UpdatePaymentMethod
) -> Row[Any]:
    """Nickname (null clears it) and, for a card, the billing address."""
    await store.lock_user(conn, user_id)
    row = await store.get(conn, method_id, user_id, for_update=True)
    if row is None:
        raise PaymentMethodNotFound("No such payment method")
    changes: dict[str, Any] = {}
    if "nickname" in body.model_fields_set:
        changes["nickname"] = body.nickname
    if "billing_address" in body.model_fields_set:
        if row.type != "card" or body.billing_address is None:
            raise Unprocessable(
                "Only a card has a billing address, and it cannot be removed",
                errors=_field("#/billing_address", "a card's new billing address"),
            )
        changes["billing_address"] = body.billing_address.model_dump()
    if changes:
        await store.update(conn, method_id, changes)
        await events.publish(
            conn,
            events.UPDATED,
            method_id,
            user_id,
            {**_summary(row), "changed": sorted(changes)},
        )
    return await _refetch(conn, method_id, user_id)


async def make_default(conn: AsyncConnection, method_id: str, user_id: str) -> Row[Any]:
    await store.lock_user(conn, user_id)
    row = await store.get(conn, method_id, user_id, for_update=True)
    if row is None:
        raise PaymentMethodNotFound("No such payment method")
    if row.status != "verified":
        raise PaymentMethodNotVerified(
            "Only a verified payment method can be the default",
            extra={"payment_method_status": row.status},
        )
    previous = await store.default_of(conn, user_id)
    if previous != method_id:
        await _change_default(conn, user_id, method_id, previous)
    return await _refetch(conn, method_id, user_id)


async def remove(uow: UnitOfWork, rt: PaymentMethodsRuntime, method_id: str, user_id: str) -> None:
    """Remove a method: a card's PAN and every token of it are deleted in the vault, a bank
    account's sealed number is dropped. A removed default hands over to the newest other
    verified method, or to none."""
    conn = await uow.connection()
    await store.lock_user(conn, user_id)
    row = await store.get(conn, method_id, user_id, for_update=True)
    if row is None:
        raise PaymentMethodNotFound("No such payment method")
    await store.update(
        conn,
        method_id,
        {"status": "removed", "removed_at": utcnow(), "is_default": False, "account_sealed": None},
    )
    await events.publish(
        conn, events.REMOVED, method_id, user_id, {**_summary(row), "status": "removed"}
    )
    if row.is_default:
        successor = await store.newest_verified(conn, user_id, excluding=method_id)
        await _change_default(conn, user_id, successor, method_id)
    if row.type == "card" and row.status != "failed":
        # Only once the removal has committed: deleted first, a transaction that then rolled
        # back would leave a live method whose card the vault no longer has. A vault that
        # cannot be reached then leaves the number behind a removed method: logged by id (and
        # no payment can reach it: the method is gone). A failed card's number was deleted
        # when it failed.
        card_id = row.vault_card_id

        async def delete_in_vault() -> None:
            await _discard(rt, card_id, "removed_by_user")

        uow.after_commit(delete_in_vault)


async def card_updated(conn: AsyncConnection, data: dict[str, Any]) -> None:
    """The vault reissued a card (`billfold.vault.card.updated`): its owner's live methods of
    that card show the new last4 and expiry (and fingerprint, when the event carries one), with
    an `updated` event each. Idempotent: a redelivered event finds nothing left to change."""
    card_id, owner_id = data.get("card_id"), data.get("owner_id")
    if not (isinstance(card_id, str) and isinstance(owner_id, str)):
        return
    new: dict[str, Any] = {}
    last4, month, year = data.get("last4"), data.get("expiry_month"), data.get("expiry_year")
    if isinstance(last4, str) and len(last4) == 4 and last4.isdigit():
        new["last4"] = last4
    if isinstance(month, int) and isinstance(year, int) and 1 <= month <= 12:
        new |= {"expiry_month": month, "expiry_year": year}
    fingerprint = data.get("fingerprint")
    if isinstance(fingerprint, str) and fingerprint:
        new["fingerprint"] = fingerprint
    await store.lock_user(conn, owner_id)
    for row in await store.live_of_vault_card(conn, card_id, owner_id):
        changes = {k: v for k, v in new.items() if getattr(row, k) != v}
        if not changes:
            continue
        await store.update(conn, row.id, changes)
        fresh = await _refetch(conn, row.id, owner_id)
        await events.publish(
            conn,
            events.UPDATED,
            row.id,
            owner_id,
            {**_summary(fresh), "changed": sorted(changes), "reason": "card_reissued"},
        )


def consumers() -> list[Consumer]:
    """The event consumers this service runs in the worker (`jobs.event_sink`)."""
    return [
        Consumer(
            "payment_methods.card-updated",
            frozenset({events.VAULT_CARD_UPDATED}),
            lambda conn, event: card_updated(conn, event.get("data") or {}),
        )
    ]


# --- spending ---------------------------------------------------------------------------------


async def card_token_for(conn: AsyncConnection, user_id: str, method_id: str) -> CardToken:
    """The payment token of the user's verified card `method_id`, for a card payment.

    Someone else's, removed or unknown method: `payment_method_not_found` (404); not verified
    (pending or failed): `payment_method_not_verified` (409); a bank account: `card_required`
    (422). The pointer is `#/payment_method_id`."""
    row = await store.get(conn, method_id, user_id)
    pointer = _field("#/payment_method_id", "not one of your cards")
    if row is None:
        raise PaymentMethodNotFound("No such payment method", errors=pointer)
    if row.type != "card":
        raise CardRequired(
            "Pay with a card or with your wallet balance, not a bank account",
            errors=_field("#/payment_method_id", "must be a card"),
        )
    if row.status != "verified" or row.vault_token_id is None:
        raise PaymentMethodNotVerified(
            "Verify this card before paying with it",
            extra={"payment_method_status": row.status},
        )
    return CardToken(
        payment_method_id=row.id,
        token_id=row.vault_token_id,
        brand=row.brand,
        last4=row.last4,
        expiry_month=row.expiry_month,
        expiry_year=row.expiry_year,
    )
