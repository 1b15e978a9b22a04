"""Channel clients on their own, against servers that insist on what production ones do: SMTP
with STARTTLS required (certificate checked against the CA we name)."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from billfold.notifications.channels import Message, SmtpChannel
from tests.support.notification_servers import FakeSmtp, make_tls


async def test_smtp_sends_over_starttls_and_a_server_requiring_it_refuses_plain_text(
    tmp_path: Path,
) -> None:
    ca, cert, key = make_tls(tmp_path)
    server = FakeSmtp(tls=(cert, key))
    server.start()
    try:
        message = Message(
            "dlv_test",
            "ada@example.com",
            {"subject": "Grüße", "text": "Hallo Ada,\n\n12,34 € sind angekommen."},
        )
        secure = SmtpChannel(
            "127.0.0.1",
            server.port,
            "billfold <no-reply@billfold.example>",
            starttls=True,
            ca_file=str(ca),
        )
        outcome = await secure.send(message)
        assert outcome.status == "sent" and outcome.provider_message_id
        (received,) = server.messages
        assert received.over_tls and received.rcpt_tos == ["ada@example.com"]
        parsed = email.message_from_bytes(received.content, policy=email.policy.default)
        assert parsed["Subject"] == "Grüße"
        assert "12,34 € sind angekommen." in parsed.get_content()  # type: ignore[attr-defined]
        assert parsed["Message-ID"] == outcome.provider_message_id

        plain = await SmtpChannel(
            "127.0.0.1", server.port, "no-reply@billfold.example", starttls=False
        ).send(message)
        assert plain.status == "failed" and plain.error == "smtp 530"
        # An untrusted certificate is not accepted: retried later, never sent in the clear.
        untrusted = await SmtpChannel(
            "127.0.0.1", server.port, "no-reply@billfold.example", starttls=True
        ).send(message)
        assert untrusted.status == "retry"
        assert len(server.messages) == 1
    finally:
        server.stop()
