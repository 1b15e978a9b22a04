"""The Token Vault: PANs under envelope encryption (KEK in a PKCS#11 HSM), EMV payment tokens,
cryptograms and audited detokenisation. Others use it only through `VaultClient`."""

from billfold.vault.client import VaultClient
from billfold.vault.models import (
    CardInput,
    CardNotFound,
    CardSecret,
    Channel,
    Cryptogram,
    CryptogramRequest,
    DetokenizePurpose,
    InvalidTokenTransition,
    PaymentToken,
    TokenDomain,
    TokenDomainViolation,
    TokenNotActive,
    TokenNotFound,
    TokenStatus,
    VaultedCard,
)

__all__ = [
    "CardInput",
    "CardNotFound",
    "CardSecret",
    "Channel",
    "Cryptogram",
    "CryptogramRequest",
    "DetokenizePurpose",
    "InvalidTokenTransition",
    "PaymentToken",
    "TokenDomain",
    "TokenDomainViolation",
    "TokenNotActive",
    "TokenNotFound",
    "TokenStatus",
    "VaultClient",
    "VaultedCard",
]
