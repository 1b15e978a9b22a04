"""The P2P Transfer Service: transfers between people, money requests, claims, limits.

The app builds a `P2PRuntime` (with the `RiskCheck` the Fraud Service provides) and mounts
`billfold.p2p.api.router`; the worker runs `expire_claims` / `expire_requests` and the claim
consumers.
"""

from billfold.p2p import claims, requests, transfers
from billfold.p2p.claims import claim_for_user, expire_claims
from billfold.p2p.requests import expire_requests
from billfold.p2p.risk import AllowAll, RiskCheck, RiskDecision, TransferRisk
from billfold.p2p.runtime import P2PRuntime
from billfold.p2p.transfers import fail_pending, release_pending
from billfold.platform.bus.consumers import Consumer


def consumers(rt: P2PRuntime) -> list[Consumer]:
    """The P2P event consumers (run by the worker): claims for verified contacts, payers of
    money requests addressed to a contact, and transfers whose review hold expired."""
    return [*claims.consumers(rt), *requests.consumers(rt), *transfers.consumers()]


__all__ = [
    "AllowAll",
    "P2PRuntime",
    "RiskCheck",
    "RiskDecision",
    "TransferRisk",
    "claim_for_user",
    "consumers",
    "expire_claims",
    "expire_requests",
    "fail_pending",
    "release_pending",
]
