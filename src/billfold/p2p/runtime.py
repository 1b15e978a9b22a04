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
