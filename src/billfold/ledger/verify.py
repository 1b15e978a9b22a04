"""`billfold ledger verify`: re-sum every posting and check every balance and invariant.

All checks read one REPEATABLE READ snapshot, so postings committed while the command runs
cannot make a consistent ledger look broken. Each check is one SQL query over the whole ledger
(set-based, window functions for the running balances: no row-by-row loop in Python) that
returns its discrepancies, the total and a few examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# Examples kept per failing check, and in all (every failing check shows at least one).
EXAMPLES_PER_CHECK = 5
MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    # Returns one row per discrepancy with a `problem` column (text); wrapped with a total.
    sql: str


CHECKS: tuple[Check, ...] = (
    Check(
        "postings_balanced",
        "every posting has at least two entries summing to zero",
        """
        SELECT format('posting %s: %s entries summing to %s', p.id, count(e.seq),
                      coalesce(sum(e.amount), 0)) AS problem
        FROM ledger.postings p LEFT JOIN ledger.entries e ON e.posting_id = p.id
        GROUP BY p.id
        HAVING count(e.seq) < 2 OR coalesce(sum(e.amount), 0) <> 0
        """,
    ),
    Check(
        "posting_currency",
        "every entry is in its posting's currency (its account's currency)",
        """
        SELECT format('posting %s (%s): entry %s on account %s in %s', p.id, p.currency, e.seq,
                      a.id, a.currency) AS problem
        FROM ledger.entries e
        JOIN ledger.postings p ON p.id = e.posting_id
        JOIN ledger.accounts a ON a.id = e.account_id
        WHERE a.currency <> p.currency
        """,
    ),
    Check(
        "account_posted",
        "each account's posted balance is the sum of its entries",
        """
        SELECT format('account %s (%s/%s/%s): posted %s, entries sum to %s', a.id, a.owner_id,
                      a.kind, a.currency, a.posted, coalesce(s.total, 0)) AS problem
        FROM ledger.accounts a
        LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger.entries
                   GROUP BY account_id) s ON s.account_id = a.id
        WHERE a.posted <> coalesce(s.total, 0)
        """,
    ),
    Check(
        "running_balance",
        "each entry's balance_after is the previous one's plus its amount (in seq order)",
        """
        SELECT format('account %s, entry %s: balance_after %s, expected %s + %s = %s',
                      account_id, seq, balance_after, previous, amount, previous + amount)
               AS problem
        FROM (SELECT account_id, seq, amount, balance_after,
                     coalesce(lag(balance_after) OVER (PARTITION BY account_id ORDER BY seq), 0)
                         AS previous
              FROM ledger.entries) chained
        WHERE balance_after <> previous + amount
        """,
    ),
    Check(
        "last_balance",
        "each account's last entry balance_after equals its posted balance",
        """
        SELECT format('account %s: posted %s, last entry %s has balance_after %s', a.id,
                      a.posted, last.seq, last.balance_after) AS problem
        FROM ledger.accounts a
        JOIN (SELECT DISTINCT ON (account_id) account_id, seq, balance_after
              FROM ledger.entries ORDER BY account_id, seq DESC) last
          ON last.account_id = a.id
        WHERE last.balance_after <> a.posted
        """,
    ),
    Check(
        "held",
        "each account's held amount is the sum of what its active holds still reserve",
        """
        SELECT format('account %s: held %s, active holds reserve %s', a.id, a.held,
                      coalesce(h.reserved, 0)) AS problem
        FROM ledger.accounts a
        LEFT JOIN (SELECT account_id, sum(remaining) AS reserved FROM ledger.holds
                   WHERE status = 'active' GROUP BY account_id) h ON h.account_id = a.id
        WHERE a.held <> coalesce(h.reserved, 0)
        """,
    ),
    Check(
        "available",
        "no account of a kind without overdraft has posted - held below zero",
        """
        SELECT format('account %s (%s/%s/%s): posted %s - held %s = %s', a.id, a.owner_id,
                      a.kind, a.currency, a.posted, a.held, a.posted - a.held) AS problem
        FROM ledger.accounts a JOIN ledger.account_kinds k ON k.kind = a.kind
        WHERE NOT k.allow_overdraft AND a.posted - a.held < 0
        """,
    ),
    Check(
        "overdraft_flags",
        "each account allows overdraft exactly when its kind does",
        """
        SELECT format('account %s (%s): allow_overdraft %s, its kind says %s', a.id, a.kind,
                      a.allow_overdraft, k.allow_overdraft) AS problem
        FROM ledger.accounts a JOIN ledger.account_kinds k ON k.kind = a.kind
        WHERE a.allow_overdraft <> k.allow_overdraft
        """,
    ),
    Check(
        "currency_totals",
        "the balances of all accounts in each currency sum to zero",
        """
        SELECT format('%s: accounts sum to %s', currency, sum(posted)) AS problem
        FROM ledger.accounts GROUP BY currency HAVING sum(posted) <> 0
        """,
    ),
    Check(
        "reversals",
        "every reversal is the exact mirror of its original (same currency, negated entries)",
        """
        WITH pairs AS (
            SELECT r.id AS reversal, r.currency AS r_currency, o.id AS original,
                   o.currency AS o_currency
            FROM ledger.postings r JOIN ledger.postings o ON o.id = r.reverses
        ), mirrored AS (
            SELECT pairs.reversal, e.account_id, sum(e.amount) AS amount
            FROM pairs JOIN ledger.entries e ON e.posting_id = pairs.reversal
            GROUP BY 1, 2
        ), expected AS (
            SELECT pairs.reversal, e.account_id, -sum(e.amount) AS amount
            FROM pairs JOIN ledger.entries e ON e.posting_id = pairs.original
            GROUP BY 1, 2
        )
        SELECT format('reversal %s of %s: in %s, the original in %s', reversal, original,
                      r_currency, o_currency) AS problem
        FROM pairs WHERE r_currency <> o_currency
        UNION ALL
        SELECT format('reversal %s: account %s moved %s, expected %s',
                      coalesce(m.reversal, x.reversal), coalesce(m.account_id, x.account_id),
                      coalesce(m.amount, 0), coalesce(x.amount, 0)) AS problem
        FROM mirrored m FULL JOIN expected x
          ON x.reversal = m.reversal AND x.account_id = m.account_id
        WHERE m.amount IS DISTINCT FROM x.amount
        """,
    ),
)


@dataclass
class Report:
    checks: dict[str, int] = field(default_factory=dict)  # check name -> discrepancies found
    problems: list[str] = field(default_factory=list)
    # What was verified: postings, entries, accounts, active holds; and the snapshot's time.
    counts: dict[str, int] = field(default_factory=dict)
    snapshot_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not any(self.checks.values())

    def render(self) -> str:
        """One line per check (OK, or how many discrepancies), then up to ~20 examples."""
        head = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        lines = [f"ledger verify: {head or 'nothing counted'}"]
        if self.snapshot_at is not None:
            lines[0] += f" (snapshot at {self.snapshot_at.isoformat()})"
        width = max((len(name) for name in self.checks), default=0)
        for name, found in self.checks.items():
            verdict = "OK" if found == 0 else f"{found} discrepanc{'y' if found == 1 else 'ies'}"
            lines.append(f"  {name:<{width}}  {verdict}")
        if self.problems:
            lines.append("examples:")
            lines.extend(f"  {p}" for p in self.problems)
        failed = sum(1 for found in self.checks.values() if found)
        lines.append("ledger OK" if self.ok else f"ledger NOT OK: {failed} check(s) failed")
        return "\n".join(lines)


_COUNTS = text(
    """
    SELECT (SELECT count(*) FROM ledger.postings) AS postings,
           (SELECT count(*) FROM ledger.entries) AS entries,
           (SELECT count(*) FROM ledger.accounts) AS accounts,
           (SELECT count(*) FROM ledger.holds WHERE status = 'active') AS active_holds,
           now() AS snapshot_at
    """
)


async def _run(conn: AsyncConnection, check: Check) -> tuple[int, list[str]]:
    # count(*) OVER () is computed before LIMIT: the total and the first examples in one query.
    sql = (
        f"SELECT problem, count(*) OVER () AS total FROM ({check.sql}) found "  # noqa: S608
        f"ORDER BY problem LIMIT {EXAMPLES_PER_CHECK}"
    )
    rows = (await conn.execute(text(sql))).all()
    return (rows[0].total if rows else 0), [f"[{check.name}] {r.problem}" for r in rows]


async def verify_ledger(engine: AsyncEngine) -> Report:
    """Run every check in `CHECKS` on one read-only REPEATABLE READ snapshot of the ledger."""
    report = Report()
    async with engine.connect() as conn:
        conn = await conn.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        async with conn.begin():
            counts = (await conn.execute(_COUNTS)).one()
            report.snapshot_at = counts.snapshot_at
            report.counts = {
                what: getattr(counts, what)
                for what in ("postings", "entries", "accounts", "active_holds")
            }
            for check in CHECKS:
                found, examples = await _run(conn, check)
                report.checks[check.name] = found
                # Each failing check shows one example at least; further ones up to the cap.
                if examples:
                    report.problems.append(examples[0])
                    room = max(0, MAX_EXAMPLES - len(report.problems))
                    report.problems.extend(examples[1 : 1 + room])
    return report
