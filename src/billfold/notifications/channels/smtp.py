"""E-mail over SMTP with aiosmtplib: STARTTLS (and AUTH) in production, plain on a test server."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib

from billfold.notifications.channels.base import Message, Outcome, transient


def build_email(sender: str, message: Message) -> EmailMessage:
    """A text/plain UTF-8 e-mail of a delivery (its Message-ID names the delivery)."""
    email = EmailMessage()
    email["From"] = sender
    email["To"] = message.target
    email["Subject"] = message.content["subject"]
    email["Message-ID"] = make_msgid(idstring=message.delivery_id, domain="billfold")
    email.set_content(message.content["text"])
    return email


class SmtpChannel:
    provider = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        username: str = "",
        password: str = "",
        starttls: bool = True,
        ca_file: str = "",
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username or None
        self._password = password or None
        self._starttls = starttls
        self._ca_file = ca_file or None

    async def send(self, message: Message) -> Outcome:
        email = build_email(self._sender, message)
        try:
            await aiosmtplib.send(
                email,
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password,
                start_tls=self._starttls,
                cert_bundle=self._ca_file,
                timeout=15,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(400 <= c < 500 for c in codes):
                return Outcome("retry", error=f"smtp recipients refused {codes}")
            return Outcome("failed", error=f"smtp recipients refused {codes}")
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                return Outcome("retry", error=f"smtp {exc.code}")
            return Outcome("failed", error=f"smtp {exc.code}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            return transient(exc)
        return Outcome("sent", provider_message_id=email["Message-ID"])

    async def aclose(self) -> None:
        return None
