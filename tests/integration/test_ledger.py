"""The ledger's functions on real PostgreSQL: balanced postings, holds, reversals, balances.

Each test uses owners of its own (fresh ids), so it sees only its own accounts; money comes
from a per-test `funding` account (overdraft allowed) unless the shared system one is the point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billfold import ledger
from billfold.ledger import store
from billfold.platform.clock import utcnow
from billfold.platform.db import unit_of_work
from billfold.platform.ids import new_id
from billfold.platform.money import Money

T = TypeVar("T")


def engine_of(app: Any) -> AsyncEngine:
    return app.state.resources.engine  # type: ignore[no-any-return]


async def in_tx(app: Any, step: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `step` in a transaction of its own, committed unless it raises."""
    async with unit_of_work(engine_of(app)) as uow:
        return await step(await uow.connection())


def owner() -> str:
    return new_id("usr")


async def fund(app: Any, who: str, amount: int, currency: str = "USD") -> ledger.Posting:
    """Money into `who`'s wallet from a funding account of the test's own."""
    source = f"funding-{who}"
    return await in_tx(
        app,
        lambda c: ledger.move(
            c,
            Money(amount, currency),
            debit=(source, "funding"),
            credit=(who, "wallet"),
            kind="test_funding",
            reference=who,
        ),
    )


async def account(app: Any, who: str, kind: str = "wallet", currency: str = "USD") -> Any:
    """The account's balance, or None if it was never opened."""
    async with engine_of(app).connect() as conn:
        for b in await ledger.balances(conn, who, kind=kind):
            if b.currency == currency:
                return b
    return None


async def hold_of(app: Any, hold_id: str) -> ledger.Hold:
    async with engine_of(app).connect() as conn:
        hold = await ledger.get_hold(conn, hold_id)
    assert hold is not None
    return hold


async def entries_of(app: Any, posting_id: str) -> list[tuple[str, int, int]]:
    """(owner, amount, balance_after) of each entry of a posting, in order."""
    async with engine_of(app).connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT a.owner_id, e.amount, e.balance_after FROM ledger.entries e "
                "JOIN ledger.accounts a ON a.id = e.account_id WHERE e.posting_id = :p "
                "ORDER BY e.seq"
            ),
            {"p": posting_id},
        )
        return [(r.owner_id, r.amount, r.balance_after) for r in rows]


async def postings_for(app: Any, reference: str) -> int:
    async with engine_of(app).connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM ledger.postings WHERE reference = :r"),
                    {"r": reference},
                )
            ).scalar_one()
        )


async def hold(app: Any, who: str, amount: int, *, ttl: timedelta = timedelta(hours=1)) -> str:
    placed = await in_tx(
        app,
        lambda c: ledger.place_hold(
            c, who, Money(amount, "USD"), reference=new_id("p2p"), expires_at=utcnow() + ttl
        ),
    )
    return placed.id


# --- postings ---------------------------------------------------------------------------------


async def test_a_balanced_posting_moves_money_with_running_balances(app: Any) -> None:
    a, b, c = owner(), owner(), owner()
    await fund(app, a, 10_000)
    posting = await in_tx(
        app,
        lambda conn: ledger.post(
            conn,
            kind="split",
            reference="ref-split",
            currency="USD",
            legs=[
                ledger.Leg(a, "wallet", -3_000),
                ledger.Leg(b, "wallet", 1_000),
                ledger.Leg(c, "wallet", 2_000),
            ],
            memo="dinner",
        ),
    )
    assert posting.balance_of(a).posted == 7_000
    assert posting.balance_of(b).posted == 1_000
    assert posting.balance_of(c).posted == 2_000
    assert await entries_of(app, posting.id) == [
        (a, -3_000, 7_000),
        (b, 1_000, 1_000),
        (c, 2_000, 2_000),
    ]
    assert (await account(app, a)).available == 7_000


