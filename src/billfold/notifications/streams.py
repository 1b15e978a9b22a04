"""The live notification streams (Server-Sent Events) one API process holds open.

Each open stream holds a Redis pub/sub connection for as long as it lasts. Taken from the API's
pool, a few hundred idle phones would starve what every request needs from Redis (rate limits,
the token denylist, payments' fraud features). So streams take their connections from a pool
of their own, bounded by `notifications_stream_limit`, and past the bound a new stream is
refused (503 `stream_capacity` with Retry-After) instead of waiting for a connection.

A stream outlives the request that authenticated it, so it re-checks its access token every
`session_check_seconds` (a revoked session, a lock, a logout end it) and ends when the token
expires: the client reconnects with a fresh token and `Last-Event-ID`."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import ConnectionPool, Redis

# How often an open stream asks whether its session still stands: a revoked session stops
# streaming within this long (the edge's check, one Redis EXISTS per stream per tick).
SESSION_CHECK_SECONDS = 5.0


@dataclass
class StreamSlot:
    """One admitted stream; `release` gives its place back (once, however often called)."""

    gate: StreamGate
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._open -= 1


class StreamGate:
    """Admits at most `limit` streams at once; `redis` is their pool (never the API's)."""

    def __init__(
        self,
        redis_url: str,
        limit: int,
        client_name: str = "billfold-sse",
        session_check_seconds: float = SESSION_CHECK_SECONDS,
    ) -> None:
        self.limit = limit
        self.session_check_seconds = session_check_seconds
        # One connection per stream: the pool can never grow past the streams admitted.
        self.redis = Redis.from_pool(
            ConnectionPool.from_url(redis_url, max_connections=limit, client_name=client_name)
        )
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    def admit(self) -> StreamSlot | None:
        """A slot for a new stream, or None when `limit` streams are open."""
        if self._open >= self.limit:
            return None
        self._open += 1
        return StreamSlot(self)

    async def aclose(self) -> None:
        await self.redis.aclose()
