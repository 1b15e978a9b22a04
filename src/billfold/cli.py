"""The `billfold` command: up, serve, worker, vault, network, migrate, seed, keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from billfold.config import Settings

app = typer.Typer(help="billfold: a digital wallet backend", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys")
app.add_typer(keys_app, name="keys")
ledger_app = typer.Typer(help="The double-entry ledger")
app.add_typer(ledger_app, name="ledger")
vault_app = typer.Typer(
    help="The Token Vault process (the only HSM session) and its keys",
    invoke_without_command=True,
)
app.add_typer(vault_app, name="vault")
events_app = typer.Typer(help="The event bus: re-delivery of past events")
app.add_typer(events_app, name="events")
fraud_app = typer.Typer(help="The Fraud Detection Service: features, model")
app.add_typer(fraud_app, name="fraud")

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where embedded servers keep their data")]


def _settings(**overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**values)  # type: ignore[arg-type]


def _refuse_unsafe_production(settings: Settings, process: Literal["api", "vault"]) -> None:
    """Exit code 2 before anything starts when production settings would expose card data."""
    errors = settings.production_errors(process)
    for error in errors:
        typer.echo(f"refusing to start: {error}", err=True)
    if errors:
        raise typer.Exit(2)


def _require_urls(settings: Settings, *, redis: bool = True) -> None:
    if not settings.database_url or (redis and not settings.redis_url):
        needed = (
            "BILLFOLD_DATABASE_URL and BILLFOLD_REDIS_URL" if redis else "BILLFOLD_DATABASE_URL"
        )
        typer.echo(f"{needed} must be set (or use `billfold up` for embedded servers)", err=True)
        raise typer.Exit(2)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    data_dir: DataDir = Path(".billfold"),
    seed: Annotated[bool, typer.Option(help="Create the demo users")] = True,
) -> None:
    """Run the whole wallet on this machine: embedded PostgreSQL + Valkey (unless
    BILLFOLD_DATABASE_URL / BILLFOLD_REDIS_URL are set), migrations, demo data, API, worker."""
    # platformdirs warns on machines without XDG_RUNTIME_DIR; it is noise for the user here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from billfold.platform.embedded import start_embedded
    from billfold.platform.observability import configure_logging

    settings = _settings(data_dir=data_dir.resolve(), public_url=f"http://{host}:{port}")
    if settings.environment == "production":
        typer.echo(
            "billfold up is for development only (embedded servers, demo users with a published "
            "password); in production run `billfold migrate`, `billfold serve` and "
            "`billfold worker`",
            err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, json_logs=os.environ.get("BILLFOLD_LOG_JSON") == "true")
    for noisy in ("pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def stop_on_term(signum: int, frame: object) -> None:
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into an exception so
        # the embedded servers below are stopped instead of the process dying on the spot.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_term)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    typer.echo(f"billfold: starting in {settings.data_dir}")
    stack = start_embedded(
        settings.data_dir, postgres=not settings.database_url, redis=not settings.redis_url
    )
    try:
        settings = settings.model_copy(
            update={
                "database_url": settings.database_url or stack.database_url,
                "redis_url": settings.redis_url or stack.redis_url,
            }
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_up(settings, host, port, seed))
    finally:
        stack.stop()
        typer.echo("billfold: stopped")


async def _up(settings: Settings, host: str, port: int, seed: bool) -> None:
    from billfold.migrations import upgrade_async

    await upgrade_async(settings.database_url)
    # The vault runs as its own process (the only one with an HSM session) unless
    # BILLFOLD_VAULT_URL names one already; the API then calls it over HTTP.
    vault = None if settings.vault_url else await _start_vault_process(settings)
    if vault is not None:
        settings = settings.model_copy(update={"vault_url": vault.url})
    # The payment network simulator too (it maps DPANs back to cards through the vault process)
    # unless BILLFOLD_NETWORK_ADDRESS names a network already.
    network = None
    try:
        if "BILLFOLD_NETWORK_ADDRESS" not in os.environ:
            network = await _start_network_process(settings)
            settings = settings.model_copy(update={"network_address": network.url})
        await _serve_up(settings, host, port, seed, vault, network)
    finally:
        if network is not None:
            await network.stop()
        if vault is not None:
            await vault.stop()


# How long `billfold up` waits for the vault process (the first start initialises the HSM token).
_VAULT_START_SECONDS = 60.0


@dataclass
class _VaultProcess:
    process: asyncio.subprocess.Process
    url: str

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def _start_vault_process(settings: Settings) -> _VaultProcess:
    """`billfold vault` as a child process on loopback (BILLFOLD_VAULT_PORT if set, otherwise a
    free port), once its /readyz answers. It shares the data dir: the SoftHSM2 token, the
    secret key and the service key (created here first, so both processes read one file)."""
    import httpx

    from billfold.app import resolve_secret_key
    from billfold.vault.service_auth import resolve_service_key

    resolve_secret_key(settings)
    resolve_service_key(settings)
    port = settings.vault_port if "BILLFOLD_VAULT_PORT" in os.environ else _free_port()
    env = {
        **os.environ,
        "BILLFOLD_DATABASE_URL": settings.database_url,
        "BILLFOLD_DATA_DIR": str(settings.data_dir),
        "BILLFOLD_LOG_JSON": os.environ.get("BILLFOLD_LOG_JSON", "false"),
    }
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "billfold.cli", "vault", "--host", "127.0.0.1"],
        *["--port", str(port)],
        env=env,
    )
    vault = _VaultProcess(process, f"http://127.0.0.1:{port}")
    try:
        async with asyncio.timeout(_VAULT_START_SECONDS):
            async with httpx.AsyncClient(base_url=vault.url, timeout=2) as client:
                while process.returncode is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get("/readyz")).status_code == 200:
                            return vault
                    await asyncio.sleep(0.1)
        raise RuntimeError(f"the vault process exited with code {process.returncode}")
    except BaseException:
        await vault.stop()
        raise


# How long `billfold up` waits for the network simulator to listen.
_NETWORK_START_SECONDS = 30.0


async def _start_network_process(settings: Settings) -> _VaultProcess:
    """`billfold network` (the ISO 8583 simulator) as a child process on loopback
    (BILLFOLD_NETWORK_PORT if set, otherwise a free port), once it accepts connections; its
    `url` is the host:port the API's client connects to."""
    port = settings.network_port if "BILLFOLD_NETWORK_PORT" in os.environ else _free_port()
    env = {
        **os.environ,
        "BILLFOLD_DATABASE_URL": settings.database_url,
        "BILLFOLD_DATA_DIR": str(settings.data_dir),
        "BILLFOLD_VAULT_URL": settings.vault_url,
        "BILLFOLD_LOG_JSON": os.environ.get("BILLFOLD_LOG_JSON", "false"),
    }
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "billfold.cli", "network", "--host", "127.0.0.1"],
        *["--port", str(port)],
        env=env,
    )
    network = _VaultProcess(process, f"127.0.0.1:{port}")
    try:
        async with asyncio.timeout(_NETWORK_START_SECONDS):
            while process.returncode is None:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                return network
        raise RuntimeError(f"the network simulator exited with code {process.returncode}")
    except BaseException:
        await network.stop()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_up(
    settings: Settings,
    host: str,
    port: int,
    seed: bool,
    vault: _VaultProcess | None,
    network: _VaultProcess | None = None,
) -> None:
    import uvicorn

    from billfold.app import create_app
    from billfold.demo import seed_demo
    from billfold.jobs import run_background
    from billfold.users.seed import DEMO_PASSWORD

    api = create_app(settings)
    resources = api.state.resources
    if seed:
        await seed_demo(resources.engine, api.state.users)
    config = uvicorn.Config(
        api,
        host=host,
        port=port,
        log_config=None,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    base = f"http://{host}:{port}"
    banner = [
        "",
        "billfold is up",
        f"  API            {base}/v1/",
        f"  API docs       {base}/docs",
        f"  OpenAPI        {base}/openapi.json",
        f"  health         {base}/healthz  {base}/readyz",
        f"  metrics        {base}/metrics",
        f"  JWKS           {base}/.well-known/jwks.json",
        "  database       "
        + ("embedded PostgreSQL" if "host=" in settings.database_url else "configured PostgreSQL"),
        f"  token vault    {settings.vault_url} "
        + (f"(own process, pid {vault.process.pid})" if vault else "(configured)"),
        f"  card network   {settings.network_address} "
        + (
            f"(ISO 8583 simulator, own process, pid {network.process.pid})"
            if network
            else "(configured)"
        ),
        "",
        f"  demo users (password: {DEMO_PASSWORD})",
        "    alice@demo.billfold.dev   bob@demo.billfold.dev   admin@demo.billfold.dev (admin)",
        "",
        "  try: curl -s -d grant_type=password -d username=alice@demo.billfold.dev "
        f"-d password={DEMO_PASSWORD} {base}/v1/auth/token",
        "  Ctrl-C stops everything.",
        "",
    ]
    stop_background = asyncio.Event()
    background = asyncio.create_task(
        run_background(
            resources.engine, settings, stop_background, resources.metrics, api.state.p2p
        )
    )

    async def announce() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no start event
            await asyncio.sleep(0.05)
        print("\n".join(banner), flush=True)

    announce_task = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        stop_background.set()
        announce_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(background, 10)


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "0.0.0.0",  # noqa: S104 - a container listens on all interfaces
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
) -> None:
    """Production API: stateless workers on configured PostgreSQL and Redis."""
    import uvicorn

    settings = _settings()
    _refuse_unsafe_production(settings, "api")
    _require_urls(settings)
    uvicorn.run(
        "billfold.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        proxy_headers=True,
        server_header=False,
    )


