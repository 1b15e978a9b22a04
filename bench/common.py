"""What the benchmarks in bench/ share: servers, a fresh database, the API under uvicorn, a cheap
HTTP/1.1 load generator, closed-loop scenarios and their measurements.

Not a benchmark itself (`make bench` skips this file).
"""

from __future__ import annotations

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
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile of `values` (NaN when there are none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    server_cpu: float = 0.0  # CPU seconds of the API process over the measured window
    client_cpu: float = 0.0  # CPU seconds of this (load) process over the measured window
    succeeded: int = 0  # answers counted as success in the measured window
    # CPU seconds over the measured window of each `CpuProbe` given (None: not measurable)
    cpu: dict[str, float | None] = field(default_factory=dict)
    # Answers that arrived within the measured window (whenever their request started) and the
    # window's length: throughput and CPU per request when latencies are long against the window
    # (see `run_scenario`). 0: not counted (then `latencies` and `elapsed` stand in).
    completed: int = 0
    window: float = 0.0

    @property
    def rps(self) -> float:
        if self.completed and self.window:
            return self.completed / self.window
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        return percentile(self.latencies, q) * 1000

    def cpu_us(self, seconds: float) -> float:
        """CPU microseconds per request (per answer within the window the CPU was measured)."""
        n = self.completed or len(self.latencies)
        return seconds / n * 1e6 if n else float("nan")

    def merged(self, other: Result, name: str) -> Result:
        return Result(
            name,
            self.latencies + other.latencies,
            self.elapsed + other.elapsed,
            self.errors + other.errors,
            self.server_cpu + other.server_cpu,
            self.client_cpu + other.client_cpu,
            self.succeeded + other.succeeded,
            completed=self.completed + other.completed,
            window=self.window + other.window,
        )


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (uvicorn `--workers N`
    runs N worker processes under a supervisor); Linux /proc, 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu(child) for child in _children(pid))


