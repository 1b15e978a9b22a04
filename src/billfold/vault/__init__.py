"""The Token Vault: PANs under envelope encryption (KEK in a PKCS#11 HSM), EMV payment tokens,
cryptograms and audited detokenisation. Others use it only through `VaultClient`."""

from billfold.vault.client import VaultClient
from billfold.vault.keys import RotationReport
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
    TokenOnNetwork,
    TokenStatus,
    VaultedCard,
)
from billfold.vault.service import CardNumberTaken, LocalVault, rotate_kek

__all__ = [
    "CardInput",
    "CardNotFound",
    "CardNumberTaken",
    "CardSecret",
    "Channel",
    "Cryptogram",
    "CryptogramRequest",
    "DetokenizePurpose",
    "InvalidTokenTransition",
    "LocalVault",
    "PaymentToken",
    "RotationReport",
    "TokenDomain",
    "TokenDomainViolation",
    "TokenNotActive",
    "TokenNotFound",
    "TokenOnNetwork",
    "TokenStatus",
    "VaultClient",
    "VaultedCard",
    "rotate_kek",
]
