"""What the User Service needs at run time, built once per process by the app."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from redis.asyncio import Redis

from billfold.config import Settings
from billfold.platform.blobs import BlobStore
from billfold.platform.keys import SealedBox
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
