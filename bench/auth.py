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
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from billfold.migrations import upgrade_async
from billfold.platform.db import async_url
from billfold.platform.keys import SealedBox

PASSWORD = "correct horse battery staple"
# High enough never to refuse, so the limiter still runs (it is part of the edge cost).
UNLIMITED = "100000000/60"
RATE_LIMITS = {
    f"rate_limit_{klass}_{kind}": UNLIMITED
    for klass in ("auth", "write", "read")
    for kind in ("ip", "user")
}


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    server_cpu: float = 0.0  # CPU seconds of the API process over the measured window
    client_cpu: float = 0.0  # CPU seconds of this (load) process over the measured window

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[rank] * 1000

    def cpu_us(self, seconds: float) -> float:
        """CPU microseconds per request."""
        return seconds / len(self.latencies) * 1e6 if self.latencies else float("nan")

    def merged(self, other: Result, name: str) -> Result:
        return Result(
            name,
            self.latencies + other.latencies,
            self.elapsed + other.elapsed,
            self.errors + other.errors,
            self.server_cpu + other.server_cpu,
            self.client_cpu + other.client_cpu,
        )


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawResponse:
    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self.content = body

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RawConnection:
    """One keep-alive HTTP/1.1 connection, written by hand: a load generator that costs ~15x
    less CPU per request than httpx, so the baseline measures the API, not the client (on two
    cores, httpx alone saturates a core at ~600 /healthz requests per second)."""

    _IDLE = 4.0  # uvicorn closes idle keep-alive connections after 5 s

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is not None and time.monotonic() - self._used > self._IDLE:
            await self.aclose()
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self._reader, self._writer

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None, body: bytes
    ) -> RawResponse:
        reader, writer = await self._connection()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length is None:
            raise OSError(f"response without Content-Length: {lines[:1]}")
        payload = await reader.readexactly(length)
        self._used = time.monotonic()
        if close:
            await self.aclose()
        return RawResponse(status, payload)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("GET", path, headers, b"")

    async def post(
        self, path: str, data: dict[str, str], headers: dict[str, str] | None = None
    ) -> RawResponse:
        form = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return await self.request("POST", path, form, urllib.parse.urlencode(data).encode())

    async def aclose(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


Client = httpx.AsyncClient | RawConnection
Response = httpx.Response | RawResponse
Request = Callable[[Client, int], Awaitable[Response]]


async def run_scenario(
    clients: list[Client],
    name: str,
    request: Request,
    *,
    duration: float,
    warmup: float,
    server_pid: int | None = None,
) -> Result:
    """One closed-loop worker per client; only requests started after the warm-up count."""
    result = Result(name)
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    last_done = measure_from
    cpu0 = [0.0, 0.0]

    async def mark() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu0[:] = [process_cpu(server_pid) if server_pid else 0.0, time.process_time()]

    async def worker(i: int) -> None:
        nonlocal last_done
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                r = await request(clients[i], i)
                ok, detail = r.is_success, f"{r.status_code} {r.text[:300]}"
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            if t0 >= measure_from:
                result.latencies.append(t1 - t0)
                last_done = max(last_done, t1)
            if not ok:
                result.errors.append(detail)
                if len(result.errors) >= 5:
                    return  # a broken scenario: stop this worker, the run fails below

    await asyncio.gather(mark(), *(worker(i) for i in range(len(clients))))
    result.elapsed = last_done - measure_from
    result.server_cpu = (process_cpu(server_pid) if server_pid else 0.0) - cpu0[0]
    result.client_cpu = time.process_time() - cpu0[1]
    return result


# --- the scenarios ---------------------------------------------------------------------------


@dataclass
class Account:
    email: str
    access_token: str
    refresh_token: str


def _registration(i: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    return {
        "email": f"bench-{tag}@example.com",
        # German mobile numbers +49 151 xxxxxxxx are valid for phonenumbers.
        "phone": f"+49151{(secrets.randbelow(10**4) * 10**4 + i) % 10**8:08d}",
        "password": PASSWORD,
        "name": "Bench User",
        "date_of_birth": "1990-05-17",
        "country": "DE",
    }


async def make_accounts(client: httpx.AsyncClient, n: int) -> list[Account]:
    """One user per worker, signed in once with the password grant."""

    async def one(i: int) -> Account:
        body = _registration(i)
        r = await client.post("/v1/users", json=body)
        if r.status_code != 201:
            raise SystemExit(f"registration failed: {r.status_code} {r.text}")
        t = await client.post(
            "/v1/auth/token",
            data={"grant_type": "password", "username": body["email"], "password": PASSWORD},
        )
        if t.status_code != 200:
            raise SystemExit(f"sign-in failed: {t.status_code} {t.text}")
        tokens = t.json()
        return Account(body["email"], tokens["access_token"], tokens["refresh_token"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


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


# --- servers, database, API process ----------------------------------------------------------


async def _admin(url: str, sql: str) -> str | None:
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env(database_url: str, redis_url: str, prefix: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLFOLD_")}
    env.update(
        {
            "BILLFOLD_DATABASE_URL": database_url,
            "BILLFOLD_REDIS_URL": redis_url,
            "BILLFOLD_REDIS_PREFIX": prefix,
            "BILLFOLD_DATA_DIR": str(data_dir),
            "BILLFOLD_SECRET_KEY": SealedBox.generate_b64(),
            "BILLFOLD_ENVIRONMENT": "bench",
            # The production default: the edge's per-request log line is part of the cost.
            "BILLFOLD_LOG_LEVEL": os.environ.get("BILLFOLD_LOG_LEVEL", "INFO"),
            "BILLFOLD_LOG_JSON": "true",
        }
    )
    env.update({f"BILLFOLD_{k.upper()}": v for k, v in RATE_LIMITS.items()})
    return env


async def _wait_ready(base: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the API process exited:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"the API did not become ready:\n{_tail(log_path)}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _drop_redis_keys(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        batch = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(batch), 500):
            await redis.delete(*batch[i : i + 500])
    finally:
        await redis.aclose()


async def _server_versions(database_url: str, redis_url: str) -> tuple[str, str]:
    from redis.asyncio import Redis

    pg = await _admin(database_url, "SHOW server_version") or "?"
    redis = Redis.from_url(redis_url)
    try:
        info = await redis.info("server")
    finally:
        await redis.aclose()
    kind = "valkey" if "valkey_version" in info else "redis"
    return str(pg), f"{kind} {info.get('valkey_version') or info.get('redis_version')}"


def _versions() -> str:
    names = ["uvicorn", "uvloop", "httptools", "fastapi", "starlette", "sqlalchemy", "asyncpg"]
    names += ["redis", "pyjwt", "cryptography", "argon2-cffi", "httpx", "structlog"]
    out = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(out)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


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
                f"server CPU/request {r.server_cpu / base.server_cpu * len(base.latencies) / len(r.latencies):6.2f}x"
                f"   (p99 {r.pct(99):.2f} ms)"
            )


# --- the run ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    name = f"billfold_bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    database_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        await upgrade_async(database_url)
        pg_version, redis_version = await _server_versions(database_url, redis_url)
        port = _free_port()
        log_path = tmp / "api.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the load
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "billfold.app:app_from_env",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    "--no-server-header",
                ],
                env=_server_env(database_url, redis_url, prefix, tmp / "data"),
                stdout=log,
                stderr=log,
            )
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(base, proc, log_path)

        print(f"machine   {os.cpu_count()} cores, {_cpu_model()}, {platform.platform()}")
        print(f"python    {platform.python_version()} ({sys.executable})")
        print(f"servers   PostgreSQL {pg_version}, {redis_version} ({args.servers})")
        print(f"packages  {_versions()}")
        print(
            f"load      {args.concurrency} keep-alive connections ({args.client} client), "
            f"{args.duration:g} s per scenario after {args.warmup:g} s warm-up; "
            "API: 1 uvicorn worker, app log INFO\n"
        )

        limits = httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        )
        raw = [RawConnection("127.0.0.1", port) for _ in range(args.concurrency)]
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
                    server_pid=proc.pid,
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
    finally:
        if proc is not None:
            _stop(proc)
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await _drop_redis_keys(redis_url, prefix)


# --- profile: the same requests in-process, against the ASGI app ------------------------------


async def profile(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    import cProfile
    import logging
    import pstats

    from asgi_lifespan import LifespanManager

    from billfold.app import create_app
    from billfold.config import Settings
    from billfold.platform.observability import configure_logging

    name = f"billfold_bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    database_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        await upgrade_async(database_url)
        settings = Settings(
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=prefix,
            data_dir=tmp / "data",
            secret_key=SealedBox.generate_b64(),
            environment="bench",
            **RATE_LIMITS,
        )
        configure_logging("INFO", True)  # as app_from_env does; the lines go nowhere
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(open(os.devnull, "w"))  # noqa: ASYNC230
        app = create_app(settings)
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
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
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await _drop_redis_keys(redis_url, prefix)


_CLIENT_SIDE = ("httpx", "httpcore", "h11", "bench")


def _package(filename: str, function: str) -> str:
    """Group a profiled function by where its code lives."""
    if filename == "~":  # a C function: name it by the type's module when it has one
        for lib in ("cryptography", "asyncpg", "uvloop", "greenlet", "argon2", "_json", "hashlib"):
            if lib in function:
                return lib
        return "builtins (C)"
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/billfold/" in filename:
        parts = filename.split("/billfold/", 1)[1].removesuffix(".py").split("/")
        return "billfold." + ".".join(parts[:2])
    if "/bench/" in filename:
        return "bench"
    name = Path(filename).parent.name
    return f"stdlib {name if name not in ('lib', 'python3.11') else Path(filename).stem}"


def print_cpu_by_package(stats: Any, requests: int) -> None:
    """Own CPU time (cProfile tottime) per package: where the server side of a request goes."""
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():
        key = _package(filename, function)
        totals[key] = totals.get(key, 0.0) + tottime
    server = {k: v for k, v in totals.items() if k not in _CLIENT_SIDE}
    total = sum(server.values())
    print(f"server-side CPU by package (the load client {', '.join(_CLIENT_SIDE)} left out):")
    print(f"  {'package':<34}{'us/request':>11}{'share':>8}")
    for key, value in sorted(server.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {key:<34}{value / requests * 1e6:>11.0f}{value / total * 100:>7.1f}%")
    print(f"  {'total (profiled, inflated)':<34}{total / requests * 1e6:>11.0f}\n")


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

    db_url = os.environ.get("BILLFOLD_DATABASE_URL", "")
    redis_url = os.environ.get("BILLFOLD_REDIS_URL", "")
    args.servers = ", ".join(
        [
            "configured PostgreSQL" if db_url else "embedded PostgreSQL",
            "configured Redis" if redis_url else "embedded Valkey",
        ]
    )
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    from billfold.platform.embedded import start_embedded

    with tempfile.TemporaryDirectory(prefix="billfold-bench-") as d:
        tmp = Path(d)
        stack = start_embedded(tmp, postgres=not db_url, redis=not redis_url)
        try:
            admin_url = db_url or stack.database_url or ""
            redis = redis_url or stack.redis_url or ""
            run = profile if args.profile else bench
            return asyncio.run(run(args, admin_url, redis, tmp))
        finally:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
