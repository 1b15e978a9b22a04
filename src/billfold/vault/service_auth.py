"""Service-to-service authentication between the API processes and the vault process.

Every request to the vault carries a short-lived service token: an HS256 JWT under
`BILLFOLD_VAULT_SERVICE_KEY`, with `iss`, `aud` (the vault), `sub` (the calling service: fixed per
signer, and what `SERVICE_ROUTES`/`SERVICE_PURPOSES` allow), `htm` and `htu` (the one method and
path it is good for), `iat`, `exp` (at most 60 s later), a random `jti` and, for a
detokenisation, `requester` (who inside the service asks; the audit row records it). A client
signs a fresh token for every request, so the vault refuses any `jti` it has already seen: in
Redis (SET NX EX, shared by every replica) when the vault has `BILLFOLD_REDIS_URL`, otherwise in
the process. The algorithm is pinned: a user's ES256 access token, or `alg: none`, never passes.
In production the channel is also mTLS (docs/architecture.md, "Token Vault").
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from billfold.config import Settings
from billfold.platform.errors import ServiceUnavailable, Unauthorized

ISSUER = "billfold"
AUDIENCE = "billfold-vault"
ALGORITHM = "HS256"
# A client's tokens live this long; the vault refuses any whose lifetime is longer than MAX_TTL.
TOKEN_TTL_SECONDS = 30
MAX_TTL_SECONDS = 60
# Clock skew tolerated between the API's and the vault's hosts.
LEEWAY_SECONDS = 5
# The calling service's name, or the requester a detokenisation is audited under (at most 200
# characters there): anything printable.
# No control characters (C0, DEL, C1), line/paragraph separators or surrogates: the same
# characters the vault refuses in any text it keeps (`service._has_control`).
_SUBJECT = re.compile(r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,200}$")


def is_service_name(value: str) -> bool:
    """Whether `value` may be a service token's `sub` (a service name or a requester)."""
    return bool(_SUBJECT.match(value))


_KEY_FILE = "vault-service.key"


class ServiceTokenRejected(Unauthorized):
    code, title = "invalid_service_token", "Invalid service token"


def generate_service_key() -> str:
    """Base64 of 32 random bytes, the format of `BILLFOLD_VAULT_SERVICE_KEY`."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def resolve_service_key(settings: Settings) -> bytes:
    """The key both sides sign and verify with: configured, or (outside production) kept in
    `data_dir/vault-service.key`, so `billfold up`'s API and vault processes share it."""
    value = settings.vault_service_key
    if not value:
        if settings.environment == "production":
            raise RuntimeError("BILLFOLD_VAULT_SERVICE_KEY must be set in production")
        path = Path(settings.data_dir) / _KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600 from the start: never readable by others, not even briefly.
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(generate_service_key())
        value = path.read_text().strip()
    try:
        key = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("BILLFOLD_VAULT_SERVICE_KEY is not base64") from None
    if len(key) < 32:
        raise ValueError("BILLFOLD_VAULT_SERVICE_KEY must be at least 32 bytes (base64)")
    return key


class ServiceTokenSigner:
    """Signs the tokens a calling service presents to the vault (one per request)."""

    def __init__(
        self,
        key: bytes,
        *,
        subject: str,
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        ttl_seconds: int = TOKEN_TTL_SECONDS,
    ) -> None:
        if not _SUBJECT.match(subject):
            raise ValueError(f"invalid service name {subject!r}")
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"service tokens live at most {MAX_TTL_SECONDS} s")
        self._key = key
        self.subject = subject
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds

    def token(self, method: str, path: str, *, requester: str | None = None) -> str:
        """A fresh token for one request: `method` and `path` (as the vault sees it, e.g.
        `/internal/v1/cards`) are the only ones it is good for; `requester` names who inside
        this service asks for a detokenisation (the audit records it)."""
        if requester is not None and not _SUBJECT.match(requester):
            raise ValueError("invalid requester")
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": self.subject,
            "htm": method.upper(),
            "htu": path,
            "iat": now,
            "exp": now + self._ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if requester is not None:
            claims["requester"] = requester
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    @classmethod
    def from_settings(cls, settings: Settings, *, subject: str) -> ServiceTokenSigner:
        return cls(resolve_service_key(settings), subject=subject)


@dataclass(frozen=True)
class ServiceCaller:
    """The verified caller of one vault request."""

    service: str  # the token's `sub`
    token_id: str  # its `jti`
    requester: str = ""  # its `requester` claim, else the service

    def __post_init__(self) -> None:
        if not self.requester:
            object.__setattr__(self, "requester", self.service)