@app.command()
def worker(
    consumers: Annotated[
        str,
        typer.Option(
            help="Comma-separated consumers or services to run (e.g. notifications,loyalty); "
            "default all. Needs the Kafka bus (BILLFOLD_KAFKA_BOOTSTRAP)",
        ),
    ] = "",
) -> None:
    """Production worker: outbox relay, event consumers and scheduled jobs (expiries)."""
    from billfold.platform.observability import configure_logging

    settings = _settings()
    _refuse_unsafe_production(settings, "api")
    _require_urls(settings)
    selected = [c.strip() for c in consumers.split(",") if c.strip()]
    if selected and not settings.kafka_bootstrap:
        typer.echo(
            "--consumers needs the Kafka bus (BILLFOLD_KAFKA_BOOTSTRAP): on the embedded bus one "
            "worker runs every consumer",
            err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(_worker(settings, selected))
    except ValueError as exc:  # an unknown consumer name
        typer.echo(f"billfold worker: {exc}", err=True)
        raise typer.Exit(2) from None


async def _worker(settings: Settings, consumers: list[str] | None = None) -> None:
    from billfold.jobs import run_background
    from billfold.platform.db import create_engine

    engine = create_engine(settings.database_url, pool_size=4)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_background(engine, settings, stop, consumers=consumers or ())
    finally:
        await engine.dispose()


@app.command()
def migrate() -> None:
    """Apply database migrations (safe to run from several replicas at once)."""
    from billfold.migrations import upgrade

    settings = _settings()
    _require_urls(settings)
    upgrade(settings.database_url)
    typer.echo("migrated to head")


@app.command("seed")
def seed_command(
    allow_production: Annotated[
        bool,
        typer.Option(
            "--allow-production",
            help="Seed even when BILLFOLD_ENVIRONMENT=production (the demo admin's password "
            "is published)",
        ),
    ] = False,
) -> None:
    """Create the demo users (idempotent). Refused in production without --allow-production."""
    from billfold.users.seed import SeedRefused, check_seed_allowed

    settings = _settings()
    try:
        check_seed_allowed(settings.environment, allow_production=allow_production)
    except SeedRefused as exc:
        typer.echo(f"billfold seed: {exc}", err=True)
        raise typer.Exit(2) from None
    _require_urls(settings)

    async def run() -> None:
        from billfold.app import create_app
        from billfold.demo import seed_demo

        api = create_app(settings)
        result = await seed_demo(
            api.state.resources.engine, api.state.users, allow_production=allow_production
        )
        for demo, _, created in result:
            typer.echo(f"{'created' if created else 'exists '} {demo.email}")
        await api.state.resources.engine.dispose()
        await api.state.resources.keys_engine.dispose()
        await api.state.resources.redis.aclose()

    asyncio.run(run())


@keys_app.command("rotate-jwt")
def rotate_jwt() -> None:
    """Make a new token-signing key; older keys keep verifying until their tokens expire."""
    settings = _settings()
    _require_urls(settings)

    async def run() -> None:
        from billfold.app import create_app

        api = create_app(settings)
        kid = await api.state.users.tokens.keyring.rotate()
        typer.echo(f"new signing key {kid}")
        await api.state.resources.engine.dispose()
        await api.state.resources.keys_engine.dispose()
        await api.state.resources.redis.aclose()

    asyncio.run(run())


@fraud_app.command("rebuild-features")
def fraud_rebuild_features() -> None:
    """Rebuild the live fraud features in Redis from PostgreSQL (after Redis lost them): the
    completed history, the last 24 hours' windows, locations and devices."""
    from redis.asyncio import Redis

    from billfold.fraud.features import RedisFeatures, rebuild
    from billfold.platform.db import create_engine

    settings = _settings()
    _require_urls(settings)

    async def run() -> None:
        engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)
        redis = Redis.from_url(settings.redis_url)
        try:
            report = await rebuild(engine, RedisFeatures.from_settings(redis, settings))
        finally:
            await redis.aclose()
            await engine.dispose()
        typer.echo(report.render())

    asyncio.run(run())


