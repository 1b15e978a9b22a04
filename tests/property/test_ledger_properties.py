"""Random sequences of ledger operations on real PostgreSQL keep every invariant.

A hypothesis state machine tops wallets up, withdraws, moves money between a handful of users,
places holds and commits them in parts or at once, voids them, reverses postings, and tries what
must fail (overdrawing, over-committing, committing an expired or finished hold, reversing
twice). A plain Python model predicts every outcome and balance; after each step the database
must agree with it and with the ledger's invariants. Each example uses fresh owner ids, so runs
share the session's database without seeing each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger
from billfold.ledger import wallet
from billfold.ledger.verify import verify_ledger
from billfold.platform.clock import utcnow
from billfold.platform.db import create_engine, unit_of_work
from billfold.platform.ids import new_id
from billfold.platform.money import Money

T = TypeVar("T")

USERS = 4
CURRENCIES = ("USD", "EUR")
FUNDING = (ledger.SYSTEM, "funding")

top_ups = st.integers(min_value=1, max_value=100_000)
# Money going out is sized against what is available (see `amount_out`), so most steps succeed
# and the refusals are the deliberate ones.
percents = st.integers(min_value=1, max_value=99)
users = st.integers(min_value=0, max_value=USERS - 1)
others = st.integers(min_value=1, max_value=USERS - 1)  # an offset to another user
currencies = st.sampled_from(CURRENCIES)

Account = tuple[str, str, str]  # (owner, kind, currency)


@dataclass
class ModelHold:
    owner: str
    currency: str
    remaining: int
    expired: bool
    status: str = "active"


@dataclass
class ModelPosting:
    currency: str
    legs: dict[tuple[str, str], int]
    reversed: bool = False


@dataclass
class Runner:
    """The event loop and engine the (synchronous) state machine drives the ledger with."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def step(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`fn` in a transaction of its own: committed, or rolled back if it raises."""

        async def go() -> T:
            async with unit_of_work(self.engine) as uow:
                return await fn(await uow.connection())

        return self.run(go())

    def refused(self, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> type[Exception] | None:
        """The ledger problem `fn` raised (its transaction rolled back), or None if it worked."""
        try:
            self.step(fn)
        except (
            ledger.InsufficientFunds,
            ledger.HoldNotActive,
            ledger.HoldExpired,
            ledger.HoldAmountExceeded,
            ledger.AlreadyReversed,
        ) as exc:
            event(f"ledger: refused with {exc.code}")  # type: ignore[attr-defined]
            return type(exc)
        return None


_STATE = text(
    """
    SELECT a.owner_id, a.kind, a.currency, a.posted, a.held,
           (SELECT coalesce(sum(h.remaining), 0) FROM ledger.holds h
            WHERE h.account_id = a.id AND h.status = 'active') AS reserved
    FROM ledger.accounts a WHERE a.owner_id = ANY(:owners) OR (a.owner_id = 'system'
                                                               AND a.kind = 'funding')
    """
)
_TOTALS = text(
    "SELECT currency, sum(posted) AS total FROM ledger.accounts GROUP BY currency"
    " HAVING sum(posted) <> 0"
)
_UNBALANCED = text(
    """
    SELECT p.id, count(e.seq) AS n, coalesce(sum(e.amount), 0) AS total
    FROM ledger.postings p LEFT JOIN ledger.entries e ON e.posting_id = p.id
    WHERE p.id = ANY(:ids) GROUP BY p.id
    HAVING count(e.seq) < 2 OR coalesce(sum(e.amount), 0) <> 0
    """
)
_HOLDS = text("SELECT id, remaining, status FROM ledger.holds WHERE id = ANY(:ids)")


class LedgerMachine(RuleBasedStateMachine):
    """Five rules, each with its variants as a parameter, so every kind of step (and every
    refusal) comes up often in few steps."""

    runner: ClassVar[Runner]

    postings = Bundle("postings")

    def __init__(self) -> None:
        super().__init__()
        self.users = [new_id("usr") for _ in range(USERS)]
        self.posted: dict[Account, int] = {}
        self.model_holds: dict[str, ModelHold] = {}
        self.model_postings: dict[str, ModelPosting] = {}
        # The shared funding account carries other tests' top-ups: only its change is ours.
        self.funding_start = self._funding_now()

    # --- the model ---------------------------------------------------------------------------

    def _funding_now(self) -> dict[str, int]:
        async def read() -> dict[str, int]:
            async with self.runner.engine.connect() as conn:
                rows = await conn.execute(_STATE, {"owners": []})
                return {r.currency: r.posted for r in rows}

        return self.runner.run(read())

    def held(self, owner: str, currency: str) -> int:
        return sum(
            h.remaining
            for h in self.model_holds.values()
            if h.owner == owner and h.currency == currency and h.status == "active"
        )

    def available(self, owner: str, currency: str) -> int:
        return self.posted.get((owner, "wallet", currency), 0) - self.held(owner, currency)

    def amount_out(self, owner: str, currency: str, size: str, percent: int) -> int:
        """How much to take out: a share of the available balance, all of it, or more."""
        available = self.available(owner, currency)
        if size == "over":
            return available + percent
        if size == "all":
            return max(1, available)
        return max(1, available * percent // 100)

    def book(self, posting_id: str, currency: str, legs: dict[tuple[str, str], int]) -> str:
        for (owner, kind), amount in legs.items():
            key = (owner, kind, currency)
            self.posted[key] = self.posted.get(key, 0) + amount
        self.model_postings[posting_id] = ModelPosting(currency, legs)
        return posting_id

    # --- operations --------------------------------------------------------------------------

    @initialize(
        target=postings,
        amounts=st.lists(
            top_ups, min_size=USERS * len(CURRENCIES), max_size=USERS * len(CURRENCIES)
        ),
    )
    def open_wallets(self, amounts: list[int]) -> Any:
        """Every wallet starts with some money, so spending is not mostly refusals."""
        wallets = [(who, currency) for who in self.users for currency in CURRENCIES]
        return multiple(
            *(
                self._top_up(who, amount, currency)
                for (who, currency), amount in zip(wallets, amounts, strict=True)
            )
        )

    def _top_up(self, who: str, amount: int, currency: str) -> str:
        done = self.runner.step(
            lambda c: wallet.top_up(c, who, Money(amount, currency), max_amount=None)
        )
        assert done.balance.posted == self.posted.get((who, "wallet", currency), 0) + amount
        return self.book(done.id, currency, {FUNDING: -amount, (who, "wallet"): amount})

    @rule(target=postings, user=users, amount=top_ups, currency=currencies)
    def top_up(self, user: int, amount: int, currency: str) -> str:
        return self._top_up(self.users[user], amount, currency)

    @rule(
        target=postings,
        user=users,
        offset=others,
        currency=currencies,
        way=st.sampled_from(["withdraw", "move"]),
        size=st.sampled_from(["share", "share", "all", "over"]),
        percent=percents,
    )
    def take_out(
        self, user: int, offset: int, currency: str, way: str, size: str, percent: int
    ) -> Any:
        """Withdraw, or move to another user, a share of the available balance, exactly all of
        it (the boundary is allowed) or more (refused, nothing changes)."""
        who, other = self.users[user], self.users[(user + offset) % USERS]
        amount = self.amount_out(who, currency, size, percent)
        money = Money(amount, currency)
        to = FUNDING if way == "withdraw" else (other, "wallet")

        def go(c: AsyncConnection) -> Awaitable[Any]:
            if way == "withdraw":
                return wallet.withdraw(c, who, money, max_amount=None)
            return ledger.move(
                c, money, debit=(who, "wallet"), credit=to, kind="p2p_transfer", reference=who
            )

        if amount > self.available(who, currency):
            assert self.runner.refused(go) is ledger.InsufficientFunds
            return multiple()
        done = self.runner.step(go)
        posting_id = done.id
        return self.book(posting_id, currency, {(who, "wallet"): -amount, to: amount})

    @rule(
        user=users,
        currency=currencies,
        size=st.sampled_from(["share", "share", "all", "over"]),
        percent=percents,
        expired=st.sampled_from([False, False, True]),
    )
    def place_hold(self, user: int, currency: str, size: str, percent: int, expired: bool) -> None:
        """Reserve part of the available balance, all of it, or more (refused); now and then
        with an expiry already past: such a hold reserves money until the sweeper runs."""
        who = self.users[user]
        amount = self.amount_out(who, currency, size, percent)
        expires_at = utcnow() + (timedelta(seconds=-1) if expired else timedelta(hours=1))

        def go(c: AsyncConnection) -> Awaitable[ledger.Hold]:
            return ledger.place_hold(
                c, who, Money(amount, currency), reference=new_id("p2p"), expires_at=expires_at
            )

        if amount > self.available(who, currency):
            assert self.runner.refused(go) is ledger.InsufficientFunds
            return
        hold = self.runner.step(go)
        assert (hold.amount, hold.remaining, hold.status) == (amount, amount, "active")
        self.model_holds[hold.id] = ModelHold(who, currency, amount, expired)

    @precondition(lambda self: self.model_holds)
    @rule(
        target=postings,
        pick=st.integers(min_value=0, max_value=1_000),
        offset=others,
        how=st.sampled_from(["part", "part", "all", "over", "none", "void"]),
        percent=percents,
        final=st.booleans(),
    )
    def settle_hold(self, pick: int, offset: int, how: str, percent: int, final: bool) -> Any:
        """Commit part of a hold (final or not), all of it, more than remains or nothing; or
        void it. Mostly a live hold; one time in four any hold, so finished and expired ones
        are tried too (refused)."""
        live = [i for i, h in self.model_holds.items() if h.status == "active" and not h.expired]
        candidates = live if live and pick % 4 else list(self.model_holds)
        hold_id = candidates[pick % len(candidates)]
        h = self.model_holds[hold_id]
        if how == "void":
            if h.status != "active":
                refused = self.runner.refused(lambda c: ledger.void_hold(c, hold_id))
                assert refused is ledger.HoldNotActive
                return multiple()
            released = self.runner.step(lambda c: ledger.void_hold(c, hold_id))
            assert released == h.remaining
            event("hold: voided")
            h.remaining, h.status = 0, "voided"
            return multiple()

        payee = self.users[(self.users.index(h.owner) + offset) % USERS]
        amount = {
            "part": max(1, h.remaining * percent // 100),
            "all": h.remaining,
            "over": h.remaining + percent,
            "none": 1 - percent,  # zero or negative
        }[how]

        def go(c: AsyncConnection) -> Awaitable[ledger.Posting]:
            return ledger.commit_hold(
                c, hold_id, amount, credit=(payee, "wallet"), kind="capture", final=final
            )

        # The order the database checks in: finished, then expired, then the amount.
        expected: type[Exception] | None = None
        if h.status != "active":
            expected = ledger.HoldNotActive
        elif h.expired:
            expected = ledger.HoldExpired
        elif amount <= 0 or amount > h.remaining:
            expected = ledger.HoldAmountExceeded
        if expected is not None:
            assert self.runner.refused(go) is expected
            return multiple()
        done = self.runner.step(go)
        event("hold: committed, final" if final else "hold: committed in part")
        h.remaining -= h.remaining if final else amount
        if h.remaining == 0:
            h.status = "committed"
        return self.book(
            done.id, h.currency, {(h.owner, "wallet"): -amount, (payee, "wallet"): amount}
        )

    @rule(target=postings, posting_id=postings)
    def reverse(self, posting_id: str) -> Any:
        """Undo a posting (a reversal may be reversed too); each one once only, and not when
        the money it would take back is already spent or held."""
        original = self.model_postings[posting_id]

        def go(c: AsyncConnection) -> Awaitable[ledger.Posting]:
            return ledger.reverse(c, posting_id)

        if original.reversed:
            assert self.runner.refused(go) is ledger.AlreadyReversed
            return multiple()
        short = any(
            kind == "wallet" and amount > self.available(owner, original.currency)
            for (owner, kind), amount in original.legs.items()
        )
        if short:
            assert self.runner.refused(go) is ledger.InsufficientFunds
            return multiple()
        done = self.runner.step(go)
        event("posting: reversed")
        original.reversed = True
        mirror = {account: -amount for account, amount in original.legs.items()}
        return self.book(done.id, original.currency, mirror)

    # --- invariants, after every step --------------------------------------------------------

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        async def read() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
            async with self.runner.engine.connect() as conn:
                state = (await conn.execute(_STATE, {"owners": self.users})).all()
                totals = (await conn.execute(_TOTALS)).all()
                unbalanced = (
                    await conn.execute(_UNBALANCED, {"ids": list(self.model_postings)})
                ).all()
                holds = (await conn.execute(_HOLDS, {"ids": list(self.model_holds)})).all()
                return state, totals, unbalanced, holds

        state, totals, unbalanced, holds = self.runner.run(read())
        # Every posting balances and has two entries at least.
        assert unbalanced == []
        # All balances of a currency sum to zero (the funding account is minus the rest).
        assert totals == []
        seen: dict[Account, int] = {}
        for row in state:
            # held is exactly what the active holds reserve; available never goes negative.
            assert row.held == row.reserved, row
            if row.kind == "wallet":
                assert row.posted - row.held >= 0, row
                assert row.held == self.held(row.owner_id, row.currency), row
            seen[(row.owner_id, row.kind, row.currency)] = row.posted
        for (owner, kind, currency), posted in self.posted.items():
            if (owner, kind) == FUNDING:
                start = self.funding_start.get(currency, 0)
                assert seen[(owner, kind, currency)] == start + posted
            else:
                assert seen[(owner, kind, currency)] == posted, (owner, currency)
        # No account of ours the model does not know about (a refused step opened nothing).
        ours = {k for k in seen if k[0] != ledger.SYSTEM}
        assert ours == {k for k in self.posted if k[0] != ledger.SYSTEM}
        for row in holds:
            h = self.model_holds[row.id]
            assert (row.remaining, row.status) == (h.remaining, h.status)


# A pass takes ~20 s. A failure is replayed while hypothesis shrinks it to a minimal sequence,
# for up to its own 5-minute cap: the test timeout must leave it that time to print the result.
@pytest.mark.timeout(900)
def test_random_ledger_operations_keep_every_invariant(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    engine = create_engine(database_url, pool_size=2, max_overflow=0)
    LedgerMachine.runner = Runner(loop, engine)
    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=20,
                stateful_step_count=30,
                deadline=None,
                database=None,  # no .hypothesis/ directory in the working tree
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
        # And the whole ledger, with everything the examples left behind, verifies.
        report = loop.run_until_complete(verify_ledger(engine))
        assert report.ok, report.render()
    finally:
        loop.run_until_complete(engine.dispose())
        loop.close()