class CpuProbe(Protocol):
    """CPU seconds something (a process, a database's backends) spends in a measured window."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> float | None: ...


class ProcessCpu:
    """`process_cpu` of one process (and its children) over the window."""

    def __init__(self, name: str, pid: int) -> None:
        self.name, self._pid, self._first = name, pid, 0.0

    async def start(self) -> None:
        self._first = process_cpu(self._pid)

    async def stop(self) -> float | None:
        return process_cpu(self._pid) - self._first


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class RawResponse:
    def __init__(
        self, status_code: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status_code
        self.content = body
        self.headers = headers or {}  # lower-case names

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
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name:
                headers[name] = value.strip()
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
        return RawResponse(status, payload, headers)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("GET", path, headers, b"")

    async def post(
        self, path: str, data: dict[str, str], headers: dict[str, str] | None = None
    ) -> RawResponse:
        form = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return await self.request("POST", path, form, urllib.parse.urlencode(data).encode())

    async def post_json(
        self, path: str, payload: Any, headers: dict[str, str] | None = None
    ) -> RawResponse:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return await self.request(
            "POST", path, {"Content-Type": "application/json", **(headers or {})}, body
        )

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
    ok_status: Collection[int] | None = None,
    max_errors: int = 5,
    probes: Sequence[CpuProbe] = (),
) -> Result:
    """One closed-loop worker per client; only requests started after the warm-up count.

    An answer is a success if it is 2xx (or, with `ok_status`, one of those codes); anything
    else, or a connection error, is recorded as an error. Once `max_errors` errors are recorded
    the workers stop: the scenario is broken and the caller fails the run. Each of `probes`
    measures the same window as `server_pid` (`Result.cpu`).

    Latencies are those of requests started in the window [warm-up end, + `duration`).
    Throughput and CPU per request count the answers that arrived in that same window, whenever
    their request started, with the CPU measured over exactly that window: with latencies
    longer than the window (500 clients at 1.2 s of network latency queue for seconds) the
    requests started in it finish long after it, and dividing the CPU spent until the last of
    them by their number alone counted ~4x the CPU per request."""
    result = Result(name)
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    last_done = measure_from
    cpu0 = [0.0, 0.0]

    async def mark() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu0[:] = [process_cpu(server_pid) if server_pid else 0.0, time.process_time()]
        for probe in probes:
            await probe.start()
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        result.server_cpu = (process_cpu(server_pid) if server_pid else 0.0) - cpu0[0]
        result.client_cpu = time.process_time() - cpu0[1]
        result.cpu = {probe.name: await probe.stop() for probe in probes}

    async def worker(i: int) -> None:
        nonlocal last_done
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                r = await request(clients[i], i)
                ok = r.is_success if ok_status is None else r.status_code in ok_status
                detail = f"{r.status_code} {r.text[:300]}"
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            if measure_from <= t1 < stop_at:
                result.completed += 1
            if t0 >= measure_from:
                result.latencies.append(t1 - t0)
                last_done = max(last_done, t1)
                result.succeeded += ok
            if not ok:
                result.errors.append(detail)
                if len(result.errors) >= max_errors:
                    return  # a broken scenario: stop this worker, the run fails below

    await asyncio.gather(mark(), *(worker(i) for i in range(len(clients))))
    result.elapsed = last_done - measure_from
    result.window = duration
    return result


# --- users -----------------------------------------------------------------------------------


@dataclass
class Account:
    email: str
    user_id: str
    access_token: str
    refresh_token: str


def registration(i: int) -> dict[str, Any]:
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


async def make_accounts(
    client: httpx.AsyncClient, n: int, *, concurrency: int | None = None
) -> list[Account]:
    """`n` new users, each registered and signed in once with the password grant, through the
    public API. Both steps run argon2id (64 MiB each), so `concurrency` bounds how many users
    are set up at a time (None: all at once)."""
    gate = asyncio.Semaphore(concurrency or n)

    async def one(i: int) -> Account:
        async with gate:
            body = registration(i)
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
            return Account(
                body["email"], r.json()["id"], tokens["access_token"], tokens["refresh_token"]
            )

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# --- servers, database, API process ----------------------------------------------------------


async def admin(url: str, sql: str) -> Any:
    """Run one statement outside a transaction (CREATE/DROP DATABASE); its first value, if any."""
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


def database_url(admin_url: str, name: str) -> str:
    """The URL of database `name` on the server of `admin_url`."""
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def fresh_database(
    admin_url: str, *, prefix: str = "billfold_bench", migrate: bool = True
) -> AsyncIterator[tuple[str, str]]:
    """A new database (name, URL), migrated to head unless `migrate` is False, dropped at exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        url = database_url(admin_url, name)
        if migrate:
            await upgrade_async(url)
        yield name, url
    finally:
        await admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def in_process_app(
    admin_url: str, redis_url: str, tmp: Path
) -> AsyncIterator[tuple[Any, str, httpx.AsyncClient]]:
    """For `--profile`: the app in this process on a fresh database and a Redis key prefix of
    its own (both gone at exit), unlimited rate limits and its log lines sent nowhere, behind
    an httpx client over ASGI (no socket). Yields (app, database URL, client)."""
    from asgi_lifespan import LifespanManager

    from billfold.app import create_app
    from billfold.config import Settings

    prefix = f"bfb:{uuid.uuid4().hex[:8]}:"
    try:
        async with fresh_database(admin_url) as (_, url):
            settings = Settings(
                database_url=url,
                redis_url=redis_url,
                redis_prefix=prefix,
                data_dir=tmp / "data",
                secret_key=SealedBox.generate_b64(),
                environment="bench",
                **RATE_LIMITS,
            )
            silence_app_log()
            app = create_app(settings)
            async with LifespanManager(app):
                transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
                async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
                    yield app, url, c
    finally:
        await drop_redis_keys(redis_url, prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(
    database_url: str,
    redis_url: str,
    prefix: str,
    data_dir: Path,
    *,
    secret_key: str | None = None,
) -> dict[str, str]:
    """The environment of the API process: this one's without BILLFOLD_*, plus the run's
    servers, a fresh secret (or `secret_key`, so a restarted API opens the same sealed keys)
    and unlimited rate limits (`RATE_LIMITS`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLFOLD_")}
    env.update(
        {
            "BILLFOLD_DATABASE_URL": database_url,
            "BILLFOLD_REDIS_URL": redis_url,
            "BILLFOLD_REDIS_PREFIX": prefix,
            "BILLFOLD_DATA_DIR": str(data_dir),
            "BILLFOLD_SECRET_KEY": secret_key or SealedBox.generate_b64(),
            "BILLFOLD_ENVIRONMENT": "bench",
            # The production default: the edge's per-request log line is part of the cost.
            "BILLFOLD_LOG_LEVEL": os.environ.get("BILLFOLD_LOG_LEVEL", "INFO"),
            "BILLFOLD_LOG_JSON": "true",
        }
    )
    env.update({f"BILLFOLD_{k.upper()}": v for k, v in RATE_LIMITS.items()})
    return env


def start_api(
    env: dict[str, str], log_path: Path, *, workers: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    """`billfold serve`'s app under uvicorn on a free loopback port: (process, port)."""
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
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
                str(workers),
                "--no-access-log",
                "--log-level",
                "warning",
                "--no-server-header",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    return proc, port


async def wait_ready(base: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 180  # starting the app takes long on a busy machine
    async with httpx.AsyncClient(base_url=base, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the API process exited:\n{tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"the API did not become ready:\n{tail(log_path)}")


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def drop_redis_keys(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        batch = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(batch), 500):
            await redis.delete(*batch[i : i + 500])
    finally:
        await redis.aclose()


async def server_versions(database_url: str, redis_url: str) -> tuple[str, str]:
    from redis.asyncio import Redis

    pg = await admin(database_url, "SHOW server_version") or "?"
    redis = Redis.from_url(redis_url)
    try:
        info = await redis.info("server")
    finally:
        await redis.aclose()
    kind = "valkey" if "valkey_version" in info else "redis"
    return str(pg), f"{kind} {info.get('valkey_version') or info.get('redis_version')}"


def versions() -> str:
    names = ["uvicorn", "uvloop", "httptools", "fastapi", "starlette", "sqlalchemy", "asyncpg"]
    names += ["redis", "pyjwt", "cryptography", "argon2-cffi", "httpx", "structlog"]
    out = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(out)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# --- profiles --------------------------------------------------------------------------------


def silence_app_log() -> None:
    """Configure the app's logging as `app_from_env` does (the per-request line is part of the
    cost) but send the lines nowhere: for in-process profiles."""
    import logging

    from billfold.platform.observability import configure_logging

    configure_logging("INFO", True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))


CLIENT_SIDE = ("httpx", "httpcore", "h11", "bench")


def package_of(filename: str, function: str) -> str:
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
        key = package_of(filename, function)
        totals[key] = totals.get(key, 0.0) + tottime
    server = {k: v for k, v in totals.items() if k not in CLIENT_SIDE}
    total = sum(server.values())
    print(f"server-side CPU by package (the load client {', '.join(CLIENT_SIDE)} left out):")
    print(f"  {'package':<34}{'us/request':>11}{'share':>8}")
    for key, value in sorted(server.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {key:<34}{value / requests * 1e6:>11.0f}{value / total * 100:>7.1f}%")
    print(f"  {'total (profiled, inflated)':<34}{total / requests * 1e6:>11.0f}\n")


# --- the process -----------------------------------------------------------------------------

Run = Callable[[str, str, Path], Coroutine[Any, Any, int]]


def servers_label() -> str:
    """Which servers a run uses, for the report header."""
    return ", ".join(
        [
            "configured PostgreSQL"
            if os.environ.get("BILLFOLD_DATABASE_URL")
            else "embedded PostgreSQL",
            "configured Redis" if os.environ.get("BILLFOLD_REDIS_URL") else "embedded Valkey",
        ]
    )


def run_with_servers(run: Run) -> int:
    """Run `run(admin_url, redis_url, tmp)` on uvloop with the servers of BILLFOLD_DATABASE_URL /
    BILLFOLD_REDIS_URL, or embedded ones started in a temporary directory (and stopped after)."""
    db_url = os.environ.get("BILLFOLD_DATABASE_URL", "")
    redis_url = os.environ.get("BILLFOLD_REDIS_URL", "")
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
            return asyncio.run(run(admin_url, redis, tmp))
        finally:
            stack.stop()
