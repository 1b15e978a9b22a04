"""Deliveries against the providers' real error answers: dead push tokens are forgotten, a
security alert that cannot be pushed goes by SMS, transient errors are retried with backoff
and then dead-lettered; one-time codes are delivered but never stored in clear; dedupe, rate
limit, and the events that raise security, account, balance and loyalty notifications."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import uuid
from typing import Any

import httpx
import pytest

from billfold import users
from billfold.notifications.events import INVITATIONS_PER_SENDER_PER_DAY
from billfold.platform.db import unit_of_work
from billfold.platform.events import Event, record_event
from tests.conftest import SignedIn, fund, make_admin, new_phone, set_kyc_tier, sign_up
from tests.integration.notifications_support import (
    Providers,
    deliveries_of,
    enrol,
    execute,
    harness,
    log_of,
    notifications_of,
    providers,
    sql,
    verify_contacts,
)
from tests.integration.test_notifications_inbox import served
from tests.integration.transfer_support import send, send_ok
from tests.support.notification_servers import twilio_signature
from tests.support.one_time_codes import reveal_code

__all__ = ["providers", "served"]


def _token(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _push_token(app: Any, device_id: str) -> str | None:
    (row,) = await sql(app, "SELECT push_token FROM users.devices WHERE id = :d", d=device_id)
    return row.push_token  # type: ignore[no-any-return]


async def test_dead_push_tokens_are_forgotten_and_security_alerts_fall_back_to_sms(
    client: httpx.AsyncClient, app: Any, providers: Providers, bob: SignedIn
) -> None:
    providers.reset()
    await verify_contacts(app, bob)
    ios, android = _token("apns"), _token("fcm")
    providers.apns.unregistered.add(ios)  # APNs answers 410 Unregistered
    providers.fcm.unregistered.add(android)  # FCM answers 404 UNREGISTERED
    iphone = await enrol(client, bob, "ios", ios)
    pixel = await enrol(client, bob, "android", android)

    async with harness(app, **providers.settings()) as h:
        await h.deliver(bob.user["id"])  # device.enrolled x2: security alerts
        await h.dispatch()

    assert await _push_token(app, iphone["id"]) is None
    assert await _push_token(app, pixel["id"]) is None
    alerts = await notifications_of(app, bob, "new_device")
    assert len(alerts) == 2
    for alert in alerts:
        by_channel = await deliveries_of(app, alert.id)
        push = by_channel["push"]
        assert {d.status for d in push} == {"failed"}
        assert {d.error.split()[2] for d in push} == {"Unregistered", "UNREGISTERED"}
        (sms,) = by_channel["sms"]  # one fallback, however many pushes failed
        assert sms.status == "sent" and sms.fallback_of in {d.id for d in push}
        assert by_channel["email"][0].status == "sent"
    texts = [m["body"] for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    assert len(texts) == 2 and all("new device" in t for t in texts)
    assert providers.apns.messages == [] and providers.fcm.messages == []
    # The device is still there, only its token went.
    r = await client.get("/v1/devices", headers=bob.headers)
    devices = {d["id"]: d for d in r.json()["data"]}
    assert devices[iphone["id"]]["has_push_token"] is False


async def test_transient_errors_are_retried_with_backoff_then_dead_lettered(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    android = _token("fcm")
    providers.fcm.unavailable.add(android)  # 503 UNAVAILABLE every time
    await enrol(client, bob, "android", android)
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 100, bob)
    async with harness(app, **providers.settings(notifications_max_attempts=3)) as h:
        await h.deliver(transfer["id"])
        (received,) = await notifications_of(app, bob, "transfer_received")
        for _ in range(100):  # the retries come due 10 ms, then 20 ms after each failure
            await h.dispatch()
            (push,) = (await deliveries_of(app, received.id))["push"]
            if push.status == "failed":
                break
            assert push.status == "queued" and push.next_attempt_at > push.updated_at
            await asyncio.sleep(0.01)
        assert push.status == "failed" and push.attempts == 3
        assert push.error == "gave up after 3 attempts: fcm 503 UNAVAILABLE"
        assert await log_of(app, push.id) == [
            "queued",
            "sending",
            "retry",
            "sending",
            "retry",
            "sending",
            "failed",
        ]
        # Not a security alert: no SMS instead.
        assert "sms" not in await deliveries_of(app, received.id)

        # The dead letter is visible to an administrator, who can send it again.
        admin = await make_admin(app, client)
        r = await client.get(
            "/v1/admin/notifications/deliveries",
            params={"status": "failed", "user_id": bob.user["id"]},
            headers=admin.headers,
        )
        assert r.status_code == 200, r.text
        (listed,) = [d for d in r.json()["data"] if d["id"] == push.id]
        assert listed["log"][-1]["status"] == "failed"
        assert (
            await client.get("/v1/admin/notifications/deliveries", headers=bob.headers)
        ).status_code == 403
        providers.fcm.unavailable.clear()
        r = await client.post(
            f"/v1/admin/notifications/deliveries/{push.id}/retry", headers=admin.headers
        )
        assert r.status_code == 200 and r.json()["status"] == "queued"
        again = await client.post(
            f"/v1/admin/notifications/deliveries/{push.id}/retry", headers=admin.headers
        )
        assert again.status_code == 409 and again.json()["code"] == "delivery_not_retryable"
        await h.dispatch()
    (push,) = (await deliveries_of(app, received.id))["push"]
    assert push.status == "sent"
    assert [m["token"] for m in providers.fcm.messages] == [android]


async def test_an_invalid_number_fails_for_good_at_once(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await verify_contacts(app, bob)
    providers.twilio.invalid.add(bob.user["phone"])  # Twilio 400, code 21211
    await client.put(
        "/v1/me/notification-preferences",
        json={"categories": [{"category": "transfers", "channels": {"sms": True}}]},
        headers=bob.headers,
    )
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 100, bob)
    async with harness(app, **providers.settings()) as h:
        await h.deliver(transfer["id"])
        await h.dispatch()
    (received,) = await notifications_of(app, bob, "transfer_received")
    (sms,) = (await deliveries_of(app, received.id))["sms"]
    assert (sms.status, sms.attempts, sms.error) == ("failed", 1, "twilio 400 21211")


async def test_one_time_codes_are_delivered_but_never_kept_in_clear(
    client: httpx.AsyncClient, app: Any, providers: Providers, bob: SignedIn
) -> None:
    providers.reset()
    r = await client.post("/v1/me/verifications", json={"channel": "email"}, headers=bob.headers)
    assert r.status_code == 201, r.text
    verification_id = r.json()["id"]
    r = await client.post("/v1/me/verifications", json={"channel": "phone"}, headers=bob.headers)
    assert r.status_code == 201, r.text
    phone_verification = r.json()["id"]
    async with harness(app, **providers.settings()) as h:
        await h.deliver(bob.user["id"])
        (mail_code, sms_code) = await notifications_of(app, bob, "verification_code")
        (queued,) = (await deliveries_of(app, mail_code.id))["email"]
        assert queued.content is None and queued.sealed_content is not None
        await h.dispatch()

    (mail,) = [m for m in providers.smtp.messages if bob.email in m.rcpt_tos]
    code = re.search(rb"code is (\d{6})", mail.content)
    assert code is not None
    (sms,) = [m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    phone_code = re.search(r"code is (\d{6})", sms["body"])
    assert phone_code is not None
    # The codes work, so they are the ones the users service issued.
    r = await client.post(
        f"/v1/me/verifications/{verification_id}/confirm",
        json={"code": code.group(1).decode()},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v1/me/verifications/{phone_verification}/confirm",
        json={"code": phone_code.group(1)},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    # Nothing in the notifications schema holds them, and the inbox does not show them.
    for n in (mail_code, sms_code):
        assert not n.in_app and n.body == ""
        for d in [x for ds in (await deliveries_of(app, n.id)).values() for x in ds]:
            assert d.status == "sent" and d.sealed_content is None and d.content is None
    dump = json.dumps(
        [
            [list(r) for r in await sql(app, f"SELECT * FROM notifications.{table}")]
            for table in ("notifications", "deliveries", "delivery_log")
        ],
        default=str,
    )
    assert code.group(1).decode() not in dump and phone_code.group(1) not in dump
    inbox = await client.get("/v1/notifications", headers=bob.headers)
    assert all(n["kind"] != "verification_code" for n in inbox.json()["data"])


async def test_dedupe_survives_redelivery_and_a_forced_replay(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 100, bob)
    async with harness(app) as h:  # no provider configured: the inbox only
        await h.deliver(transfer["id"], times=3)
        # `events replay --force` clears the consumer's inbox rows: the dedupe key still holds.
        await execute(
            app,
            "DELETE FROM platform.inbox WHERE consumer = 'notifications' AND event_id IN "
            "(SELECT id FROM platform.outbox WHERE subject = :s)",
            s=transfer["id"],
        )
        await h.deliver(transfer["id"])
        await h.dispatch()
    assert len(await notifications_of(app, bob, "transfer_received")) == 1
    assert len(await notifications_of(app, alice, "transfer_sent")) == 1


async def test_past_the_hourly_budget_only_the_inbox_is_told(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    providers.reset()
    await verify_contacts(app, bob)
    await fund(app, alice.user["id"], 5_000)
    transfers = [await send_ok(client, alice, 100, bob) for _ in range(3)]
    async with harness(app, **providers.settings(notifications_rate_limit_per_hour=2)) as h:
        await h.deliver(*[t["id"] for t in transfers])
        await h.dispatch()
    statuses = []
    for n in await notifications_of(app, bob, "transfer_received"):
        by_channel = await deliveries_of(app, n.id)
        assert by_channel["in_app"][0].status == "sent"
        statuses.append((by_channel["email"][0].status, by_channel["email"][0].error))
    assert statuses == [("sent", None), ("sent", None), ("failed", "rate_limited")]
    assert len([m for m in providers.smtp.messages if bob.email in m.rcpt_tos]) == 2


async def test_low_balance_is_told_once_when_the_wallet_crosses_the_line(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 2_500)
    first = await send_ok(client, alice, 1_000, bob)  # 1,500 left: above the 1,000 line
    second = await send_ok(client, alice, 1_000, bob)  # 500 left: crossed
    third = await send_ok(client, alice, 100, bob)  # 400 left: already below
    # (The consumer runs after all three: it sees 400 each time and still tells it once.)
    async with harness(app) as h:
        await h.deliver(first["id"], second["id"], third["id"])
    (low,) = await notifications_of(app, alice, "low_balance")
    assert low.body == "Your USD balance is down to $4.00."
    # Back above the line (Bob pays her back), then below again: told again.
    back = await send_ok(client, bob, 2_000, alice)
    async with harness(app) as h:
        await h.deliver(back["id"])
        again = await send_ok(client, alice, 1_500, bob)
        await h.deliver(again["id"])
    assert [n.body for n in await notifications_of(app, alice, "low_balance")] == [
        "Your USD balance is down to $4.00.",
        "Your USD balance is down to $9.00.",
    ]


async def _record(app: Any, type_: str, subject: str, data: dict[str, Any]) -> None:
    async with unit_of_work(app.state.resources.engine) as uow:
        await record_event(
            await uow.connection(),
            Event(type=type_, source="/test", subject=subject, aggregate_id=subject, data=data),
        )


async def test_fraud_kyc_sign_in_and_tier_events_raise_their_notifications(
    client: httpx.AsyncClient, app: Any, providers: Providers, bob: SignedIn
) -> None:
    uid = bob.user["id"]
    decision = {"user_id": uid, "amount": 9_900, "currency": "USD", "subject_kind": "payment"}
    await _record(
        app,
        "billfold.fraud.decision.made",
        uid,
        {**decision, "decision_id": "dec_1", "subject_id": "txn_1", "action": "block"},
    )
    await _record(
        app,
        "billfold.fraud.decision.made",
        uid,
        {**decision, "decision_id": "dec_2", "subject_id": "txn_2", "action": "allow"},
    )
    await _record(
        app,
        "billfold.users.kyc.status_changed",
        uid,
        {
            "user_id": uid,
            "submission_id": "kyc_1",
            "from_status": "pending",
            "to_status": "verified",
        },
    )
    await _record(
        app,
        "billfold.loyalty.tier.changed",
        uid,
        {"user_id": uid, "from_tier": "green", "to_tier": "gold", "multiplier": 2},
    )
    # A second sign-in from another browser is news; the first one (at sign-up) was not.
    r = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": bob.email, "password": bob.password},
        headers={"User-Agent": "Firefox/140 on a new laptop"},
    )
    assert r.status_code == 200, r.text
    async with harness(app) as h:
        await h.deliver(uid)
    kinds = sorted(n.kind for n in await notifications_of(app, bob))
    assert kinds == ["fraud_block", "kyc_result", "new_sign_in", "tier_changed"]
    (block,) = await notifications_of(app, bob, "fraud_block")
    assert block.category == "security" and "$99.00 payment" in block.body
    (tier,) = await notifications_of(app, bob, "tier_changed")
    assert tier.title == "Your tier: Gold" and tier.body == "You are now Gold: 2\u00d7 points."


async def test_the_workers_sink_fills_the_inbox(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    """`jobs.event_sink` (what the relay feeds) runs the notification consumer."""
    from billfold import jobs

    await set_kyc_tier(app, alice.user["id"], 1)
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 250, bob)
    sink = jobs.event_sink(app.state.resources.engine, app.state.p2p)
    rows = await sql(
        app,
        "SELECT id, type, source, subject, time, data FROM platform.outbox WHERE subject = :s",
        s=transfer["id"],
    )
    for r in rows:
        await sink(
            {
                "id": r.id,
                "type": r.type,
                "source": r.source,
                "subject": r.subject,
                "time": r.time.isoformat(),
                "data": r.data,
            }
        )
    (received,) = await notifications_of(app, bob, "transfer_received")
    assert received.body == "Alice Example sent you $2.50."
    # No provider is configured in the test app: the inbox is the only channel.
    assert sorted(await deliveries_of(app, received.id)) == ["in_app"]


async def test_twilio_status_callbacks_mark_sms_delivered_or_failed(
    client: httpx.AsyncClient,
    app: Any,
    providers: Providers,
    alice: SignedIn,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    providers.reset()
    settings = app.state.resources.settings.model_copy(
        update={"twilio_auth_token": providers.twilio.auth_token}
    )
    monkeypatch.setattr(app.state.resources, "settings", settings)
    await verify_contacts(app, bob)
    await client.put(
        "/v1/me/notification-preferences",
        json={"categories": [{"category": "transfers", "channels": {"sms": True}}]},
        headers=bob.headers,
    )
    await fund(app, alice.user["id"], 5_000)
    one, two = (await send_ok(client, alice, 100, bob)), (await send_ok(client, alice, 100, bob))
    async with harness(app, **providers.settings()) as h:
        await h.deliver(one["id"], two["id"])
        await h.dispatch()
    first, second = [m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    url = f"{settings.public_url}/v1/notifications/webhooks/twilio"
    # Each message's callback names its delivery (Twilio signs the URL with its query).
    assert first["callback"].startswith(f"{url}?delivery=dlv_")

    async def callback(sid: str, status: str, signature: str | None = None) -> httpx.Response:
        form = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC" + "0" * 32}
        if status == "undelivered":
            form["ErrorCode"] = "30003"
        sig = signature or twilio_signature(providers.twilio.auth_token, url, form)
        return await client.post(
            "/v1/notifications/webhooks/twilio", data=form, headers={"X-Twilio-Signature": sig}
        )

    forged = await callback(first["sid"], "delivered", signature="bm90IGEgc2lnbmF0dXJl")
    assert forged.status_code == 403 and forged.json()["code"] == "invalid_webhook_signature"
    assert (await callback(first["sid"], "sent")).status_code == 204  # not final: ignored
    assert (await callback(first["sid"], "delivered")).status_code == 204
    assert (await callback(second["sid"], "undelivered")).status_code == 204
    assert (await callback(first["sid"], "delivered")).status_code == 204  # a repeat: no change

    # Signed by Twilio but about no message of ours: 404; unsigned junk: 403; never a 500.
    unknown = await callback("SM" + "f" * 32, "delivered")
    assert unknown.status_code == 404 and unknown.json()["code"] == "delivery_not_found"
    form = {"MessageSid": "SM" + "e" * 32, "MessageStatus": "delivered"}
    other = first["callback"].removeprefix(settings.public_url)
    signature = twilio_signature(providers.twilio.auth_token, first["callback"], form)
    r = await client.post(other, data=form, headers={"X-Twilio-Signature": signature})
    assert r.status_code == 404  # that delivery is another message
    junk_url = f"{url}?delivery=not-an-id"
    signature = twilio_signature(providers.twilio.auth_token, junk_url, form)
    r = await client.post(
        "/v1/notifications/webhooks/twilio?delivery=not-an-id",
        data=form,
        headers={"X-Twilio-Signature": signature},
    )
    assert r.status_code == 404
    for junk in (
        {"json": {"MessageSid": first["sid"], "MessageStatus": "failed"}},
        {"content": b"\xff\xfe", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        {"content": b""},
    ):
        r = await client.post("/v1/notifications/webhooks/twilio", **junk)  # type: ignore[arg-type]
        assert 400 <= r.status_code < 500 and r.headers["content-type"] == (
            "application/problem+json"
        ), r.text
    rows = await sql(
        app,
        "SELECT provider_message_id, status, error FROM notifications.deliveries "
        "WHERE provider_message_id = ANY(:ids)",
        ids=[first["sid"], second["sid"]],
    )
    outcome = {r.provider_message_id: (r.status, r.error) for r in rows}
    assert outcome == {
        first["sid"]: ("delivered", None),
        second["sid"]: ("failed", "twilio undelivered 30003"),
    }
    (row,) = await sql(
        app,
        "SELECT id FROM notifications.deliveries WHERE provider_message_id = :s",
        s=first["sid"],
    )
    assert await log_of(app, row.id) == ["queued", "sending", "sent", "delivered"]


async def test_a_late_delivered_report_settles_a_delivery_the_dispatcher_gave_up_on(
    client: httpx.AsyncClient,
    app: Any,
    providers: Providers,
    alice: SignedIn,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatcher fails a delivery whose sends never got an answer, while Twilio in fact
    had the message: its later `delivered` report is the truth, not a no-op."""
    providers.reset()
    settings = app.state.resources.settings.model_copy(
        update={"twilio_auth_token": providers.twilio.auth_token}
    )
    monkeypatch.setattr(app.state.resources, "settings", settings)
    await verify_contacts(app, bob)
    await client.put(
        "/v1/me/notification-preferences",
        json={"categories": [{"category": "transfers", "channels": {"sms": True}}]},
        headers=bob.headers,
    )
    await fund(app, alice.user["id"], 5_000)
    transfer = await send_ok(client, alice, 100, bob)
    async with harness(app, **providers.settings()) as h:
        await h.deliver(transfer["id"])
        await h.dispatch()
    (message,) = [m for m in providers.twilio.messages if m["to"] == bob.user["phone"]]
    (received,) = await notifications_of(app, bob, "transfer_received")
    (sms,) = (await deliveries_of(app, received.id))["sms"]
    # As the dispatcher leaves it after its last attempt timed out: failed, no Twilio id.
    await execute(
        app,
        "UPDATE notifications.deliveries SET status = 'failed', error = 'timeout', "
        "provider_message_id = NULL WHERE id = :d",
        d=sms.id,
    )
    url = message["callback"]
    form = {"MessageSid": message["sid"], "MessageStatus": "delivered"}
    r = await client.post(
        url.removeprefix(settings.public_url),
        data=form,
        headers={"X-Twilio-Signature": twilio_signature(providers.twilio.auth_token, url, form)},
    )
    assert r.status_code == 204, r.text
    (row,) = await sql(
        app,
        "SELECT status, error, provider_message_id FROM notifications.deliveries WHERE id = :d",
        d=sms.id,
    )
    assert (row.status, row.error, row.provider_message_id) == (
        "delivered",
        None,
        message["sid"],
    )


