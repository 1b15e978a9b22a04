"""Building the worker's dispatcher: one client per configured provider."""

from __future__ import annotations

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from billfold.notifications.channels import (
    ApnsChannel,
    Channel,
    FcmChannel,
    InAppChannel,
    SesChannel,
    SmtpChannel,
    TwilioChannel,
)
from billfold.notifications.channels.twilio import STATUS_CALLBACK_PATH
from billfold.notifications.service import Dispatcher, NotificationsRuntime


def build_channels(rt: NotificationsRuntime, redis: Redis) -> dict[str, Channel]:
    """The provider clients the settings configure (in-app always)."""
    s = rt.settings
    # The CLI refuses these before anything starts; a process built another way refuses here.
    errors = s.notification_transport_errors()
    if errors:
        raise RuntimeError("; ".join(errors))
    channels: dict[str, Channel] = {"inapp": InAppChannel(redis, s.redis_prefix)}
    if s.fcm_service_account_file:
        channels["fcm"] = FcmChannel.from_file(s.fcm_service_account_file, s.fcm_endpoint)
    if s.apns_key_file:
        channels["apns"] = ApnsChannel.from_files(
            s.apns_key_file,
            s.apns_key_id,
            s.apns_team_id,
            s.apns_topic,
            s.apns_endpoint,
            s.apns_ca_file,
        )
    if s.email_provider == "smtp":
        channels["smtp"] = SmtpChannel(
            s.smtp_host,
            s.smtp_port,
            s.email_from,
            username=s.smtp_username,
            password=s.smtp_password,
            starttls=s.smtp_starttls,
            ca_file=s.smtp_ca_file,
        )
    elif s.email_provider == "ses":
        channels["ses"] = SesChannel(s.email_from, s.ses_region, s.ses_endpoint_url)
    if s.twilio_account_sid:
        channels["twilio"] = TwilioChannel(
            s.twilio_account_sid,
            s.twilio_auth_token,
            s.twilio_from,
            s.twilio_endpoint,
            # Twilio reports delivery (or its failure) to this route of the API.
            status_callback=f"{s.public_url.rstrip('/')}{STATUS_CALLBACK_PATH}",
        )
    return channels


def build_dispatcher(engine: AsyncEngine, rt: NotificationsRuntime, redis: Redis) -> Dispatcher:
    """The dispatcher with every configured channel (close it with `aclose`)."""
    return Dispatcher(engine, rt, build_channels(rt, redis))
