"""What the P2P Transfer Service needs at run time, built once per process by the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from billfold import users
from billfold.config import Settings
from billfold.p2p.risk import AllowAll, RiskCheck


@dataclass
class P2PRuntime:
    settings: Settings
    users: users.UsersRuntime
    risk: RiskCheck = field(default_factory=AllowAll)

    def contact_hash(self, kind: str, value: str) -> bytes:
        """Keyed hash of a normalised e-mail/phone: unclaimed transfers are found by it, and
        the table never holds the contact of someone who is not a user in clear."""
        return self.users.keyed_hash("p2p-contact", f"{kind}:{value}")

    def seal_contact(self, transfer_id: str, kind: str, value: str) -> bytes:
        """The contact of an unclaimed transfer, sealed to that transfer: kept only to invite
        its owner again when a transfer held for review is released."""
        return self.users.sealed.seal(f"{kind}:{value}".encode(), transfer_id.encode())

    def open_contact(self, transfer_id: str, sealed: bytes) -> dict[str, str]:
        """`{"email": …}` or `{"phone": …}`, the shape of an event's `invitee`."""
        kind, _, value = (
            self.users.sealed.open(sealed, transfer_id.encode()).decode().partition(":")
        )
        return {kind: value}