@fraud_app.command("train")
def fraud_train(
    role: Annotated[
        Literal["champion", "challenger"],
        typer.Option("--as", help="Install the new model as the champion or as the challenger"),
    ] = "challenger",
    users: Annotated[int, typer.Option(min=50, help="Simulated users")] = 2000,
    days: Annotated[int, typer.Option(min=3, help="Simulated days")] = 28,
    seed: Annotated[int, typer.Option(help="The synthetic world's seed")] = 7,
    labels: Annotated[
        bool, typer.Option(help="Add the analysts' labelled decisions from PostgreSQL")
    ] = True,
    model_dir: Annotated[
        Path | None, typer.Option(help="Registry directory (default BILLFOLD_FRAUD_MODEL_DIR)")
    ] = None,
) -> None:
    """Train the fraud model (LightGBM + IsolationForest) on a synthetic world plus the
    analysts' labels and install it in the registry; a challenger is scored in shadow until
    `billfold fraud promote`."""
    from billfold.fraud.model.registry import ModelRegistry
    from billfold.fraud.model.registry import model_dir as default_model_dir
    from billfold.fraud.model.synthetic import WorldConfig
    from billfold.fraud.model.training import train_synthetic
    from billfold.fraud.runtime import thresholds_from

    settings = _settings()
    analyst: list[tuple[dict[str, object], int]] = []
    if labels:
        _require_urls(settings, redis=False)
        analyst = asyncio.run(_fraud_labels(settings.database_url))
    typer.echo(f"training on {users} users x {days} days (seed {seed}), {len(analyst)} labels")
    trained = train_synthetic(WorldConfig(users=users, days=days, seed=seed), analyst)  # type: ignore[arg-type]
    registry = ModelRegistry(model_dir or default_model_dir(settings))
    path = registry.install(trained, role, thresholds_from(settings))
    for name, m in trained.metrics.items():
        typer.echo(
            f"{name}: rows {m.rows}, frauds {m.frauds}, PR-AUC {m.pr_auc:.3f}, "
            f"precision {m.precision:.3f}, recall {m.recall:.3f} at p >= {m.threshold}"
        )
    typer.echo(f"installed {trained.version} as {role} in {path}")


