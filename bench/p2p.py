"""P2P transfers through the whole HTTP stack, as a ratio to pgbench's TPC-B on the same
PostgreSQL in the same run.

    .venv/bin/python bench/p2p.py [--clients 16] [--seconds 20] [--warmup 3] [--users 48]
                                  [--workers 1,2] [--hot] [--quick]

The reference is pgbench's built-in TPC-B-like script (`pgbench -i -s 10`, then
`pgbench -c CLIENTS -j 2 -T SECONDS`) in its own database on the same server. TPC-B is the
textbook "move money between accounts" transaction (3 UPDATEs, 1 SELECT, 1 INSERT, one commit),
so `ratio = billfold_tps / pgbench_tps` says how much of what the database alone can do survives
the whole billfold stack: HTTP, token verify, rate limit, idempotency, limits, ledger posting,
transfer row and outbox event, each transfer one transaction.

A run, one thing at a time (never two loads at once):

  1. a fresh billfold database (migrated) and a fresh pgbench database (`pgbench -i`);
  2. setup, not timed: USERS users registered and signed in through the API (password grant),
     set to KYC tier 2 and funded from the system funding account (SQL, as the tests do);
  3. pgbench TPC-B, warm-up then SECONDS measured;
  4. for each worker count: uvicorn with that many workers, CLIENTS closed-loop keep-alive
     clients each POSTing /v1/transfers (fresh Idempotency-Key, random sender and recipient
     among the users, 0.01-1.00 USD), warm-up then SECONDS measured;
  5. pgbench again, so a machine that got busier or quieter during the run shows;
  6. checks: every 201 is one completed transfer, money is conserved (every account's balance
     is the sum of its entries, every posting balances, wallets + funding = 0), and the
     ledger's own verify_ledger when it is implemented.

Any answer other than 201 is an error; more than 0.1% of errors fails the run (exit 1), and so
does any money check. Rate limits are set so high they never refuse (the limiter still runs on
every request: it is part of the cost), so the run measures the transfer path.

PostgreSQL and Redis come from BILLFOLD_DATABASE_URL / BILLFOLD_REDIS_URL when set, otherwise
embedded servers are started in a temporary directory. Both databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billfold import ledger
from billfold.ledger.verify import verify_ledger
from billfold.platform.db import async_url, create_engine, unit_of_work
from billfold.platform.keys import SealedBox
from billfold.platform.money import Money
from common import (
    UNLIMITED,
    Account,
    Client,
    RawConnection,
    Request,
    Response,
    Result,
    cpu_model,
    drop_redis_keys,
    fresh_database,
    in_process_app,
    machine_busy,
    make_accounts,
    percentile,
    print_cpu_by_package,
    process_cpu,
    run_scenario,
    run_with_servers,
    server_env,
    server_versions,
    servers_label,
    start_api,
    stop,
    tail,
    versions,
    wait_ready,
)

CURRENCY = "USD"
FUNDS = 1_000_000  # minor units per user: 10,000.00, far more than a run moves
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
MAX_ERROR_SHARE = 0.001
HOT_USERS = 4


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Window:
    """One measured window: a pgbench run or a billfold run, summarised the same way."""

    label: str
    transactions: int  # completed (pgbench) or answered 201 (billfold)
    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    requests: int = 0  # everything sent, warm-up included (billfold)
    api_cpu: float | None = None  # CPU seconds of the API process tree
    pg_cpu: float | None = None  # CPU seconds of the database's backends
    load_cpu: float | None = None  # CPU seconds of the load generator
    busy: float = 0.0  # share of the machine's CPU time that was busy, 0..1
    backends: tuple[int, int] = (0, 0)  # PostgreSQL backends at the start, new ones after
    error_samples: list[str] = field(default_factory=list)
    log_tail: str = ""  # the end of the API's log, kept when there were errors

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds."""
        return percentile(self.latencies_ms, q)

    def per_tx_us(self, cpu: float | None) -> str:
        if cpu is None or not self.transactions:
            return "n/a"
        return f"{cpu / self.transactions * 1e6:.0f} us"


