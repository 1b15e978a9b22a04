"""Firebase Cloud Messaging, HTTP v1: a service-account JWT (RS256) exchanged for an OAuth2
access token at the account's `token_uri`, then `POST /v1/projects/<id>/messages:send`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

from billfold.notifications.channels.base import Message, Outcome, retry_after, transient

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# The token is dead for good: the app was uninstalled or the token belongs to another sender.
_DEAD = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
_TRANSIENT = frozenset({"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED"})


class FcmChannel:
    provider = "fcm"

    def __init__(
        self,
        service_account: dict[str, Any],
        endpoint: str = "https://fcm.googleapis.com",
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._account = service_account
        self._endpoint = endpoint.rstrip("/")
        self._http = http or httpx.AsyncClient(timeout=10)
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_file(cls, path: str, endpoint: str) -> FcmChannel:
        return cls(json.loads(Path(path).read_text()), endpoint)

    async def _access_token(self) -> str:
        async with self._lock:
            if self._token is not None and self._token[1] > time.time() + 60:
                return self._token[0]
            now = int(time.time())
            assertion = jwt.encode(
                {
                    "iss": self._account["client_email"],
                    "sub": self._account["client_email"],
                    "scope": SCOPE,
                    "aud": self._account["token_uri"],
                    "iat": now,
                    "exp": now + 3600,
                },
                self._account["private_key"],
                algorithm="RS256",
                headers={"kid": self._account.get("private_key_id", "")},
            )
            response = await self._http.post(
                self._account["token_uri"], data={"grant_type": _GRANT, "assertion": assertion}
            )
            response.raise_for_status()
            body = response.json()
            self._token = (body["access_token"], now + float(body.get("expires_in", 3600)))
            return self._token[0]

    async def send(self, message: Message) -> Outcome:
        url = f"{self._endpoint}/v1/projects/{self._account['project_id']}/messages:send"
        payload = {
            "message": {
                "token": message.target,
                "notification": {
                    "title": message.content["title"],
                    "body": message.content["body"],
                },
                # FCM data values must be strings.
                "data": {k: str(v) for k, v in message.data.items()},
                "android": {"priority": "high"},
            }
        }
        try:
            for _ in range(2):  # once more with a fresh token if the cached one was refused
                token = await self._access_token()
                response = await self._http.post(
                    url, json=payload, headers={"Authorization": f"Bearer {token}"}
                )
                if response.status_code != 401:
                    break
                self._token = None
        except httpx.HTTPError as exc:
            return transient(exc)
        if response.status_code == 200:
            return Outcome("sent", provider_message_id=response.json().get("name"))
        return _error(response)

    async def aclose(self) -> None:
        await self._http.aclose()


def _error(response: httpx.Response) -> Outcome:
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    codes = [
        d.get("errorCode")
        for d in error.get("details", [])
        if isinstance(d, dict) and d.get("@type") == _FCM_ERROR
    ]
    code = codes[0] if codes else error.get("status", str(response.status_code))
    detail = f"fcm {response.status_code} {code}"
    if code in _DEAD:
        return Outcome("failed", error=detail, unregistered=True)
    if code in _TRANSIENT or response.status_code == 429 or response.status_code >= 500:
        return Outcome("retry", error=detail, retry_after=retry_after(response))
    return Outcome("failed", error=detail)
