"""Channel clients: each speaks its provider's real protocol (FCM HTTP v1, APNs HTTP/2, SMTP,
SES v2, Twilio REST) or, for in-app, Redis pub/sub."""

from billfold.notifications.channels.apns import ApnsChannel
from billfold.notifications.channels.base import Channel, Message, Outcome
from billfold.notifications.channels.fcm import FcmChannel
from billfold.notifications.channels.inapp import InAppChannel, stream_channel
from billfold.notifications.channels.ses import SesChannel
from billfold.notifications.channels.smtp import SmtpChannel
from billfold.notifications.channels.twilio import TwilioChannel

__all__ = [
    "ApnsChannel",
    "Channel",
    "FcmChannel",
    "InAppChannel",
    "Message",
    "Outcome",
    "SesChannel",
    "SmtpChannel",
    "TwilioChannel",
    "stream_channel",
]
