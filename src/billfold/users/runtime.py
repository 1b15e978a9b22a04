"""What the User Service needs at run time, built once per process by the app."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field
from functools import cached_property

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from redis.asyncio import Redis

from billfold.config import Settings
from billfold.platform.blobs import BlobStore
from billfold.platform.keys import SealedBox, SealRing
from billfold.users.events import one_time_code_ring
from billfold.users.tokens import AccessTokens

# argon2id; RFC 9106's second recommended option (64 MiB, t=3, p=4).
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)


@dataclass
class UsersRuntime:
    settings: Settings
    redis: Redis
    tokens: AccessTokens
    sealed: SealedBox
    blobs: BlobStore
    hasher: PasswordHasher = field(default=_HASHER)
    _dummy_hash: str | None = None

    def key(self, *parts: str) -> str:
        return self.settings.redis_prefix + ":".join(parts)

    @cached_property
    def codes(self) -> SealRing:
        """Seals one-time codes for the notification service (the events' only carrier)."""
        return one_time_code_ring(self.settings)

    def keyed_hash(self, domain: str, message: str) -> bytes:
        """HMAC-SHA256 of `message` under a key derived from the secret key for `domain`, so a
        stored hash of a short code or number cannot be brute-forced, nor stand in elsewhere."""
        key = hashlib.sha256(f"billfold-{domain}:".encode() + self.settings.secret_key.encode())
        return hmac.new(key.digest(), message.encode(), hashlib.sha256).digest()

    async def hash_password(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify_password(self, stored: str | None, password: str) -> bool:
        """Constant work whether or not the account exists (no user enumeration by timing)."""
        if stored is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash_password("billfold-dummy-password")
            stored = self._dummy_hash

        def check() -> bool:
            try:
                return self.hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False

        return await asyncio.to_thread(check)