class MachineBusy:
    """Busy share of all cores between `start()` and `stop()`."""

    def start(self) -> None:
        self._busy, self._total = machine_busy()

    def stop(self) -> float:
        busy, total = machine_busy()
        return (busy - self._busy) / (total - self._total) if total > self._total else 0.0


class BackendCpu:
    """CPU used by the PostgreSQL backends of one database while sampling runs.

    Backends are found in pg_stat_activity and read in /proc, so this works only when the
    server runs on this machine (a loopback or socket URL; otherwise it reports None). Each backend's CPU is taken as
    last seen minus first seen; backends that connect during the window count in full, and
    the poll keeps the number of a backend that disconnects within ~0.25 s of its end."""

    def __init__(self, engine: AsyncEngine, database: str) -> None:
        self._engine = engine
        self._database = database
        host = engine.url.host or engine.url.query.get("host") or "/"  # no host: a socket
        self._local = str(host).startswith("/") or host in ("127.0.0.1", "localhost", "::1")
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._visible = False

    async def _sample(self) -> dict[int, float]:
        async with self._engine.connect() as conn:
            pids = (
                await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE datname = :d AND backend_type = 'client backend'"
                    ),
                    {"d": self._database},
                )
            ).scalars()
            found = _cpu_of(list(pids)) if self._local else {}
        self._visible = self._visible or any(v is not None for v in found.values())
        return {pid: v for pid, v in found.items() if v is not None}

    async def start(self, *, poll: bool = False) -> None:
        """Take the first sample; with `poll`, keep sampling (for backends that come and go)."""
        self._first = await self._sample()
        self._last = dict(self._first)
        if poll:
            self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._last.update(await self._sample())

    async def stop(self) -> tuple[float | None, tuple[int, int]]:
        """(CPU seconds or None when /proc cannot see the server, (backends at start, new))."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._last.update(await self._sample())
        cpu = sum(v - self._first.get(pid, 0.0) for pid, v in self._last.items())
        new = len(set(self._last) - set(self._first))
        return (cpu if self._visible else None), (len(self._first), new)


def _cpu_of(pids: list[int]) -> dict[int, float | None]:
    """CPU seconds of each process, None for one this machine cannot see."""
    return {pid: process_cpu(pid) if Path(f"/proc/{pid}").exists() else None for pid in pids}


# --- the reference: pgbench TPC-B ------------------------------------------------------------


def find_pgbench(explicit: str | None) -> str:
    """pgbench from --pgbench, else the system's for a configured server, else the embedded
    server's own (pgserver ships it next to postgres)."""
    if explicit:
        return explicit
    embedded = None
    with contextlib.suppress(ImportError):
        import pgserver  # type: ignore[import-untyped]

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        embedded = str(candidate) if candidate.exists() else None
    system = shutil.which("pgbench")
    chosen = (system or embedded) if os.environ.get("BILLFOLD_DATABASE_URL") else embedded
    chosen = chosen or system
    if chosen is None:
        raise SystemExit("pgbench not found: install it or pass --pgbench PATH")
    return chosen


def libpq_env(url: str) -> dict[str, str]:
    """PG* variables for pgbench from a SQLAlchemy-style URL (also pgserver's `?host=` form)."""
    parsed = make_url(url)
    env = dict(os.environ)
    host = parsed.host or parsed.query.get("host")
    for name, value in (
        ("PGHOST", host if isinstance(host, str) else None),
        ("PGPORT", str(parsed.port) if parsed.port else None),
        ("PGUSER", parsed.username),
        ("PGPASSWORD", parsed.password or None),
    ):
        if value:
            env[name] = str(value)
    return env


