"""The `billfold` command refuses development conveniences in production (no servers needed)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from billfold import cli
from billfold.users.seed import SeedRefused, check_seed_allowed

# No URLs: a command that got past its production check would stop at `_require_urls`.
PRODUCTION = {
    "BILLFOLD_ENVIRONMENT": "production",
    "BILLFOLD_DATABASE_URL": None,
    "BILLFOLD_REDIS_URL": None,
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_seed_is_refused_in_production(runner):
    result = runner.invoke(cli.app, ["seed"], env=PRODUCTION)
    assert result.exit_code == 2, result.output
    assert "refusing to create the demo users in production" in result.output
    assert "--allow-production" in result.output
    assert "BILLFOLD_DATABASE_URL" not in result.output  # refused before anything else


def test_seed_in_production_with_allow_production_gets_past_the_refusal(runner):
    result = runner.invoke(cli.app, ["seed", "--allow-production"], env=PRODUCTION)
    # Past the refusal: what stops it now is the missing database, not the environment.
    assert "refusing" not in result.output
    assert result.exit_code == 2 and "BILLFOLD_DATABASE_URL" in result.output


def test_seed_outside_production_is_not_refused(runner):
    env = {**PRODUCTION, "BILLFOLD_ENVIRONMENT": "staging"}
    result = runner.invoke(cli.app, ["seed"], env=env)
    assert "refusing" not in result.output
    assert "BILLFOLD_DATABASE_URL" in result.output


def test_up_is_refused_in_production(runner, monkeypatch, tmp_path):
    from billfold.platform import embedded

    def must_not_start(*args, **kwargs):
        raise AssertionError("billfold up started servers in production")

    monkeypatch.setattr(embedded, "start_embedded", must_not_start)
    result = runner.invoke(cli.app, ["up", "--data-dir", str(tmp_path)], env=PRODUCTION)
    assert result.exit_code == 2, result.output
    assert "development only" in result.output
    assert not isinstance(result.exception, AssertionError)


def test_seed_use_case_refuses_production_too():
    with pytest.raises(SeedRefused, match="production"):
        check_seed_allowed("production")
    check_seed_allowed("production", allow_production=True)
    check_seed_allowed("development")


def test_vault_refuses_half_a_tls_configuration(runner):
    result = runner.invoke(cli.app, ["vault", "--ssl-certfile", "vault.crt"], env=PRODUCTION)
    assert result.exit_code == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in result.output
    result = runner.invoke(cli.app, ["vault", "--ssl-ca-certs", "ca.crt"], env=PRODUCTION)
    assert result.exit_code == 2


def test_vault_in_production_needs_its_secrets(runner, tmp_path):
    env = {
        **PRODUCTION,
        "BILLFOLD_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "BILLFOLD_DATA_DIR": str(tmp_path),
        "BILLFOLD_SECRET_KEY": None,
        "BILLFOLD_VAULT_SERVICE_KEY": None,
    }
    result = runner.invoke(cli.app, ["vault"], env=env)
    assert result.exit_code == 2, result.output
    assert "BILLFOLD_SECRET_KEY must be set in production" in result.output
    env["BILLFOLD_SECRET_KEY"] = "A" * 43 + "="
    result = runner.invoke(cli.app, ["vault"], env=env)
    assert result.exit_code == 2, result.output
    assert "BILLFOLD_VAULT_SERVICE_KEY must be set in production" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing generated in production
    for command in (["vault"], ["vault", "rotate-kek"]):
        result = runner.invoke(cli.app, command, env={**env, "BILLFOLD_DATABASE_URL": None})
        assert result.exit_code == 2 and "BILLFOLD_DATABASE_URL" in result.output
