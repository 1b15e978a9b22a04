"""One-time codes travel sealed for the notification service: a named key ring (rotation keeps
what is in flight openable), AAD bound to the event's user, reference, channel and target."""

from __future__ import annotations

import base64
import os

import pytest

from billfold import users
from billfold.config import Settings
from billfold.platform.keys import SealError, SealRing

TYPE = "billfold.users.verification.requested"
DATA = {
    "user_id": "usr_01m8qcs77xe45a091gsgj7qwah",
    "verification_id": "vrf_01m8qcs77xe45a091gsgj7qwah",
    "channel": "email",
    "target": "ada@example.com",
}


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _sealed(ring: SealRing, code: str = "123456") -> dict[str, object]:
    sealed = ring.seal(code.encode(), users.events.one_time_code_aad(TYPE, DATA))
    return {"type": TYPE, "data": {**DATA, "sealed_code": sealed}}


def test_rotation_seals_with_the_first_key_and_opens_with_any() -> None:
    old, new = _key(), _key()
    before = SealRing.from_settings(Settings(one_time_code_keys=f"k1:{old}"), "p")
    event = _sealed(before)
    after = SealRing.from_settings(Settings(one_time_code_keys=f"k2:{new}, k1:{old}"), "p")
    assert users.open_one_time_code(after, event) == "123456"
    assert _sealed(after)["data"]["sealed_code"]["kid"] == "k2"  # type: ignore[index]
    dropped = SealRing.from_settings(Settings(one_time_code_keys=f"k2:{new}"), "p")
    with pytest.raises(SealError, match="unknown key"):
        users.open_one_time_code(dropped, event)


def test_the_code_opens_only_for_the_message_it_was_sealed_for() -> None:
    ring = SealRing.from_settings(Settings(secret_key=_key()), "one-time-codes")
    event = _sealed(ring)
    assert "123456" not in repr(event)
    for field, value in (("target", "mallory@example.com"), ("channel", "sms"), ("user_id", "x")):
        moved = {**event, "data": {**event["data"], field: value}}  # type: ignore[dict-item]
        with pytest.raises(SealError):
            users.open_one_time_code(ring, moved)
    other_key = SealRing.from_settings(Settings(secret_key=_key()), "one-time-codes")
    with pytest.raises(SealError):
        users.open_one_time_code(other_key, event)
    assert users.open_one_time_code(ring, {"type": TYPE, "data": DATA}) is None  # none carried


def test_a_bad_configuration_is_refused() -> None:
    for spec in ("k1:not-base64!", f"k1:{base64.b64encode(b'short').decode()}", f":{_key()}"):
        with pytest.raises(ValueError):
            SealRing.from_settings(Settings(one_time_code_keys=spec), "p")
    with pytest.raises(ValueError):
        SealRing.from_settings(Settings(secret_key=""), "p")