async def test_only_development_prints_one_time_codes(
    client: httpx.AsyncClient, app: Any, bob: SignedIn, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker's downstream sink prints codes in development (that line is the e-mail
    there); in production the notification service delivers them and nothing prints them."""
    import dataclasses

    from billfold import jobs

    r = await client.post("/v1/me/verifications", json={"channel": "email"}, headers=bob.headers)
    assert r.status_code == 201, r.text
    (row,) = await sql(
        app,
        "SELECT id, type, source, subject, time, data FROM platform.outbox WHERE subject = :u "
        "AND type = 'billfold.users.verification.requested'",
        u=bob.user["id"],
    )
    event = {
        "id": row.id,
        "type": row.type,
        "source": row.source,
        "subject": row.subject,
        "time": row.time.isoformat(),
        "data": row.data,
    }
    production = dataclasses.replace(
        app.state.p2p,
        settings=app.state.p2p.settings.model_copy(update={"environment": "production"}),
    )
    code = reveal_code(app, row.type, row.data)
    capsys.readouterr()
    await jobs.event_sink(app.state.resources.engine, production)(event)
    assert code not in capsys.readouterr().out
    await jobs.event_sink(app.state.resources.engine, app.state.p2p)(event)
    assert code in capsys.readouterr().out
    # Delivered twice, told once (the production and development sinks share the inbox).
    assert len(await notifications_of(app, bob, "verification_code")) == 1


@pytest.mark.parametrize("reports_first", [False, True], ids=["after-the-answer", "before-it"])
async def test_twilios_own_reports_settle_the_sms_delivery_log(
    served: str,
    client: httpx.AsyncClient,
    app: Any,
    providers: Providers,
    alice: SignedIn,
    bob: SignedIn,
    monkeypatch: pytest.MonkeyPatch,
    reports_first: bool,
) -> None:
    """The local Twilio calls each message's StatusCallback on the served API as Twilio does:
    Bob's SMS ends `delivered`, Alice's (an unreachable handset) `failed`. The reports may come
    before the dispatcher recorded Twilio's answer: the log is the same either way."""
    providers.reset()
    providers.twilio.report = True
    providers.twilio.report_first = reports_first
    overrides = {"twilio_auth_token": providers.twilio.auth_token, "public_url": served}
    monkeypatch.setattr(
        app.state.resources, "settings", app.state.resources.settings.model_copy(update=overrides)
    )
    transfers = []
    for sender, recipient in ((alice, bob), (bob, alice)):
        await verify_contacts(app, recipient)
        r = await client.put(
            "/v1/me/notification-preferences",
            json={"categories": [{"category": "transfers", "channels": {"sms": True}}]},
            headers=recipient.headers,
        )
        assert r.status_code == 200, r.text
        await fund(app, sender.user["id"], 5_000)
        transfers.append((await send_ok(client, sender, 100, recipient))["id"])
    providers.twilio.undeliverable.add(alice.user["phone"])
    async with harness(app, **providers.settings(public_url=served)) as h:
        await h.deliver(*transfers)
        await h.dispatch()
        await providers.twilio.reported()
    assert providers.twilio.reports and {code for _, code in providers.twilio.reports} == {204}

    outcome = {}
    for who in (bob, alice):
        (received,) = await notifications_of(app, who, "transfer_received")
        (sms,) = (await deliveries_of(app, received.id))["sms"]
        outcome[who.user["id"]] = (sms.status, sms.error, await log_of(app, sms.id))
        sent = {m["sid"] for m in providers.twilio.messages if m["to"] == who.user["phone"]}
        assert sms.provider_message_id in sent
    assert outcome == {
        bob.user["id"]: ("delivered", None, ["queued", "sending", "sent", "delivered"]),
        alice.user["id"]: (
            "failed",
            "twilio undelivered 30003",
            ["queued", "sending", "sent", "failed"],
        ),
    }


