"""Rate limits in Redis with GCRA: one script call checks and charges every key of a request."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS: bucket keys; ARGV: limit_1, period_ms_1, limit_2, period_ms_2, ...
# Returns {allowed, remaining, retry_after_s, reset_s, index_of_tightest}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local best_remaining, best_reset, tightest = nil, 0, 1
local new_tats = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at > now then
    return {0, 0, math.ceil((allow_at - now) / 1000), math.ceil((tat - now) / 1000), i}
  end
  new_tats[i] = new_tat
  local remaining = math.floor((now - allow_at) / interval)
  if best_remaining == nil or remaining < best_remaining then
    best_remaining, best_reset, tightest = remaining, math.ceil((new_tat - now) / 1000), i
  end
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, new_tats[i], 'PX', math.ceil(new_tats[i] - now) + 1)
end
return {1, best_remaining, 0, best_reset, tightest}
"""


@dataclass(frozen=True)
class Quota:
    limit: int
    period_seconds: int

    @classmethod
    def parse(cls, spec: str) -> Quota:
        """`"30/60"` means 30 requests per 60 seconds."""
        count, _, seconds = spec.partition("/")
        quota = cls(int(count), int(seconds or 60))
        if quota.limit <= 0 or quota.period_seconds <= 0:
            raise ValueError(f"bad rate limit {spec!r}")
        return quota


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    period_seconds: int
    remaining: int
    retry_after: int
    reset: int

    def headers(self) -> list[tuple[str, str]]:
        out = [
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(self.remaining)),
            ("RateLimit-Reset", str(self.reset)),
            ("RateLimit-Policy", f"{self.limit};w={self.period_seconds}"),
        ]
        if not self.allowed:
            out.append(("Retry-After", str(max(self.retry_after, 1))))
        return out


class RateLimiter:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._script = redis.register_script(_GCRA)

    async def hit(self, buckets: list[tuple[str, Quota]]) -> Decision:
        """Charge one request to every bucket, or to none if any is exhausted."""
        keys = [f"{self._prefix}rl:{name}" for name, _ in buckets]
        argv: list[int] = []
        for _, q in buckets:
            argv += [q.limit, q.period_seconds * 1000]
        allowed, remaining, retry_after, reset, index = await self._script(keys=keys, args=argv)
        quota = buckets[int(index) - 1][1]
        return Decision(
            allowed=bool(allowed),
            limit=quota.limit,
            period_seconds=quota.period_seconds,
            remaining=int(remaining),
            retry_after=int(retry_after),
            reset=int(reset),
        )
