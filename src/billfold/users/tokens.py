"""ES256 access tokens: a key ring in PostgreSQL (private keys sealed), rotation, JWKS, verify."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.config import Settings
from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.errors import Unauthorized
from billfold.platform.ids import new_id
from billfold.platform.keys import SealedBox
from billfold.platform.observability import get_logger

log = get_logger("billfold.users.tokens")

_CLOCK_SKEW = 30
# Access tokens already verified, by their exact bytes: an ES256 verify (plus PyJWT's parsing)
# is a fifth of the edge's CPU per request, and a client sends the same token for 15 minutes.
_VERIFIED_CACHE_SIZE = 10_000
_RELOAD_EVERY = 60.0
_UNKNOWN_KID_RELOAD_GAP = 1.0  # an unknown `kid` reloads at most once a second


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    public_key: ec.EllipticCurvePublicKey
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None


def _invalid(detail: str = "The access token is invalid or expired") -> Unauthorized:
    return Unauthorized(
        detail,
        code="invalid_token",
        headers={"WWW-Authenticate": 'Bearer realm="billfold", error="invalid_token"'},
    )


class KeyRing:
    """The JWT signing keys. The newest unretired key signs; every key verifies until the
    last token it could have signed has expired.

    `engine` should be the key ring's own small pool: a reload must never wait for a connection
    held by the request that triggered it. Signing does no I/O: `run()` (a background task of
    the app) reloads and rotates on schedule; only an unknown `kid` reloads on the request path.
    """

    def __init__(self, engine: AsyncEngine, sealed: SealedBox, settings: Settings) -> None:
        self._engine = engine
        self._sealed = sealed
        self._settings = settings
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._verified: dict[str, tuple[dict[str, Any], str]] = {}

    @property
    def _grace(self) -> timedelta:
        # A replica may sign with a just-retired key until its next reload, so a retired key
        # verifies for one token lifetime past that.
        return timedelta(
            seconds=self._settings.access_token_ttl_seconds + _RELOAD_EVERY + _CLOCK_SKEW
        )

    def _rotation_due(self) -> bool:
        active = self._active
        if active is None:
            return True
        age = (utcnow() - active.created_at).total_seconds()
        return age > self._settings.signing_key_rotation_seconds

    async def start(self) -> None:
        """Load the keys, creating or rotating the active one when it is missing or too old."""
        await self.reload()
        if self._rotation_due():
            await self.rotate(if_older_than=self._settings.signing_key_rotation_seconds)

    async def reload(self) -> None:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT kid, private_key, public_jwk, created_at, retired_at "
                        "FROM users.signing_keys WHERE retired_at IS NULL OR retired_at > :cutoff "
                        "ORDER BY created_at"
                    ),
                    {"cutoff": utcnow() - self._grace},
                )
            ).all()
        keys: dict[str, SigningKey] = {}
        for row in rows:
            pem = self._sealed.open(bytes(row.private_key), aad=row.kid.encode())
            private = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            keys[row.kid] = SigningKey(
                row.kid,
                private,
                private.public_key(),
                dict(row.public_jwk),
                row.created_at,
                row.retired_at,
            )
        self._keys = keys
        unretired = [k for k in keys.values() if k.retired_at is None]
        self._active = unretired[-1] if unretired else None
        self._loaded_at = time.monotonic()

    async def rotate(self, *, if_older_than: float | None = None) -> str | None:
        """Add a new signing key and retire the others (they keep verifying for one token TTL).

        With `if_older_than`, rotate only when the newest key is older than that many seconds,
        so replicas noticing the same due rotation make one new key, not one each."""
        private = ec.generate_private_key(ec.SECP256R1())
        kid = new_id("key")
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        async with self._engine.begin() as conn:
            # One rotation at a time across replicas.
            await conn.execute(text("SELECT pg_advisory_xact_lock(727275)"))
            now = utcnow()
            made: str | None = kid
            if if_older_than is not None:
                newest = (
                    await conn.execute(
                        text(
                            "SELECT max(created_at) FROM users.signing_keys "
                            "WHERE retired_at IS NULL"
                        )
                    )
                ).scalar_one()
                if newest is not None and (now - newest).total_seconds() <= if_older_than:
                    made = None  # another replica rotated already
            if made is not None:
                await conn.execute(
                    text(
                        "UPDATE users.signing_keys SET retired_at = :now WHERE retired_at IS NULL"
                    ),
                    {"now": now},
                )
                await conn.execute(
                    text(
                        "INSERT INTO users.signing_keys (kid, private_key, public_jwk, created_at) "
                        "VALUES (:kid, :pk, CAST(:jwk AS jsonb), :now)"
                    ),
                    {
                        "kid": kid,
                        "pk": self._sealed.seal(pem, aad=kid.encode()),
                        "jwk": json.dumps(jwk),
                        "now": now,
                    },
                )
        await self.reload()
        return made

    async def refresh(self) -> None:
        """The periodic work: pick up keys made by other replicas, rotate when due."""
        async with self._lock:
            await self.reload()
            if self._rotation_due():  # a long-running process rotates on schedule too
                await self.rotate(if_older_than=self._settings.signing_key_rotation_seconds)

    async def run(self, interval: float = _RELOAD_EVERY) -> None:
        """Refresh every `interval` seconds until cancelled (the app lifespan runs this)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # a database blip must not end the loop; the old keys still work
                log.exception("signing key reload failed")

    async def _reload_for(self, kid: str) -> None:
        """A token signed by a key this replica has not seen yet (another replica rotated)."""
        if kid in self._keys:
            return
        async with self._lock:
            if kid not in self._keys and (
                time.monotonic() - self._loaded_at > _UNKNOWN_KID_RELOAD_GAP
            ):
                await self.reload()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk for k in self._keys.values()]}

    async def sign(self, claims: dict[str, Any]) -> str:
        active = self._active
        if active is None:  # only before start(); a running app always has an active key
            await self.rotate()
            active = self._active
        assert active is not None
        return jwt.encode(
            claims, active.private_key, algorithm="ES256", headers={"kid": active.kid}
        )

    async def decode(self, token: str) -> dict[str, Any]:
        cached = self._verified.get(token)
        if cached is not None:
            # Still only while it is unexpired and its key is still in the ring.
            if cached[1] in self._keys and time.time() < cached[0]["exp"] + _CLOCK_SKEW:
                return cached[0]
            del self._verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _invalid() from exc
        kid = header.get("kid")
        if header.get("alg") != "ES256" or not isinstance(kid, str):
            raise _invalid()
        await self._reload_for(kid)
        key = self._keys.get(kid)
        if key is None:
            raise _invalid()
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=["ES256"],
                audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                leeway=_CLOCK_SKEW,
                options={"require": ["exp", "iat", "sub", "sid", "iss", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise _invalid() from exc
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = (claims, kid)
        return claims


class AccessTokens:
    """Issues and verifies access tokens; implements the gateway's `TokenVerifier`."""

    def __init__(self, keyring: KeyRing, redis: Redis, settings: Settings) -> None:
        self.keyring = keyring
        self._redis = redis
        self._settings = settings

    def _revoked_key(self, session_id: str) -> str:
        return revoked_session_key(self._settings, session_id)

    async def issue(
        self,
        *,
        user_id: str,
        session_id: str,
        scopes: list[str],
        role: str,
        device_id: str | None,
        auth_method: str,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        now = int(time.time())
        ttl = self._settings.access_token_ttl_seconds
        claims: dict[str, Any] = {
            "iss": self._settings.jwt_issuer,
            "aud": self._settings.jwt_audience,
            "sub": user_id,
            "sid": session_id,
            "scope": " ".join(scopes),
            "role": role,
            "amr": [auth_method],
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": new_id("evt").removeprefix("evt_"),
        }
        if device_id:
            claims["did"] = device_id
        if extra:
            claims.update(extra)
        return await self.keyring.sign(claims), ttl

    async def verify(self, token: str) -> Principal:
        claims = await self.keyring.decode(token)
        if claims.get("token_use", "access") != "access":
            raise _invalid()
        if await self._redis.exists(self._revoked_key(str(claims["sid"]))):
            raise _invalid("The session of this token has been revoked")
        return Principal(
            user_id=str(claims["sub"]),
            session_id=str(claims["sid"]),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            role=str(claims.get("role", "user")),
            device_id=claims.get("did"),
            auth_method=(claims.get("amr") or ["pwd"])[0],
            claims=claims,
        )

    async def revoke_sessions(self, session_ids: list[str]) -> None:
        """Reject live access tokens of these sessions for as long as they could still be valid."""
        await deny_sessions(self._redis, self._settings, session_ids)


def revoked_session_key(settings: Settings, session_id: str) -> str:
    return f"{settings.redis_prefix}revoked-session:{session_id}"


async def deny_sessions(redis: Redis, settings: Settings, session_ids: list[str]) -> None:
    """Reject live access tokens of these sessions for as long as they could still be valid
    (for processes without an `AccessTokens`, such as the worker's consumers)."""
    if not session_ids:
        return
    ttl = settings.access_token_ttl_seconds + _CLOCK_SKEW
    async with redis.pipeline(transaction=False) as pipe:
        for sid in session_ids:
            pipe.set(revoked_session_key(settings, sid), "1", ex=ttl)
        await pipe.execute()
