"""Apple Push Notification service over HTTP/2 (httpx with h2): a provider token (ES256 JWT with
the team id and key id, reused for 40 minutes as Apple asks), `apns-topic` (the app's bundle
id), `apns-push-type`, `POST /3/device/<token>`. Production speaks TLS to api.push.apple.com
(ALPN h2); the tests' APNs server does the same with a CA of their own (`apns_ca_file`)."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from pathlib import Path

import httpx
import jwt

from billfold.notifications.channels.base import Message, Outcome, retry_after, transient

_TOKEN_SECONDS = 40 * 60
# The device token is no longer valid for this topic: forget it.
_DEAD = frozenset({"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"})
_REFRESH = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})


class ApnsChannel:
    provider = "apns"

    def __init__(
        self,
        key_pem: str,
        key_id: str,
        team_id: str,
        topic: str,
        endpoint: str = "https://api.push.apple.com",
        ca_file: str = "",
    ) -> None:
        self._key = key_pem
        self._key_id = key_id
        self._team_id = team_id
        self._topic = topic
        self._endpoint = endpoint.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        self._http = httpx.AsyncClient(http2=True, verify=verify, timeout=10)
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_files(
        cls, key_file: str, key_id: str, team_id: str, topic: str, endpoint: str, ca_file: str
    ) -> ApnsChannel:
        return cls(Path(key_file).read_text(), key_id, team_id, topic, endpoint, ca_file)

    async def _provider_token(self, refresh: bool = False) -> str:
        async with self._lock:
            if not refresh and self._token is not None and self._token[1] > time.time():
                return self._token[0]
            now = int(time.time())
            token = jwt.encode(
                {"iss": self._team_id, "iat": now},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._token = (token, now + _TOKEN_SECONDS)
            return token

    async def send(self, message: Message) -> Outcome:
        apns_id = str(uuid.uuid4())
        payload = {
            "aps": {
                "alert": {"title": message.content["title"], "body": message.content["body"]},
                "sound": "default",
            },
            **{k: str(v) for k, v in message.data.items()},
        }
        try:
            refresh = False
            for _ in range(2):  # once more with a new provider token if Apple refused ours
                token = await self._provider_token(refresh)
                response = await self._http.post(
                    f"{self._endpoint}/3/device/{message.target}",
                    json=payload,
                    headers={
                        "authorization": f"bearer {token}",
                        "apns-topic": self._topic,
                        "apns-push-type": "alert",
                        "apns-priority": "10",
                        "apns-id": apns_id,
                        "apns-expiration": str(int(time.time()) + 24 * 3600),
                    },
                )
                if response.status_code == 200 or _reason(response) not in _REFRESH:
                    break
                refresh = True
        except httpx.HTTPError as exc:
            return transient(exc)
        if response.status_code == 200:
            return Outcome("sent", provider_message_id=response.headers.get("apns-id", apns_id))
        reason = _reason(response)
        detail = f"apns {response.status_code} {reason}"
        if response.status_code == 410 or reason in _DEAD:
            return Outcome("failed", error=detail, unregistered=True)
        if response.status_code in (429, 500, 503):
            return Outcome("retry", error=detail, retry_after=retry_after(response))
        return Outcome("failed", error=detail)

    async def aclose(self) -> None:
        await self._http.aclose()


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("reason", ""))
    except ValueError:
        return ""
