"""SMS through Twilio's REST Messages API: `POST /2010-04-01/Accounts/<sid>/Messages.json`,
form-encoded `To`, `From`, `Body`, HTTP Basic auth with the account SID and auth token."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

import httpx

from billfold.notifications.channels.base import Message, Outcome, retry_after, transient

# Twilio error codes that no retry will fix: invalid or unreachable 'To' number, the number
# opted out (STOP), not SMS-capable, a region that is not enabled.
_PERMANENT = frozenset({21211, 21214, 21408, 21610, 21612, 21614})


# MessageStatus values of a status callback that end a message, and what they mean for us;
# any other (queued, accepted, sending, sent…) only says Twilio has it.
FINAL_STATUSES = {
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}
STATUS_CALLBACK_PATH = "/v1/notifications/webhooks/twilio"


def status_callback_url(base: str, delivery_id: str) -> str:
    """Where Twilio reports on one message: the delivery's id rides in the (signed) URL, so a
    report that comes before we recorded Twilio's answer still finds its delivery."""
    return f"{base}?delivery={delivery_id}"


def request_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """`X-Twilio-Signature` of a callback: base64 HMAC-SHA1, keyed by the auth token, of the
    full URL followed by every POST parameter's name and value in name order."""
    data = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def valid_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    """Whether a callback really comes from Twilio (constant-time comparison)."""
    expected = request_signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode(), signature.encode())


class TwilioChannel:
    provider = "twilio"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        sender: str,
        endpoint: str = "https://api.twilio.com",
        status_callback: str | None = None,
    ) -> None:
        self._url = f"{endpoint.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._sender = sender
        self._callback = status_callback
        self._http = httpx.AsyncClient(auth=(account_sid, auth_token), timeout=10)

    async def send(self, message: Message) -> Outcome:
        form = {"To": message.target, "From": self._sender, "Body": message.content["text"]}
        if self._callback:
            form["StatusCallback"] = status_callback_url(self._callback, message.delivery_id)
        try:
            response = await self._http.post(self._url, data=form)
        except httpx.HTTPError as exc:
            return transient(exc)
        if response.status_code in (200, 201):
            return Outcome("sent", provider_message_id=response.json().get("sid"))
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("code")
        detail = f"twilio {response.status_code} {code or ''}".strip()
        if response.status_code == 429 or response.status_code >= 500:
            return Outcome("retry", error=detail, retry_after=retry_after(response))
        if code in _PERMANENT or 400 <= response.status_code < 500:
            return Outcome("failed", error=detail)
        return Outcome("retry", error=detail)

    async def aclose(self) -> None:
        await self._http.aclose()
