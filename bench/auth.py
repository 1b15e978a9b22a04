"""Token issue + verify through the whole HTTP stack, as a ratio to a bare `/healthz`.

    .venv/bin/python bench/auth.py [--duration 10] [--concurrency 16] [--quick]
    .venv/bin/python bench/auth.py --profile verify|refresh   # cProfile, in-process ASGI

A real uvicorn process (one worker, the settings `billfold serve` uses) answers on a loopback
port; this process is the load: N keep-alive HTTP/1.1 clients, each in a closed loop for a fixed
time per scenario. Scenarios:

  healthz   GET /healthz: the reference (edge middleware + routing + JSON, no I/O); run first
            and last, so a drifting machine shows
  verify    GET /v1/me with a bearer token: ES256 verify, Redis revocation check, rate limit
            (one Redis script), one transaction with one SELECT
  refresh   POST /v1/auth/token grant_type=refresh_token: token issue (rotation: each worker
            chains its own refresh tokens), ES256 sign, one transaction with four statements
  password  POST /v1/auth/token grant_type=password: argon2id (64 MiB, t=3, p=4), slow on
            purpose; reported, never a target

Machines are noisy: read the ratios (scenario / healthz of the same run), not the absolute
numbers. Any non-2xx answer is an error and fails the run.

PostgreSQL and Redis come from BILLFOLD_DATABASE_URL / BILLFOLD_REDIS_URL when set, otherwise
embedded servers are started in a temporary directory. The run uses a fresh database (dropped
at the end) and its own Redis key prefix (deleted at the end).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from common import (
    PASSWORD,
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
    make_accounts,
    print_cpu_by_package,
    run_scenario,
    run_with_servers,
    server_env,
    server_versions,
    servers_label,
    start_api,
    stop,
    versions,
    wait_ready,
)

# --- the scenarios ---------------------------------------------------------------------------


def scenarios(accounts: list[Account]) -> dict[str, Request]:
    bearer = [{"Authorization": f"Bearer {a.access_token}"} for a in accounts]

    async def healthz(client: Any, i: int) -> Response:
        return await client.get("/healthz")  # type: ignore[no-any-return]

    async def verify(client: Any, i: int) -> Response:
        return await client.get("/v1/me", headers=bearer[i])  # type: ignore[no-any-return]

    async def refresh(client: Any, i: int) -> Response:
        account = accounts[i]
        r: Response = await client.post(
            "/v1/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": account.refresh_token},
        )
        if r.is_success:
            account.refresh_token = r.json()["refresh_token"]  # rotation: the old one is spent
        return r

    async def password(client: Any, i: int) -> Response:
        return await client.post(  # type: ignore[no-any-return]
            "/v1/auth/token",
            data={"grant_type": "password", "username": accounts[i].email, "password": PASSWORD},
        )

    return {"healthz": healthz, "verify": verify, "refresh": refresh, "password": password}


LABELS = {
    "healthz": "GET /healthz (baseline)",
    "verify": "GET /v1/me (token verify)",
    "refresh": "POST /v1/auth/token refresh (issue)",
    "password": "POST /v1/auth/token password *",
}


# --- report ----------------------------------------------------------------------------------


def report(results: dict[str, Result], base: Result, drift: tuple[Result, Result]) -> None:
    head = f"{'scenario':<37}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    head += f"{'errors':>7}{'rps/base':>10}{'p99/base':>10}{'srv CPU/req':>13}{'cli CPU/req':>13}"
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        line = f"{LABELS[key]:<37}{len(r.latencies):>9}{r.rps:>9.0f}{r.pct(50):>9.2f}"
        line += f"{r.pct(99):>9.2f}{len(r.errors):>7}"
        line += f"{r.rps / base.rps:>10.3f}{r.pct(99) / base.pct(99):>10.2f}"
        line += f"{r.cpu_us(r.server_cpu):>10.0f} us{r.cpu_us(r.client_cpu):>10.0f} us"
        print(line)
    first, last = drift
    print(
        f"\nbaseline drift: healthz {first.rps:.0f} req/s before, {last.rps:.0f} after "
        f"({(last.rps / first.rps - 1) * 100:+.1f}%); ratios use both halves pooled"
    )
    print("* argon2id (64 MiB, t=3, p=4) by design: slow on purpose, not a target\n")
    print("ratios to healthz (the result; absolute numbers vary from machine to machine):")
    for key in ("verify", "refresh", "password"):
        if key in results:
            r = results[key]
            print(
                f"  {key:<9} throughput {r.rps / base.rps:6.3f}x   "
                f"p99 {r.pct(99) / base.pct(99):6.2f}x   "
                f"server CPU/request {r.cpu_us(r.server_cpu) / base.cpu_us(base.server_cpu):6.2f}x"
                f"   (p99 {r.pct(99):.2f} ms)"
            )


# --- the run ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    proc = None
    try:
        async with fresh_database(admin_url) as (_, database_url):
            try:
                pg_version, redis_version = await server_versions(database_url, redis_url)
                log_path = tmp / "api.log"
                proc, port = start_api(
                    server_env(database_url, redis_url, prefix, tmp / "data"), log_path
                )
                base = f"http://127.0.0.1:{port}"
                await wait_ready(base, proc, log_path)
                return await _measure(args, proc.pid, port, base, pg_version, redis_version)
            finally:
                if proc is not None:
                    stop(proc)
    finally:
        await drop_redis_keys(redis_url, prefix)


async def _measure(
    args: argparse.Namespace,
    server_pid: int,
    port: int,
    base: str,
    pg_version: str,
    redis_version: str,
) -> int:
    print(f"machine   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"servers   PostgreSQL {pg_version}, {redis_version} ({args.servers})")
    print(f"packages  {versions()}")
    print(
        f"load      {args.concurrency} keep-alive connections ({args.client} client), "
        f"{args.duration:g} s per scenario after {args.warmup:g} s warm-up; "
        "API: 1 uvicorn worker, app log INFO\n"
    )

    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    raw: list[Client] = [RawConnection("127.0.0.1", port) for _ in range(args.concurrency)]
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        accounts = await make_accounts(client, args.concurrency)
        requests = scenarios(accounts)
        clients: list[Client] = raw if args.client == "raw" else [client] * args.concurrency
        order = ["healthz", *args.scenarios, "healthz"]
        runs: list[tuple[str, Result]] = []
        for key in order:
            print(f"  running {key} ...", file=sys.stderr, flush=True)
            r = await run_scenario(
                clients,
                key,
                requests[key],
                duration=args.duration,
                warmup=args.warmup,
                server_pid=server_pid,
            )
            runs.append((key, r))
            if r.errors:
                break
    for connection in raw:
        await connection.aclose()

    failed = [(k, r) for k, r in runs if r.errors]
    if failed:
        for k, r in failed:
            print(f"FAILED {k}: {len(r.errors)} non-2xx answers, e.g.:", file=sys.stderr)
            for e in r.errors[:3]:
                print(f"  {e}", file=sys.stderr)
        return 1
    before, after = runs[0][1], runs[-1][1]
    baseline = before.merged(after, "healthz")
    results = {"healthz": baseline} | {k: r for k, r in runs[1:-1]}
    report(results, baseline, (before, after))
    return 0


# --- profile: the same requests in-process, against the ASGI app ------------------------------


async def profile(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    import cProfile
    import pstats

    async with in_process_app(admin_url, redis_url, tmp) as (_, _, client):
        accounts = await make_accounts(client, args.concurrency)
        request = scenarios(accounts)[args.profile]
        clients: list[Client] = [client] * args.concurrency
        await run_scenario(
            clients,
            args.profile,
            request,
            duration=1,
            warmup=0,
        )
        sampler: Any = None
        if args.profiler == "pyinstrument":
            from pyinstrument import Profiler  # not a dependency: uv pip install it

            sampler = Profiler(interval=0.0005, async_mode="disabled")
        prof = cProfile.Profile(time.process_time)  # CPU, not waiting
        sampler.start() if sampler else prof.enable()
        r = await run_scenario(
            clients,
            args.profile,
            request,
            duration=args.duration,
            warmup=0,
        )
        sampler.stop() if sampler else prof.disable()
    if r.errors:
        print(f"FAILED: {r.errors[:3]}", file=sys.stderr)
        return 1
    print(f"{len(r.latencies)} requests of {args.profile} in-process ({r.rps:.0f} req/s)")
    print("(the httpx client runs in this process too: read the ASGI app's subtree)\n")
    if sampler:
        print(sampler.output_text(unicode=True, show_all=args.profile_all))
    else:
        stats = pstats.Stats(prof)
        print_cpu_by_package(stats, len(r.latencies))
        stats.strip_dirs().sort_stats("tottime").print_stats(40)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: hand-written HTTP/1.1 (default, cheap) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--profile",
        choices=["verify", "refresh", "password", "healthz"],
        help="instead of the benchmark: cProfile one scenario in-process (ASGI, no socket)",
    )
    parser.add_argument(
        "--profiler",
        choices=["cprofile", "pyinstrument"],
        default="cprofile",
        help="cprofile (CPU time, by package) or pyinstrument (call tree; install it first)",
    )
    parser.add_argument(
        "--profile-all", action="store_true", help="with pyinstrument: show library frames"
    )
    parser.add_argument(
        "--scenarios",
        default="verify,refresh,password",
        help="comma-separated subset of verify,refresh,password (healthz always runs)",
    )
    args = parser.parse_args()
    args.scenarios = [k for k in args.scenarios.split(",") if k]
    if not set(args.scenarios) <= {"verify", "refresh", "password"}:
        parser.error("--scenarios: choose from verify, refresh, password")
    if args.quick:
        args.duration, args.warmup = 2.5, 0.5

    args.servers = servers_label()
    run = profile if args.profile else bench
    return run_with_servers(lambda admin_url, redis, tmp: run(args, admin_url, redis, tmp))


if __name__ == "__main__":
    sys.exit(main())
