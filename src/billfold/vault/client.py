"""`VaultClient`: the one interface to the Token Vault, in-process or over HTTP.

`billfold up` and the tests may use the in-process implementation; production API processes use
the HTTP one against the isolated `billfold vault` process, the only holder of an HSM session.
Both implementations pass one shared test suite, so the demo and production run the same paths.
Owner checks belong to the caller (Payment Methods); the vault records who asked, for audit.
"""

from __future__ import annotations

from typing import Protocol

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


class VaultClient(Protocol):
    """Every operation is its own vault transaction; lifecycle changes emit `billfold.vault.*`."""

    async def vault_card(self, card: CardInput, *, owner_id: str) -> VaultedCard:
        """Store a PAN (envelope-encrypted) and return its reference. The same PAN for the same
        owner returns the existing card (idempotent); the fingerprint is the same across owners."""
        ...

    async def get_card(self, card_id: str) -> VaultedCard:
        """Raises `CardNotFound`."""
        ...

    async def update_card(
        self,
        card_id: str,
        *,
        pan: str | None = None,
        expiry_month: int | None = None,
        expiry_year: int | None = None,
    ) -> VaultedCard:
        """A reissued card (new PAN and/or expiry): the card's tokens keep working, unchanged."""
        ...

    async def delete_card(self, card_id: str, *, reason: str) -> None:
        """Delete the PAN and every token of the card (tokens go to `deleted`)."""
        ...

    async def issue_token(self, card_id: str, *, domain: TokenDomain) -> PaymentToken:
        """Issue an EMV payment token (DPAN from the token BIN range) bound to `domain`."""
        ...

    async def get_token(self, token_id: str) -> PaymentToken:
        """Raises `TokenNotFound`."""
        ...

    async def list_tokens(self, card_id: str) -> list[PaymentToken]: ...

    async def suspend_token(self, token_id: str, *, reason: str) -> PaymentToken:
        """active → suspended (raises `InvalidTokenTransition` otherwise)."""
        ...

    async def resume_token(self, token_id: str, *, reason: str) -> PaymentToken:
        """suspended → active."""
        ...

    async def delete_token(self, token_id: str, *, reason: str) -> PaymentToken:
        """active|suspended → deleted (final)."""
        ...

    async def cryptogram(self, request: CryptogramRequest) -> Cryptogram:
        """A fresh ARQC + dynamic CVV for one transaction on an active token, within its domain
        (`TokenDomainViolation` otherwise); the ATC increments on every call."""
        ...

    async def verify_cryptogram(self, cryptogram: Cryptogram, request: CryptogramRequest) -> bool:
        """Issuer side: does `cryptogram` verify for `request`, and is its ATC fresh (a replayed
        or older ATC fails)? Used by the network simulator."""
        ...

    async def token_by_dpan(self, dpan: str) -> TokenOnNetwork | None:
        """Issuer side: the token a DPAN belongs to (None for a DPAN the vault never issued).
        Used by the network simulator to map a DPAN back to its card."""
        ...

    async def detokenize(
        self,
        *,
        card_id: str | None = None,
        token_id: str | None = None,
        requester: str,
        purpose: DetokenizePurpose,
    ) -> CardSecret:
        """The clear PAN for the payment-network path, by card or by token; every call writes
        an append-only audit row (who, why, when) before the PAN leaves the vault."""
        ...

    async def aclose(self) -> None: ...
