"""Reading a one-time code as its recipient would: the users service seals it in the event for
the notification service (`sealed_code`); the tests open it with the app's key, as the
dispatcher does, instead of reading an SMS or e-mail."""

from __future__ import annotations

from typing import Any

from billfold import users


def reveal_code(app: Any, type_: str, data: dict[str, Any]) -> str:
    """The code a one-time-code event's `data` carries sealed."""
    code = users.open_one_time_code(app.state.users.codes, {"type": type_, "data": data})
    assert code is not None, "the event carries no sealed code"
    return code
