"""Production refuses configurations that would expose card data: no vault URL (the API would
open the HSM itself), a plain-HTTP vault URL or one without client certificates, a software key
store in the vault. Exit code 2 from the CLI, before anything starts (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from billfold import cli
from billfold.config import Settings
from billfold.platform.keys import KeyStoreError, open_keystore
from billfold.vault.connect import vault_client

SAFE_API = {
    "BILLFOLD_ENVIRONMENT": "production",
    "BILLFOLD_DATABASE_URL": None,
    "BILLFOLD_REDIS_URL": None,
    "BILLFOLD_VAULT_URL": "https://vault.internal:8700",
    "BILLFOLD_VAULT_CLIENT_CERT_FILE": "/etc/billfold/vault-tls/tls.crt",
    "BILLFOLD_VAULT_CLIENT_KEY_FILE": "/etc/billfold/vault-tls/tls.key",
    "BILLFOLD_VAULT_KEYSTORE": "pkcs11",
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", [["serve"], ["worker"]])
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"BILLFOLD_VAULT_URL": ""}, "BILLFOLD_VAULT_URL must be set"),
        ({"BILLFOLD_VAULT_URL": "http://vault.internal:8700"}, "must be https://"),
        ({"BILLFOLD_VAULT_CLIENT_CERT_FILE": ""}, "BILLFOLD_VAULT_CLIENT_CERT_FILE"),
        ({"BILLFOLD_VAULT_CLIENT_KEY_FILE": ""}, "BILLFOLD_VAULT_CLIENT_KEY_FILE"),
    ],
)
def test_the_api_and_worker_refuse_an_unsafe_vault_in_production(
    runner: CliRunner, command: list[str], change: dict[str, str], expected: str
) -> None:
    result = runner.invoke(cli.app, command, env={**SAFE_API, **change})
    assert result.exit_code == 2, result.output
    assert "refusing to start" in result.output and expected in result.output
    assert "BILLFOLD_DATABASE_URL" not in result.output  # refused before anything else


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["vault"]])
def test_a_safe_production_configuration_gets_past_the_guard(
    runner: CliRunner, command: list[str]
) -> None:
    result = runner.invoke(cli.app, command, env=SAFE_API)
    # What stops it now is the missing database, not the guard.
    assert "refusing to start" not in result.output
    assert result.exit_code == 2 and "BILLFOLD_DATABASE_URL" in result.output


def test_the_vault_refuses_the_software_key_store_in_production(runner: CliRunner) -> None:
    env = {**SAFE_API, "BILLFOLD_VAULT_KEYSTORE": "software"}
    for command in (["vault"], ["vault", "rotate-kek"]):
        result = runner.invoke(cli.app, command, env=env)
        assert result.exit_code == 2, result.output
        assert "BILLFOLD_VAULT_KEYSTORE=software" in result.output


def test_outside_production_nothing_is_refused() -> None:
    for environment in ("development", "test", "staging"):
        settings = Settings(environment=environment, vault_url="", vault_keystore="software")
        assert settings.production_errors("api") == []
        assert settings.production_errors("vault") == []


def test_the_library_refuses_too_whoever_calls_it(tmp_path: Path) -> None:
    """Not only the CLI: a process built some other way cannot open the software key store or
    the in-process vault in production."""
    production = Settings(
        environment="production", data_dir=tmp_path, secret_key="x" * 44, vault_url=""
    )
    with pytest.raises(KeyStoreError):
        open_keystore(production.model_copy(update={"vault_keystore": "software"}))
    with pytest.raises(RuntimeError, match="BILLFOLD_VAULT_URL"):
        vault_client(production)
