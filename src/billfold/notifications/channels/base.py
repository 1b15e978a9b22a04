"""What every channel client takes and answers: one message to one target, one outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

OutcomeStatus = Literal["sent", "delivered", "retry", "failed"]


@dataclass(frozen=True)
class Message:
    """One delivery's rendered content for one target (device token, address, number, user)."""

    delivery_id: str
    target: str
    content: dict[str, Any]
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """A provider's answer. `retry`: try again later (`retry_after` seconds if it said so);
    `failed`: never will work; `unregistered`: the push token is dead and must be forgotten."""

    status: OutcomeStatus
    provider_message_id: str | None = None
    error: str | None = None
    unregistered: bool = False
    retry_after: float | None = None


class Channel(Protocol):
    """A provider client. `send` never raises for a provider's answer, only returns it."""

    provider: str

    async def send(self, message: Message) -> Outcome: ...

    async def aclose(self) -> None: ...


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` seconds of a response, when it gives a number."""
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def transient(exc: Exception) -> Outcome:
    """A network-level failure: the provider may never have seen the request, so try again."""
    return Outcome("retry", error=f"{type(exc).__name__}: {str(exc)[:200]}")
