"""Events the Fraud Service publishes (`billfold.fraud.*`)."""

from __future__ import annotations

from typing import Any

from billfold.platform.events import Event

SOURCE = "/billfold/fraud"

# Every risk check's decision, in the payment's/transfer's own transaction.
DECISION_MADE = "billfold.fraud.decision.made"
CASE_OPENED = "billfold.fraud.case.opened"
CASE_ASSIGNED = "billfold.fraud.case.assigned"
CASE_COMMENTED = "billfold.fraud.case.commented"
CASE_DECIDED = "billfold.fraud.case.decided"
# The lock policy fired (N blocks in 24 h): the users service has no lock on its public face
# yet, so the request is an event an operator or a future users consumer acts on.
USER_LOCK_REQUESTED = "billfold.fraud.user.lock_requested"


def event(type_: str, aggregate_id: str, data: dict[str, Any]) -> Event:
    """A fraud event; the aggregate (a decision's subject, or a case) keys its order."""
    return Event(
        type=type_, source=SOURCE, subject=aggregate_id, aggregate_id=aggregate_id, data=data
    )