async def _fraud_labels(database_url: str) -> list[tuple[dict[str, object], int]]:
    from billfold.fraud.store.labels import labelled
    from billfold.platform.db import create_engine

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            return [(dict(f), y) for f, y in await labelled(conn)]
    finally:
        await engine.dispose()


@fraud_app.command("promote")
def fraud_promote(
    version: Annotated[
        str | None,
        typer.Option(help="Make this installed version the champion (a rollback)"),
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Registry directory")] = None,
) -> None:
    """The challenger becomes the champion (or `--version` does). Processes load it on their
    next start."""
    from billfold.fraud.model.registry import ModelRegistry
    from billfold.fraud.model.registry import model_dir as default_model_dir
    from billfold.fraud.model.scorer import ModelUnavailable

    registry = ModelRegistry(model_dir or default_model_dir(_settings()))
    try:
        if version:
            registry.assign(version, "champion")
        else:
            version = registry.promote()
    except ModelUnavailable as exc:
        typer.echo(f"billfold fraud promote: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"champion is now {version}")


@fraud_app.command("models")
def fraud_models(
    model_dir: Annotated[Path | None, typer.Option(help="Registry directory")] = None,
) -> None:
    """The installed models, newest first, with their role and held-out metrics."""
    from billfold.fraud.model.registry import SHIPPED, ModelRegistry
    from billfold.fraud.model.registry import model_dir as default_model_dir

    for root in (model_dir or default_model_dir(_settings()), SHIPPED):
        for info in ModelRegistry(root).models():
            holdout = info.metrics.get("holdout", {})
            typer.echo(
                f"{info.version}  {info.role or '-':10}  PR-AUC {holdout.get('pr_auc', '?')}  "
                f"{info.created_at}  {root}"
            )


@fraud_app.command("evaluate")
def fraud_evaluate(
    users: Annotated[
        int, typer.Option(min=50, help="Simulated users of the held-out world")
    ] = 1000,
    days: Annotated[int, typer.Option(min=3, help="Simulated days")] = 28,
    seed: Annotated[
        int, typer.Option(help="The held-out world's seed (not the training's)")
    ] = 2026,
    model_dir: Annotated[Path | None, typer.Option(help="Registry directory")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the Markdown here")] = None,
) -> None:
    """Precision, recall, PR-AUC and the confusion matrix at the configured thresholds on a
    held-out synthetic world: the default rules alone vs the rules with the champion model."""
    from billfold.fraud.model.evaluation import evaluate, render
    from billfold.fraud.model.registry import load_scorer
    from billfold.fraud.model.registry import model_dir as default_model_dir
    from billfold.fraud.model.synthetic import WorldConfig, generate
    from billfold.fraud.rules import DEFAULT_RULES, compile_rules
    from billfold.fraud.runtime import thresholds_from

    settings = _settings()
    thresholds = thresholds_from(settings)
    champion = load_scorer(model_dir or default_model_dir(settings)).champion
    dataset = generate(WorldConfig(users=users, days=days, seed=seed))
    results = evaluate(dataset, compile_rules(DEFAULT_RULES), champion, thresholds)
    report = render(
        results,
        thresholds,
        title=f"Held-out world: {users} users x {days} days, seed {seed}; model {champion.version}",
    )
    typer.echo(report)
    if output is not None:
        output.write_text(report + "\n")


@ledger_app.command("verify")
def ledger_verify() -> None:
    """Re-sum every posting and check every balance and invariant; exit 1 on any discrepancy."""
    from billfold.ledger.verify import verify_ledger
    from billfold.platform.db import create_engine

    settings = _settings()
    _require_urls(settings, redis=False)

    async def run() -> bool:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            report = await verify_ledger(engine)
        finally:
            await engine.dispose()
        typer.echo(report.render())
        return report.ok

    if not asyncio.run(run()):
        raise typer.Exit(1)


@app.command("network")
def network_command(
    host: Annotated[
        str | None, typer.Option(help="Interface (default BILLFOLD_NETWORK_HOST)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default BILLFOLD_NETWORK_PORT)")] = None,
    latency_ms: Annotated[float, typer.Option(min=0, help="Answer after this long")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(min=0, help="± this much, at random")] = 0.0,
    timeout_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests never answered")
    ] = 0.0,
    card_balance: Annotated[
        int, typer.Option(min=0, help="Every card's open-to-buy per currency (minor units)")
    ] = 1_000_000,
    rule: Annotated[
        list[str] | None,
        typer.Option(help="Card rule LAST4=CODE (or LAST4=VERIFY/CHARGE), e.g. 1111=05"),
    ] = None,
    amount_rule: Annotated[
        list[str] | None,
        typer.Option(help="Amount rule AMOUNT=CODE, or AMOUNT=no-answer (a lost answer)"),
    ] = None,
) -> None:
    """Run the payment network simulator: an ISO 8583 issuer over TCP (2-byte length prefix)
    that maps DPANs to cards and verifies cryptograms through the token vault (over HTTP when
    BILLFOLD_VAULT_URL is set). Never in production: its test cards decline real ones."""
    from billfold.app import VaultTokenService
    from billfold.network import NO_ANSWER, NetworkSimulator, SimulatorConfig
    from billfold.platform.observability import configure_logging
    from billfold.vault.connect import vault_client

    settings = _settings()
    if settings.environment == "production":
        typer.echo("billfold network is a simulator: it never runs in production", err=True)
        raise typer.Exit(2)
    if not settings.vault_url:
        _require_urls(settings, redis=False)
        from billfold.app import resolve_secret_key

        settings = settings.model_copy(update={"secret_key": resolve_secret_key(settings)})
    config = SimulatorConfig(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        timeout_rate=timeout_rate,
        card_balance=card_balance,
    )
    try:
        for item in rule or []:
            last4, _, codes = item.partition("=")
            verify, _, charge = codes.partition("/")
            if len(last4) != 4 or not last4.isdigit() or len(verify) != 2:
                raise ValueError(f"bad --rule {item!r}")
            config.card_rules[last4] = (verify, charge or verify)
        for item in amount_rule or []:
            amount, _, code = item.partition("=")
            if not amount.isdigit() or (len(code) != 2 and code != NO_ANSWER):
                raise ValueError(f"bad --amount-rule {item!r}")
            config.amount_rules[int(amount)] = code
    except ValueError as exc:
        typer.echo(f"billfold network: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_json)

    async def run() -> None:
        tokens = vault_client(settings, service=VaultTokenService.REQUESTER)
        simulator = NetworkSimulator(VaultTokenService(tokens), config)
        await simulator.start(host or settings.network_host, port or settings.network_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await simulator.stop()
            await tokens.aclose()

    asyncio.run(run())


@vault_app.callback()
def vault(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Interface (default BILLFOLD_VAULT_HOST)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default BILLFOLD_VAULT_PORT)")] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate of the vault (PEM)")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Its private key (PEM)")] = None,
    ssl_ca_certs: Annotated[
        Path | None,
        typer.Option(help="CA bundle of the callers' client certificates: requires mTLS"),
    ] = None,
) -> None:
    """Run the vault process: the internal vault API on its own port, with the process's one
    HSM session. The API calls it when BILLFOLD_VAULT_URL is set (`billfold up` does that)."""
    if ctx.invoked_subcommand is not None:
        return
    import ssl

    import uvicorn

    from billfold.platform.observability import configure_logging
    from billfold.vault.server import create_vault_app

    if (ssl_certfile is None) != (ssl_keyfile is None) or (ssl_ca_certs and not ssl_certfile):
        typer.echo(
            "--ssl-certfile and --ssl-keyfile go together (and --ssl-ca-certs needs them)",
            err=True,
        )
        raise typer.Exit(2)
    settings = _vault_settings(service_key=True)
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        create_vault_app(settings),
        host=host or settings.vault_host,
        port=port or settings.vault_port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certs=str(ssl_ca_certs) if ssl_ca_certs else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if ssl_ca_certs else ssl.CERT_NONE,
    )


def _vault_settings(*, service_key: bool = False) -> Settings:
    """Settings of a vault command: a database, and the secret key resolved (the software key
    store seals under it; `billfold up`'s processes share the one in the data dir), and with
    `service_key` the key service tokens are checked with; a missing secret is exit code 2."""
    from billfold.app import resolve_secret_key
    from billfold.vault.service_auth import resolve_service_key

    settings = _settings()
    _refuse_unsafe_production(settings, "vault")
    _require_urls(settings, redis=False)
    try:
        settings = settings.model_copy(update={"secret_key": resolve_secret_key(settings)})
        if service_key:
            resolve_service_key(settings)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"billfold vault: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


@vault_app.command("rotate-kek")
def vault_rotate_kek(
    batch_size: Annotated[int, typer.Option(min=1, help="Data keys read per batch")] = 100,
) -> None:
    """Make a new key-encryption key in the HSM and re-wrap every data key under it, online:
    the vault keeps serving (each data key is re-wrapped in its own short transaction)."""
    from billfold.platform.db import create_engine
    from billfold.platform.keys import open_keystore
    from billfold.vault.service import rotate_kek

    settings = _vault_settings()

    async def run() -> None:
        engine = create_engine(settings.database_url, pool_size=1, max_overflow=1)
        keystore = await asyncio.to_thread(open_keystore, settings)
        try:
            report = await rotate_kek(engine, keystore, batch_size=batch_size)
        finally:
            keystore.close()
            await engine.dispose()
        typer.echo(f"new KEK version {report.kek_version}")
        typer.echo(f"re-wrapped {report.rewrapped} data key(s)")
        for version, count in sorted(report.data_keys_by_kek_version.items()):
            typer.echo(f"  KEK v{version}: {count} data key(s)")

    asyncio.run(run())


@events_app.command("replay")
def events_replay(
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="Where to start: an event id (evt_…, included) or an ISO 8601 time (UTC if "
            "it names no offset)",
        ),
    ],
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only this event type (repeatable; `billfold.p2p.*` ok)"),
    ] = None,
    consumers: Annotated[
        list[str] | None,
        typer.Option("--consumer", help="With --force: the consumer whose inbox is cleared"),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Clear the named consumers' inbox rows for these events, so they handle them "
            "again (only for consumers whose effects are safe to repeat)"
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Count, change nothing")] = False,
) -> None:
    """Re-deliver published events from the outbox through the running relay (either bus).
    Consumers that handled an event skip it (inbox); dead-lettered ones get it again."""
    from datetime import UTC, datetime

    from billfold.platform.bus.replay import ReplayError, replay
    from billfold.platform.db import create_engine, unit_of_work

    settings = _settings()
    _require_urls(settings, redis=False)
    from_event: str | None = None
    since: datetime | None = None
    if start.startswith("evt_"):
        from_event = start
    else:
        try:
            since = datetime.fromisoformat(start)
        except ValueError:
            typer.echo(f"--from {start!r} is neither an event id nor an ISO 8601 time", err=True)
            raise typer.Exit(2) from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)

    async def run() -> None:
        engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)
        try:
            async with unit_of_work(engine) as uow:
                result = await replay(
                    await uow.connection(),
                    from_event=from_event,
                    since=since,
                    types=types or (),
                    consumers=consumers or (),
                    force=force,
                    dry_run=dry_run,
                )
        finally:
            await engine.dispose()
        verb = "would re-deliver" if dry_run else "re-delivering"
        typer.echo(f"{verb} {result.events} event(s)")
        if force:
            typer.echo(
                f"{'would clear' if dry_run else 'cleared'} {result.inbox_cleared} inbox row(s)"
            )

    try:
        asyncio.run(run())
    except ReplayError as exc:
        typer.echo(f"billfold events replay: {exc}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