@dataclass
class ServiceTokenVerifier:
    """Checks every request's token: signature, algorithm, issuer, audience, lifetime (≤ 60 s),
    and that its `jti` was not used before (while it could still be valid)."""

    key: bytes
    issuer: str = ISSUER
    audience: str = AUDIENCE
    max_ttl_seconds: int = MAX_TTL_SECONDS
    leeway_seconds: int = LEEWAY_SECONDS
    # Replays are caught across replicas when set (`SET jti NX EX`), per process otherwise.
    redis: Any = None
    redis_prefix: str = ""
    _seen: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _next_purge: float = field(default=0.0, init=False, repr=False)

    async def verify(self, token: str, *, method: str, path: str) -> ServiceCaller:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["iss", "aud", "sub", "iat", "exp", "jti", "htm", "htu"]},
            )
        except jwt.ExpiredSignatureError:
            raise _rejected("The service token has expired") from None
        except jwt.InvalidTokenError:
            raise _rejected("The service token is not valid for the vault") from None
        sub, jti, iat, exp = claims["sub"], claims["jti"], claims["iat"], claims["exp"]
        if not (isinstance(sub, str) and _SUBJECT.match(sub)):
            raise _rejected("The service token names no valid service")
        if not (isinstance(jti, str) and 8 <= len(jti) <= 128):
            raise _rejected("The service token has no valid id")
        if not (isinstance(iat, int) and isinstance(exp, int)):
            raise _rejected("The service token's times are not integers")
        now = time.time()
        if exp - iat > self.max_ttl_seconds:
            raise _rejected(f"A service token may live at most {self.max_ttl_seconds} s")
        if iat > now + self.leeway_seconds:
            raise _rejected("The service token was issued in the future")
        if claims["htm"] != method.upper() or claims["htu"] != path:
            raise _rejected("The service token is for another request")
        requester = claims.get("requester")
        if requester is not None and not (isinstance(requester, str) and _SUBJECT.match(requester)):
            raise _rejected("The service token names no valid requester")
        until = exp + self.leeway_seconds
        if self.redis is not None:
            await self._remember_shared(jti, until, now)
        else:
            self._remember(jti, until, now)
        return ServiceCaller(sub, jti, requester or sub)

    async def _remember_shared(self, jti: str, until: float, now: float) -> None:
        try:
            fresh = await self.redis.set(
                f"{self.redis_prefix}vault:jti:{jti}",
                b"1",
                nx=True,
                ex=max(1, int(until - now) + 1),
            )
        except Exception:  # fail closed: an unchecked token could be a replay
            raise ServiceUnavailable(
                "The vault cannot check service tokens right now", code="service_unavailable"
            ) from None
        if not fresh:
            raise _rejected("The service token was already used")

    def _remember(self, jti: str, until: float, now: float) -> None:
        if now >= self._next_purge:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            self._next_purge = now + 10
        if jti in self._seen:
            raise _rejected("The service token was already used")
        self._seen[jti] = until

    @classmethod
    def from_settings(cls, settings: Settings, redis: Any = None) -> ServiceTokenVerifier:
        return cls(resolve_service_key(settings), redis=redis, redis_prefix=settings.redis_prefix)


# What each calling service may do (`sub` → route templates under /internal/v1, and the purposes
# it may detokenise for). Any other `sub` may do nothing. The API vaults cards, manages tokens,
# makes cryptograms and reveals a card to verify it or authorise with it; the network (the issuer
# side) finds a token by its DPAN, verifies cryptograms and reveals the card behind a DPAN to
# authorise. Neither does the other's part.
_API_ROUTES = frozenset(
    {
        ("POST", "/cards"),
        ("GET", "/cards/{card_id}"),
        ("PATCH", "/cards/{card_id}"),
        ("POST", "/cards/{card_id}/delete"),
        ("POST", "/cards/{card_id}/tokens"),
        ("GET", "/cards/{card_id}/tokens"),
        ("GET", "/tokens/{token_id}"),
        ("POST", "/tokens/{token_id}/suspend"),
        ("POST", "/tokens/{token_id}/resume"),
        ("POST", "/tokens/{token_id}/delete"),
        ("POST", "/cryptograms"),
        ("POST", "/detokenize"),
    }
)
SERVICE_ROUTES: dict[str, frozenset[tuple[str, str]]] = {
    "billfold-api": _API_ROUTES,
    "billfold-network": frozenset(
        {
            ("POST", "/tokens/by-dpan"),
            ("POST", "/cryptograms/verify"),
            ("GET", "/tokens/{token_id}"),
            ("POST", "/detokenize"),
        }
    ),
}
SERVICE_PURPOSES: dict[str, frozenset[str]] = {
    "billfold-api": frozenset({"account_verification", "authorization", "refund"}),
    "billfold-network": frozenset({"authorization"}),
}


def may_call(service: str, method: str, route: str) -> bool:
    """Whether `service` may call the vault route `route` (its template under /internal/v1)."""
    return (method.upper(), route) in SERVICE_ROUTES.get(service, frozenset())


def may_detokenize(service: str, purpose: str) -> bool:
    return purpose in SERVICE_PURPOSES.get(service, frozenset())


def _rejected(detail: str) -> ServiceTokenRejected:
    return ServiceTokenRejected(
        detail, headers={"WWW-Authenticate": 'Bearer realm="billfold-vault"'}
    )
