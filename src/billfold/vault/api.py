"""The vault process's internal HTTP routes: one per `VaultClient` method, JSON over HTTP.

Only `HttpVault` calls these, with a service token that `server.VaultEdge` has verified before a
route runs. Bodies are the contract's own types (pydantic validates the dataclasses of
`vault.models`), so the HTTP and in-process implementations cannot drift apart. Errors are the
vault's own problem codes; the requester of a detokenisation is the verified token's `requester`
claim (else its `sub`), never something the body claims, and the `sub` must be allowed the
purpose (`service_auth.SERVICE_PURPOSES`). A card number appears in two answers only (`detokenize`, and the DPAN
of a cryptogram) and in no error and no log line.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from billfold.platform.errors import Forbidden, Unauthorized, problem_responses
from billfold.platform.validation import Strict
from billfold.vault.client import VaultClient
from billfold.vault.models import (
    CardInput,
    CardSecret,
    Cryptogram,
    CryptogramRequest,
    DetokenizePurpose,
    PaymentToken,
    TokenDomain,
    TokenOnNetwork,
    VaultedCard,
)
from billfold.vault.service_auth import ServiceCaller, may_detokenize

PREFIX = "/internal/v1"
router = APIRouter(prefix=PREFIX, tags=["vault"])


class _Body(Strict):
    """Types only (and no NUL or non-finite number anywhere, which PostgreSQL would refuse with
    a 500): the vault's own rules (Luhn, expiry, lengths, control characters…) judge the values
    and answer with the same problems as the in-process vault; the edge caps the body at 64 KiB."""


class VaultCardBody(_Body):
    owner_id: str
    pan: str
    expiry_month: int
    expiry_year: int
    cardholder_name: str | None = None

    def card(self) -> CardInput:
        return CardInput(self.pan, self.expiry_month, self.expiry_year, self.cardholder_name)


class UpdateCardBody(_Body):
    pan: str | None = None
    expiry_month: int | None = None
    expiry_year: int | None = None


class ReasonBody(_Body):
    reason: str


class IssueTokenBody(_Body):
    domain: TokenDomain


class TokenList(_Body):
    data: list[PaymentToken]


class VerifyCryptogramBody(_Body):
    cryptogram: Cryptogram
    request: CryptogramRequest


class DpanBody(_Body):
    dpan: str


class TokenByDpan(_Body):
    """`token` null: no token has that DPAN."""

    token: PaymentToken | None
    token_bin: str | None = None


class Verification(_Body):
    valid: bool


class DetokenizeBody(_Body):
    """By card or by token (exactly one); no `requester`: that is in the service token."""

    card_id: str | None = None
    token_id: str | None = None
    purpose: DetokenizePurpose


async def vault(request: Request) -> VaultClient:
    """The process's in-process vault (the only HSM session), opened by the lifespan."""
    return request.app.state.vault  # type: ignore[no-any-return]


async def caller(request: Request) -> ServiceCaller:
    """The service that signed this request's token (verified by the vault's edge)."""
    found = request.scope.get("state", {}).get("service_caller")
    if not isinstance(found, ServiceCaller):  # never reached behind VaultEdge; fail closed
        raise Unauthorized("A service token is required", code="invalid_service_token")
    return found


Vault = Annotated[VaultClient, Depends(vault)]
Caller = Annotated[ServiceCaller, Depends(caller)]
_ERRORS: dict[int | str, dict[str, Any]] = problem_responses(401, 404, 409, 422)


@router.post("/cards", status_code=201, responses=_ERRORS, summary="Vault a card number")
async def vault_card(body: VaultCardBody, v: Vault, _: Caller) -> VaultedCard:
    return await v.vault_card(body.card(), owner_id=body.owner_id)


@router.get("/cards/{card_id}", responses=_ERRORS, summary="A vaulted card's reference")
async def get_card(card_id: str, v: Vault, _: Caller) -> VaultedCard:
    return await v.get_card(card_id)


