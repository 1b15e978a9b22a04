"""One-time codes (contact verification, step-up, password reset) travel sealed: the users
service seals each for the notification service (AES-256-GCM, `sealed_code` with its kid), so
neither the outbox row nor the Kafka record holds it, nor anything the notification service
stores; the dispatcher opens it only to send it, and the e-mail or SMS carries the right code."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from billfold.config import Settings
from billfold.platform.bus.kafka import KafkaConfig, KafkaPublisher, KafkaRelay
from billfold.platform.db import unit_of_work
from billfold.platform.events import Event, record_event
from billfold.platform.ids import new_id
from tests.conftest import SignedIn
from tests.integration.notifications_support import (
    Providers,
    deliveries_of,
    harness,
    notifications_of,
    providers,
    sql,
    verify_contacts,
)
from tests.integration.test_event_bus_kafka import bus_settings, read_topic
from tests.integration.test_mfa import start

__all__ = ["bus_settings", "providers"]

CODE_TYPES = (
    "billfold.users.verification.requested",
    "billfold.users.password_reset.requested",
    "billfold.users.step_up.code_requested",
)


def _code(message: str) -> str:
    found = re.search(r"code is (\d{6})", message)
    assert found is not None, message
    return found.group(1)


async def _schema_dump(app: Any) -> str:
    return json.dumps(
        [
            [list(r) for r in await sql(app, f"SELECT * FROM notifications.{table}")]
            for table in ("notifications", "deliveries", "delivery_log")
        ],
        default=lambda v: bytes(v).hex() if isinstance(v, (bytes, memoryview)) else str(v),
    )


async def test_codes_are_sealed_on_the_outbox_and_kafka_and_arrive_right(
    client: httpx.AsyncClient,
    app: Any,
    providers: Providers,
    bob: SignedIn,
    bus_settings: Settings,
) -> None:
    providers.reset()
    user_id = bob.user["id"]
    email = await client.post(
        "/v1/me/verifications", json={"channel": "email"}, headers=bob.headers
    )
    assert email.status_code == 201, email.text
    reset = await client.post("/v1/auth/password-reset", json={"email": bob.email})
    assert reset.status_code == 202, reset.text
    await verify_contacts(app, bob)
    challenge = await start(client, bob, "sms", purpose="transfer", reference="p2p_abc")
    assert challenge.status_code == 201, challenge.text

    rows = await sql(
        app,
        "SELECT type, data FROM platform.outbox WHERE subject = :u AND type = ANY(:t) ORDER BY seq",
        u=user_id,
        t=list(CODE_TYPES),
    )
    assert sorted(r.type for r in rows) == sorted(CODE_TYPES)
    for r in rows:
        assert "code" not in r.data
        assert set(r.data["sealed_code"]) == {"kid", "ciphertext"}

    # The relay publishes them to Kafka as they are in the outbox.
    publisher = KafkaPublisher(KafkaConfig.from_settings(bus_settings))
    await publisher.start()
    try:
        relay = KafkaRelay(app.state.resources.engine, bus_settings.database_url, publisher)
        while await relay.relay_once():
            pass
    finally:
        await publisher.stop()
    (count,) = await sql(
        app, "SELECT count(*) AS n FROM platform.outbox WHERE aggregate_id = :u", u=user_id
    )
    config = KafkaConfig.from_settings(bus_settings)
    records = await read_topic(config, config.topic(CODE_TYPES[0]), count.n, [user_id])
    published = [json.loads(r.value) for r in records]
    assert {e["type"] for e in published} >= set(CODE_TYPES)

    async with harness(app, **providers.settings()) as h:
        await h.deliver(user_id)
        queued = await _schema_dump(app)
        await h.dispatch()

    mails = [m for m in providers.smtp.messages if bob.email in m.rcpt_tos]
    texts = [m["body"] for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    assert len(mails) == 2 and len(texts) == 1
    codes = [_code(m.content.decode()) for m in mails] + [_code(t) for t in texts]

    # Each code works where it was issued: the users service sealed the one it issued.
    r = await client.post(
        f"/v1/auth/step-up/challenges/{challenge.json()['id']}/verify",
        json={"code": codes[2]},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    # The two e-mails are the verification and the reset (in either order); a reset signs
    # every session out, so it goes last.
    verified = []
    for code in codes[:2]:
        r = await client.post(
            f"/v1/me/verifications/{email.json()['id']}/confirm",
            json={"code": code},
            headers=bob.headers,
        )
        verified.append(r.status_code == 200)
    assert sorted(verified) == [False, True]
    r = await client.post(
        "/v1/auth/password-reset/confirm",
        json={
            "reset_id": reset.json()["reset_id"],
            "code": codes[verified.index(False)],
            "new_password": "another long passphrase 42",
        },
    )
    assert r.status_code == 204, r.text

    # No code in clear anywhere: outbox, Kafka, the notification service's tables (queued
    # or sent), the inbox.
    outbox = json.dumps([r.data for r in rows])
    on_kafka = json.dumps(published)
    after = await _schema_dump(app)
    for code in codes:
        for place in (outbox, on_kafka, queued, after):
            assert code not in place
    secret = await notifications_of(app, bob, "verification_code")
    assert len(secret) == 3 and all(not n.in_app and n.body == "" for n in secret)


async def test_a_sealed_code_moved_to_another_address_does_not_open(
    client: httpx.AsyncClient, app: Any, providers: Providers, bob: SignedIn
) -> None:
    """The seal binds the code to its event's user, reference, channel and address: an event
    that names another target (a tampered or forged one) sends nothing."""
    providers.reset()
    r = await client.post("/v1/me/verifications", json={"channel": "email"}, headers=bob.headers)
    assert r.status_code == 201, r.text
    (row,) = await sql(
        app,
        "SELECT data FROM platform.outbox WHERE subject = :u AND type = :t",
        u=bob.user["id"],
        t=CODE_TYPES[0],
    )
    forged = {**row.data, "verification_id": new_id("vrf")}
    forged["target"] = "mallory@example.com"
    async with unit_of_work(app.state.resources.engine) as uow:
        await record_event(
            await uow.connection(),
            Event(
                type=CODE_TYPES[0],
                source="/billfold/users",
                subject=f"forged-{bob.user['id']}",
                data=forged,
            ),
        )
    async with harness(app, **providers.settings()) as h:
        await h.deliver(f"forged-{bob.user['id']}")
        await h.dispatch()
    assert not [m for m in providers.smtp.messages if "mallory@example.com" in m.rcpt_tos]
    (notification,) = [
        n
        for n in await notifications_of(app, bob, "verification_code")
        if n.dedupe_key.endswith(forged["verification_id"])
    ]
    (delivery,) = (await deliveries_of(app, notification.id))["email"]
    assert (delivery.status, delivery.error) == ("failed", "the sealed content does not open")
    assert delivery.sealed_content is None
