"""The Loyalty Service: points (the ledger unit PTS) earned on captured payments by earn rules
and tier multipliers, taken back in proportion on refunds, expiring in FIFO lots, tiers by
rolling 12-month net spend, and redemption into the wallet. It learns about payments only from
their events.

Public face: `LoyaltyRuntime`, `consumers(rt)` for the worker's event sink, the scheduled jobs
`expire_points` and `reevaluate_tiers`, `router` and `admin_router` (earn rules, administrators).
"""

from billfold.loyalty.api import admin_router, router
from billfold.loyalty.consumers import consumers
from billfold.loyalty.models import LoyaltyRuntime
from billfold.loyalty.service import expire_points, reevaluate_tiers

__all__ = [
    "LoyaltyRuntime",
    "admin_router",
    "consumers",
    "expire_points",
    "reevaluate_tiers",
    "router",
]
