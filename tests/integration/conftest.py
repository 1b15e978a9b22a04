"""Fixtures of the integration tests that are not the whole suite's: the vault process and the
`vault` fixture that runs a test on each `VaultClient` (tests/integration/vault_support.py)."""

from tests.integration.vault_support import vault, vault_process

__all__ = ["vault", "vault_process"]