async def test_a_locked_and_unlocked_account_is_told_on_its_security_channels(
    client: httpx.AsyncClient, app: Any, providers: Providers, bob: SignedIn
) -> None:
    """A lock (a fraud policy or an administrator) signs the user out everywhere: they learn
    why they cannot sign in by e-mail and, with no device to push to, by SMS; the lock's
    reason (the locker's own words) is not shown. Unlocking is told the same way."""
    providers.reset()
    await verify_contacts(app, bob)
    uid = bob.user["id"]
    async with unit_of_work(app.state.resources.engine) as uow:
        change = await users.lock_account(
            await uow.connection(), uid, reason="fraud rule R-17 hit 3 times", by=None
        )
    assert change.changed
    async with unit_of_work(app.state.resources.engine) as uow:
        await users.unlock_account(await uow.connection(), uid, reason="checked", by=None)
    async with harness(app, **providers.settings()) as h:
        await h.deliver(uid, times=2)
        await h.dispatch()
    for kind, subject in (
        ("account_locked", "Your billfold account is locked"),
        ("account_unlocked", "Your billfold account is unlocked"),
    ):
        (n,) = await notifications_of(app, bob, kind)
        assert n.category == "security" and n.in_app
        by_channel = await deliveries_of(app, n.id)
        assert sorted(by_channel) == ["email", "in_app", "sms"]
        assert by_channel["email"][0].status == by_channel["sms"][0].status == "sent"
        mails = [m for m in providers.smtp.messages if bob.email in m.rcpt_tos]
        assert any(f"Subject: {subject}".encode() in m.content for m in mails)
    everything = b"".join(m.content for m in providers.smtp.messages)
    everything += "".join(m["body"] for m in providers.twilio.messages).encode()
    assert b"R-17" not in everything


