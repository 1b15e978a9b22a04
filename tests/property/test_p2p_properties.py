"""The P2P service in random sequences of steps, checked against a Python model (hypothesis).

The steps are the service's own functions, each in its own unit of work as a request would run
it: top-ups, transfers to users (completed at once) and to e-mail addresses (into escrow),
transfers the risk check sends to review (a hold, then released or refused), cancellations,
reversals, and the ledger's own holds placed, committed (partly or in full) and voided. Mixed
in are steps that must be refused and change nothing: overdrawing, going over a limit, paying
yourself or nobody, a non-positive amount, cancelling or releasing the wrong transfer,
committing or voiding a spent hold.

After every step the database must equal the model: each wallet's posted and held balance
(never a negative available one), the escrow holding exactly the unclaimed transfers, funding
paying for every top-up, every account in the currency summing to zero, each user's limit usage
counted exactly and never above their limits, and every transfer's and hold's status.

Hypothesis drives the machine in a worker thread; each step runs as a coroutine on the test's
event loop, where the app's engine and its connections live.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger, users
from billfold.gateway import Principal
from billfold.ledger.models import HoldAmountExceeded, HoldNotActive, InsufficientFunds
from billfold.p2p import RiskDecision, TransferRisk, limits, transfers
from billfold.p2p.models import (
    Counterparty,
    InvalidAmount,
    LimitExceeded,
    LimitOverride,
    NewTransfer,
    RecipientNotFound,
    SelfTransfer,
    TransferNotCancellable,
    TransferNotFound,
)
from billfold.p2p.risk import RiskAction
from billfold.p2p.runtime import P2PRuntime
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.errors import ProblemError
from billfold.platform.money import Money
from tests.conftest import fund, set_kyc_tier
from tests.integration.test_transfer_concurrency import register

T = TypeVar("T")

CURRENCY = "EUR"
USERS = 4
# E-mail addresses of nobody registered: their transfers wait in escrow.
STRANGERS = ("nobody-one@example.org", "nobody-two@example.org")
UNKNOWN_USER = "usr_" + "0" * 26  # well-formed, never issued

MACHINE_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    database=None,  # no example store in the working tree; a failure prints its steps
    suppress_health_check=[HealthCheck.too_slow],
)

Failure = type[ProblemError]


class ScriptedRisk:
    """The fraud hook answering whatever the machine scripted for the next transfer."""

    def __init__(self) -> None:
        self.action: RiskAction = "allow"

    async def assess(self, conn: AsyncConnection, transfer: TransferRisk) -> RiskDecision:
        return RiskDecision(self.action)


@dataclass
class World:
    """What all examples share: the app, its event loop and engine, the P2P runtime."""

    app: Any
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    rt: P2PRuntime
    risk: ScriptedRisk

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def step(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T | ProblemError:
        """`work` in its own unit of work, committed, or the problem it was refused with (the
        unit of work rolled back)."""

        async def once() -> T:
            async with unit_of_work(self.engine) as uow:
                return await work(await uow.connection())

        try:
            return self.run(once())
        except ProblemError as exc:
            return exc

    def read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async def once() -> T:
            async with self.engine.connect() as conn:
                return await work(conn)

        return self.run(once())


@dataclass(frozen=True)
class Snapshot:
    """What the database says, in the terms of the model."""

    wallets: dict[str, tuple[int, int]]  # user -> (posted, held)
    escrow: int
    funding: int
    currency_total: int  # every account in CURRENCY
    unclaimed: int  # pending_claim transfers of the users
    usage: dict[str, tuple[int, int]]  # user -> (used today, used this month)
    limits: dict[str, tuple[int, int, int]]  # user -> (per transfer, daily, monthly)
    transfers: dict[str, str]  # transfer -> status
    holds: dict[str, tuple[str, int]]  # hold -> (status, remaining)


async def snapshot(
    conn: AsyncConnection, user_ids: list[str], transfer_ids: list[str], hold_ids: list[str]
) -> Snapshot:
    async def rows(query: str, **params: Any) -> list[Any]:
        return list((await conn.execute(text(query), params)).all())

    accounts = await rows(
        "SELECT owner_id, kind, posted, held FROM ledger.accounts WHERE currency = :c "
        "AND ((owner_id = ANY(:users) AND kind = 'wallet') OR owner_id = :system)",
        c=CURRENCY,
        users=user_ids,
        system=ledger.SYSTEM,
    )
    wallets = {u: (0, 0) for u in user_ids}
    system: dict[str, int] = {}
    for a in accounts:
        if a.kind == "wallet":
            wallets[a.owner_id] = (a.posted, a.held)
        else:
            system[a.kind] = a.posted
    (total,) = await rows(
        "SELECT coalesce(sum(posted), 0) AS n FROM ledger.accounts WHERE currency = :c", c=CURRENCY
    )
    (unclaimed,) = await rows(
        "SELECT coalesce(sum(amount), 0) AS n FROM p2p.transfers "
        "WHERE status = 'pending_claim' AND currency = :c AND sender_id = ANY(:users)",
        c=CURRENCY,
        users=user_ids,
    )
    # Usage in the user's current local day and month (PostgreSQL's own reckoning of the zone,
    # a second opinion on the service's), and the limits in force (all set per example).
    usage: dict[str, tuple[int, int]] = {u: (0, 0) for u in user_ids}
    limit: dict[str, tuple[int, int, int]] = {}
    for r in await rows(
        """
        SELECT l.user_id,
               CASE WHEN l.usage_day = (now() AT TIME ZONE u.timezone)::date
                    THEN l.used_today ELSE 0 END AS today,
               CASE WHEN l.usage_month = date_trunc('month', now() AT TIME ZONE u.timezone)::date
                    THEN l.used_this_month ELSE 0 END AS month,
               l.per_transfer_limit, l.daily_limit, l.monthly_limit
        FROM p2p.transfer_limits l JOIN users.users u ON u.id = l.user_id
        WHERE l.currency = :c AND l.user_id = ANY(:users)
        """,
        c=CURRENCY,
        users=user_ids,
    ):
        usage[r.user_id] = (r.today, r.month)
        limit[r.user_id] = (r.per_transfer_limit, r.daily_limit, r.monthly_limit)
    statuses = await rows(
        "SELECT id, status FROM p2p.transfers WHERE id = ANY(:ids)", ids=transfer_ids
    )
    holds = await rows(
        "SELECT id, status, remaining FROM ledger.holds WHERE id = ANY(:ids)", ids=hold_ids
    )
    return Snapshot(
        wallets=wallets,
        escrow=system.get("escrow", 0),
        funding=system.get("funding", 0),
        currency_total=int(total.n),
        unclaimed=int(unclaimed.n),
        usage=usage,
        limits=limit,
        transfers={r.id: r.status for r in statuses},
        holds={r.id: (r.status, r.remaining) for r in holds},
    )


@dataclass
class ModelTransfer:
    sender: str
    recipient: str | None  # None: addressed to an e-mail address, waiting in escrow
    amount: int
    status: str


@dataclass
class ModelHold:
    owner: str
    amount: int
    remaining: int
    status: str


users_ = st.integers(0, USERS - 1)
amounts = st.integers(1, 4_000)
contacts = st.integers(0, USERS + len(STRANGERS) - 1)


class P2PMachine(RuleBasedStateMachine):
    """The model: balances, escrow, funding and usage as changes since the example began."""

    world: ClassVar[World]
    transfer_ids = Bundle("transfers")
    held_ids = Bundle("held")  # transfers sent to review (and what became of them since)
    hold_ids = Bundle("holds")

    # --- set-up ---------------------------------------------------------------------------

    @initialize(
        per_transfer=st.integers(1_000, 5_000),
        daily=st.integers(4_000, 25_000),
        monthly=st.integers(4_000, 25_000),
        funds=st.lists(st.integers(0, 20_000), min_size=USERS, max_size=USERS),
    )
    def start(self, per_transfer: int, daily: int, monthly: int, funds: list[int]) -> None:
        """New users for each example (KYC tier 2 with these limits, topped up with `funds`):
        hypothesis replays an example's steps to shrink it, and they must meet the same
        wallets each time."""
        w = self.world

        async def newcomers() -> list[tuple[Any, dict[str, Any]]]:
            return list(await asyncio.gather(*(register(w.app, "Prop") for _ in range(USERS))))

        created = w.run(newcomers())
        self.user_ids = [user.id for user, _ in created]
        self.emails = [body["email"] for _, body in created]

        async def tier_and_limits(conn: AsyncConnection) -> None:
            budget = LimitOverride(per_transfer=per_transfer, daily=daily, monthly=monthly)
            for u in self.user_ids:
                await conn.execute(
                    text(
                        "UPDATE users.users SET kyc_tier = 2, kyc_status = 'verified' WHERE id = :u"
                    ),
                    {"u": u},
                )
                party = await users.get_party(conn, u)
                assert party is not None and party.kyc_tier == 2
                await limits.override(conn, party, CURRENCY, budget)

        assert not isinstance(w.step(tier_and_limits), ProblemError)
        self.base = w.read(lambda conn: snapshot(conn, self.user_ids, [], []))
        assert set(self.base.wallets.values()) == {(0, 0)}
        assert set(self.base.usage.values()) == {(0, 0)}
        assert set(self.base.limits.values()) == {(per_transfer, daily, monthly)}
        self.posted = {u: 0 for u in self.user_ids}
        self.held = {u: 0 for u in self.user_ids}
        self.used = {u: [0, 0] for u in self.user_ids}
        self.limits = dict(self.base.limits)
        self.escrow = 0
        self.funding = 0
        self.model_transfers: dict[str, ModelTransfer] = {}
        self.model_holds: dict[str, ModelHold] = {}
        for u, amount in zip(self.user_ids, funds, strict=True):
            if amount:
                self.add_money(u, amount)

    # --- helpers ----------------------------------------------------------------------------

    def user(self, i: int) -> str:
        return self.user_ids[i]

    def available(self, u: str) -> int:
        return self.posted[u] - self.held[u]

    def refused(self, outcome: object, expected: Failure) -> None:
        assert isinstance(outcome, expected), f"expected {expected.__name__}, got {outcome!r}"

    def limit_hit(self, sender: str, amount: int) -> str | None:
        """The window `amount` would break, in the order the service checks them."""
        per_transfer, daily, monthly = self.limits[sender]
        today, month = self.used[sender]
        if amount > per_transfer:
            return "per_transfer"
        if today + amount > daily:
            return "daily"
        if month + amount > monthly:
            return "monthly"
        return None

    def send(self, sender: str, to: Counterparty, amount: int, action: RiskAction) -> Any:
        w = self.world
        w.risk.action = action
        principal = Principal(user_id=sender, session_id="ses_test", scopes=frozenset({"wallet"}))
        body = NewTransfer(recipient=to, amount=amount, currency=CURRENCY)
        return w.step(lambda conn: transfers.send(conn, w.rt, principal, body))

    def expect_send(
        self, sender: str, recipient: str | None, amount: int, action: RiskAction, outcome: Any
    ) -> Any:
        """Check a send to a real counterparty (a user, or escrow when `recipient` is None)
        against the model and apply it; returns the bundle entry."""
        window = self.limit_hit(sender, amount)
        if window is not None:
            self.refused(outcome, LimitExceeded)
            assert outcome.extra["limit"] == window, outcome.extra
            return multiple()
        if amount > self.available(sender):
            self.refused(outcome, InsufficientFunds)
            return multiple()
        assert not isinstance(outcome, ProblemError), outcome
        self.used[sender][0] += amount
        self.used[sender][1] += amount
        if action == "review":
            status = "pending"
            self.held[sender] += amount
        else:
            status = "completed" if recipient else "pending_claim"
            self.posted[sender] -= amount
            if recipient:
                self.posted[recipient] += amount
            else:
                self.escrow += amount
        assert outcome.status == status, outcome
        self.model_transfers[outcome.id] = ModelTransfer(sender, recipient, amount, status)
        return outcome.id

    # --- money in ---------------------------------------------------------------------------

    @rule(who=users_, amount=st.integers(1, 20_000))
    def top_up(self, who: int, amount: int) -> None:
        self.add_money(self.user(who), amount)

    def add_money(self, u: str, amount: int) -> None:
        """From the funding account, as a card top-up does."""
        outcome = self.world.step(
            lambda conn: ledger.move(
                conn,
                Money(amount, CURRENCY),
                debit=(ledger.SYSTEM, "funding"),
                credit=(u, "wallet"),
                kind="test_top_up",
                reference=f"prop:{uuid.uuid4().hex}",
            )
        )
        assert not isinstance(outcome, ProblemError), outcome
        self.posted[u] += amount
        self.funding -= amount

    # --- transfers --------------------------------------------------------------------------

    @rule(target=transfer_ids, sender=users_, recipient=users_, amount=amounts)
    def send_to_user(self, sender: int, recipient: int, amount: int) -> Any:
        return self.send_to(sender, recipient, False, amount, "allow")

    @rule(target=transfer_ids, sender=users_, contact=contacts, amount=amounts)
    def send_to_email(self, sender: int, contact: int, amount: int) -> Any:
        """To a stranger's or a user's (unverified) address: escrow either way, never a hint of
        who is registered; only one's own address is refused."""
        return self.send_to(sender, contact, True, amount, "allow")

    @rule(target=held_ids, sender=users_, who=contacts, by_email=st.booleans(), amount=amounts)
    def send_for_review(self, sender: int, who: int, by_email: bool, amount: int) -> Any:
        """The risk check holds the transfer for review: the money is held in the wallet."""
        return self.send_to(sender, who if by_email else who % USERS, by_email, amount, "review")

    def send_to(
        self, sender: int, who: int, by_email: bool, amount: int, action: RiskAction
    ) -> Any:
        """Send to user number `who`, or by e-mail to address number `who` (the users' own
        addresses, then strangers')."""
        s = self.user(sender)
        if by_email:
            to = Counterparty(email=(self.emails + list(STRANGERS))[who])
        else:
            to = Counterparty(user_id=self.user(who))
        outcome = self.send(s, to, amount, action)
        if who == sender:
            self.refused(outcome, SelfTransfer)
            return multiple()
        return self.expect_send(s, None if by_email else self.user(who), amount, action, outcome)

    @rule(sender=users_, recipient=users_, amount=st.integers(-1_000, 4_000))
    def send_to_nobody_or_nothing(self, sender: int, recipient: int, amount: int) -> None:
        """To a user id nobody has, or a non-positive amount to someone real (one rule for two
        refusals, so refusals do not crowd out the steps that move money)."""
        if amount > 0:
            to = Counterparty(user_id=UNKNOWN_USER)
            self.refused(self.send(self.user(sender), to, amount, "allow"), RecipientNotFound)
        else:
            to = Counterparty(user_id=self.user(recipient))
            self.refused(self.send(self.user(sender), to, amount, "allow"), InvalidAmount)

    @rule(transfer_id=transfer_ids, by=users_)
    def cancel(self, transfer_id: str, by: int) -> None:
        self.cancel_by(transfer_id, by)

    @rule(transfer_id=held_ids, by=users_)
    def cancel_held(self, transfer_id: str, by: int) -> None:
        self.cancel_by(transfer_id, by)

    def give_back(self, t: Any) -> None:
        """Money that never reached anyone stops counting against the sender's limits (the
        example runs within one local day, so today's and this month's windows are current)."""
        self.used[t.sender][0] -= t.amount
        self.used[t.sender][1] -= t.amount

    def cancel_by(self, transfer_id: str, by: int) -> None:
        t, who = self.model_transfers[transfer_id], self.user(by)
        outcome = self.world.step(lambda conn: transfers.cancel(conn, transfer_id, who))
        if who not in (t.sender, t.recipient):
            self.refused(outcome, TransferNotFound)  # someone else's transfer does not exist
            return
        if who != t.sender or t.status not in ("pending", "pending_claim"):
            self.refused(outcome, TransferNotCancellable)
            return
        assert not isinstance(outcome, ProblemError), outcome
        if t.status == "pending":
            self.held[t.sender] -= t.amount
        else:
            self.escrow -= t.amount
            self.posted[t.sender] += t.amount
        self.give_back(t)
        t.status = "cancelled"
        assert outcome.status == "cancelled"

    @rule(transfer_id=held_ids)
    def release(self, transfer_id: str) -> None:
        """The fraud review lets a held transfer through."""
        t = self.model_transfers[transfer_id]
        outcome = self.world.step(
            lambda conn: transfers.release_pending(conn, self.world.rt, transfer_id)
        )
        if t.status != "pending":
            self.refused(outcome, TransferNotFound)
            return
        assert not isinstance(outcome, ProblemError), outcome
        self.held[t.sender] -= t.amount
        self.posted[t.sender] -= t.amount
        if t.recipient:
            self.posted[t.recipient] += t.amount
            t.status = "completed"
        else:
            self.escrow += t.amount
            t.status = "pending_claim"
        assert outcome.status == t.status

    @rule(transfer_id=held_ids)
    def refuse(self, transfer_id: str) -> None:
        """The fraud review stops a held transfer: the hold goes, the sender keeps the money."""
        t = self.model_transfers[transfer_id]
        outcome = self.world.step(
            lambda conn: transfers.fail_pending(conn, transfer_id, "fraud review")
        )
        if t.status != "pending":
            self.refused(outcome, TransferNotFound)
            return
        assert not isinstance(outcome, ProblemError), outcome
        self.held[t.sender] -= t.amount
        self.give_back(t)
        t.status = "failed"
        assert outcome.status == "failed"

    @rule(transfer_id=transfer_ids)
    def reverse(self, transfer_id: str) -> None:
        """Support takes a completed transfer back, if the recipient still has the money."""
        t = self.model_transfers[transfer_id]
        outcome = self.world.step(
            lambda conn: transfers.reverse(conn, transfer_id, "sent by mistake")
        )
        if t.status != "completed":
            self.refused(outcome, TransferNotCancellable)
            return
        assert t.recipient is not None
        if t.amount > self.available(t.recipient):
            self.refused(outcome, InsufficientFunds)
            return
        assert not isinstance(outcome, ProblemError), outcome
        self.posted[t.recipient] -= t.amount
        self.posted[t.sender] += t.amount
        t.status = "reversed"
        assert outcome.status == "reversed"

    # --- the ledger's own holds -------------------------------------------------------------

    @rule(target=hold_ids, who=users_, amount=amounts)
    def place_hold(self, who: int, amount: int) -> Any:
        u = self.user(who)
        outcome = self.world.step(
            lambda conn: ledger.place_hold(
                conn,
                u,
                Money(amount, CURRENCY),
                reference=f"prop:{uuid.uuid4().hex}",
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
        if amount > self.available(u):
            self.refused(outcome, InsufficientFunds)
            return multiple()
        assert not isinstance(outcome, ProblemError), outcome
        self.held[u] += amount
        self.model_holds[outcome.id] = ModelHold(u, amount, amount, "active")
        return outcome.id

    @rule(
        hold_id=hold_ids,
        to=st.integers(1, USERS - 1),
        percent=st.integers(1, 120),
        final=st.booleans(),
    )
    def commit_hold(self, hold_id: str, to: int, percent: int, final: bool) -> None:
        """Commit `percent` of the amount first held (over 100, or over what is left after
        earlier partial commits, must be refused)."""
        h = self.model_holds[hold_id]
        amount = max(1, h.amount * percent // 100)
        # Never the owner itself: someone `to` places further along the users.
        receiver = self.user((self.user_ids.index(h.owner) + to) % USERS)
        outcome = self.world.step(
            lambda conn: ledger.commit_hold(
                conn, hold_id, amount, credit=(receiver, "wallet"), kind="test_capture", final=final
            )
        )
        if h.status != "active":
            self.refused(outcome, HoldNotActive)
            return
        if amount > h.remaining:
            self.refused(outcome, HoldAmountExceeded)
            return
        assert not isinstance(outcome, ProblemError), outcome
        released = h.remaining if final else amount
        self.held[h.owner] -= released
        self.posted[h.owner] -= amount
        self.posted[receiver] += amount
        h.remaining -= released
        if h.remaining == 0:
            h.status = "committed"

    @rule(hold_id=hold_ids)
    def void_hold(self, hold_id: str) -> None:
        h = self.model_holds[hold_id]
        outcome = self.world.step(lambda conn: ledger.void_hold(conn, hold_id))
        if h.status != "active":
            self.refused(outcome, HoldNotActive)
            return
        assert outcome == h.remaining, (outcome, h)
        self.held[h.owner] -= h.remaining
        h.remaining, h.status = 0, "voided"

    # --- what must hold after every step ----------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        now = self.world.read(
            lambda conn: snapshot(
                conn, self.user_ids, list(self.model_transfers), list(self.model_holds)
            )
        )
        for u in self.user_ids:
            assert now.wallets[u] == (self.posted[u], self.held[u]), (u, now.wallets[u])
            assert self.available(u) >= 0
        # Money only moves: what the users gained, the escrow and funding account lost.
        assert sum(self.posted.values()) + self.escrow + self.funding == 0
        assert now.funding - self.base.funding == self.funding
        assert now.escrow - self.base.escrow == self.escrow
        assert now.currency_total == 0, "every posting balances: the currency sums to zero"
        # The escrow holds exactly the transfers waiting to be claimed.
        waiting = sum(
            t.amount for t in self.model_transfers.values() if t.status == "pending_claim"
        )
        assert self.escrow == waiting
        assert now.unclaimed - self.base.unclaimed == waiting
        for u in self.user_ids:
            assert now.usage[u] == tuple(self.used[u]), (u, now.usage[u], self.used[u])
            _, daily, monthly = now.limits[u]
            assert now.usage[u][0] <= daily and now.usage[u][1] <= monthly, (u, now.usage[u])
        assert now.transfers == {i: t.status for i, t in self.model_transfers.items()}
        assert now.holds == {i: (h.status, h.remaining) for i, h in self.model_holds.items()}


async def test_random_p2p_sequences_keep_every_invariant(app: Any) -> None:
    risk = ScriptedRisk()
    world = World(
        app=app,
        loop=asyncio.get_running_loop(),
        engine=app.state.resources.engine,
        rt=P2PRuntime(app.state.p2p.settings, app.state.p2p.users, risk=risk),
        risk=risk,
    )
    machine = type("P2PInWorld", (P2PMachine,), {"world": world})
    # The machine blocks on each step, so it runs in a thread while this loop serves it.
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=MACHINE_SETTINGS)


async def test_contact_transfer_held_for_review_is_refused_or_released(app: Any) -> None:
    """A transfer to an e-mail address that the risk check holds for review is `pending` with
    no recipient yet: refused, the hold goes; released, the money waits in escrow."""
    risk = ScriptedRisk()
    risk.action = "review"
    rt = P2PRuntime(app.state.p2p.settings, app.state.p2p.users, risk=risk)
    engine = app.state.resources.engine
    sender, _ = await register(app, "Held Sender")
    await set_kyc_tier(app, sender.id, 2)
    await fund(app, sender.id, 10_000, CURRENCY)
    principal = Principal(user_id=sender.id, session_id="ses_test", scopes=frozenset({"wallet"}))
    to_stranger = NewTransfer(
        recipient=Counterparty(email=STRANGERS[0]), amount=1_000, currency=CURRENCY
    )

    async def wallet_and_escrow() -> tuple[tuple[int, int], int]:
        async with engine.connect() as conn:
            now = await snapshot(conn, [sender.id], [], [])
        return now.wallets[sender.id], now.escrow

    _, escrow_before = await wallet_and_escrow()
    async with unit_of_work(engine) as uow:
        held = await transfers.send(await uow.connection(), rt, principal, to_stranger)
    assert (held.status, held.recipient_id) == ("pending", None)
    assert await wallet_and_escrow() == ((10_000, 1_000), escrow_before)
    async with unit_of_work(engine) as uow:
        refused = await transfers.fail_pending(await uow.connection(), held.id, "fraud review")
    assert refused.status == "failed"
    assert await wallet_and_escrow() == ((10_000, 0), escrow_before)

    async with unit_of_work(engine) as uow:
        held = await transfers.send(await uow.connection(), rt, principal, to_stranger)
    async with unit_of_work(engine) as uow:
        released = await transfers.release_pending(await uow.connection(), rt, held.id)
    assert (released.status, released.recipient_id) == ("pending_claim", None)
    assert await wallet_and_escrow() == ((9_000, 0), escrow_before + 1_000)
