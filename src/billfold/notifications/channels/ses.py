"""E-mail through Amazon SES v2 (`SendEmail`, simple content) with aiobotocore; credentials from
the standard AWS chain, the endpoint overridable (moto in tests)."""

from __future__ import annotations

import contextlib
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from billfold.notifications.channels.base import Message, Outcome, transient

_RETRY = frozenset({"TooManyRequestsException", "Throttling", "LimitExceededException"})


class SesChannel:
    provider = "ses"

    def __init__(self, sender: str, region: str, endpoint_url: str | None = None) -> None:
        self._sender = sender
        self._region = region
        self._endpoint = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def _ses(self) -> Any:
        if self._client is None:
            self._client = await self._stack.enter_async_context(
                get_session().create_client(
                    "sesv2", region_name=self._region, endpoint_url=self._endpoint
                )
            )
        return self._client

    async def send(self, message: Message) -> Outcome:
        try:
            client = await self._ses()
            answer = await client.send_email(
                FromEmailAddress=self._sender,
                Destination={"ToAddresses": [message.target]},
                Content={
                    "Simple": {
                        "Subject": {"Data": message.content["subject"], "Charset": "UTF-8"},
                        "Body": {"Text": {"Data": message.content["text"], "Charset": "UTF-8"}},
                    }
                },
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _RETRY:
                return Outcome("retry", error=f"ses {code}")
            return Outcome("failed", error=f"ses {code}")
        except (BotoCoreError, OSError) as exc:
            return transient(exc)
        return Outcome("sent", provider_message_id=answer.get("MessageId"))

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None
