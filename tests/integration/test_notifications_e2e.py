"""End to end: a P2P transfer and a card payment reach push (APNs HTTP/2, FCM HTTP v1), e-mail
(SMTP, SES), SMS (Twilio) and the in-app inbox on the providers' local servers, exactly once, in
the recipient's locale; preferences and quiet hours are respected."""

from __future__ import annotations

import email
import email.policy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import SignedIn, fund
from tests.integration.notifications_support import (
    Providers,
    deliveries_of,
    enrol,
    execute,
    harness,
    localise,
    log_of,
    notifications_of,
    providers,
    verify_contacts,
)
from tests.integration.payment_methods_support import add_card
from tests.integration.payments_support import act, pay, payment_body
from tests.integration.transfer_support import send_ok

__all__ = ["providers"]

pytestmark = pytest.mark.usefixtures("network_simulator")


def _token(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _emails_to(providers: Providers, address: str) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(m.content, policy=email.policy.default)  # type: ignore[misc]
        for m in providers.smtp.messages
        if address in m.rcpt_tos
    ]


async def test_a_transfer_reaches_every_channel_once_in_the_recipients_locale(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await localise(client, bob, "de-DE", "Europe/Berlin")
    await verify_contacts(app, alice)
    await verify_contacts(app, bob)
    ios, android = _token("apns"), _token("fcm")
    await enrol(client, bob, "ios", ios)
    await enrol(client, bob, "android", android)
    r = await client.put(
        "/v1/me/notification-preferences",
        json={"categories": [{"category": "transfers", "channels": {"sms": True}}]},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    await fund(app, alice.user["id"], 100_000, "EUR")
    transfer = await send_ok(client, alice, 1_234, bob, "EUR")

    async with harness(app, **providers.settings()) as h:
        # Delivered twice (a redelivery) and dispatched twice: still once everywhere.
        await h.deliver(transfer["id"], times=2)
        await h.dispatch()
        await h.dispatch()

    (received,) = await notifications_of(app, bob, "transfer_received")
    assert received.locale == "de" and received.title == "Geld erhalten"
    assert received.body == "Alice Example hat dir 12,34\xa0€ gesendet."
    by_channel = await deliveries_of(app, received.id)
    assert sorted(by_channel) == ["email", "in_app", "push", "sms"]
    assert sorted(d.provider for d in by_channel["push"]) == ["apns", "fcm"]
    assert [d.status for d in by_channel["push"]] == ["sent", "sent"]
    assert by_channel["email"][0].status == "sent" and by_channel["sms"][0].status == "sent"
    # The inbox was told (`sent`); it is `delivered` when Bob sees it (read, or streamed).
    assert by_channel["in_app"][0].status == "sent"
    assert await log_of(app, by_channel["email"][0].id) == ["queued", "sending", "sent"]
    assert await log_of(app, by_channel["in_app"][0].id) == ["queued", "sending", "sent"]

    # APNs over HTTP/2 (TLS, ALPN h2), with the provider token and topic checked by the server.
    (push,) = [m for m in providers.apns.messages if m["token"] == ios]
    assert push["payload"]["aps"]["alert"]["title"] == "Geld erhalten"
    assert push["headers"]["apns-push-type"] == "alert"
    assert set(providers.apns.protocols) == {"h2"}
    (fcm,) = [m for m in providers.fcm.messages if m["token"] == android]
    assert fcm["notification"] == {"title": "Geld erhalten", "body": received.body}
    assert fcm["data"]["notification_id"] == received.id
    (mail,) = _emails_to(providers, bob.email)
    assert mail["Subject"] == "Alice Example hat dir 12,34\xa0€ gesendet"
    assert "Dein billfold-Team" in mail.get_content()
    (sms,) = [m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    assert sms["body"] == "billfold: Alice Example hat dir 12,34\xa0€ gesendet."

    # The sender is told in their own (English) locale, on their own channels (no devices).
    (sent,) = await notifications_of(app, alice, "transfer_sent")
    assert sent.body == "You sent €12.34 to Bob Example."
    (mail,) = _emails_to(providers, alice.email)
    assert mail["Subject"] == "You sent €12.34"

    inbox = await client.get("/v1/notifications", headers=bob.headers)
    assert inbox.status_code == 200
    assert [n["id"] for n in inbox.json()["data"]] == [received.id]
    count = await client.get("/v1/notifications/unread-count", headers=bob.headers)
    assert count.json() == {"unread": 1}
    r = await client.post(f"/v1/notifications/{received.id}/read", headers=bob.headers)
    assert r.status_code == 200, r.text
    in_app = ["queued", "sending", "sent", "delivered"]
    assert await log_of(app, by_channel["in_app"][0].id) == in_app


async def test_a_card_payment_is_pushed_mailed_through_ses_and_kept_in_the_inbox(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn
) -> None:
    providers.reset()
    await localise(client, alice, "en-US", "America/New_York")
    await verify_contacts(app, alice)
    ios = _token("apns")
    await enrol(client, alice, "ios", ios)
    r = await client.put(
        "/v1/me/notification-preferences",
        json={"categories": [{"category": "payments", "channels": {"email": True}}]},
        headers=alice.headers,
    )
    assert r.status_code == 200, r.text
    method = await add_card(client, alice)
    r = await pay(client, alice, payment_body("card", method["id"], amount=1_234))
    assert r.status_code == 201, r.text
    payment = r.json()
    assert payment["status"] == "authorized", payment
    assert (
        await act(client, alice, payment["id"], "capture", {"amount": 1_234})
    ).status_code == 201
    r = await act(client, alice, payment["id"], "refunds", {"amount": 234})
    assert r.status_code == 201, r.text

    async with harness(app, **providers.settings(email="ses")) as h:
        await h.deliver(payment["id"], times=2)
        await h.dispatch()

    kinds = [n.kind for n in await notifications_of(app, alice)]
    assert kinds.count("payment_authorized") == 1 and kinds.count("payment_refunded") == 1
    # One dispatch pass sends its due deliveries side by side: each exactly once, in any order.
    pushes = [m["payload"]["aps"]["alert"] for m in providers.apns.messages if m["token"] == ios]
    assert sorted(pushes, key=lambda alert: alert["title"]) == [
        {"title": "Payment approved", "body": "$12.34 at Blue Bottle Coffee."},
        {"title": "Refund received", "body": "Blue Bottle Coffee refunded $2.34."},
    ]
    mails = [m for m in providers.ses_messages() if alice.email in m.destinations["ToAddresses"]]
    assert sorted(m.subject for m in mails) == [
        "Blue Bottle Coffee refunded $2.34",
        "Payment of $12.34 at Blue Bottle Coffee",
    ]
    assert providers.smtp.messages == []  # SES was the configured e-mail provider
    (authorized,) = await notifications_of(app, alice, "payment_authorized")
    by_channel = await deliveries_of(app, authorized.id)
    assert by_channel["email"][0].provider == "ses" and by_channel["email"][0].status == "sent"
    assert by_channel["email"][0].provider_message_id


def _window_around_now(timezone: str) -> dict[str, str]:
    local = datetime.now(UTC).astimezone(ZoneInfo(timezone))
    return {
        "start": (local - timedelta(hours=1)).strftime("%H:%M"),
        "end": (local + timedelta(hours=1)).strftime("%H:%M"),
    }


async def test_quiet_hours_hold_push_and_sms_but_not_security_alerts(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await localise(client, bob, "en", "Asia/Tokyo")
    await verify_contacts(app, bob)
    ios = _token("apns")
    await enrol(client, bob, "ios", ios)
    r = await client.put(
        "/v1/me/notification-preferences",
        json={
            "categories": [{"category": "transfers", "channels": {"sms": True}}],
            "quiet_hours": _window_around_now("Asia/Tokyo"),
        },
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["quiet_hours"] == _window_around_now("Asia/Tokyo")
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 500, bob)

    async with harness(app, **providers.settings()) as h:
        await h.deliver(transfer["id"])
        await h.dispatch()
        (received,) = await notifications_of(app, bob, "transfer_received")
        by_channel = await deliveries_of(app, received.id)
        held = [*by_channel["push"], *by_channel["sms"]]
        assert [d.status for d in held] == ["queued", "queued"]
        for d in held:
            # Released at the end of the window, a little under an hour from now.
            assert (
                timedelta(minutes=55) < d.next_attempt_at - datetime.now(UTC) <= timedelta(hours=1)
            )
        assert by_channel["email"][0].status == "sent"
        assert by_channel["in_app"][0].status == "sent"
        assert not [m for m in providers.apns.messages if m["token"] == ios]
        assert not [m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]

        # A security alert (the device enrolled above) is not held.
        await h.deliver(bob.user["id"])
        await h.dispatch()
        (alert,) = await notifications_of(app, bob, "new_device")
        assert [d.status for d in (await deliveries_of(app, alert.id))["push"]] == ["sent"]

        # The window ends: the held messages go out.
        await execute(
            app,
            "UPDATE notifications.deliveries SET next_attempt_at = now() WHERE id = ANY(:ids)",
            ids=[d.id for d in held],
        )
        await h.dispatch()
    by_channel = await deliveries_of(app, received.id)
    assert [d.status for d in [*by_channel["push"], *by_channel["sms"]]] == ["sent", "sent"]
    assert len([m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]) == 1


async def test_switched_off_channels_are_not_used(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await verify_contacts(app, bob)
    await enrol(client, bob, "android", _token("fcm"))
    r = await client.put(
        "/v1/me/notification-preferences",
        json={
            "categories": [{"category": "transfers", "channels": {"push": False, "email": False}}]
        },
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 700, bob)
    async with harness(app, **providers.settings()) as h:
        await h.deliver(transfer["id"])
        await h.dispatch()
    (received,) = await notifications_of(app, bob, "transfer_received")
    assert sorted(await deliveries_of(app, received.id)) == ["in_app"]
    assert providers.fcm.messages == [] and _emails_to(providers, bob.email) == []
