"""`billfold ledger verify` through the CLI: a clean ledger passes, each corruption is named.

The corruptions happen in throw-away databases (copies of one populated database made here),
never in the session's shared one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from billfold import ledger
from billfold.cli import app as cli
from billfold.ledger.verify import CHECKS, verify_ledger
from billfold.migrations import upgrade
from billfold.platform.clock import utcnow
from billfold.platform.db import async_url, create_engine, unit_of_work
from billfold.platform.money import Money

FUNDING = (ledger.SYSTEM, "funding")


def _url(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def _admin(admin_url: str, sql: str) -> None:
    engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        # A copy needs its template without sessions; one that just closed may linger a moment.
        for attempt in range(50):
            try:
                async with engine.connect() as conn:
                    await conn.execute(text(sql))
                return
            except DBAPIError as exc:
                if "is being accessed by other users" not in str(exc) or attempt == 49:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await engine.dispose()


async def _populate(url: str) -> None:
    """A small ledger with every kind of record: top-ups in two currencies, moves, a hold
    committed in two parts, a voided hold, an active hold, and a reversed posting."""
    engine = create_engine(url, pool_size=1)

    async def step(fn: Any) -> Any:
        async with unit_of_work(engine) as uow:
            return await fn(await uow.connection())

    def move(amount: int, debit: tuple[str, str], credit: tuple[str, str], kind: str, ref: str,
             currency: str = "USD") -> Any:  # fmt: skip
        return lambda c: ledger.move(
            c, Money(amount, currency), debit=debit, credit=credit, kind=kind, reference=ref
        )

    try:
        await step(move(10_000, FUNDING, ("alice", "wallet"), "wallet_topup", "alice"))
        await step(move(5_000, FUNDING, ("bob", "wallet"), "wallet_topup", "bob"))
        await step(move(3_000, FUNDING, ("alice", "wallet"), "wallet_topup", "alice", "EUR"))
        await step(move(1_000, ("alice", "wallet"), ("bob", "wallet"), "plain", "plain-move"))
        mistaken = await step(move(700, ("bob", "wallet"), ("carol", "wallet"), "p2p", "mistake"))
        await step(lambda c: ledger.reverse(c, mistaken.id))
        later = utcnow() + timedelta(days=1)
        captured = await step(
            lambda c: ledger.place_hold(
                c, "alice", Money(2_000, "USD"), reference="card", expires_at=later
            )
        )
        await step(
            lambda c: ledger.commit_hold(
                c, captured.id, 500, credit=("merchant", "settlement"), kind="capture", final=False
            )
        )
        await step(
            lambda c: ledger.commit_hold(
                c, captured.id, 800, credit=("merchant", "settlement"), kind="capture"
            )
        )
        voided = await step(
            lambda c: ledger.place_hold(
                c, "bob", Money(300, "USD"), reference="review", expires_at=later
            )
        )
        await step(lambda c: ledger.void_hold(c, voided.id))
        await step(
            lambda c: ledger.place_hold(
                c, "bob", Money(400, "USD"), reference="review", expires_at=later
            )
        )
        # Carol's wallet ends with a plain top-up (the corruptions below rely on it).
        await step(move(250, FUNDING, ("carol", "wallet"), "wallet_topup", "carol"))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def ledger_template(server_urls: tuple[str, str]) -> Iterator[str]:
    """A populated, consistent ledger database to copy from; dropped at the end."""
    admin_url = server_urls[0]
    name = f"billfold_verify_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        url = _url(admin_url, name)
        upgrade(url)
        asyncio.run(_populate(url))
        yield name
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def throwaway_db(server_urls: tuple[str, str], ledger_template: str) -> Iterator[str]:
    """A fresh copy of the populated ledger, free to corrupt; dropped afterwards."""
    admin_url = server_urls[0]
    name = f"{ledger_template}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{ledger_template}"'))
    try:
        yield _url(admin_url, name)
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run_sql(url: str, *statements: str) -> None:
    async def run() -> None:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.begin() as conn:
                for sql in statements:
                    await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


def verify_cli(url: str, redis_url: str) -> tuple[int, str]:
    started = time.monotonic()
    result = CliRunner().invoke(
        cli,
        ["ledger", "verify"],
        env={"BILLFOLD_DATABASE_URL": url, "BILLFOLD_REDIS_URL": redis_url},
    )
    assert time.monotonic() - started < 60
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def verdicts(output: str) -> dict[str, str]:
    """Check name -> its verdict ("OK" or "n discrepancies") from the rendered report."""
    names = {c.name for c in CHECKS}
    found: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0] in names and line.startswith("  "):
            found[parts[0]] = parts[1].strip()
    return found


def test_a_clean_ledger_verifies(throwaway_db: str, server_urls: tuple[str, str]) -> None:
    code, output = verify_cli(throwaway_db, server_urls[1])
    assert code == 0, output
    assert verdicts(output) == {c.name: "OK" for c in CHECKS}
    assert "examples:" not in output
    assert output.rstrip().endswith("ledger OK")
    # It says what it looked at: 4 top-ups, 2 moves, 1 reversal, 2 captures; 1 hold active.
    assert "9 postings" in output and "1 active_holds" in output


CAROL_LAST_ENTRY = """
    (SELECT max(e.seq) FROM ledger.entries e JOIN ledger.accounts a ON a.id = e.account_id
     WHERE a.owner_id = 'carol' AND a.kind = 'wallet')
"""
ALICE_ENTRIES = """
    (SELECT e.seq FROM ledger.entries e JOIN ledger.accounts a ON a.id = e.account_id
     WHERE a.owner_id = 'alice' AND a.kind = 'wallet' AND a.currency = 'USD'
     ORDER BY e.seq DESC LIMIT 1 OFFSET {offset})
