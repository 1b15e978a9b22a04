"""The event schemas of docs/events/: loading, validating outbox rows, and (re)generating them.

Each event type has one JSON Schema (draft 2020-12), `docs/events/<type>.json`, describing the
whole CloudEvents envelope as consumers receive it (on either bus) with its `data`. The
integration suite validates every outbox row its tests wrote against them (the session fixture
in tests/integration/conftest.py), so an event that drifts from its schema fails the suite.

Generating: run the integration tests with `BILLFOLD_EVENT_SAMPLES=/tmp/samples.jsonl`, then
`python -m tests.support.event_schemas /tmp/samples.jsonl` writes a schema for every sampled
type that has none yet (`--all` rewrites them). Generated schemas are a starting point: review
and commit them; required fields are the ones every sample had, types the ones seen.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "events"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
# Types tests make up to exercise the bus itself; they have no schema.
TEST_TYPE_PREFIX = "billfold.test."
_ID = re.compile(r"^([a-z]+)_[0-9a-hjkmnp-tv-z]{26}$")
OPTIONAL = frozenset({"code"})
_NULL_ONLY = "null in every sample"
_ENVELOPE_FIELDS = ["specversion", "id", "type", "source", "subject", "time", "datacontenttype"]


def schema_path(event_type: str) -> Path:
    return SCHEMA_DIR / f"{event_type}.json"


@cache
def validator(event_type: str) -> Draft202012Validator | None:
    path = schema_path(event_type)
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def problems(envelope: dict[str, Any]) -> list[str]:
    """Why `envelope` does not match its type's schema (empty: it does)."""
    event_type = envelope.get("type", "")
    if event_type.startswith(TEST_TYPE_PREFIX):
        return []
    check = validator(event_type)
    if check is None:
        return [f"{event_type}: no schema; add docs/events/{event_type}.json (see {__name__})"]
    return [
        f"{event_type} {envelope.get('id')}: {'/'.join(map(str, e.absolute_path)) or '(root)'}: "
        f"{e.message}"
        for e in sorted(check.iter_errors(envelope), key=lambda e: list(e.absolute_path))
    ]


# --- generation ---------------------------------------------------------------------------------


def _is_time(value: str) -> bool:
    if "T" not in value:
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def infer(values: list[Any], key: str = "") -> dict[str, Any]:
    """A schema that every one of `values` (samples of one field) matches."""
    kinds: set[str] = set()
    for v in values:
        if v is None:
            kinds.add("null")
        elif isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int):
            kinds.add("integer")
        elif isinstance(v, float):
            kinds.add("number")
        elif isinstance(v, str):
            kinds.add("string")
        elif isinstance(v, list):
            kinds.add("array")
        else:
            kinds.add("object")
    if kinds == {"null"}:
        # Only ever seen empty: the samples say nothing about the type it has when set.
        return {"description": f"{_NULL_ONLY}; its type when set is not constrained"}
    if {"integer", "number"} <= kinds:
        kinds.discard("integer")
    schema: dict[str, Any] = {"type": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds)}
    strings = [v for v in values if isinstance(v, str)]
    if strings and kinds - {"null"} == {"string"}:
        prefixes = {m.group(1) if (m := _ID.match(s)) else None for s in strings}
        if len(prefixes) == 1 and None not in prefixes:
            schema["pattern"] = f"^{prefixes.pop()}_[0-9a-hjkmnp-tv-z]{{26}}$"
        elif key == "currency" or key.endswith("_currency"):
            schema["pattern"] = "^[A-Z]{3}$"
        elif all(_is_time(s) for s in strings):
            schema["format"] = "date-time"
    objects = [v for v in values if isinstance(v, dict)]
    if objects:
        schema |= infer_object(objects)
    arrays = [item for v in values if isinstance(v, list) for item in v]
    if "array" in kinds:
        schema["items"] = infer(arrays) if arrays else {}
    return schema


def infer_object(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({k for s in samples for k in s})
    return {
        "properties": {k: infer([s[k] for s in samples if k in s], k) for k in keys},
        # A one-time `code` leaves the stored event once it is published: never required.
        "required": [k for k in keys if k not in OPTIONAL and all(k in s for s in samples)],
    }


def generate(event_type: str, envelopes: list[dict[str, Any]]) -> dict[str, Any]:
    """The schema of `event_type` from sample envelopes of it."""
    data = infer([e["data"] for e in envelopes])
    data["additionalProperties"] = True
    return {
        "$schema": DRAFT,
        "$id": f"https://billfold.dev/events/{event_type}.json",
        "title": event_type,
        "description": f"CloudEvents 1.0 envelope of `{event_type}` as consumers receive it.",
        "$comment": (
            "Generated from the events the test suite writes (tests/support/event_schemas.py), "
            "then reviewed. `data` may gain fields: consumers ignore what they do not know."
        ),
        "type": "object",
        "required": [*_ENVELOPE_FIELDS, "data"],
        "additionalProperties": False,
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "pattern": "^evt_[0-9a-hjkmnp-tv-z]{26}$"},
            "type": {"const": event_type},
            # Tests record events with sources of their own; the services use /billfold/<svc>.
            "source": {
                "type": "string",
                "pattern": "^/",
                "description": f"/billfold/{event_type.split('.')[1]} when the service wrote it",
            },
            "subject": {"type": "string", "minLength": 1},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": "application/json"},
            "data": data,
        },
    }


def write_schemas(samples: Iterable[dict[str, Any]], *, overwrite: bool = False) -> list[Path]:
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for envelope in samples:
        if not envelope["type"].startswith(TEST_TYPE_PREFIX):
            by_type[envelope["type"]].append(envelope)
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type, envelopes in sorted(by_type.items()):
        path = schema_path(event_type)
        if path.exists() and not overwrite:
            continue
        path.write_text(json.dumps(generate(event_type, envelopes), indent=2) + "\n")
        written.append(path)
    return written


def _kinds(prop: dict[str, Any]) -> set[str]:
    kind = prop.get("type")
    if kind is None:
        return {"null"} if prop.get("description", "").startswith(_NULL_ONLY) else {"any"}
    return set(kind) if isinstance(kind, list) else {kind}


def harmonise() -> None:
    """Widen the field types of sibling schemas (`billfold.p2p.transfer.*`, …) to their union:
    what one sibling's samples show (a null recipient, a card without a brand) holds for the
    others, which the tests may have sampled only a few times."""
    schemas = {p: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.json")}
    families: dict[str, list[Path]] = defaultdict(list)
    for path in schemas:
        families[path.stem.rsplit(".", 1)[0]].append(path)
    for members in families.values():
        kinds: dict[str, set[str]] = defaultdict(set)
        for path in members:
            for name, prop in schemas[path]["properties"]["data"].get("properties", {}).items():
                kinds[name] |= _kinds(prop)
        for path in members:
            for name, prop in schemas[path]["properties"]["data"].get("properties", {}).items():
                union = kinds[name]
                if union == {"null"}:
                    continue
                if "any" in union:
                    prop.pop("type", None)
                    prop.pop("pattern", None)
                    prop.pop("format", None)
                else:
                    prop["type"] = sorted(union)[0] if len(union) == 1 else sorted(union)
            path.write_text(json.dumps(schemas[path], indent=2) + "\n")


if __name__ == "__main__":
    files = [a for a in sys.argv[1:] if not a.startswith("--")]
    lines = (line for f in files for line in Path(f).read_text().splitlines() if line.strip())
    for p in write_schemas((json.loads(line) for line in lines), overwrite="--all" in sys.argv):
        print(f"wrote {p.relative_to(SCHEMA_DIR.parents[1])}")
    harmonise()
