"""The event bus's pure parts: topic and group names, consumer selection, replay type patterns,
and the worker's refusal to split consumers on the embedded bus."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from billfold import cli
from billfold.platform.bus.consumers import Consumer, select_consumers
from billfold.platform.bus.kafka import KafkaConfig
from billfold.platform.bus.replay import type_patterns


async def _noop(conn: object, event: object) -> None:
    return None


def consumer(name: str) -> Consumer:
    return Consumer(name, frozenset({"billfold.x.y.z"}), _noop)  # type: ignore[arg-type]


ALL = [
    consumer("p2p.claims"),
    consumer("p2p.requests"),
    consumer("notifications"),
    consumer("notifications.push"),
    consumer("transactions.receipts"),
]


def test_topics_are_per_service_and_groups_per_consumer():
    config = KafkaConfig(bootstrap="b:9092", topic_prefix="prod.", group_prefix="grp.")
    assert config.topic("billfold.p2p.transfer.completed") == "prod.p2p"
    assert config.topic("billfold.payment_methods.added") == "prod.payment_methods"
    assert config.topic("odd") == "prod.other"
    assert config.dead_letter_topic == "prod.dead-letters"
    assert config.group("transactions.receipts") == "grp.transactions.receipts"
    assert config.client_options() == {"bootstrap_servers": "b:9092", "client_id": "billfold"}


def test_consumers_are_selected_by_name_or_service():
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    assert names(select_consumers(ALL, [])) == names(ALL)
    assert names(select_consumers(ALL, ["p2p"])) == ["p2p.claims", "p2p.requests"]
    assert names(select_consumers(ALL, ["notifications", "p2p.claims"])) == [
        "notifications",
        "notifications.push",
        "p2p.claims",
    ]
    assert names(select_consumers(ALL, ["p2p", "p2p.claims"])) == ["p2p.claims", "p2p.requests"]
    # A prefix selects whole name segments only, and a typo is an error, not an idle worker.
    with pytest.raises(ValueError, match="no consumer is called 'p2'"):
        select_consumers(ALL, ["p2"])


def test_replay_type_patterns():
    assert type_patterns([]) is None
    assert type_patterns(["billfold.p2p.*"]) == ["billfold.p2p.%"]
    # `_` is a LIKE wildcard: an exact type stays exact.
    assert type_patterns(["billfold.users.step_up.code_requested"]) == [
        "billfold.users.step\\_up.code\\_requested"
    ]


def test_worker_refuses_to_select_consumers_on_the_embedded_bus():
    result = CliRunner().invoke(
        cli.app,
        ["worker", "--consumers", "notifications"],
        env={
            "BILLFOLD_DATABASE_URL": "postgresql://nowhere/x",
            "BILLFOLD_REDIS_URL": "redis://nowhere",
            "BILLFOLD_KAFKA_BOOTSTRAP": "",
        },
    )
    assert result.exit_code == 2
    assert "--consumers needs the Kafka bus" in result.output


def test_replay_needs_a_start_it_can_read():
    env = {"BILLFOLD_DATABASE_URL": "postgresql://nowhere/x"}
    result = CliRunner().invoke(cli.app, ["events", "replay", "--from", "yesterday"], env=env)
    assert result.exit_code == 2 and "neither an event id nor an ISO 8601 time" in result.output
