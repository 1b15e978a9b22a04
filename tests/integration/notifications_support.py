"""Fixtures and helpers of the notification tests: the providers' local servers (FCM, APNs,
Twilio, SMTP, SES on moto), a notification runtime configured for them, the consumer run on the
real outbox rows, the dispatcher, and readers of the deliveries."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends
from sqlalchemy import text

from billfold import notifications
from billfold.platform.bus.consumers import ConsumerSink
from tests.conftest import SignedIn, free_port
from tests.integration.transfer_support import outbox_envelopes
from tests.support.notification_servers import FakeApns, FakeFcm, FakeSmtp, FakeTwilio

SES_REGION = "eu-west-1"
SENDER = "billfold <no-reply@billfold.example>"
SENDER_ADDRESS = "no-reply@billfold.example"

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass
class Providers:
    fcm: FakeFcm
    apns: FakeApns
    twilio: FakeTwilio
    smtp: FakeSmtp
    ses_url: str
    directory: Path

    def settings(self, email: str = "smtp", **overrides: Any) -> dict[str, Any]:
        """Settings that point every channel at the local servers."""
        account = self.directory / "fcm-service-account.json"
        account.write_text(json.dumps(self.fcm.service_account()))
        values: dict[str, Any] = {
            "fcm_service_account_file": str(account),
            "fcm_endpoint": self.fcm.url,
            "apns_key_file": str(self.apns.key_file()),
            "apns_key_id": self.apns.key_id,
            "apns_team_id": self.apns.team_id,
            "apns_topic": self.apns.topic,
            "apns_endpoint": self.apns.url,
            "apns_ca_file": str(self.apns.ca_file),
            "email_provider": email,
            "email_from": SENDER,
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtp.port,
            # The local server speaks plain SMTP; production keeps STARTTLS on (the default).
            "smtp_starttls": False,
            "ses_region": SES_REGION,
            "ses_endpoint_url": self.ses_url,
            "twilio_account_sid": self.twilio.account_sid,
            "twilio_auth_token": self.twilio.auth_token,
            "twilio_from": self.twilio.sender,
            "twilio_endpoint": self.twilio.url,
            "notifications_retry_base_seconds": 0.01,
        }
        values.update(overrides)
        return values

    def ses_messages(self) -> list[Any]:
        return list(ses_backends[DEFAULT_ACCOUNT_ID][SES_REGION].sent_messages)

    def reset(self) -> None:
        for fake in (self.fcm, self.apns, self.twilio, self.smtp):
            fake.messages.clear()
        self.fcm.unregistered.clear()
        self.fcm.unavailable.clear()
        self.apns.unregistered.clear()
        self.twilio.invalid.clear()
        self.twilio.undeliverable.clear()
        self.twilio.reports.clear()
        self.twilio.report = self.twilio.report_first = False
        ses_backends[DEFAULT_ACCOUNT_ID][SES_REGION].sent_messages.clear()


@contextlib.contextmanager
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(_AWS_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
async def providers() -> AsyncIterator[Providers]:
    """Every provider's local server, for the module."""
    with tempfile.TemporaryDirectory(prefix="billfold-notify-") as d, _aws_env():
        directory = Path(d)
        fcm, apns, twilio, smtp = FakeFcm(), FakeApns(directory), FakeTwilio(), FakeSmtp()
        port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        ses_url = f"http://127.0.0.1:{port}"
        # SES sends only from a verified identity (moto checks it too).
        ses = boto3.client("sesv2", region_name=SES_REGION, endpoint_url=ses_url)
        ses.create_email_identity(EmailIdentity=SENDER_ADDRESS)
        await fcm.start()
        await apns.start()
        await twilio.start()
        smtp.start()
        try:
            yield Providers(fcm, apns, twilio, smtp, ses_url, directory)
        finally:
            smtp.stop()
            await twilio.stop()
            await apns.stop()
            await fcm.stop()
            moto.stop()


class Harness:
    """The notification consumer and dispatcher of one configuration, on the test app."""

    def __init__(self, app: Any, **overrides: Any) -> None:
        settings = app.state.p2p.settings.model_copy(update=overrides)
        self.app = app
        self.rt = notifications.NotificationsRuntime(settings, app.state.users.sealed)
        self.engine = app.state.resources.engine
        self.sink = ConsumerSink(self.engine, notifications.consumers(self.rt), backoff_seconds=0)
        self.dispatcher = notifications.build_dispatcher(
            self.engine, self.rt, app.state.resources.redis
        )

    async def deliver(self, *subjects: str, times: int = 1) -> int:
        """Run the consumer on every outbox event about `subjects` (`times` over)."""
        found = await outbox_envelopes(self.app, list(subjects))
        for _ in range(times):
            for event in found:
                await self.sink(event)
        dead = await sql(
            self.app,
            "SELECT error FROM platform.dead_letters WHERE consumer = 'notifications' "
            "AND event_id = ANY(:ids)",
            ids=[e["id"] for e in found],
        )
        assert dead == [], dead
        return len(found)

    async def dispatch(self) -> int:
        return await self.dispatcher.drain()

    async def aclose(self) -> None:
        await self.dispatcher.aclose()


@contextlib.asynccontextmanager
async def harness(app: Any, **overrides: Any) -> AsyncIterator[Harness]:
    h = Harness(app, **overrides)
    try:
        yield h
    finally:
        await h.aclose()


async def sql(app: Any, query: str, **params: Any) -> list[Any]:
    async with app.state.resources.engine.connect() as conn:
        return list((await conn.execute(text(query), params)).all())


async def execute(app: Any, statement: str, **params: Any) -> None:
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(text(statement), params)


async def notifications_of(app: Any, who: SignedIn, kind: str | None = None) -> list[Any]:
    return await sql(
        app,
        "SELECT * FROM notifications.notifications WHERE user_id = :u "
        "AND (CAST(:k AS text) IS NULL OR kind = :k) ORDER BY id",
        u=who.user["id"],
        k=kind,
    )


async def deliveries_of(app: Any, notification_id: str) -> dict[str, list[Any]]:
    rows = await sql(
        app,
        "SELECT * FROM notifications.deliveries WHERE notification_id = :n ORDER BY id",
        n=notification_id,
    )
    out: dict[str, list[Any]] = {}
    for r in rows:
        out.setdefault(r.channel, []).append(r)
    return out


async def log_of(app: Any, delivery_id: str) -> list[str]:
    rows = await sql(
        app,
        "SELECT status FROM notifications.delivery_log WHERE delivery_id = :d ORDER BY id",
        d=delivery_id,
    )
    return [r.status for r in rows]


async def enrol(
    client: httpx.AsyncClient, who: SignedIn, platform: str, push_token: str
) -> dict[str, Any]:
    r = await client.post(
        "/v1/devices",
        json={"name": f"{platform} phone", "platform": platform, "push_token": push_token},
        headers=who.headers,
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def localise(client: httpx.AsyncClient, who: SignedIn, locale: str, timezone: str) -> None:
    r = await client.patch(
        "/v1/me", json={"locale": locale, "timezone": timezone}, headers=who.headers
    )
    assert r.status_code == 200, r.text


async def verify_contacts(app: Any, who: SignedIn) -> None:
    """Mark the user's e-mail and phone verified (the verification flow is tested on its own)."""
    async with app.state.resources.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE users.users SET email_verified_at = now(), phone_verified_at = now() "
                "WHERE id = :u"
            ),
            {"u": who.user["id"]},
        )
