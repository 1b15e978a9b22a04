"""The Loyalty Service: points (the ledger unit PTS) earned on captured payments by earn rules
and tier multipliers, taken back in proportion on refunds, expiring in FIFO lots, tiers by
rolling 12-month net spend, and redemption into the wallet. It learns about payments only from
their events.

Public face: `LoyaltyRuntime`, `consumers(rt)` for the worker's event sink, the scheduled jobs
`expire_points` and `reevaluate_tiers`, and `router`.
"""

from billfold.loyalty.api import router
from billfold.loyalty.consumers import consumers
from billfold.loyalty.models import LoyaltyRuntime
from billfold.loyalty.service import expire_points, reevaluate_tiers

__all__ = ["LoyaltyRuntime", "consumers", "expire_points", "reevaluate_tiers", "router"]
