"""The live notification streams (Server-Sent Events) one API process holds open.

Each open stream holds a Redis pub/sub connection for as long as it lasts. Taken from the API's
pool, a few hundred idle phones would starve what every request needs from Redis (rate limits,
the token denylist, payments' fraud features). So streams take their connections from a pool
of their own, bounded by `notifications_stream_limit`, and past the bound a new stream is
refused (503 `stream_capacity` with Retry-After) instead of waiting for a connection. One user
(or one stolen token) may hold only `per_user` of them, so a single account cannot fill every
slot of a process and lock everyone else out (429 `too_many_streams`).

A stream outlives the request that authenticated it, so it re-checks its access token every
`session_check_seconds` (a revoked session, a lock, a logout end it) and ends when the token
expires: the client reconnects with a fresh token and `Last-Event-ID`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from redis.asyncio import ConnectionPool, Redis

# A phone, a watch, a few browser tabs: more live streams than this for one user is not a user.
STREAMS_PER_USER = 5

# How often an open stream asks whether its session still stands: a revoked session stops
# streaming within this long (the edge's check, one Redis EXISTS per stream per tick).
SESSION_CHECK_SECONDS = 5.0


@dataclass
class StreamSlot:
    """One admitted stream; `release` gives its place back (once, however often called)."""

    gate: StreamGate
    user_id: str
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._open -= 1
            self.gate._per_user[self.user_id] -= 1
            if self.gate._per_user[self.user_id] <= 0:
                del self.gate._per_user[self.user_id]


class StreamRefused(Exception):
    """No slot for a new stream: the process is full, or this user holds `per_user` already."""

    def __init__(self, per_user: bool) -> None:
        super().__init__("per-user stream limit" if per_user else "stream capacity")
        self.per_user = per_user


class StreamGate:
    """Admits at most `limit` streams at once, `per_user` of them for one user; `redis` is
    their pool (never the API's)."""

    def __init__(
        self,
        redis_url: str,
        limit: int,
        client_name: str = "billfold-sse",
        session_check_seconds: float = SESSION_CHECK_SECONDS,
        per_user: int = STREAMS_PER_USER,
    ) -> None:
        self.limit = limit
        self.per_user = per_user
        self.session_check_seconds = session_check_seconds
        # One connection per stream: the pool can never grow past the streams admitted.
        self.redis = Redis.from_pool(
            ConnectionPool.from_url(redis_url, max_connections=limit, client_name=client_name)
        )
        self._open = 0
        self._per_user: Counter[str] = Counter()

    @property
    def open_streams(self) -> int:
        return self._open

    def streams_of(self, user_id: str) -> int:
        return self._per_user[user_id]

    def admit(self, user_id: str) -> StreamSlot:
        """A slot for a new stream of `user_id`; `StreamRefused` when `limit` streams are open
        (checked first: a full process is no fault of the user) or the user holds `per_user`."""
        if self._open >= self.limit:
            raise StreamRefused(per_user=False)
        if self._per_user[user_id] >= self.per_user:
            raise StreamRefused(per_user=True)
        self._open += 1
        self._per_user[user_id] += 1
        return StreamSlot(self, user_id)

    async def aclose(self) -> None:
        await self.redis.aclose()
