"""`HttpVault`: the `VaultClient` of API processes, calling the isolated vault process over HTTP.

One pooled `httpx.AsyncClient` per process (keep-alive, bounded pool, timeouts); a fresh service
token on every request. Answers are parsed into the contract's own types and problem codes are
raised as the vault's own exception classes, so a caller cannot tell this client from the
in-process vault. The vault refusing our service token, answering 5xx, timing out or being
unreachable is a 503 `vault_unavailable` for the caller (it is our fault, not theirs).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from billfold.platform.errors import (
    Conflict,
    FieldError,
    Forbidden,
    NotFound,
    ProblemError,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from billfold.platform.observability import get_logger, request_id_var
from billfold.vault import models
from billfold.vault.models import (
    CardInput,
    CardNotFound,
    CardSecret,
    Cryptogram,
    CryptogramRequest,
    DetokenizePurpose,
    PaymentToken,
    TokenDomain,
    TokenNotFound,
    TokenOnNetwork,
    VaultedCard,
)
from billfold.vault.service_auth import ServiceTokenSigner, is_service_name

log = get_logger("billfold.vault.http")

T = TypeVar("T")

_CARD = TypeAdapter(VaultedCard)
_TOKEN = TypeAdapter(PaymentToken)
_TOKENS = TypeAdapter(list[PaymentToken])
_CRYPTOGRAM = TypeAdapter(Cryptogram)
_CRYPTOGRAM_REQUEST = TypeAdapter(CryptogramRequest)
_DOMAIN = TypeAdapter(TokenDomain)
_SECRET = TypeAdapter(CardSecret)
_TOKEN_ON_NETWORK = TypeAdapter(TokenOnNetwork)
_PROBLEM_FIELDS = frozenset(
    {"type", "title", "status", "code", "detail", "instance", "errors", "request_id"}
)

_BY_STATUS: dict[int, type[ProblemError]] = {
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Unprocessable,
    429: TooManyRequests,
}

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=2.0, pool=5.0)
# Idle connections are dropped after 4 s, before the vault's uvicorn closes them (5 s): a call
# sent on a connection the server is closing fails with a ReadError (seen at 500 in flight), and
# it cannot be retried safely (a cryptogram spends an ATC).
DEFAULT_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=4)


class VaultUnavailable(ServiceUnavailable):
    code, title = "vault_unavailable", "The token vault is unavailable"


def _vault_errors() -> dict[str, type[ProblemError]]:
    """Problem code → the vault's exception class: the contract's (`vault.models`) and any
    other `ProblemError` subclass defined in `billfold.vault` that is loaded."""
    found: dict[str, type[ProblemError]] = {}
    pending: list[type[ProblemError]] = [ProblemError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("billfold.vault."):
            found.setdefault(cls.code, cls)
    for value in vars(models).values():
        if (
            isinstance(value, type)
            and issubclass(value, ProblemError)
            and value.__module__ == models.__name__
        ):
            found[value.code] = value  # the contract's class wins
    return found


def _segment(value: str, missing: type[ProblemError]) -> str:
    """One path segment, whatever the caller passed (an id is data, never a path). An id that
    cannot travel in a path (empty, or with a `/`) is no id at all: the vault's not-found."""
    if not value or "/" in value:
        raise missing()
    return quote(value, safe="").replace(".", "%2E")


