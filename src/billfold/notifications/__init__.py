"""The Notification Service: events become notifications (Jinja2 templates per kind and
locale, babel formatting), delivered by push (FCM HTTP v1, APNs HTTP/2), e-mail (SMTP, SES v2),
SMS (Twilio) and the in-app inbox with a live SSE stream, as the user's preferences and quiet
hours allow; each delivery is logged `queued → sent → delivered | failed`.

Public face: `NotificationsRuntime` (built by the app and the worker), `consumers(rt)` for the
worker's event sink, `Dispatcher` / `build_dispatcher` for the worker's send job, `router`,
and `StreamGate` (the API process's bounded live streams, on a Redis pool of their own).
"""

from billfold.notifications.api import router
from billfold.notifications.catalog import CATEGORIES, CHANNELS, KINDS
from billfold.notifications.dispatch import build_dispatcher
from billfold.notifications.events import consumers
from billfold.notifications.service import Dispatcher, Intent, NotificationsRuntime, notify
from billfold.notifications.streams import StreamGate

__all__ = [
    "CATEGORIES",
    "CHANNELS",
    "KINDS",
    "Dispatcher",
    "Intent",
    "NotificationsRuntime",
    "StreamGate",
    "build_dispatcher",
    "consumers",
    "notify",
    "router",
]