async def test_money_sent_to_an_unregistered_contact_invites_them_once(
    client: httpx.AsyncClient, app: Any, providers: Providers, alice: SignedIn, bob: SignedIn
) -> None:
    """A transfer to an e-mail or phone nobody has verified: the invitee gets the claim
    instructions (sign up or in, verify that contact within the claim window) by e-mail or SMS,
    once; the sender's inbox shows no such item. A contact someone has verified is not
    invited: the money is claimed for them."""
    providers.reset()
    await verify_contacts(app, bob)
    await fund(app, alice.user["id"], 10_000)
    stranger_mail = f"user-{uuid.uuid4().hex[:10]}@example.com"
    stranger_phone = new_phone()
    sent = []
    for recipient in ({"email": stranger_mail}, {"phone": stranger_phone}, {"email": bob.email}):
        r = await send(client, alice, 1_234, "USD", **recipient)
        assert r.status_code == 201, r.text
        sent.append(r.json()["id"])
    async with harness(app, **providers.settings()) as h:
        await h.deliver(*sent, times=2)
        await h.dispatch()

    (mail,) = [m for m in providers.smtp.messages if stranger_mail in m.rcpt_tos]
    text = mail.content.decode()
    # Alice has no verified contact to show: her first name only (never her whole name).
    assert "Alice sent you $12.34 with billfold" in text and "Example" not in text
    assert "verify this e-mail address in your profile within 14 days" in text
    (sms,) = [m for m in providers.twilio.messages if m["to"] == stranger_phone]
    assert sms["body"].startswith("billfold: Alice sent you $12.34.")
    assert "14 days" in sms["body"]
    # Bob has that e-mail verified: no invitation, however the claim goes.
    assert not [
        m for m in providers.smtp.messages if bob.email in m.rcpt_tos and b"sign up" in m.content
    ]
    invitations = await notifications_of(app, alice, "transfer_invitation")
    assert len(invitations) == 2 and not any(n.in_app for n in invitations)
    inbox = await client.get("/v1/notifications", headers=alice.headers)
    assert all(n["kind"] != "transfer_invitation" for n in inbox.json()["data"])


