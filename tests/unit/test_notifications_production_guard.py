"""Production refuses notification transports that would carry messages (one-time codes among
them) in clear: SMTP without STARTTLS, an http:// FCM, APNs, Twilio or SES endpoint, or an
http:// public URL for Twilio's receipts. Exit code 2 from the CLI before anything starts, and
the dispatcher refuses too when built some other way."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from billfold import cli, notifications
from billfold.config import Settings
from billfold.platform.keys import SealedBox

SAFE = {
    "BILLFOLD_ENVIRONMENT": "production",
    "BILLFOLD_DATABASE_URL": None,
    "BILLFOLD_REDIS_URL": None,
    "BILLFOLD_VAULT_URL": "https://vault.internal:8700",
    "BILLFOLD_VAULT_CLIENT_CERT_FILE": "/etc/billfold/vault-tls/tls.crt",
    "BILLFOLD_VAULT_CLIENT_KEY_FILE": "/etc/billfold/vault-tls/tls.key",
    "BILLFOLD_PUBLIC_URL": "https://api.billfold.example",
    "BILLFOLD_EMAIL_PROVIDER": "smtp",
    "BILLFOLD_SMTP_HOST": "smtp.billfold.example",
    "BILLFOLD_FCM_SERVICE_ACCOUNT_FILE": "/etc/billfold/fcm.json",
    "BILLFOLD_APNS_KEY_FILE": "/etc/billfold/apns.p8",
    "BILLFOLD_TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
    "BILLFOLD_TWILIO_AUTH_TOKEN": "token",
}


@pytest.mark.parametrize("command", [["serve"], ["worker"]])
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"BILLFOLD_SMTP_STARTTLS": "false"}, "BILLFOLD_SMTP_STARTTLS=false"),
        ({"BILLFOLD_FCM_ENDPOINT": "http://fcm.internal"}, "BILLFOLD_FCM_ENDPOINT must be https"),
        ({"BILLFOLD_APNS_ENDPOINT": "http://apns.internal"}, "BILLFOLD_APNS_ENDPOINT must be"),
        ({"BILLFOLD_TWILIO_ENDPOINT": "http://twilio.internal"}, "BILLFOLD_TWILIO_ENDPOINT"),
        ({"BILLFOLD_PUBLIC_URL": "http://api.billfold.example"}, "BILLFOLD_PUBLIC_URL must be"),
        (
            {"BILLFOLD_EMAIL_PROVIDER": "ses", "BILLFOLD_SES_ENDPOINT_URL": "http://ses.internal"},
            "BILLFOLD_SES_ENDPOINT_URL must be https",
        ),
    ],
)
def test_production_refuses_notifications_in_clear(
    command: list[str], change: dict[str, str], expected: str
) -> None:
    result = CliRunner().invoke(cli.app, command, env={**SAFE, **change})
    assert result.exit_code == 2, result.output
    assert "refusing to start" in result.output and expected in result.output
    assert "BILLFOLD_DATABASE_URL" not in result.output  # refused before anything else


@pytest.mark.parametrize("command", [["serve"], ["worker"]])
def test_encrypted_transports_get_past_the_guard(command: list[str]) -> None:
    result = CliRunner().invoke(cli.app, command, env=SAFE)
    assert "refusing to start" not in result.output
    assert result.exit_code == 2 and "BILLFOLD_DATABASE_URL" in result.output


def test_unused_providers_and_other_environments_are_not_judged() -> None:
    # An http:// default of a provider that is not configured carries nothing.
    unused = Settings(environment="production", fcm_endpoint="http://x", email_provider="none")
    assert unused.notification_transport_errors() == []
    for environment in ("development", "test", "staging"):
        plain = Settings(environment=environment, email_provider="smtp", smtp_starttls=False)
        assert plain.notification_transport_errors() == []


def test_the_dispatcher_refuses_too_whoever_builds_it() -> None:
    settings = Settings(environment="production", email_provider="smtp", smtp_starttls=False)
    rt = notifications.NotificationsRuntime(settings, SealedBox(b"k" * 32))
    with pytest.raises(RuntimeError, match="BILLFOLD_SMTP_STARTTLS"):
        notifications.build_dispatcher(None, rt, None)  # type: ignore[arg-type]