async def test_an_unbalanced_posting_is_refused_by_python_and_by_the_database(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    legs = [ledger.Leg(a, "wallet", -500), ledger.Leg(b, "wallet", 400)]
    with pytest.raises(ValueError, match="balance"):
        await in_tx(
            app,
            lambda c: ledger.post(
                c, kind="bad", reference="ref-unbalanced", currency="USD", legs=legs
            ),
        )
    # The PL/pgSQL function refuses it on its own too (a caller bypassing the Python check).
    with pytest.raises(DBAPIError) as raised:
        await in_tx(
            app,
            lambda c: store.post(
                c,
                posting_id=new_id("pst"),
                kind="bad",
                reference="ref-unbalanced",
                currency="USD",
                legs=legs,
                memo=None,
            ),
        )
    assert getattr(raised.value.orig, "sqlstate", None) == "BF002"
    # A posting needs two distinct legs.
    with pytest.raises(DBAPIError) as single:
        await in_tx(
            app,
            lambda c: store.post(
                c,
                posting_id=new_id("pst"),
                kind="bad",
                reference="ref-unbalanced",
                currency="USD",
                legs=[ledger.Leg(a, "wallet", -500), ledger.Leg(a, "wallet", 500)],
                memo=None,
            ),
        )
    assert getattr(single.value.orig, "sqlstate", None) == "BF006"
    assert await postings_for(app, "ref-unbalanced") == 0
    assert (await account(app, a)).posted == 1_000
    assert await account(app, b) is None


async def test_an_overdraft_is_refused_and_changes_nothing(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    reference = new_id("p2p")
    with pytest.raises(ledger.InsufficientFunds):
        await in_tx(
            app,
            lambda c: ledger.move(
                c,
                Money(1_001, "USD"),
                debit=(a, "wallet"),
                credit=(b, "wallet"),
                kind="t",
                reference=reference,
            ),
        )
    assert (await account(app, a)).posted == 1_000
    assert await account(app, b) is None  # not even opened
    assert await postings_for(app, reference) == 0


async def test_accounts_are_opened_lazily_per_currency(app: Any) -> None:
    a = owner()
    async with engine_of(app).connect() as conn:
        assert await ledger.balances(conn, a) == []
    await fund(app, a, 500, "EUR")
    async with engine_of(app).connect() as conn:
        balances = await ledger.balances(conn, a)
    assert [(b.currency, b.posted, b.held, b.available) for b in balances] == [("EUR", 500, 0, 500)]
    await fund(app, a, 700, "USD")
    async with engine_of(app).connect() as conn:
        assert [b.currency for b in await ledger.balances(conn, a)] == ["EUR", "USD"]
    # A hold needs money, so it opens nothing: no account, no hold.
    nobody = owner()
    with pytest.raises(ledger.InsufficientFunds):
        await hold(app, nobody, 1)
    assert await account(app, nobody) is None


async def test_system_accounts_with_overdraft_may_go_negative_others_may_not(app: Any) -> None:
    a = owner()
    # funding and settlement may go below zero: they stand for money outside billfold.
    for kind in ("funding", "settlement"):
        await in_tx(
            app,
            lambda c, kind=kind: ledger.move(
                c, Money(2_500, "USD"), debit=(a, kind), credit=(a, "wallet"), kind="t", reference=a
            ),
        )
        assert (await account(app, a, kind)).posted == -2_500
    # escrow and fees belong to the system too, but never go below zero.
    for kind in ("escrow", "fees"):
        with pytest.raises(ledger.InsufficientFunds):
            await in_tx(
                app,
                lambda c, kind=kind: ledger.move(
                    c, Money(1, "USD"), debit=(a, kind), credit=(a, "wallet"), kind="t", reference=a
                ),
            )
        assert await account(app, a, kind) is None
    assert (await account(app, a)).posted == 5_000


async def test_the_shared_system_funding_account_goes_negative_by_what_wallets_hold(
    app: Any,
) -> None:
    a = owner()
    before = await account(app, ledger.SYSTEM, "funding")
    await in_tx(
        app,
        lambda c: ledger.move(
            c,
            Money(1_234, "USD"),
            debit=(ledger.SYSTEM, "funding"),
            credit=(a, "wallet"),
            kind="t",
            reference=a,
        ),
    )
    after = await account(app, ledger.SYSTEM, "funding")
    assert after.posted == (before.posted if before else 0) - 1_234
    assert after.posted < 0


# --- holds ------------------------------------------------------------------------------------


async def test_a_hold_reserves_then_partial_and_final_commits_post_it(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 10_000)
    hold_id = await hold(app, a, 4_000)
    held = await account(app, a)
    assert (held.posted, held.held, held.available) == (10_000, 4_000, 6_000)
    h = await hold_of(app, hold_id)
    assert (h.status, h.amount, h.remaining) == ("active", 4_000, 4_000)

    # A partial commit that is not final keeps the rest reserved.
    first = await in_tx(
        app,
        lambda c: ledger.commit_hold(
            c, hold_id, 1_500, credit=(b, "wallet"), kind="capture", final=False
        ),
    )
    assert first.balance_of(a).posted == 8_500 and first.balance_of(a).held == 2_500
    assert first.balance_of(b).posted == 1_500
    h = await hold_of(app, hold_id)
    assert (h.status, h.remaining) == ("active", 2_500)

    # The final commit posts 1,000 and releases the 1,500 left over.
    await in_tx(
        app,
        lambda c: ledger.commit_hold(
            c, hold_id, 1_000, credit=(b, "wallet"), kind="capture", final=True
        ),
    )
    done = await account(app, a)
    assert (done.posted, done.held, done.available) == (7_500, 0, 7_500)
    assert (await account(app, b)).posted == 2_500
    h = await hold_of(app, hold_id)
    assert (h.status, h.remaining) == ("committed", 0)
    with pytest.raises(ledger.HoldNotActive):
        await in_tx(
            app, lambda c: ledger.commit_hold(c, hold_id, 1, credit=(b, "wallet"), kind="capture")
        )


async def test_a_hold_cannot_reserve_more_than_is_available(app: Any) -> None:
    a = owner()
    await fund(app, a, 1_000)
    await hold(app, a, 600)
    with pytest.raises(ledger.InsufficientFunds):
        await hold(app, a, 401)
    # …and money on hold cannot be moved away either.
    with pytest.raises(ledger.InsufficientFunds):
        await in_tx(
            app,
            lambda c: ledger.move(
                c,
                Money(401, "USD"),
                debit=(a, "wallet"),
                credit=(owner(), "wallet"),
                kind="t",
                reference=a,
            ),
        )
    now = await account(app, a)
    assert (now.posted, now.held, now.available) == (1_000, 600, 400)


async def test_void_releases_a_hold_and_then_it_cannot_be_committed(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    hold_id = await hold(app, a, 700)
    released = await in_tx(app, lambda c: ledger.void_hold(c, hold_id))
    assert released == 700
    now = await account(app, a)
    assert (now.posted, now.held, now.available) == (1_000, 0, 1_000)
    assert (await hold_of(app, hold_id)).status == "voided"
    with pytest.raises(ledger.HoldNotActive):
        await in_tx(
            app, lambda c: ledger.commit_hold(c, hold_id, 100, credit=(b, "wallet"), kind="capture")
        )
    with pytest.raises(ledger.HoldNotActive):
        await in_tx(app, lambda c: ledger.void_hold(c, hold_id))
    assert await account(app, b) is None
    assert (await account(app, a)).posted == 1_000


async def test_committing_more_than_remains_is_refused_and_changes_nothing(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    hold_id = await hold(app, a, 500)
    await in_tx(
        app,
        lambda c: ledger.commit_hold(
            c, hold_id, 200, credit=(b, "wallet"), kind="capture", final=False
        ),
    )
    for amount in (301, 0, -5):
        with pytest.raises(ledger.HoldAmountExceeded):
            await in_tx(
                app,
                lambda c, amount=amount: ledger.commit_hold(
                    c, hold_id, amount, credit=(b, "wallet"), kind="capture"
                ),
            )
    h = await hold_of(app, hold_id)
    assert (h.status, h.remaining) == ("active", 300)
    now = await account(app, a)
    assert (now.posted, now.held) == (800, 300)
    assert (await account(app, b)).posted == 200


async def test_an_expired_hold_cannot_be_committed(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    hold_id = await hold(app, a, 400, ttl=timedelta(seconds=-1))
    with pytest.raises(ledger.HoldExpired):
        await in_tx(
            app, lambda c: ledger.commit_hold(c, hold_id, 100, credit=(b, "wallet"), kind="capture")
        )
    assert (await account(app, a)).posted == 1_000
    assert await account(app, b) is None


async def test_expire_holds_releases_expired_holds_and_publishes_an_event(app: Any) -> None:
    a = owner()
    await fund(app, a, 1_000)
    expired = await hold(app, a, 300, ttl=timedelta(seconds=-1))
    alive = await hold(app, a, 200)
    assert await ledger.expire_holds(engine_of(app)) >= 1
    assert (await hold_of(app, expired)).status == "expired"
    assert (await hold_of(app, alive)).status == "active"
    now = await account(app, a)
    assert (now.posted, now.held, now.available) == (1_000, 200, 800)
    async with engine_of(app).connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT type, data FROM platform.outbox WHERE subject = :h"), {"h": expired}
            )
        ).all()
    assert [r.type for r in rows] == ["billfold.ledger.hold.expired"]
    assert rows[0].data["released"] == 300 and rows[0].data["owner_id"] == a
    # A second sweep finds nothing more of this hold.
    await ledger.expire_holds(engine_of(app))
    assert (await account(app, a)).held == 200


# --- reversals --------------------------------------------------------------------------------


async def test_a_posting_is_reversed_once_by_its_mirror_image(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    reference = new_id("p2p")
    original = await in_tx(
        app,
        lambda c: ledger.move(
            c,
            Money(600, "USD"),
            debit=(a, "wallet"),
            credit=(b, "wallet"),
            kind="t",
            reference=reference,
        ),
    )
    reversal = await in_tx(app, lambda c: ledger.reverse(c, original.id, memo="mistake"))
    assert reversal.reference == reference
    assert await entries_of(app, reversal.id) == [(a, 600, 1_000), (b, -600, 0)]
    with pytest.raises(ledger.AlreadyReversed):
        await in_tx(app, lambda c: ledger.reverse(c, original.id))
    assert (await account(app, a)).posted == 1_000
    assert (await account(app, b)).posted == 0
    assert await postings_for(app, reference) == 2


async def test_a_reversal_cannot_take_back_money_already_spent(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    original = await in_tx(
        app,
        lambda c: ledger.move(
            c, Money(600, "USD"), debit=(a, "wallet"), credit=(b, "wallet"), kind="t", reference=a
        ),
    )
    await in_tx(
        app,
        lambda c: ledger.move(
            c,
            Money(500, "USD"),
            debit=(b, "wallet"),
            credit=(owner(), "wallet"),
            kind="t",
            reference=a,
        ),
    )
    with pytest.raises(ledger.InsufficientFunds):
        await in_tx(app, lambda c: ledger.reverse(c, original.id))
    assert (await account(app, b)).posted == 100
    # Nothing was recorded, so the posting can still be reversed once b has the money again.
    await fund(app, b, 500)
    await in_tx(app, lambda c: ledger.reverse(c, original.id))
    assert (await account(app, a)).posted == 1_000


# --- concurrency ------------------------------------------------------------------------------


async def test_racing_holds_and_postings_never_overdraw_one_account(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)

    async def take(i: int) -> str:
        try:
            if i % 2:
                await hold(app, a, 100)
            else:
                await in_tx(
                    app,
                    lambda c: ledger.move(
                        c,
                        Money(100, "USD"),
                        debit=(a, "wallet"),
                        credit=(b, "wallet"),
                        kind="t",
                        reference=a,
                    ),
                )
        except ledger.InsufficientFunds:
            return "refused"
        return "done"

    results = await asyncio.gather(*(take(i) for i in range(40)))
    assert results.count("done") == 10
    assert results.count("refused") == 30
    now = await account(app, a)
    assert now.available == 0 and now.posted - now.held == 0
    assert now.posted + (await account(app, b)).posted == 1_000
    async with engine_of(app).connect() as conn:
        active = (
            await conn.execute(
                text(
                    "SELECT coalesce(sum(remaining), 0) FROM ledger.holds WHERE account_id = :a AND status = 'active'"
                ),
                {"a": now.account_id},
            )
        ).scalar_one()
    assert active == now.held


async def test_racing_commits_of_one_hold_never_post_more_than_it_holds(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    hold_id = await hold(app, a, 500)

    async def capture() -> str:
        try:
            await in_tx(
                app,
                lambda c: ledger.commit_hold(
                    c, hold_id, 100, credit=(b, "wallet"), kind="capture", final=False
                ),
            )
        except (ledger.HoldAmountExceeded, ledger.HoldNotActive):
            return "refused"
        return "done"

    results = await asyncio.gather(*(capture() for _ in range(12)))
    assert results.count("done") == 5
    assert (await account(app, b)).posted == 500
    now = await account(app, a)
    assert (now.posted, now.held) == (500, 0)
    assert (await hold_of(app, hold_id)).status == "committed"


# --- balances and statements ------------------------------------------------------------------


async def test_point_in_time_balances_follow_the_running_balance(app: Any) -> None:
    a = owner()
    before_anything = utcnow()
    await asyncio.sleep(0.01)
    first = await fund(app, a, 1_000)
    await fund(app, a, 250)
    await fund(app, a, 500, "EUR")
    async with engine_of(app).connect() as conn:
        statement = await ledger.statement(conn, a, currency="USD")
        at_first = next(e for e in statement if e.posting_id == first.id).created_at
        then = await ledger.balances(conn, a, as_of=at_first)
        now = await ledger.balances(conn, a, as_of=utcnow())
        never = await ledger.balances(conn, a, as_of=before_anything)
    # At the first entry's instant: USD 1,000; EUR did not exist yet.
    assert [(b.currency, b.posted) for b in then] == [("USD", 1_000)]
    assert [(b.currency, b.posted) for b in now] == [("EUR", 500), ("USD", 1_250)]
    assert never == []


async def test_statement_is_newest_first_with_running_balances_and_pages(app: Any) -> None:
    a, b = owner(), owner()
    await fund(app, a, 1_000)
    for amount in (100, 200, 300):
        await in_tx(
            app,
            lambda c, amount=amount: ledger.move(
                c,
                Money(amount, "USD"),
                debit=(a, "wallet"),
                credit=(b, "wallet"),
                kind="t",
                reference=b,
            ),
        )
    async with engine_of(app).connect() as conn:
        page1 = await ledger.statement(conn, a, limit=2)
        page2 = await ledger.statement(conn, a, limit=2, after=page1[-1].seq)
    assert [(e.amount, e.balance_after) for e in page1] == [(-300, 400), (-200, 700)]
    assert [(e.amount, e.balance_after) for e in page2] == [(-100, 900), (1_000, 1_000)]
