"""The Ledger: double-entry accounts, balanced postings, holds, balances and statements.

Every movement of money in billfold is a `post` (or `move`, `commit_hold`, `reverse`) on the
caller's connection, so it commits with the caller's business row and outbox event.
"""

from billfold.ledger.events import HOLD_EXPIRED
from billfold.ledger.models import (
    SYSTEM,
    AccountBalance,
    AlreadyReversed,
    Entry,
    Hold,
    HoldAmountExceeded,
    HoldExpired,
    HoldNotActive,
    InsufficientFunds,
    Leg,
    Posting,
)
from billfold.ledger.service import (
    balances,
    commit_hold,
    expire_holds,
    get_hold,
    move,
    place_hold,
    post,
    reverse,
    statement,
    void_hold,
)
from billfold.ledger.wallet import Movement, check_amount, top_up, withdraw

__all__ = [
    "HOLD_EXPIRED",
    "SYSTEM",
    "AccountBalance",
    "AlreadyReversed",
    "Entry",
    "Hold",
    "HoldAmountExceeded",
    "HoldExpired",
    "HoldNotActive",
    "InsufficientFunds",
    "Leg",
    "Movement",
    "Posting",
    "balances",
    "check_amount",
    "commit_hold",
    "expire_holds",
    "get_hold",
    "move",
    "place_hold",
    "post",
    "reverse",
    "statement",
    "top_up",
    "void_hold",
    "withdraw",
]