async def _exec(argv: list[str], env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{output[-3000:]}")
    return output


async def pgbench_init(pgbench: str, env: dict[str, str], database: str, scale: int) -> float:
    started = time.perf_counter()
    await _exec([pgbench, "-i", "-q", "-s", str(scale), database], env)
    return time.perf_counter() - started


async def pgbench_run(
    pgbench: str,
    env: dict[str, str],
    database: str,
    *,
    label: str,
    clients: int,
    seconds: float,
    warmup: float,
    tmp: Path,
    sampler: BackendCpu,
) -> Window:
    """pgbench's TPC-B-like script: `warmup` seconds thrown away (it also vacuums), then
    `seconds` measured with a per-transaction log for the latency percentiles."""
    jobs = str(min(2, clients))
    if warmup > 0:
        await _exec(
            [pgbench, "-c", str(clients), "-j", jobs, "-T", str(max(1, round(warmup))), database],
            env,
        )
    logs = tmp / f"pgbench-{uuid.uuid4().hex[:6]}"
    argv = [pgbench, "-n", "-c", str(clients), "-j", jobs, "-T", str(max(1, round(seconds)))]
    argv += ["-l", f"--log-prefix={logs}", database]
    machine = MachineBusy()
    machine.start()
    load0 = _children_cpu()
    await sampler.start(poll=True)  # pgbench's backends connect after this
    output = await _exec(argv, env)
    pg_cpu, backends = await sampler.stop()
    busy = machine.stop()
    load = _children_cpu() - load0

    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", output, re.M)
    done = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    if tps is None or done is None:
        raise SystemExit(f"cannot read pgbench's result:\n{output[-2000:]}")
    latencies = _read_pgbench_logs(logs)
    transactions = int(done.group(1))
    return Window(
        label=label,
        transactions=transactions,
        # pgbench's own tps excludes connection time; keep it exact.
        seconds=transactions / float(tps.group(1)),
        latencies_ms=latencies,
        errors=int(failed.group(1)) if failed else 0,
        requests=transactions,
        pg_cpu=pg_cpu,
        load_cpu=load,
        busy=busy,
        backends=backends,
    )


def _read_pgbench_logs(prefix: Path) -> list[float]:
    """Latencies (ms) from pgbench's per-transaction logs (one file per thread), then delete
    them. A line: client_id transaction_no latency_us script_no epoch_s epoch_us."""
    latencies: list[float] = []
    for path in sorted(prefix.parent.glob(f"{prefix.name}.*")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                latencies.append(int(parts[2]) / 1000)
        path.unlink()
    return latencies


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (pgbench)."""
    usage = os.times()
    return usage.children_user + usage.children_system


# --- billfold: setup and load ----------------------------------------------------------------


async def prepare_users(database_url: str, accounts: list[Account]) -> None:
    """KYC tier 2 (the KYC flow has its own tests) and FUNDS each from the funding account,
    through the ledger's public face, one transaction."""
    engine = create_engine(database_url)
    try:
        async with unit_of_work(engine) as uow:
            conn = await uow.connection()
            await conn.execute(
                text(
                    "UPDATE users.users SET kyc_tier = 2, kyc_status = 'verified' "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": [a.user_id for a in accounts]},
            )
            for a in accounts:
                await ledger.move(
                    conn,
                    Money(FUNDS, CURRENCY),
                    debit=(ledger.SYSTEM, "funding"),
                    credit=(a.user_id, "wallet"),
                    kind="bench_funding",
                    reference=f"bench:{a.user_id}",
                )
    finally:
        await engine.dispose()


async def refresh_tokens(base: str, accounts: list[Account]) -> None:
    """Fresh access tokens (they live 15 minutes) through the refresh grant, before each run."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one(a: Account) -> None:
            r = await client.post(
                "/v1/auth/token",
                data={"grant_type": "refresh_token", "refresh_token": a.refresh_token},
            )
            if r.status_code != 200:
                raise SystemExit(f"token refresh failed: {r.status_code} {r.text}")
            a.access_token, a.refresh_token = r.json()["access_token"], r.json()["refresh_token"]

        await asyncio.gather(*(one(a) for a in accounts))


@dataclass
class Sent:
    """What the API accepted (201), warm-up included: checked against the database at the end."""

    transfers: int = 0
    minor_units: int = 0


def transfer_request(accounts: list[Account], amount_max: int, sent: Sent) -> Request:
    """POST /v1/transfers from a random user to another random user, fresh Idempotency-Key."""
    ids = [a.user_id for a in accounts]
    n = len(accounts)

    async def send(client: Client, i: int) -> Response:
        sender = random.randrange(n)
        recipient = random.randrange(n - 1)
        recipient += recipient >= sender  # anyone but the sender
        amount = random.randint(1, amount_max)
        body = {"recipient": {"user_id": ids[recipient]}, "amount": amount, "currency": CURRENCY}
        headers = {
            "Authorization": f"Bearer {accounts[sender].access_token}",
            "Idempotency-Key": uuid.uuid4().hex,
        }
        r: Response
        if isinstance(client, RawConnection):
            r = await client.post_json("/v1/transfers", body, headers)
        else:  # --profile: httpx over ASGI, in-process
            r = await client.post("/v1/transfers", json=body, headers=headers)
        if r.status_code == 201:
            sent.transfers += 1
            sent.minor_units += amount
        return r

    return send


async def billfold_run(
    args: argparse.Namespace,
    *,
    workers: int,
    env: dict[str, str],
    tmp: Path,
    accounts: list[Account],
    sent: Sent,
    sampler: BackendCpu,
) -> Window:
    log_path = tmp / f"api-{workers}.log"
    proc, port = start_api(env, log_path, workers=workers)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, proc, log_path)
        await refresh_tokens(base, accounts)
        clients: list[Client] = [RawConnection("127.0.0.1", port) for _ in range(args.clients)]
        request = transfer_request(accounts, args.amount_max, sent)
        options: dict[str, Any] = {"ok_status": (201,), "max_errors": 1000}
        warm = await run_scenario(
            clients, "warm-up", request, duration=args.warmup, warmup=0, **options
        )
        machine = MachineBusy()
        await sampler.start(poll=True)  # the pool's connections are open after the warm-up
        machine.start()
        measured: Result = await run_scenario(
            clients,
            "transfers",
            request,
            duration=args.seconds,
            warmup=0,
            server_pid=proc.pid,
            **options,
        )
        busy = machine.stop()
        pg_cpu, backends = await sampler.stop()
        for c in clients:
            await c.aclose()
    finally:
        stop(proc)
    errors = warm.errors + measured.errors
    log = tail(log_path) if errors else ""  # the temporary directory goes at the end
    return Window(
        label=f"billfold, {workers} worker{'s' if workers > 1 else ''}",
        transactions=measured.succeeded,
        seconds=measured.elapsed,
        latencies_ms=[s * 1000 for s in measured.latencies],
        errors=len(errors),
        requests=len(warm.latencies) + len(measured.latencies),
        api_cpu=measured.server_cpu,
        pg_cpu=pg_cpu,
        load_cpu=measured.client_cpu,
        busy=busy,
        backends=backends,
        error_samples=errors[:3],
        log_tail=log,
    )


# --- money checks ----------------------------------------------------------------------------

_CHECKS = {
    "postings that do not balance": """
        SELECT count(*) FROM (
            SELECT posting_id FROM ledger.entries GROUP BY posting_id HAVING sum(amount) <> 0
        ) unbalanced""",
    "accounts whose balance is not the sum of their entries": """
        SELECT count(*) FROM ledger.accounts a
        WHERE a.posted <> (SELECT coalesce(sum(e.amount), 0) FROM ledger.entries e
                           WHERE e.account_id = a.id)""",
    "currencies whose accounts do not sum to zero": """
        SELECT count(*) FROM (
            SELECT currency FROM ledger.accounts GROUP BY currency HAVING sum(posted) <> 0
        ) unbalanced""",
    "accounts with money on hold (none was placed)": (
        "SELECT count(*) FROM ledger.accounts WHERE held <> 0"
    ),
    "transfers not completed": "SELECT count(*) FROM p2p.transfers WHERE status <> 'completed'",
}


async def check_money(database_url: str, users: int, sent: Sent) -> list[str]:
    """Every 201 is one completed transfer and one posting; money is conserved."""
    problems: list[str] = []
    lines: list[str] = []
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            for name, sql in _CHECKS.items():
                found = (await conn.execute(text(sql))).scalar_one()
                if found:
                    problems.append(f"{found} {name}")
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*) AS n, coalesce(sum(amount), 0) AS total "
                        "FROM p2p.transfers WHERE status = 'completed'"
                    )
                )
            ).one()
            postings = (
                await conn.execute(
                    text("SELECT count(*) FROM ledger.postings WHERE kind = 'p2p_transfer'")
                )
            ).scalar_one()
            money = (
                await conn.execute(
                    text(
                        "SELECT coalesce(sum(posted) FILTER (WHERE kind = 'wallet'), 0) AS wallets,"
                        " coalesce(sum(posted) FILTER (WHERE kind = 'funding'), 0) AS funding"
                        " FROM ledger.accounts WHERE currency = :c"
                    ),
                    {"c": CURRENCY},
                )
            ).one()
        if (row.n, row.total) != (sent.transfers, sent.minor_units):
            problems.append(
                f"the API answered 201 to {sent.transfers} transfers of {sent.minor_units} minor "
                f"units, the database holds {row.n} of {row.total}"
            )
        if postings != sent.transfers:
            problems.append(f"{postings} transfer postings for {sent.transfers} transfers")
        funded = users * FUNDS
        if (money.wallets, money.funding) != (funded, -funded):
            problems.append(
                f"wallets hold {money.wallets} and funding is {money.funding}; "
                f"expected {funded} and {-funded}"
            )
        lines.append(
            f"  {sent.transfers} answers 201 = {row.n} completed transfers = {postings} "
            f"postings; {Money(sent.minor_units, CURRENCY).display()} moved"
        )
        lines.append(
            f"  wallets {Money(int(money.wallets), CURRENCY).display()} + funding "
            f"{Money(int(money.funding), CURRENCY).display()} = "
            f"{Money(int(money.wallets + money.funding), CURRENCY).display()}; "
            f"SQL checks: {len(_CHECKS)} run, {'all passed' if not problems else 'FAILED'}"
        )
        try:
            verified = await verify_ledger(engine)
        except NotImplementedError:
            lines.append("  verify_ledger: not implemented yet (the SQL checks above stand in)")
        else:
            lines.append(f"  verify_ledger: {'ok' if verified.ok else 'FAILED'}")
            problems += [f"verify_ledger: {p}" for p in verified.problems]
    finally:
        await engine.dispose()
    print("money")
    print("\n".join(lines))
    return problems


# --- report ----------------------------------------------------------------------------------


def report(windows: list[Window], reference: float, clients: int) -> None:
    head = f"{'run':<26}{'tx':>8}{'tps':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}"
    head += f"{'errors':>7}{'API CPU/tx':>12}{'PG CPU/tx':>11}{'load CPU/tx':>13}{'busy':>6}"
    print(head)
    print("-" * len(head))
    for w in windows:
        line = f"{w.label:<26}{w.transactions:>8}{w.tps:>8.0f}{w.pct(50):>8.2f}{w.pct(95):>8.2f}"
        line += f"{w.pct(99):>8.2f}{w.pct(100):>8.1f}{w.errors:>7}"
        line += f"{w.per_tx_us(w.api_cpu):>12}{w.per_tx_us(w.pg_cpu):>11}"
        line += f"{w.per_tx_us(w.load_cpu):>13}{w.busy * 100:>5.0f}%"
        print(line)
    first, last = windows[0], windows[-1]
    print(
        f"\npgbench drift: {first.tps:.0f} tps before, {last.tps:.0f} after "
        f"({(last.tps / first.tps - 1) * 100:+.1f}%); the reference is their mean, "
        f"{reference:.0f} tps"
    )
    backends = ", ".join(f"{w.label}: {w.backends[0]}+{w.backends[1]}" for w in windows)
    print(f"PostgreSQL backends (at start + connected during the window): {backends}")
    print(
        f"target: ratio >= {TARGET_RATIO:.2f} with p99 < {TARGET_P99_MS:.0f} ms "
        f"at {clients} clients\n"
    )
    for w in windows[1:-1]:
        ratio = w.tps / reference if reference else float("nan")
        met = ratio >= TARGET_RATIO and w.pct(99) < TARGET_P99_MS
        print(
            f"ratio = billfold_tps / pgbench_tps = {ratio:.2f}   ({w.label}: {w.tps:.0f} / "
            f"{reference:.0f} tps; p50 {w.pct(50):.1f} ms, p99 {w.pct(99):.1f} ms; "
            f"errors {w.errors} of {w.requests}) target {'met' if met else 'NOT met'}"
        )


# --- the run ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    pgbench = find_pgbench(args.pgbench)
    admin_engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        async with (
            fresh_database(admin_url) as (app_db, app_url),
            fresh_database(admin_url, prefix="billfold_pgbench", migrate=False) as (ref_db, _),
        ):
            return await _bench(
                args, admin_engine, app_db, app_url, ref_db, pgbench, redis_url, prefix, tmp
            )
    finally:
        await admin_engine.dispose()
        await drop_redis_keys(redis_url, prefix)


async def _bench(
    args: argparse.Namespace,
    admin_engine: AsyncEngine,
    app_db: str,
    app_url: str,
    ref_db: str,
    pgbench: str,
    redis_url: str,
    prefix: str,
    tmp: Path,
) -> int:
    pg_version, redis_version = await server_versions(app_url, redis_url)
    pg_env = libpq_env(app_url)
    pgbench_version = (await _exec([pgbench, "--version"], pg_env)).strip()
    print(f"machine   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"          load average before the run: {os.getloadavg()[0]:.2f}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"servers   PostgreSQL {pg_version}, {redis_version} ({args.servers})")
    print(f"pgbench   {pgbench_version} ({pgbench})")
    print(f"packages  {versions()}")

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    progress(f"pgbench -i -s {args.scale} ...")
    init_seconds = await pgbench_init(pgbench, pg_env, ref_db, args.scale)

    progress(f"setting up {args.users} users ...")
    env = server_env(app_url, redis_url, prefix, tmp / "data", secret_key=SealedBox.generate_b64())
    started = time.perf_counter()
    log_path = tmp / "api-setup.log"
    proc, port = start_api(env, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, proc, log_path)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            accounts = await make_accounts(client, args.users, concurrency=4)
    finally:
        stop(proc)
    await prepare_users(app_url, accounts)
    setup_seconds = time.perf_counter() - started

    print(
        f"setup     {args.users} users{' (--hot)' if args.hot else ''}, KYC tier 2, "
        f"{Money(FUNDS, CURRENCY).display()} each, registered and signed in through the API in "
        f"{setup_seconds:.1f} s; pgbench -i -s {args.scale} in {init_seconds:.1f} s"
    )
    print(
        f"load      {args.clients} clients, {args.seconds:g} s measured after {args.warmup:g} s "
        "warm-up, one run after the other; transfers of 0.01-"
        f"{Money(args.amount_max, CURRENCY).display()} between random users; "
        f"rate limits {UNLIMITED} (the limiter runs, never refuses); app log INFO\n"
    )

    windows: list[Window] = []
    ref_sampler = BackendCpu(admin_engine, ref_db)
    app_sampler = BackendCpu(admin_engine, app_db)
    sent = Sent()
    for label in ("pgbench TPC-B (before)", *args.workers, "pgbench TPC-B (after)"):
        if isinstance(label, str):
            progress(f"running {label} ...")
            window = await pgbench_run(
                pgbench,
                pg_env,
                ref_db,
                label=label,
                clients=args.clients,
                seconds=args.seconds,
                warmup=args.warmup,
                tmp=tmp,
                sampler=ref_sampler,
            )
        else:
            progress(f"running billfold with {label} worker(s) ...")
            window = await billfold_run(
                args,
                workers=label,
                env=env,
                tmp=tmp,
                accounts=accounts,
                sent=sent,
                sampler=app_sampler,
            )
        windows.append(window)

    reference = (windows[0].tps + windows[-1].tps) / 2
    report(windows, reference, args.clients)
    print()
    problems = await check_money(app_url, args.users, sent)

    failed = False
    for w in windows[1:-1]:
        if w.errors > MAX_ERROR_SHARE * max(1, w.requests):
            failed = True
            print(
                f"FAILED {w.label}: {w.errors} errors in {w.requests} requests, e.g.:",
                file=sys.stderr,
            )
            for e in w.error_samples:
                print(f"  {e}", file=sys.stderr)
            print(f"the end of the API's log:\n{w.log_tail}", file=sys.stderr)
    for w in (windows[0], windows[-1]):
        if w.errors:
            failed = True
            print(f"FAILED {w.label}: {w.errors} failed transactions", file=sys.stderr)
    for p in problems:
        failed = True
        print(f"FAILED money check: {p}", file=sys.stderr)
    return 1 if failed else 0


# --- profile: the same requests in-process, against the ASGI app ------------------------------


async def profile(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    """cProfile (CPU time) of the transfer requests in-process, and the SQL each one sends as
    SQLAlchemy sees it (statements, transactions)."""
    import cProfile
    import pstats

    from sqlalchemy import event

    sql: dict[str, int] = {}

    def count(kind: str) -> Callable[..., None]:
        def listener(*_: Any) -> None:
            sql[kind] = sql.get(kind, 0) + 1

        return listener

    sent = Sent()
    async with in_process_app(admin_url, redis_url, tmp) as (app, database_url, client):
        engine = app.state.resources.engine.sync_engine
        for kind in ("before_cursor_execute", "begin", "commit", "rollback"):
            event.listen(engine, kind, count(kind))
        accounts = await make_accounts(client, args.users, concurrency=4)
        await prepare_users(database_url, accounts)
        request = transfer_request(accounts, args.amount_max, sent)
        clients: list[Client] = [client] * args.clients
        options: dict[str, Any] = {"ok_status": (201,), "max_errors": 5}
        await run_scenario(clients, "warm-up", request, duration=1, warmup=0, **options)
        sql.clear()
        prof = cProfile.Profile(time.process_time)  # CPU, not waiting
        prof.enable()
        r = await run_scenario(
            clients, "transfers", request, duration=args.seconds, warmup=0, **options
        )
        prof.disable()
    if r.errors:
        print(f"FAILED: {r.errors[:3]}", file=sys.stderr)
        return 1
    n = len(r.latencies)
    print(f"{n} transfers in-process ({r.rps:.0f} /s, {args.clients} clients, {args.users} users)")
    print(
        "SQL per transfer as SQLAlchemy sends it: "
        f"{sql.get('before_cursor_execute', 0) / n:.2f} statements in "
        f"{sql.get('begin', 0) / n:.2f} transactions (+ BEGIN and COMMIT: "
        f"{(sql.get('before_cursor_execute', 0) + 2 * sql.get('begin', 0)) / n:.2f} "
        f"round trips); {sql.get('rollback', 0)} rollbacks"
    )
    print("(the httpx client runs in this process too: read the ASGI app's subtree)\n")
    stats = pstats.Stats(prof)
    print_cpu_by_package(stats, n)
    stats.strip_dirs().sort_stats("tottime").print_stats(30)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (both)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--users",
        type=int,
        help=f"users sending to each other (default 48; {HOT_USERS} with --hot)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="uvicorn worker counts to run, one after the other (comma-separated)",
    )
    parser.add_argument(
        "--hot",
        action="store_true",
        help=f"{HOT_USERS} users: most transfers wait for rows another transfer holds",
    )
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    parser.add_argument("--amount-max", type=int, default=100, help="largest transfer, minor units")
    parser.add_argument("--pgbench", help="the pgbench binary (default: found for the server)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 s, 1 worker")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: cProfile the transfers in-process (ASGI, no socket, "
        "no pgbench) and count the SQL each one sends",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.workers = 5.0, 1.0, "1"
    args.users = args.users or (HOT_USERS if args.hot else 48)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        parser.error("--workers: comma-separated numbers, e.g. 1,2")
    if args.users < 2 or args.clients < 1 or not args.workers or min(args.workers) < 1:
        parser.error("need at least 2 users, 1 client and 1 worker")
    args.servers = servers_label()
    run = profile if args.profile else bench
    return run_with_servers(lambda admin_url, redis, tmp: run(args, admin_url, redis, tmp))


if __name__ == "__main__":
    sys.exit(main())
