"""Events the Fraud Service publishes (`billfold.fraud.*`), and its consumer of its own lock
requests (`lock_consumer`)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection

from billfold import users
from billfold.config import Settings
from billfold.platform.bus.consumers import Consumer
from billfold.platform.events import Event
from billfold.platform.observability import get_logger

log = get_logger(__name__)

SOURCE = "/billfold/fraud"

# Every risk check's decision, in the payment's/transfer's own transaction.
DECISION_MADE = "billfold.fraud.decision.made"
CASE_OPENED = "billfold.fraud.case.opened"
CASE_ASSIGNED = "billfold.fraud.case.assigned"
CASE_COMMENTED = "billfold.fraud.case.commented"
CASE_DECIDED = "billfold.fraud.case.decided"
# The lock policy fired (N blocks in the window); `lock_consumer` locks the account.
USER_LOCK_REQUESTED = "billfold.fraud.user.lock_requested"
# The reason a policy lock carries in `billfold.users.account.locked`.
LOCK_REASON = "fraud_repeated_blocks"


def event(type_: str, aggregate_id: str, data: dict[str, Any]) -> Event:
    """A fraud event; the aggregate (a decision's subject, or a case) keys its order."""
    return Event(
        type=type_, source=SOURCE, subject=aggregate_id, aggregate_id=aggregate_id, data=data
    )


def lock_consumer(redis: Redis, settings: Settings) -> Consumer:
    """`fraud.lock-accounts`: a lock request locks the account (`users.lock_account`: no
    sign-in, every session revoked) in the consumer's transaction, with the inbox row, so a
    redelivered request is a no-op (and a second request for a locked account changes nothing).

    A consumer rather than a lock inside the risk check: the check runs in the payment's own
    transaction, on its hot path, inside a savepoint whose failure must never fail the payment;
    revoking every session of a user and writing the users' events there would put another
    service's writes (and their failures) on that path. The request is recorded atomically with
    the block that crossed the limit, and the relay delivers it within a poll interval."""

    async def handle(conn: AsyncConnection, event: dict[str, Any]) -> None:
        data = event["data"]
        try:
            change = await users.lock_account(
                conn, str(data["user_id"]), reason=LOCK_REASON, by=None
            )
        except users.AccountNotFound:
            log.warning("lock requested for an unknown user", user_id=data.get("user_id"))
            return
        # Before the commit: if the commit then fails the event is redelivered and the lock
        # retried; tokens denied a little early never let anyone in.
        await users.deny_access_tokens(redis, settings, change)

    return Consumer("fraud.lock-accounts", frozenset({USER_LOCK_REQUESTED}), handle)
