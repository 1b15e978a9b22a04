"""What the service can tell a user: kinds of notification, their categories, the channels.

A *kind* is one message (its template); a *category* groups kinds for preferences. Security
alerts cannot be switched off on the channels they use by default; one-time codes follow no
preference at all (they go where the user asked them to go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Channel = Literal["push", "email", "sms", "in_app"]
CHANNELS: tuple[Channel, ...] = ("push", "email", "sms", "in_app")
# Channels that leave the system: counted by the per-user rate limit, held in quiet hours
# (push and SMS wake people; e-mail and the inbox do not).
OUTSIDE: frozenset[str] = frozenset({"push", "email", "sms"})
HELD_IN_QUIET_HOURS: frozenset[str] = frozenset({"push", "sms"})

SECURITY = "security"


@dataclass(frozen=True)
class Category:
    name: str
    defaults: frozenset[str]
    # Channels on by default that the user cannot turn off.
    locked: bool = False

    def default(self, channel: str) -> bool:
        return channel in self.defaults


CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in (
        Category("transfers", frozenset({"push", "email", "in_app"})),
        Category("payments", frozenset({"push", "in_app"})),
        Category(SECURITY, frozenset({"push", "email", "in_app"}), locked=True),
        Category("account", frozenset({"push", "email", "in_app"})),
        Category("balance", frozenset({"push", "in_app"})),
        Category("loyalty", frozenset({"push", "in_app"})),
    )
}


@dataclass(frozen=True)
class Kind:
    name: str
    category: str
    # A one-time code: sealed until sent, never in the inbox, no preferences.
    secret: bool = False
    # Shown in the owner's inbox. An invitation is sent for its owner (the sender) to someone
    # else's address: it is the owner's to account for (rate limit, delivery log), not to read.
    inbox: bool = True


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("transfer_sent", "transfers"),
        Kind("transfer_received", "transfers"),
        Kind("transfer_claimed", "transfers"),
        Kind("transfer_expired", "transfers"),
        Kind("transfer_invitation", "transfers", inbox=False),
        Kind("payment_authorized", "payments"),
        Kind("payment_declined", "payments"),
        Kind("payment_refunded", "payments"),
        Kind("fraud_challenge", SECURITY),
        Kind("fraud_block", SECURITY),
        Kind("new_device", SECURITY),
        Kind("new_sign_in", SECURITY),
        Kind("account_locked", SECURITY),
        Kind("account_unlocked", SECURITY),
        Kind("verification_code", SECURITY, secret=True),
        Kind("kyc_result", "account"),
        Kind("low_balance", "balance"),
        Kind("tier_changed", "loyalty"),
    )
}
