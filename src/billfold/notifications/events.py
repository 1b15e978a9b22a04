"""The events the service listens to (by type string: it imports none of the services that
publish them above its layer) and what each means for whom."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import ledger, users
from billfold.notifications import store
from billfold.notifications.service import Intent, NotificationsRuntime, notify
from billfold.platform.bus.consumers import Consumer
from billfold.platform.clock import utcnow

log = logging.getLogger(__name__)

CONSUMER = "notifications"

TRANSFER_COMPLETED = "billfold.p2p.transfer.completed"
TRANSFER_PENDING_CLAIM = "billfold.p2p.transfer.pending_claim"
TRANSFER_EXPIRED = "billfold.p2p.transfer.expired"
PAYMENT_AUTHORIZED = "billfold.transactions.payment.authorized"
PAYMENT_DECLINED = "billfold.transactions.payment.declined"
PAYMENT_REFUNDED = "billfold.transactions.payment.refunded"
FRAUD_DECISION = "billfold.fraud.decision.made"
DEVICE_ENROLLED = "billfold.users.device.enrolled"
SESSION_CREATED = "billfold.users.session.created"
KYC_STATUS_CHANGED = "billfold.users.kyc.status_changed"
VERIFICATION_REQUESTED = "billfold.users.verification.requested"
STEP_UP_CODE_REQUESTED = "billfold.users.step_up.code_requested"
PASSWORD_RESET_REQUESTED = "billfold.users.password_reset.requested"
ACCOUNT_LOCKED = "billfold.users.account.locked"
ACCOUNT_UNLOCKED = "billfold.users.account.unlocked"
WALLET_WITHDRAWN = "billfold.ledger.wallet.withdrawn"
TIER_CHANGED = "billfold.loyalty.tier.changed"

Handler = Callable[[AsyncConnection, dict[str, Any]], Awaitable[list[Intent]]]


async def _name(conn: AsyncConnection, user_id: str | None) -> str:
    party = await users.get_party(conn, user_id) if user_id else None
    if party is None:
        return "?"
    return party.name if not party.handle else f"{party.name} (@{party.handle})"


# An invitation goes to an address nobody has verified, under billfold's name: what it says
# about the sender must not be text the sender chose (a user's name is any 1-120 characters:
# "billfold Security: call +1 900…" would be phishing sent by us). It shows the first word of
# the name only if it reads as a first name (letters, joined by single ' or - but no dot, no
# digits, at most 24) and names no brand or role, plus the sender's verified contact masked.
_FIRST_NAME = re.compile("^[^\\W\\d_]+(?:['\u2019-][^\\W\\d_]+)*$")
_FIRST_NAME_MAX = 24
_ROLES = frozenset(
    {"security", "support", "admin", "service", "team", "bank", "official", "help", "info"}
)
# Invitations a sender may cause in a day, apart from the hourly notification budget (each is a
# message to a stranger, and an SMS costs money).
INVITATIONS_PER_SENDER_PER_DAY = 10


def _first_name(name: str) -> str | None:
    words = name.split()
    first = unicodedata.normalize("NFKC", words[0]) if words else ""
    if len(first) > _FIRST_NAME_MAX or not _FIRST_NAME.match(first):
        return None
    folded = first.casefold()
    if "billfold" in folded or folded in _ROLES:
        return None
    return first


def _masked_contact(party: users.Party) -> str | None:
    if party.verified_phone:
        return users.mask_phone(party.verified_phone)
    if party.verified_email:
        # The domain is the sender's choice too ("billfold-help.example"): only its first
        # letter and its top-level domain show.
        local, _, domain = party.verified_email.partition("@")
        host, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***.{tld}" if host else f"{local[:1]}***@{domain}"
    return None


async def _inviter(conn: AsyncConnection, sender_id: str) -> str:
    """The sender as an invitation shows them: "Alice (+49*****89)", "Alice", "a***@e***.com",
    or "" (the template then says "Someone")."""
    party = await users.get_party(conn, sender_id)
    if party is None:
        return ""
    first, contact = _first_name(party.name), _masked_contact(party)
    if first and contact:
        return f"{first} ({contact})"
    return first or contact or ""


def _invitee(data: dict[str, Any]) -> str:
    invitee = data.get("invitee") or {}
    if "email" in invitee:
        return users.mask_email(invitee["email"])
    if "phone" in invitee:
        return users.mask_phone(invitee["phone"])
    return ""


async def _transfer(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d, at = event["data"], event["time"]
    tid = d["transfer_id"]
    money = {"amount": d["amount"], "currency": d["currency"], "at": at}
    link = {"transfer_id": tid}
    sender, recipient = d.get("sender_id"), d.get("recipient_id")
    if event["type"] == TRANSFER_EXPIRED:
        return [Intent(sender, "transfer_expired", f"transfer_expired:{tid}", money, link, event)]
    if event["type"] == TRANSFER_PENDING_CLAIM:
        ctx = {**money, "counterparty": _invitee(d) or "?"}
        return [Intent(sender, "transfer_sent", f"transfer_sent:{tid}", ctx, link, event)]
    intents = []
    sender_name = await _name(conn, sender)
    recipient_name = await _name(conn, recipient)
    if d.get("claimed"):
        ctx = {**money, "counterparty": recipient_name}
        intents.append(
            Intent(sender, "transfer_claimed", f"transfer_claimed:{tid}", ctx, link, event)
        )
    else:
        ctx = {**money, "counterparty": recipient_name}
        intents.append(Intent(sender, "transfer_sent", f"transfer_sent:{tid}", ctx, link, event))
    if recipient:
        ctx = {**money, "counterparty": sender_name}
        intents.append(
            Intent(recipient, "transfer_received", f"transfer_received:{tid}", ctx, link, event)
        )
    return intents


async def _invitation(
    conn: AsyncConnection, rt: NotificationsRuntime, event: dict[str, Any]
) -> list[Intent]:
    """Money sent to an e-mail or phone nobody has verified: the invitee is told how to claim it
    (sign up or in, verify that contact before the claim window closes). Someone who has it
    verified is not invited: the claim consumer hands them the money, and they are told it was
    received. The sender owns the message (their hourly budget, their delivery log), shows in
    it only as `_inviter` puts them (never their free text), and causes at most
    `INVITATIONS_PER_SENDER_PER_DAY` invitations a day."""
    d = event["data"]
    invitee = d.get("invitee") or {}
    sender = d.get("sender_id")
    if not isinstance(invitee, dict) or len(invitee) != 1 or not isinstance(sender, str):
        return []
    ((kind, address),) = invitee.items()
    if kind not in ("email", "phone") or not isinstance(address, str) or not address:
        return []
    _, owner = await users.find_counterparty(conn, sender, kind, address)
    if owner is not None and address in (owner.verified_email, owner.verified_phone):
        return []
    since = utcnow() - timedelta(days=1)
    sent = await store.count_kind_since(conn, sender, "transfer_invitation", since)
    if sent >= INVITATIONS_PER_SENDER_PER_DAY:
        log.info("invitation not sent: the sender's daily invitations are used up")
        return []  # the money waits to be claimed all the same, and goes back if it is not
    tid = d["transfer_id"]
    ctx = {
        "amount": d["amount"],
        "currency": d["currency"],
        "at": event["time"],
        "counterparty": await _inviter(conn, sender),
        "days": max(rt.settings.p2p_claim_ttl_seconds // 86_400, 1),
    }
    return [
        Intent(
            sender,
            "transfer_invitation",
            f"transfer_invitation:{tid}",
            ctx,
            {"transfer_id": tid},
            event,
            direct=("email" if kind == "email" else "sms", address),
        )
    ]


async def _payment(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d, at = event["data"], event["time"]
    txn = d["transaction_id"]
    merchant = (d.get("merchant") or {}).get("name") or "?"
    link = {"transaction_id": txn}
    if event["type"] == PAYMENT_REFUNDED:
        refund = d.get("refund") or {}
        ctx = {"amount": refund.get("amount", 0), "currency": d["currency"], "merchant": merchant}
        key = f"payment_refunded:{refund.get('id') or event['id']}"
        return [Intent(d["user_id"], "payment_refunded", key, {**ctx, "at": at}, link, event)]
    kind = "payment_authorized" if event["type"] == PAYMENT_AUTHORIZED else "payment_declined"
    amount = d.get("authorized_amount") or d["amount"]
    ctx = {"amount": amount, "currency": d["currency"], "merchant": merchant, "at": at}
    return [Intent(d["user_id"], kind, f"{kind}:{txn}", ctx, link, event)]


async def _fraud(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    action = d.get("action")
    if action not in ("challenge", "block") or not d.get("user_id"):
        return []
    kind = "fraud_challenge" if action == "challenge" else "fraud_block"
    subject = "transfer" if str(d.get("subject_kind", "")).startswith("transfer") else "payment"
    ctx = {
        "amount": d.get("amount") or 0,
        "currency": d.get("currency") or "USD",
        "subject_kind": subject,
        "at": event["time"],
    }
    key = f"{kind}:{d.get('decision_id') or event['id']}"
    link = {"subject_id": d.get("subject_id")}
    return [Intent(d["user_id"], kind, key, ctx, link, event)]


async def _device(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    device_id = d["device_id"]
    # The device itself is a known place to sign in from from now on.
    await store.remember_signin(conn, d["user_id"], f"device:{device_id}")
    ctx = {"device_name": d.get("name", ""), "platform": d.get("platform", ""), "at": event["time"]}
    key = f"new_device:{device_id}"
    return [Intent(d["user_id"], "new_device", key, ctx, {"device_id": device_id}, event)]


async def _session(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    if d.get("device_id"):
        fingerprint = f"device:{d['device_id']}"
    else:
        agent = str(d.get("user_agent") or "")
        fingerprint = "agent:" + hashlib.sha256(agent.encode()).hexdigest()[:32]
    new, known = await store.remember_signin(conn, d["user_id"], fingerprint)
    if not new or known == 0:  # the very first sign-in is not news
        return []
    key = f"new_sign_in:{d['session_id']}"
    return [Intent(d["user_id"], "new_sign_in", key, {"at": event["time"]}, {}, event)]


async def _account_lock(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    # The reason is the locker's own words (a policy, an administrator's note): not for the user.
    d = event["data"]
    kind = "account_locked" if event["type"] == ACCOUNT_LOCKED else "account_unlocked"
    ctx = {"at": event["time"]}
    return [Intent(d["user_id"], kind, f"{kind}:{event['id']}", ctx, {}, event)]


async def _kyc(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    status = d.get("to_status")
    if status not in ("verified", "rejected"):
        return []
    key = f"kyc_result:{d.get('submission_id')}:{status}"
    ctx = {"verified": status == "verified", "at": event["time"]}
    return [Intent(d["user_id"], "kyc_result", key, ctx, {"status": status}, event)]


async def _code(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    target = d.get("target")
    if not isinstance(d.get("sealed_code"), dict) or not target:
        return []  # no sealed code (stripped, or written before codes were sealed): no message
    channel = "email" if d.get("channel") == "email" else "sms"
    ref = d.get("verification_id") or d.get("challenge_id") or d.get("reset_id") or event["id"]
    # The code stays sealed in the delivery until the dispatcher sends it.
    ctx = {"minutes": max(int(d.get("expires_in") or 600) // 60, 1)}
    return [
        Intent(
            d["user_id"],
            "verification_code",
            f"verification_code:{ref}",
            ctx,
            {"purpose": event["type"].rsplit(".", 2)[-2]},
            event,
            direct=(channel, target),
            sealed={"type": event["type"], "data": d},
        )
    ]


async def _tier(conn: AsyncConnection, event: dict[str, Any]) -> list[Intent]:
    d = event["data"]
    tier = d.get("tier") or d.get("to_tier") or d.get("new_tier")
    if not tier or not d.get("user_id"):
        return []
    ctx = {
        "tier": str(tier),
        "previous": str(d.get("from_tier") or d.get("previous_tier") or ""),
        "multiplier": d.get("multiplier") or "",
    }
    return [Intent(d["user_id"], "tier_changed", f"tier_changed:{event['id']}", ctx, {}, event)]


_HANDLERS: dict[str, Handler] = {
    TRANSFER_COMPLETED: _transfer,
    TRANSFER_PENDING_CLAIM: _transfer,
    TRANSFER_EXPIRED: _transfer,
    PAYMENT_AUTHORIZED: _payment,
    PAYMENT_DECLINED: _payment,
    PAYMENT_REFUNDED: _payment,
    FRAUD_DECISION: _fraud,
    DEVICE_ENROLLED: _device,
    SESSION_CREATED: _session,
    KYC_STATUS_CHANGED: _kyc,
    ACCOUNT_LOCKED: _account_lock,
    ACCOUNT_UNLOCKED: _account_lock,
    VERIFICATION_REQUESTED: _code,
    STEP_UP_CODE_REQUESTED: _code,
    PASSWORD_RESET_REQUESTED: _code,
    TIER_CHANGED: _tier,
}

# Events that move a wallet: whose wallet went down (told when it is below the line) and whose
# went up (only un-told: receiving money is no time to say the balance is low).
WALLET_TOPPED_UP = "billfold.ledger.wallet.topped_up"
_WALLET_MOVES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TRANSFER_COMPLETED: (("sender_id",), ("recipient_id",)),
    TRANSFER_PENDING_CLAIM: (("sender_id",), ()),
    TRANSFER_EXPIRED: ((), ("sender_id",)),
    PAYMENT_AUTHORIZED: (("user_id",), ()),
    PAYMENT_REFUNDED: ((), ("user_id",)),
    WALLET_WITHDRAWN: (("user_id",), ()),
    WALLET_TOPPED_UP: ((), ("user_id",)),
}


async def _low_balance(
    conn: AsyncConnection, rt: NotificationsRuntime, event: dict[str, Any]
) -> list[Intent]:
    """A wallet below the line is told once, until it is back above (a flag per currency, so
    events handled late, when the balance has moved on, still tell it exactly once)."""
    d = event["data"]
    currency = d.get("currency")
    if not isinstance(currency, str):
        return []
    if event["type"].startswith("billfold.transactions.") and d.get("source") != "wallet":
        return []  # a card payment leaves the wallet as it is
    threshold = rt.settings.notifications_low_balance_threshold
    intents = []
    spenders, receivers = _WALLET_MOVES[event["type"]]
    for field_name in (*spenders, *receivers):
        user_id = d.get(field_name)
        if not isinstance(user_id, str):
            continue
        balance = next(
            (b for b in await ledger.balances(conn, user_id) if b.currency == currency), None
        )
        if balance is None:
            continue
        key = f"low_balance:{currency}"
        if balance.available >= threshold:
            await store.clear_flag(conn, user_id, key)
        elif field_name in spenders and await store.raise_flag(conn, user_id, key):
            ctx = {"amount": balance.available, "currency": currency}
            intents.append(
                Intent(
                    user_id,
                    "low_balance",
                    f"low_balance:{event['id']}:{user_id}",
                    ctx,
                    {"currency": currency},
                    event,
                )
            )
    return intents


def consumers(rt: NotificationsRuntime) -> list[Consumer]:
    """The one consumer that turns events into notifications (their sending is the worker's
    dispatch job, outside the consumer's transaction)."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        intents: list[Intent] = []
        handler = _HANDLERS.get(event["type"])
        if handler is not None:
            intents += await handler(conn, event)
        if event["type"] == TRANSFER_PENDING_CLAIM:
            intents += await _invitation(conn, rt, event)
        if event["type"] in _WALLET_MOVES:
            intents += await _low_balance(conn, rt, event)
        for intent in intents:
            if intent.user_id:
                await notify(conn, rt, intent)

    return [Consumer(CONSUMER, frozenset(_HANDLERS) | frozenset(_WALLET_MOVES), handle)]
