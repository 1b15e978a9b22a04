"""Card authorizations through `POST /v1/payments`, as a ratio to a bare `/healthz` of the same API.

    .venv/bin/python bench/authorize.py [--duration 10] [--concurrency 16] [--in-flight 500] [--quick]

The processes `billfold up` runs, each on a loopback port: `billfold vault` (SoftHSM2 token in a
temporary data dir), two `billfold network` simulators (one answering at once, one after
`--latency-ms`, 1200 by default) and two API processes (uvicorn, one worker each, the settings
`billfold serve` uses, log INFO), one per simulator. This process is the load: keep-alive
HTTP/1.1 clients in closed loops. Each client pays with a card of its own (a payment token's ATCs
go up one cryptogram at a time, so clients never share one). Scenarios:

  healthz     GET /healthz of the 0 ms API: the reference (edge + routing, no I/O); first and last
  pay-0ms-c1  POST /v1/payments (card, in_app, approved) with `--overhead-clients` (1) client and
              the network answering at once: billfold's own overhead without queueing (auth,
              vault cryptogram, fraud, ISO 8583 round trip incl. the simulator's vault checks,
              two short transactions): what the p99 <= 25 ms target is about
  pay-0ms     the same with `--concurrency` clients: throughput, and p99 mostly queueing
  pay-1200ms  the same with `--in-flight` clients against the slow network: requests hold no
              database connection while they wait, so throughput should be in-flight / latency

A payment is a success only if it ends 201 with status `authorized`; anything else (a decline,
a network timeout, a 202 `challenge_required`/`review`, 5xx, a dropped connection) is an error
and fails the run (until the sixth session a 202 passed as a success: most of the slow scenario's
payments were challenges that never reached the network). The bench merchant is on the fraud
allow list: a few hundred cards paying one shop back to back is what velocity rules challenge;
the check still runs in full for every payment, only its action is overridden. A 429 `overloaded`
is not an answer about the payment: the API refused to start it (nothing done) and the client
waits `Retry-After` and sends it again with the same Idempotency-Key, as an acquirer does; the
payment's latency includes those waits, and the refusals are counted on a line of their own. Machines are noisy: read the ratios. PostgreSQL and
Redis come from BILLFOLD_DATABASE_URL / BILLFOLD_REDIS_URL when set, otherwise embedded servers.

billfold's own share per payment (DESIGN.md section 8: auth, token, fraud, DB, notify-enqueue) is
printed for pay-0ms-c1 and pay-0ms: each payment's latency as its client saw it minus its
`network` step from the timings in its details (the ISO 8583 exchange, the simulator's issuer
work and its vault verification included), beside the end-to-end figures.

CPU per payment is measured over each scenario's window in every process on the path: the API,
the vault, the scenario's simulator and the bench database's PostgreSQL backends (Redis is
shared and not counted), beside the whole machine's busy CPU (others' work included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billfold.network import TEST_CARD_RULES
from billfold.platform.db import async_url
from billfold.platform.keys import SealedBox
from billfold.vault.emv import luhn_check_digit
from billfold.vault.service_auth import generate_service_key
from common import (
    Account,
    Client,
    CpuProbe,
    ProcessCpu,
    RawConnection,
    RawResponse,
    Response,
    Result,
    cpu_model,
    drop_redis_keys,
    free_port,
    fresh_database,
    machine_busy,
    make_accounts,
    percentile,
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
from p2p import BackendCpu

MERCHANT = {"id": "mch_bench", "name": "Bench Coffee", "mcc": "5814", "country": "US"}
CARDS_PER_USER = 25


def _pan() -> str:
    """A random card the simulator approves (none of its test-card endings)."""
    while True:
        body = "4" + "".join(str(secrets.randbelow(10)) for _ in range(14))
        pan = body + luhn_check_digit(body)
        if pan[-4:] not in TEST_CARD_RULES:
            return pan


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "billfold.cli", *args], env=env, stdout=log, stderr=log
        )


async def _listening(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(1200):  # two minutes: importing the CLI is slow on a busy machine
        if proc.poll() is not None:
            raise SystemExit(f"{log_path.name}: the process exited\n{tail(log_path)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"{log_path.name}: not listening")


async def _cards(base: str, users: list[Account], n: int) -> list[tuple[Account, str]]:
    """`n` verified cards, `CARDS_PER_USER` per user, through the public API."""
    out: list[tuple[Account, str]] = []
    gate = asyncio.Semaphore(8)

    async def one(who: Account) -> tuple[Account, str]:
        async with gate:
            body = {
                "card": {
                    "pan": _pan(),
                    "expiry_month": 12,
                    "expiry_year": 2031,
                    "cvv": "123",
                    "cardholder_name": "Bench User",
                    "billing_address": {
                        "line1": "1 Main St",
                        "city": "Oakland",
                        "region": "CA",
                        "postal_code": "94607",
                        "country": "US",
                    },
                }
            }
            headers = {
                "Authorization": f"Bearer {who.access_token}",
                "Idempotency-Key": uuid.uuid4().hex,
            }
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                r = await c.post("/v1/payment-methods", json=body, headers=headers)
            if r.status_code != 201 or r.json()["status"] != "verified":
                raise SystemExit(f"adding a card failed: {r.status_code} {r.text}")
            return who, str(r.json()["id"])

    out = list(await asyncio.gather(*(one(users[i // CARDS_PER_USER]) for i in range(n))))
    return out


class Refusals:
    """429 `overloaded` answers of a scenario: the API refused to start a payment (nothing was
    done) and the client waited `Retry-After` before trying again with the same key, as an
    acquirer does. Not errors: the payment still ends `authorized` or counts as one, and its
    latency includes the waits. `waiting` is how many clients sit out a Retry-After now."""

    def __init__(self) -> None:
        self.count = 0
        self.waiting = 0
        self.samples: list[int] = []


class Paid:
    """Each authorized payment of a scenario: when it was sent (the loop's clock), its latency
    as its client saw it (s) and its id, for `own_overhead`."""

    def __init__(self) -> None:
        self.payments: list[tuple[float, float, str]] = []
        self.window = 0.0  # the measured window's start

    def measured(self) -> list[tuple[float, str]]:
        return [(latency, pid) for sent, latency, pid in self.payments if sent >= self.window]


def _pay(
    cards: list[tuple[Account, str]],
    refusals: Refusals,
    amount: int = 1_250,
    paid: Paid | None = None,
) -> Any:
    async def request(client: Any, i: int) -> Response:
        who, method = cards[i]
        body = {
            "source": "card",
            "payment_method_id": method,
            "amount": amount,
            "currency": "USD",
            "merchant": MERCHANT,
            "channel": "in_app",
        }
        headers = {
            "Authorization": f"Bearer {who.access_token}",
            "Idempotency-Key": uuid.uuid4().hex,
        }
        sent = time.perf_counter()
        while True:
            r: RawResponse = await client.post_json("/v1/payments", body, headers)
            if r.status_code != 429 or '"overloaded"' not in r.text:
                break
            refusals.count += 1
            refusals.waiting += 1
            try:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            finally:
                refusals.waiting -= 1
        if r.is_success and (r.status_code != 201 or r.json().get("status") != "authorized"):
            # A decline, a failed payment, or a 202 (`challenge_required`, `review`: the payment
            # never reached the network) is an error of the run, never a success.
            return RawResponse(599, r.content)
        if paid is not None and r.status_code == 201:
            paid.payments.append((sent, time.perf_counter() - sent, str(r.json()["id"])))
        return r

    return request


class _PostgresCpu:
    """The bench database's backends (`p2p.BackendCpu`, polled for ones that come and go)."""

    name = "postgres"

    def __init__(self, engine: AsyncEngine, database: str) -> None:
        self._engine, self._database = engine, database
        self._sampler: BackendCpu | None = None

    async def start(self) -> None:
        self._sampler = BackendCpu(self._engine, self._database)
        await self._sampler.start(poll=True)

    async def stop(self) -> float | None:
        assert self._sampler is not None
        cpu, _ = await self._sampler.stop()
        return cpu


class _MachineCpu:
    """Busy CPU seconds of the whole machine (all cores, everyone's work)."""

    name = "machine"

    def __init__(self) -> None:
        self._first = 0.0

    async def start(self) -> None:
        self._first = machine_busy()[0]

    async def stop(self) -> float | None:
        return machine_busy()[0] - self._first


async def _allow_list_merchant(database_url: str) -> None:
    """The bench's merchant on the fraud allow list. A load test is a few hundred cards paying
    one coffee shop back to back, which the velocity rules rightly challenge (a 202 that never
    reaches the network). The check itself still runs in full for every payment (features,
    rules, model, the decision stored): only its action is overridden, as for any allow-listed
    merchant."""
    from billfold.fraud.lists import AddEntry, add_entry
    from billfold.platform.db import create_engine, unit_of_work

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with unit_of_work(engine) as uow:
            entry = AddEntry(list="allow", kind="merchant", value=MERCHANT["id"], reason="bench")
            await add_entry(uow, "bench", entry)
    finally:
        await engine.dispose()


async def _prime(port: int, n: int, request: Any) -> Result:
    """Each of `n` clients makes one payment at once; the round's successes, errors, time."""
    result = Result("priming")
    clients = [RawConnection("127.0.0.1", port) for _ in range(n)]
    started = asyncio.get_running_loop().time()

    async def one(i: int) -> None:
        try:
            r = await request(clients[i], i)
            ok, detail = r.is_success, f"{r.status_code} {r.text[:300]}"
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        result.succeeded += ok
        if not ok:
            result.errors.append(detail)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for client in clients:
            await client.aclose()
    result.elapsed = asyncio.get_running_loop().time() - started
    return result


# Stands for "a payment request" in `scenario` (built there with the scenario's `Refusals`).
_PAY: Any = object()


async def _healthz(client: Any, i: int) -> Response:
    return await client.get("/healthz")  # type: ignore[no-any-return]


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    try:
        async with fresh_database(admin_url) as (db_name, database_url):
            pg_version, redis_version = await server_versions(database_url, redis_url)
            await _allow_list_merchant(database_url)
            data_dir = tmp / "data"
            env = server_env(database_url, redis_url, prefix, data_dir)
            env["BILLFOLD_VAULT_SERVICE_KEY"] = generate_service_key()
            env["BILLFOLD_SECRET_KEY"] = env.get("BILLFOLD_SECRET_KEY") or SealedBox.generate_b64()
            vault_port = free_port()
            log = tmp / "vault.log"
            procs.append(
                _start(["vault", "--host", "127.0.0.1", "--port", str(vault_port)], env, log)
            )
            await wait_ready(f"http://127.0.0.1:{vault_port}", procs[-1], log)
            env["BILLFOLD_VAULT_URL"] = f"http://127.0.0.1:{vault_port}"
            apis: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
            sims: dict[str, int] = {"vault": procs[-1].pid}
            for name, latency in (("0ms", 0.0), ("slow", args.latency_ms)):
                net_port = free_port()
                log = tmp / f"network-{name}.log"
                procs.append(
                    _start(
                        [
                            "network",
                            "--port",
                            str(net_port),
                            "--latency-ms",
                            str(latency),
                            "--card-balance",
                            str(10**11),
                        ],
                        env,
                        log,
                    )
                )
                await _listening(net_port, procs[-1], log)
                sims[name] = procs[-1].pid
                api_env = {**env, "BILLFOLD_NETWORK_ADDRESS": f"127.0.0.1:{net_port}"}
                log = tmp / f"api-{name}.log"
                proc, port = start_api(api_env, log, workers=args.workers)
                procs.append(proc)
                await wait_ready(f"http://127.0.0.1:{port}", proc, log)
                apis[name] = (proc, port)
            engine = create_async_engine(async_url(database_url), pool_size=1, max_overflow=1)
            try:
                code = await _measure(
                    args,
                    apis,
                    sims,
                    engine,
                    _PostgresCpu(engine, db_name),
                    pg_version,
                    redis_version,
                )
            finally:
                await engine.dispose()
            if code:
                keep = (
                    Path(tempfile.gettempdir()) / f"billfold-authorize-logs-{uuid.uuid4().hex[:6]}"
                )
                shutil.copytree(tmp, keep, ignore=shutil.ignore_patterns("data", "postgres*"))
                print(f"the processes' logs: {keep}", file=sys.stderr)
            return code
    finally:
        for proc in reversed(procs):
            stop(proc)
        await drop_redis_keys(redis_url, prefix)


async def _measure(
    args: argparse.Namespace,
    apis: dict[str, tuple[subprocess.Popen[bytes], int]],
    sims: dict[str, int],
    engine: AsyncEngine,
    postgres: CpuProbe,
    pg_version: str,
    redis_version: str,
) -> int:
    fast_proc, fast_port = apis["0ms"]
    slow_proc, slow_port = apis["slow"]
    print(f"machine   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"servers   PostgreSQL {pg_version}, {redis_version} ({args.servers})")
    print(f"packages  {versions()}, pyiso8583")
    print(
        f"load      raw HTTP/1.1 keep-alive clients: {args.concurrency} (healthz, pay-0ms), "
        f"{args.in_flight} (pay-{args.latency_ms:g}ms); {args.duration:g} s per scenario after "
        f"{args.warmup:g} s warm-up; processes: vault, 2 network simulators, "
        f"2 APIs ({args.workers} worker{'s' if args.workers > 1 else ''} each)\n"
    )
    base = f"http://127.0.0.1:{fast_port}"
    n_cards = max(args.concurrency, args.in_flight)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        print("  preparing users and cards ...", file=sys.stderr, flush=True)
        users = await make_accounts(c, -(-n_cards // CARDS_PER_USER), concurrency=4)
    cards = await _cards(base, users, n_cards)

    runs: list[tuple[str, Result]] = []

    refused: dict[str, Refusals] = {}

    shares: dict[str, Paid] = {}

    async def scenario(
        name: str, port: int, pid: int, clients_n: int, request: Any, warmup: float, sim: str
    ) -> Result:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        refusals = refused.setdefault(name, Refusals())
        paid = shares[name] = Paid()
        paid.window = time.perf_counter() + warmup
        if request is _PAY:
            request = _pay(cards, refusals, paid=paid)
        clients: list[Client] = [RawConnection("127.0.0.1", port) for _ in range(clients_n)]
        probes: list[CpuProbe] = [
            ProcessCpu("vault", sims["vault"]),
            ProcessCpu("network", sims[sim]),
            postgres,
            _MachineCpu(),
        ]

        async def sample() -> None:
            # How many of the clients the API holds (the rest sit out a Retry-After).
            await asyncio.sleep(warmup)
            end = asyncio.get_running_loop().time() + args.duration
            while asyncio.get_running_loop().time() < end:
                refusals.samples.append(clients_n - refusals.waiting)
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        spies = _profile(
            args, name, warmup, {"api": pid, "vault": sims["vault"], "network": sims[sim]}
        )
        try:
            r = await run_scenario(
                clients,
                name,
                request,
                duration=args.duration,
                warmup=warmup,
                server_pid=pid,
                max_errors=20,
                probes=probes,
            )
        finally:
            sampler.cancel()
            for spy in spies:
                spy.wait()
            for client in clients:
                await client.aclose()  # type: ignore[union-attr]
        runs.append((name, r))
        return r

    ref1 = await scenario(
        "healthz", fast_port, fast_proc.pid, args.concurrency, _healthz, args.warmup, "0ms"
    )
    before_alone = await _step_totals(fast_port)
    alone = await scenario(
        f"pay-0ms-c{args.overhead_clients}",
        fast_port,
        fast_proc.pid,
        args.overhead_clients,
        _PAY,
        args.warmup,
        "0ms",
    )
    alone_steps = _step_diff(before_alone, await _step_totals(fast_port))
    fast = await scenario(
        "pay-0ms", fast_port, fast_proc.pid, args.concurrency, _PAY, args.warmup, "0ms"
    )
    slow_name = f"pay-{args.latency_ms:g}ms"
    # A first round of `in_flight` payments at once, each client one, not measured: on two cores
    # it takes longer than a fixed warm-up (~15 s at 35/s), and a window that ends inside it
    # measures a pipeline still filling. It also fills the slow simulator's card cache. Its
    # payments count as the scenario's: a failed one is an error of the run.
    print(f"  priming {slow_name}: one payment per client ...", file=sys.stderr, flush=True)
    primed = await _prime(
        slow_port, args.in_flight, _pay(cards, refused.setdefault(slow_name, Refusals()))
    )
    slow = await scenario(
        slow_name,
        slow_port,
        slow_proc.pid,
        args.in_flight,
        _PAY,
        # ...and a warm-up as long as that round took: by then every client has had an answer
        # and their payments no longer start together.
        max(args.warmup, 3.0, primed.elapsed * 1.2),
        "slow",
    )
    ref2 = await scenario(
        "healthz", fast_port, fast_proc.pid, args.concurrency, _healthz, args.warmup, "0ms"
    )
    steps: list[str] = []
    async with httpx.AsyncClient(timeout=10) as c:
        for name, port in (("pay-0ms", fast_port), (f"pay-{args.latency_ms:g}ms", slow_port)):
            metrics = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
            steps.append(f"  {name}: " + ", ".join(_step_means(metrics)))

    head = f"{'scenario':<14}{'clients':>8}{'ops':>8}{'ops/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'errors':>7}{'ops/ref':>9}{'API CPU/op':>12}"
    print(head)
    print("-" * len(head))
    ref = ref1.merged(ref2, "healthz")
    rows = (
        ("healthz", ref, args.concurrency),
        (f"pay-0ms-c{args.overhead_clients}", alone, args.overhead_clients),
        ("pay-0ms", fast, args.concurrency),
        (slow_name, slow, args.in_flight),
    )
    for name, r, n in rows:
        print(
            f"{name:<14}{n:>8}{len(r.latencies):>8}{r.rps:>9.1f}{r.pct(50):>10.2f}{r.pct(99):>10.2f}"
            f"{len(r.errors):>7}{r.rps / ref.rps:>9.4f}{r.cpu_us(r.server_cpu) / 1000:>9.2f} ms"
        )
    print(
        "\nCPU per request in the measured window, ms (total: API + vault + simulator + "
        "PostgreSQL; machine: every process on the machine, others' work included)"
    )
    cols = ("API", "vault", "network", "postgres", "total", "machine")
    print(f"{'scenario':<14}" + "".join(f"{c:>10}" for c in cols))
    for name, r, _ in rows[1:]:
        per = {"API": r.server_cpu, **r.cpu}
        parts = [per.get(k) for k in ("API", "vault", "network", "postgres")]
        total = sum(p for p in parts if p is not None)
        values = [*parts, total, per.get("machine")]
        print(
            f"{name:<14}"
            + "".join(
                f"{r.cpu_us(v) / 1000:>10.2f}" if v is not None else f"{'?':>10}" for v in values
            )
        )
    print(
        "\n429 `overloaded` (refused before any work, retried after Retry-After with the same "
        "key; not errors; warm-up included), and how many clients the API held (sampled every "
        "0.1 s of the measured window):"
    )
    for name, _, n in rows[1:]:
        held = refused[name].samples or [n]
        print(
            f"  {name}: {refused[name].count} refusals; API held {min(held)}-{max(held)} "
            f"of {n} clients (mean {sum(held) / len(held):.0f})"
        )
    print(
        f"\nhealthz drift: {ref1.rps:.0f} req/s before, {ref2.rps:.0f} after; "
        f"in flight at {args.latency_ms:g} ms: {slow.rps * slow.pct(50) / 1000:.0f} "
        f"(throughput x p50), ideal {args.in_flight / (args.latency_ms / 1000):.0f} ops/s"
    )
    print(
        "\nbillfold's own share per payment (DESIGN.md section 8: auth, token, fraud, DB, "
        "notify-enqueue): each payment's latency as its client saw it minus its `network` step "
        "as recorded in its details (the ISO 8583 exchange with the issuer simulator, the "
        "issuer's own cryptogram verification in the vault included), measured window only:"
    )
    for name in (alone.name, "pay-0ms"):
        print(f"  {name}: " + await own_overhead(engine, shares[name].measured()))
    print("per-step means of each API (billfold_payment_step_duration_seconds, warm-up included):")
    print("\n".join(steps))
    print(f"  {alone.name} alone (warm-up included): " + ", ".join(alone_steps))
    print(
        f"{slow_name} priming round (not measured): {primed.succeeded} of {args.in_flight} "
        f"authorized in {primed.elapsed:.1f} s, {len(primed.errors)} errors"
    )
    runs.append((f"{slow_name} priming", primed))
    failed = [(k, r) for k, r in runs if r.errors]
    for k, r in failed:
        print(f"FAILED {k}: {len(r.errors)} errors, e.g.:", file=sys.stderr)
        for e in r.errors[:3]:
            print(f"  {e}", file=sys.stderr)
    return 1 if failed else 0


async def own_overhead(engine: AsyncEngine, payments: list[tuple[float, str]]) -> str:
    """p50/p99 of end to end minus the network step, per payment (timings from its details)."""
    if not payments:
        return "no payments"
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT transaction_id, timings FROM transactions.transaction_details "
                "WHERE transaction_id = ANY(:ids)"
            ),
            {"ids": [pid for _, pid in payments]},
        )
        network = {r.transaction_id: float((r.timings or {}).get("network", 0.0)) for r in rows}
    missing = sum(1 for _, pid in payments if pid not in network)
    e2e = [latency * 1000 for latency, _ in payments]
    net = [network.get(pid, 0.0) for _, pid in payments]
    own = [t - n for t, n in zip(e2e, net, strict=True)]
    pct = percentile
    return (
        f"n={len(own)}, own p50 {pct(own, 50):.2f} ms, p99 {pct(own, 99):.2f} ms, "
        f"max {max(own):.2f} ms (end to end p50 {pct(e2e, 50):.2f}, p99 {pct(e2e, 99):.2f}; "
        f"network step p50 {pct(net, 50):.2f}, p99 {pct(net, 99):.2f})"
        + (f"; {missing} without details" if missing else "")
    )


def _profile(
    args: argparse.Namespace, scenario: str, warmup: float, pids: dict[str, int]
) -> list[subprocess.Popen[bytes]]:
    """With `--py-spy`, sample each process of `--profile-scenario` over its measured window
    (py-spy record, collapsed stacks, `--profile-dir`/<scenario>-<process>.txt)."""
    if not args.py_spy or scenario != args.profile_scenario:
        return []
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            _spy_command(args, pid, out / f"{scenario}-{name}.txt", warmup),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def _spy_command(args: argparse.Namespace, pid: int, output: Path, warmup: float) -> list[str]:
    # py-spy has no start delay: a shell sleeps the warm-up first.
    record = (
        f"{args.py_spy} record --pid {pid} --duration {max(1, round(args.duration))} "
        f"--rate 250 --format raw --nonblocking --output {output}"
    )
    return ["sh", "-c", f"sleep {warmup}; exec {record}"]


async def _step_totals(port: int) -> dict[str, tuple[float, float]]:
    """step -> (sum of seconds, count) of the API's payment step histogram now."""
    async with httpx.AsyncClient(timeout=10) as c:
        metrics = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    totals: dict[str, tuple[float, float]] = {}
    for line in metrics.splitlines():
        if not line.startswith("billfold_payment_step_duration_seconds_"):
            continue
        name, _, value = line.rpartition(" ")
        step = name.split('step="', 1)[-1].split('"', 1)[0]
        s, n = totals.get(step, (0.0, 0.0))
        if name.startswith("billfold_payment_step_duration_seconds_sum"):
            totals[step] = (s + float(value), n)
        elif name.startswith("billfold_payment_step_duration_seconds_count"):
            totals[step] = (s, n + float(value))
    return totals


def _step_diff(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> list[str]:
    out = []
    for step, (s, n) in after.items():
        s0, n0 = before.get(step, (0.0, 0.0))
        if n - n0:
            out.append(f"{step} {(s - s0) / (n - n0) * 1000:.1f} ms")
    return out


def _step_means(metrics: str) -> list[str]:
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        if not line.startswith("billfold_payment_step_duration_seconds_"):
            continue
        name, _, value = line.rpartition(" ")
        step = name.split('step="', 1)[-1].split('"', 1)[0]
        if name.startswith("billfold_payment_step_duration_seconds_sum"):
            sums[step] = sums.get(step, 0) + float(value)
        elif name.startswith("billfold_payment_step_duration_seconds_count"):
            counts[step] = counts.get(step, 0) + float(value)
    return [f"{k} {sums[k] / counts[k] * 1000:.1f} ms" for k in sums if counts.get(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at 0 ms")
    parser.add_argument("--in-flight", type=int, default=500, help="clients at --latency-ms")
    parser.add_argument("--latency-ms", type=float, default=1200.0, help="the slow network")
    parser.add_argument(
        "--overhead-clients", type=int, default=1, help="clients of pay-0ms-cN (no queueing)"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per API")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--py-spy", default="", help="path of a py-spy binary: profile --profile-scenario"
    )
    parser.add_argument("--profile-scenario", default="pay-0ms-c1", help="which scenario")
    parser.add_argument(
        "--profile-dir", default="/tmp/billfold-authorize-profile", help="where profiles go"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 5.0, 1.0
    args.servers = servers_label()
    return run_with_servers(lambda admin_url, redis, tmp: bench(args, admin_url, redis, tmp))


if __name__ == "__main__":
    sys.exit(main())