"""
WALLET = "owner_id = '{who}' AND kind = 'wallet' AND currency = 'USD'"

CORRUPTIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    # One entry of a posting changed (and its account kept in step): the posting no longer
    # balances, so neither does the currency.
    "unbalanced posting": (
        [
            f"UPDATE ledger.entries SET amount = amount + 1, balance_after = balance_after + 1 "
            f"WHERE seq = {CAROL_LAST_ENTRY}",
            f"UPDATE ledger.accounts SET posted = posted + 1 WHERE {WALLET.format(who='carol')}",
        ],
        {"postings_balanced": "1 discrepancy", "currency_totals": "1 discrepancy"},
    ),
    "posting without entries": (
        [
            "INSERT INTO ledger.postings (id, kind, reference, currency, created_at) "
            "VALUES ('pst_empty', 'ghost', 'ghost', 'USD', now())"
        ],
        {"postings_balanced": "1 discrepancy"},
    ),
    "account posted differs from its entries": (
        [f"UPDATE ledger.accounts SET posted = posted + 5 WHERE {WALLET.format(who='bob')}"],
        {
            "account_posted": "1 discrepancy",
            "last_balance": "1 discrepancy",
            "currency_totals": "1 discrepancy",
        },
    ),
    "broken running balance in the middle": (
        [
            "UPDATE ledger.entries SET balance_after = balance_after + 7 "
            f"WHERE seq = {ALICE_ENTRIES.format(offset=1)}"
        ],
        # The changed entry and the one after it no longer chain.
        {"running_balance": "2 discrepancies"},
    ),
    "last balance differs from posted": (
        [
            "UPDATE ledger.entries SET balance_after = balance_after + 3 "
            f"WHERE seq = {ALICE_ENTRIES.format(offset=0)}"
        ],
        {"running_balance": "1 discrepancy", "last_balance": "1 discrepancy"},
    ),
    "held differs from the active holds": (
        [f"UPDATE ledger.accounts SET held = held + 1 WHERE {WALLET.format(who='alice')}"],
        {"held": "1 discrepancy"},
    ),
    "negative available": (
        [
            # The constraint would refuse it: the check exists for when it is gone.
            "ALTER TABLE ledger.accounts DROP CONSTRAINT accounts_available",
            "INSERT INTO ledger.holds (id, account_id, amount, remaining, status, reference, "
            "expires_at) SELECT 'hold_x', id, posted + 100, posted + 100, 'active', 'x', "
            f"now() + interval '1 day' FROM ledger.accounts WHERE {WALLET.format(who='bob')}",
            "UPDATE ledger.accounts SET held = held + posted + 100 "
            f"WHERE {WALLET.format(who='bob')}",
        ],
        {"available": "1 discrepancy"},
    ),
    "posting in another currency than its accounts": (
        ["UPDATE ledger.postings SET currency = 'EUR' WHERE reference = 'plain-move'"],
        {"posting_currency": "2 discrepancies"},
    ),
    "wallet allowed to overdraw": (
        [f"UPDATE ledger.accounts SET allow_overdraft = true WHERE {WALLET.format(who='alice')}"],
        {"overdraft_flags": "1 discrepancy"},
    ),
    "reversal that does not mirror its original": (
        [
            "UPDATE ledger.postings SET reverses = "
            "(SELECT id FROM ledger.postings WHERE reference = 'plain-move') "
            "WHERE reverses IS NOT NULL"
        ],
        # bob/carol moved by the reversal, alice/bob expected: three accounts differ.
        {"reversals": "3 discrepancies"},
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_each_corruption_fails_verification_naming_its_check(
    throwaway_db: str, server_urls: tuple[str, str], case: str
) -> None:
    statements, expected = CORRUPTIONS[case]
    run_sql(throwaway_db, *statements)
    code, output = verify_cli(throwaway_db, server_urls[1])
    assert code == 1, output
    failing = {name: v for name, v in verdicts(output).items() if v != "OK"}
    assert failing == expected, output
    assert len(verdicts(output)) == len(CHECKS)
    # At least one example per failing check, labelled with the check's name.
    for name in expected:
        assert f"  [{name}] " in output, output
    assert f"ledger NOT OK: {len(expected)} check(s) failed" in output


def test_examples_are_capped_but_name_every_failing_check(
    throwaway_db: str, server_urls: tuple[str, str]
) -> None:
    # Every account (7) breaks four checks at once, and both currencies no longer sum to zero.
    run_sql(
        throwaway_db,
        "UPDATE ledger.entries SET balance_after = balance_after + 1",
        "UPDATE ledger.accounts SET posted = posted + 2, held = held + 1",
    )
    code, output = verify_cli(throwaway_db, server_urls[1])
    assert code == 1
    failing = {name: v for name, v in verdicts(output).items() if v != "OK"}
    assert failing == {
        "account_posted": "7 discrepancies",
        "running_balance": "7 discrepancies",
        "last_balance": "7 discrepancies",
        "held": "7 discrepancies",
        "currency_totals": "2 discrepancies",
    }
    examples = [line for line in output.splitlines() if line.startswith("  [")]
    assert 20 <= len(examples) <= 20 + len(failing)
    for name in failing:
        assert any(line.startswith(f"  [{name}] ") for line in examples), name


async def test_the_session_ledger_verifies(app: Any) -> None:
    """Whatever the tests before this one did through the ledger left it consistent."""
    report = await verify_ledger(app.state.resources.engine)
    assert report.ok, report.render()
    assert set(report.checks) == {c.name for c in CHECKS}