class HttpVault:
    """`VaultClient` over HTTP. `signer` names this process (the token's `sub`, which decides
    what it may call); each token is bound to its method and path, and a detokenisation's carries
    its `requester`, which the vault audits. For mTLS pass an
    `ssl.SSLContext` with the vault's CA and this process's client certificate as `verify`."""

    def __init__(
        self,
        base_url: str,
        signer: ServiceTokenSigner,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._signer = signer
        # httpx logs every request at INFO ("HTTP Request: POST …/detokenize"): the vault logs
        # each call itself, with its request id, and twice is noise.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        # Retries only when no connection could be made (the request was never sent), so a
        # cryptogram (which spends an ATC) is never asked for twice.
        transport = transport or httpx.AsyncHTTPTransport(verify=verify, limits=limits, retries=1)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/internal/v1",
            timeout=timeout,
            transport=transport,
            headers={"user-agent": "billfold-vault-client"},
            follow_redirects=False,
        )
        # Calls in flight at once: no more than the pool keeps alive. httpx's pool matches every
        # queued request against every connection each time one is added or done, so with
        # hundreds queued inside it (the simulator at 500 payments in flight) its bookkeeping
        # cost more CPU than the calls; past the keep-alive count it would also close and
        # reopen connections. Waiting here is cheap, and not a failure: the vault's own
        # timeouts start when a call is sent.
        self._in_flight = asyncio.Semaphore(
            limits.max_keepalive_connections or limits.max_connections or 32
        )
        self._errors = _vault_errors()
        # The path the vault sees (and checks a token's `htu` against) is under its prefix.
        self._path_prefix = "/internal/v1"

    # --- cards -----------------------------------------------------------------------------

    async def vault_card(self, card: CardInput, *, owner_id: str) -> VaultedCard:
        body = {
            "owner_id": owner_id,
            "pan": card.pan,
            "expiry_month": card.expiry_month,
            "expiry_year": card.expiry_year,
            "cardholder_name": card.cardholder_name,
        }
        return self._parse(_CARD, await self._call("POST", "/cards", json=body))

    async def get_card(self, card_id: str) -> VaultedCard:
        r = await self._call(
            "GET", f"/cards/{_segment(card_id, CardNotFound)}", missing=CardNotFound
        )
        return self._parse(_CARD, r)

    async def update_card(
        self,
        card_id: str,
        *,
        pan: str | None = None,
        expiry_month: int | None = None,
        expiry_year: int | None = None,
    ) -> VaultedCard:
        body = {"pan": pan, "expiry_month": expiry_month, "expiry_year": expiry_year}
        r = await self._call(
            "PATCH", f"/cards/{_segment(card_id, CardNotFound)}", json=body, missing=CardNotFound
        )
        return self._parse(_CARD, r)

    async def delete_card(self, card_id: str, *, reason: str) -> None:
        await self._call(
            "POST",
            f"/cards/{_segment(card_id, CardNotFound)}/delete",
            json={"reason": reason},
            missing=CardNotFound,
        )

    # --- tokens ----------------------------------------------------------------------------

    async def issue_token(self, card_id: str, *, domain: TokenDomain) -> PaymentToken:
        r = await self._call(
            "POST",
            f"/cards/{_segment(card_id, CardNotFound)}/tokens",
            json={"domain": _DOMAIN.dump_python(domain, mode="json")},
            missing=CardNotFound,
        )
        return self._parse(_TOKEN, r)

    async def get_token(self, token_id: str) -> PaymentToken:
        r = await self._call(
            "GET", f"/tokens/{_segment(token_id, TokenNotFound)}", missing=TokenNotFound
        )
        return self._parse(_TOKEN, r)

    async def list_tokens(self, card_id: str) -> list[PaymentToken]:
        if not card_id or "/" in card_id:
            return []  # as the vault answers for any id that is not a card's
        r = await self._call(
            "GET", f"/cards/{_segment(card_id, CardNotFound)}/tokens", missing=CardNotFound
        )
        return _TOKENS.validate_python(r.json()["data"])

    async def suspend_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._lifecycle(token_id, "suspend", reason)

    async def resume_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._lifecycle(token_id, "resume", reason)

    async def delete_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await self._lifecycle(token_id, "delete", reason)

    async def _lifecycle(self, token_id: str, action: str, reason: str) -> PaymentToken:
        r = await self._call(
            "POST",
            f"/tokens/{_segment(token_id, TokenNotFound)}/{action}",
            json={"reason": reason},
            missing=TokenNotFound,
        )
        return self._parse(_TOKEN, r)

    # --- cryptograms and the network path --------------------------------------------------

    async def cryptogram(self, request: CryptogramRequest) -> Cryptogram:
        body = _CRYPTOGRAM_REQUEST.dump_python(request, mode="json")
        return self._parse(_CRYPTOGRAM, await self._call("POST", "/cryptograms", json=body))

    async def verify_cryptogram(self, cryptogram: Cryptogram, request: CryptogramRequest) -> bool:
        body = {
            "cryptogram": _CRYPTOGRAM.dump_python(cryptogram, mode="json"),
            "request": _CRYPTOGRAM_REQUEST.dump_python(request, mode="json"),
        }
        r = await self._call("POST", "/cryptograms/verify", json=body)
        return bool(r.json()["valid"])

    async def token_by_dpan(self, dpan: str) -> TokenOnNetwork | None:
        # POST, so the DPAN is in a body, never in a URL (access logs, proxies).
        r = await self._call("POST", "/tokens/by-dpan", json={"dpan": dpan})
        body = r.json()
        if body.get("token") is None:
            return None
        return _TOKEN_ON_NETWORK.validate_python(body)

    async def detokenize(
        self,
        *,
        card_id: str | None = None,
        token_id: str | None = None,
        requester: str,
        purpose: DetokenizePurpose,
    ) -> CardSecret:
        # The requester travels in the signed token (`requester`); the vault audits it.
        if not requester.strip() or len(requester.strip()) > 200 or not is_service_name(requester):
            raise Unprocessable("requester is required (at most 200 characters)")
        body = {"card_id": card_id, "token_id": token_id, "purpose": purpose}
        r = await self._call(
            "POST",
            "/detokenize",
            json=body,
            requester=requester,
            missing=TokenNotFound if token_id is not None else CardNotFound,
        )
        return self._parse(_SECRET, r)

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- plumbing --------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        requester: str | None = None,
        missing: type[ProblemError] | None = None,
    ) -> httpx.Response:
        async with self._in_flight:
            return await self._send(method, path, json, requester, missing)

    async def _send(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None,
        requester: str | None,
        missing: type[ProblemError] | None,
    ) -> httpx.Response:
        # Bound to this one method and path (`htm`/`htu`): a token seen in flight opens nothing
        # else. Signed once the call may go, so a wait above never ages it.
        token = self._signer.token(method, self._path_prefix + path, requester=requester)
        headers = {"authorization": f"Bearer {token}"}
        rid = request_id_var.get()
        if rid is not None:
            headers["x-request-id"] = rid  # one request id across both processes' logs
        try:
            r = await self._client.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException:
            log.warning("vault timed out", method=method)
            raise VaultUnavailable("The token vault did not answer in time") from None
        except httpx.TransportError as exc:
            log.warning("vault unreachable", method=method, error=type(exc).__name__)
            raise VaultUnavailable("The token vault cannot be reached") from None
        if r.status_code >= 400:
            raise self._error(r, missing)
        return r

    def _error(self, r: httpx.Response, missing: type[ProblemError] | None) -> ProblemError:
        try:
            body = r.json()
            code = str(body["code"])
        except (ValueError, KeyError, TypeError):
            body, code = {}, ""
        if r.status_code == 401 or r.status_code >= 500 or not code:
            # Our own misconfiguration or the vault's failure: never the caller's fault.
            log.error(
                "vault call failed",
                status=r.status_code,
                problem=code,
                vault_request_id=body.get("request_id"),
            )
            return VaultUnavailable("The token vault could not serve the request")
        detail = body.get("detail")
        errors = [FieldError.model_validate(e) for e in body.get("errors") or []] or None
        extra = {k: v for k, v in body.items() if k not in _PROBLEM_FIELDS}
        cls = self._errors.get(code)
        if cls is None and code == "not_found" and missing is not None:
            cls = missing  # an id that cannot even be routed: the same as an unknown one
            return cls()
        if cls is not None:
            return cls(detail, status=r.status_code, errors=errors, extra=extra)
        # Another code: the platform class of its status, so `except Conflict` still works.
        base = _BY_STATUS.get(r.status_code, ProblemError)
        return base(
            detail,
            status=r.status_code,
            code=code,
            title=str(body.get("title") or "Error"),
            errors=errors,
            extra=extra,
        )

    @staticmethod
    def _parse(adapter: TypeAdapter[T], r: httpx.Response) -> T:
        return adapter.validate_json(r.content)
