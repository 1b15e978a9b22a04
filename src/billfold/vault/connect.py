"""Which `VaultClient` a process uses: the vault process over HTTP when `BILLFOLD_VAULT_URL` is
set (production, `billfold up`), otherwise the vault in this process (tests, single-process runs).
"""

from __future__ import annotations

import asyncio
import ssl

from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.config import Settings
from billfold.platform.db import create_engine
from billfold.vault.client import VaultClient
from billfold.vault.http import HttpVault
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
from billfold.vault.service import LocalVault
from billfold.vault.service_auth import ServiceTokenSigner

# The `sub` of the API processes' service tokens (the vault logs it with every request).
API_SERVICE = "billfold-api"


def vault_client(settings: Settings, *, service: str = API_SERVICE) -> VaultClient:
    """`HttpVault` on `settings.vault_url` (mTLS when the client certificate settings are
    set), or an `InProcessVault`. Connects to nothing yet; close it with `aclose()`."""
    if settings.vault_url:
        return HttpVault(
            settings.vault_url,
            ServiceTokenSigner.from_settings(settings, subject=service),
            verify=vault_tls_context(settings) or True,
        )
    if settings.environment == "production":
        # The API would open the HSM and hold card numbers itself (settings.production_errors).
        raise RuntimeError("BILLFOLD_VAULT_URL must be set in production")
    return InProcessVault(settings)


def vault_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for an `https://` vault: the CA that signed the vault's certificate and
    this process's client certificate (mTLS). None when nothing is configured (system CAs)."""
    ca, cert, key = (
        settings.vault_ca_file,
        settings.vault_client_cert_file,
        settings.vault_client_key_file,
    )
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca or None)
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


class InProcessVault:
    """`LocalVault` opened on first use, on a small pool of its own (a request holding a
    connection of the API's pool must never wait for the vault to get one) and this process's
    key store. A process that never touches a card (the worker) never opens the HSM."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engine: AsyncEngine | None = None
        self._vault: LocalVault | None = None
        self._lock = asyncio.Lock()

    async def local(self) -> LocalVault:
        """The opened vault (opened now if needed)."""
        if self._vault is None:
            async with self._lock:
                if self._vault is None:
                    engine = create_engine(self._settings.database_url, pool_size=5, max_overflow=5)
                    try:
                        self._vault = await LocalVault.open(self._settings, engine)
                    except BaseException:
                        await engine.dispose()
                        raise
                    self._engine = engine
        return self._vault

    async def vault_card(self, card: CardInput, *, owner_id: str) -> VaultedCard:
        return await (await self.local()).vault_card(card, owner_id=owner_id)

    async def get_card(self, card_id: str) -> VaultedCard:
        return await (await self.local()).get_card(card_id)

    async def update_card(
        self,
        card_id: str,
        *,
        pan: str | None = None,
        expiry_month: int | None = None,
        expiry_year: int | None = None,
    ) -> VaultedCard:
        local = await self.local()
        return await local.update_card(
            card_id, pan=pan, expiry_month=expiry_month, expiry_year=expiry_year
        )

    async def delete_card(self, card_id: str, *, reason: str) -> None:
        await (await self.local()).delete_card(card_id, reason=reason)

    async def issue_token(self, card_id: str, *, domain: TokenDomain) -> PaymentToken:
        return await (await self.local()).issue_token(card_id, domain=domain)

    async def get_token(self, token_id: str) -> PaymentToken:
        return await (await self.local()).get_token(token_id)

    async def list_tokens(self, card_id: str) -> list[PaymentToken]:
        return await (await self.local()).list_tokens(card_id)

    async def suspend_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await (await self.local()).suspend_token(token_id, reason=reason)

    async def resume_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await (await self.local()).resume_token(token_id, reason=reason)

    async def delete_token(self, token_id: str, *, reason: str) -> PaymentToken:
        return await (await self.local()).delete_token(token_id, reason=reason)

    async def cryptogram(self, request: CryptogramRequest) -> Cryptogram:
        return await (await self.local()).cryptogram(request)

    async def verify_cryptogram(self, cryptogram: Cryptogram, request: CryptogramRequest) -> bool:
        return await (await self.local()).verify_cryptogram(cryptogram, request)

    async def token_by_dpan(self, dpan: str) -> TokenOnNetwork | None:
        return await (await self.local()).token_by_dpan(dpan)

    async def detokenize(
        self,
        *,
        card_id: str | None = None,
        token_id: str | None = None,
        requester: str,
        purpose: DetokenizePurpose,
    ) -> CardSecret:
        local = await self.local()
        return await local.detokenize(
            card_id=card_id, token_id=token_id, requester=requester, purpose=purpose
        )

    async def aclose(self) -> None:
        async with self._lock:
            vault, engine, self._vault, self._engine = self._vault, self._engine, None, None
        if vault is not None:
            await vault.aclose()
        if engine is not None:
            await engine.dispose()