@router.patch("/cards/{card_id}", responses=_ERRORS, summary="A reissued card: new PAN/expiry")
async def update_card(card_id: str, body: UpdateCardBody, v: Vault, _: Caller) -> VaultedCard:
    return await v.update_card(
        card_id, pan=body.pan, expiry_month=body.expiry_month, expiry_year=body.expiry_year
    )


@router.post(
    "/cards/{card_id}/delete",
    status_code=204,
    response_class=Response,
    responses=_ERRORS,
    summary="Delete a card and every token of it",
)
async def delete_card(card_id: str, body: ReasonBody, v: Vault, _: Caller) -> Response:
    await v.delete_card(card_id, reason=body.reason)
    return Response(status_code=204)


@router.post(
    "/cards/{card_id}/tokens", status_code=201, responses=_ERRORS, summary="Issue a payment token"
)
async def issue_token(card_id: str, body: IssueTokenBody, v: Vault, _: Caller) -> PaymentToken:
    return await v.issue_token(card_id, domain=body.domain)


@router.get("/cards/{card_id}/tokens", responses=_ERRORS, summary="A card's payment tokens")
async def list_tokens(card_id: str, v: Vault, _: Caller) -> TokenList:
    return TokenList(data=await v.list_tokens(card_id))


@router.get("/tokens/{token_id}", responses=_ERRORS, summary="A payment token")
async def get_token(token_id: str, v: Vault, _: Caller) -> PaymentToken:
    return await v.get_token(token_id)


@router.post("/tokens/{token_id}/suspend", responses=_ERRORS, summary="active → suspended")
async def suspend_token(token_id: str, body: ReasonBody, v: Vault, _: Caller) -> PaymentToken:
    return await v.suspend_token(token_id, reason=body.reason)


@router.post("/tokens/{token_id}/resume", responses=_ERRORS, summary="suspended → active")
async def resume_token(token_id: str, body: ReasonBody, v: Vault, _: Caller) -> PaymentToken:
    return await v.resume_token(token_id, reason=body.reason)


@router.post("/tokens/{token_id}/delete", responses=_ERRORS, summary="→ deleted (final)")
async def delete_token(token_id: str, body: ReasonBody, v: Vault, _: Caller) -> PaymentToken:
    return await v.delete_token(token_id, reason=body.reason)


@router.post(
    "/cryptograms",
    status_code=201,
    responses=problem_responses(401, 403, 404, 409, 422),
    summary="A fresh ARQC + dynamic CVV for one transaction",
)
async def cryptogram(body: CryptogramRequest, v: Vault, _: Caller) -> Cryptogram:
    return await v.cryptogram(body)


@router.post(
    "/cryptograms/verify",
    responses=problem_responses(401, 422),
    summary="Issuer side: does a cryptogram verify, with a fresh ATC?",
)
async def verify_cryptogram(body: VerifyCryptogramBody, v: Vault, _: Caller) -> Verification:
    return Verification(valid=await v.verify_cryptogram(body.cryptogram, body.request))


@router.post(
    "/tokens/by-dpan",
    responses=problem_responses(401, 422),
    summary="Issuer side: the token a DPAN belongs to (the network simulator)",
)
async def token_by_dpan(body: DpanBody, v: Vault, _: Caller) -> TokenByDpan:
    found: TokenOnNetwork | None = await v.token_by_dpan(body.dpan)
    if found is None:
        return TokenByDpan(token=None)
    return TokenByDpan(token=found.token, token_bin=found.token_bin)


@router.post(
    "/detokenize",
    responses=_ERRORS,
    summary="The clear card number, for the payment network path (audited)",
)
async def detokenize(body: DetokenizeBody, v: Vault, who: Caller) -> CardSecret:
    if not may_detokenize(who.service, body.purpose):
        raise Forbidden(f"The service {who.service!r} may not detokenise for {body.purpose}")
    return await v.detokenize(
        card_id=body.card_id, token_id=body.token_id, requester=who.requester, purpose=body.purpose
    )
