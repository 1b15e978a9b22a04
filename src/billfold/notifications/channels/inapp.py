"""In-app delivery: the inbox row is already stored; this tells any API process that holds the
user's live stream (Server-Sent Events) over Redis pub/sub, so every process can deliver."""

from __future__ import annotations

import json

from redis.asyncio import Redis
from redis.exceptions import RedisError

from billfold.notifications.channels.base import Message, Outcome, transient


def stream_channel(prefix: str, user_id: str) -> str:
    """The Redis pub/sub channel of one user's notifications."""
    return f"{prefix}ntf:{user_id}"


class InAppChannel:
    provider = "inapp"

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def send(self, message: Message) -> Outcome:
        try:
            await self._redis.publish(
                stream_channel(self._prefix, message.target),
                json.dumps(message.content, separators=(",", ":")),
            )
        except RedisError as exc:
            return transient(exc)
        # Stored and announced: `delivered` comes when a stream shows it or it is read (a
        # stream that was not listening replays it from the inbox).
        return Outcome("sent")

    async def aclose(self) -> None:
        return None
