"""Request and response bodies of the notification routes."""

from __future__ import annotations

import re
from datetime import datetime, time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billfold.platform.errors import ProblemError

ChannelName = Literal["push", "email", "sms", "in_app"]
CategoryName = Literal["transfers", "payments", "security", "account", "balance", "loyalty"]
DeliveryStatus = Literal["queued", "sending", "sent", "delivered", "failed"]

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class NotificationView(BaseModel):
    id: str
    kind: str
    category: str
    title: str
    body: str
    data: dict[str, Any]
    read: bool
    read_at: datetime | None
    created_at: datetime


class UnreadCount(BaseModel):
    unread: int


class ReadAll(BaseModel):
    updated: int


class DeliveryLogEntry(BaseModel):
    status: str
    detail: str | None
    at: datetime


class DeliveryView(BaseModel):
    id: str
    notification_id: str
    channel: ChannelName
    provider: str
    # Masked: an inbox shows where a message went, not the whole address.
    target: str
    status: DeliveryStatus
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    log: list[DeliveryLogEntry] = Field(default_factory=list)


class NotificationDetail(NotificationView):
    deliveries: list[DeliveryView]


class QuietHours(BaseModel):
    """Local times (HH:MM, 24 h) in your profile's time zone; `start` after `end` wraps
    midnight (22:00-07:00). Push and SMS wait until `end`; security alerts never wait."""

    model_config = ConfigDict(extra="forbid")

    start: str = Field(examples=["22:00"])
    end: str = Field(examples=["07:00"])

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError("must be a time HH:MM (00:00-23:59)")
        return value

    def window(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


class CategoryPreference(BaseModel):
    category: CategoryName
    channels: dict[ChannelName, bool]
    # Security alerts: the channels on by default cannot be switched off.
    locked_channels: list[ChannelName] = Field(default_factory=list)


class Preferences(BaseModel):
    categories: list[CategoryPreference]
    quiet_hours: QuietHours | None
    timezone: str


class CategoryChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: CategoryName
    channels: dict[ChannelName, bool]


class PreferencesUpdate(BaseModel):
    """Only what is sent changes: the named categories' named channels, and the quiet hours if
    `quiet_hours` is present (null switches them off)."""

    model_config = ConfigDict(extra="forbid")

    categories: list[CategoryChange] = Field(default_factory=list, max_length=20)
    quiet_hours: QuietHours | None = None


class PreferenceLockedProblem(ProblemError):
    def __init__(self, what: str) -> None:
        super().__init__(
            f"Security alerts cannot be switched off on this channel ({what})",
            status=422,
            code="notification_preference_locked",
        )
