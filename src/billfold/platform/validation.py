"""Request bodies every service validates the same way."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def check_storable(data: Any) -> Any:
    """PostgreSQL text/jsonb refuse NUL characters and NaN/Infinity: answer 422, not 500."""
    stack = [data]
    while stack:  # iterative: the body may nest as deep as the JSON parser allows
        value = stack.pop()
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("text must not contain NUL (\\u0000) characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("numbers must be finite")
        if isinstance(value, dict):
            stack.extend([*value.keys(), *value.values()])
        elif isinstance(value, list):
            stack.extend(value)
    return data


class Strict(BaseModel):
    """A request body: unknown fields, NUL characters and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    _storable = model_validator(mode="before")(check_storable)