async def test_an_invitation_never_carries_the_senders_own_text_and_is_capped_per_day(
    client: httpx.AsyncClient, app: Any, providers: Providers
) -> None:
    """Anyone can send a cent to any address and have billfold write to it: the sender's name
    (free text) would make that billfold-branded phishing. The invitation shows a first name
    only when it reads as one, and the sender's verified contact masked; and one sender causes
    at most INVITATIONS_PER_SENDER_PER_DAY invitations a day."""
    providers.reset()
    lure = "billfold Security: call +1 900 555 0100 or visit evil.example"
    sender = await sign_up(client, name=lure)
    await verify_contacts(app, sender)
    await fund(app, sender.user["id"], 10_000)
    cap = INVITATIONS_PER_SENDER_PER_DAY
    strangers = [f"user-{uuid.uuid4().hex[:10]}@example.com" for _ in range(cap + 2)]
    sent = []
    for address in strangers:
        r = await send(client, sender, 1, "USD", email=address)
        assert r.status_code == 201, r.text
        sent.append(r.json()["id"])
    async with harness(app, **providers.settings()) as h:
        await h.deliver(*sent, times=2)
        await h.dispatch()

    phone = sender.user["phone"]
    masked = f"{phone[:3]}*****{phone[-2:]}"
    mails = [m for m in providers.smtp.messages if set(m.rcpt_tos) & set(strangers)]
    assert len(mails) == cap
    for mail in mails:
        # Decoded: a quoted-printable soft line break must not hide a lure from the check.
        message = email.message_from_bytes(mail.content, policy=email.policy.default)
        text = f"{message['Subject']}\n{message.get_body(('plain',)).get_content()}"  # type: ignore[union-attr]
        assert f"{masked} sent you $0.01 with billfold" in text, text
        for lure_part in ("Security", "900", "evil", "call"):
            assert lure_part not in text
    invitations = await notifications_of(app, sender, "transfer_invitation")
    assert len(invitations) == cap
