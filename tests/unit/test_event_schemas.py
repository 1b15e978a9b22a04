"""docs/events/: one valid JSON Schema per event type the code declares, and they reject what
does not match (the integration suite validates every event its tests write against them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from billfold.platform.events import Event
from tests.support.event_schemas import SCHEMA_DIR, problems

SRC = Path(__file__).resolve().parents[2] / "src" / "billfold"
# An event type constant: `TRANSFER_COMPLETED = "billfold.p2p.transfer.completed"`.
_DECLARED = re.compile(
    r'^\s*[A-Z][A-Z0-9_]*(?:: \w+)? = "(billfold\.[a-z0-9_]+\.[a-z0-9_.]+)"', re.M
)


def declared_types() -> set[str]:
    return {m for path in SRC.rglob("*.py") for m in _DECLARED.findall(path.read_text())}


SCHEMAS = sorted(SCHEMA_DIR.glob("*.json"))


def test_there_is_a_schema_for_every_declared_event_type():
    declared = declared_types()
    assert len(declared) > 50  # the scan finds the constants (it would pass vacuously if not)
    missing = sorted(t for t in declared if not (SCHEMA_DIR / f"{t}.json").is_file())
    assert missing == [], f"add docs/events/<type>.json for: {missing}"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_each_schema_is_a_valid_cloudevents_schema_of_its_type(path):
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["title"] == path.stem
    props = schema["properties"]
    assert props["type"] == {"const": path.stem}
    assert props["specversion"] == {"const": "1.0"}
    assert set(schema["required"]) >= {"id", "type", "source", "subject", "time", "data"}
    assert props["data"]["type"] == "object"


def test_a_matching_event_passes_and_drifted_ones_are_reported():
    user = "usr_01m8q1e8cfeykt117y50tb221d"
    good = Event(
        type="billfold.ledger.wallet.topped_up",
        source="/billfold/ledger",
        subject="pst_01m8q1e8cfeykt117y50tb221d",
        data={
            "posting_id": "pst_01m8q1e8cfeykt117y50tb221d",
            "user_id": user,
            "amount": 1250,
            "currency": "USD",
            "reference": "topup:1",
            "balance": {"posted": 1250, "held": 0, "available": 1250},
            "created_at": "2026-11-30T12:00:00Z",
        },
    ).envelope()
    assert problems(good) == []
    assert problems({**good, "data": {**good["data"], "amount": "12.50"}})  # money as a string
    assert problems({**good, "data": {}})  # required fields gone
    assert problems({**good, "data": {**good["data"], "user_id": "alice"}})  # not an id
    assert problems({**good, "specversion": "0.3"})
    assert problems({**good, "extra": 1})  # the envelope is closed
    assert problems({**good, "type": "billfold.nowhere.thing.happened"}) == [
        "billfold.nowhere.thing.happened: no schema; add "
        "docs/events/billfold.nowhere.thing.happened.json (see tests.support.event_schemas)"
    ]
    assert problems({**good, "type": "billfold.test.anything"}) == []  # the bus tests' own
