"""Training on the analysts' labels and the model commands: labelled decisions in PostgreSQL
become training rows; `billfold fraud train` installs a challenger, `promote` makes it the
champion (and `--version` rolls back), `evaluate` compares rules alone with rules + model."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text
from typer.testing import CliRunner

from billfold import cli
from billfold.fraud.model.registry import ModelRegistry, load_scorer
from billfold.fraud.model.synthetic import WorldConfig, generate
from billfold.fraud.model.training import train
from billfold.fraud.store.labels import labelled

TINY = ["--users", "120", "--days", "5"]


async def _decision(engine: Any, features: dict[str, Any], label: str | None) -> str:
    decision_id = f"dec_{uuid.uuid4().hex}"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO fraud.decisions (id, subject_kind, subject_id, user_id, amount, "
                "currency, action, score, features, label, labelled_at) VALUES (:id, 'payment', "
                ":s, :u, 1000, 'USD', 'review', 720, CAST(:f AS jsonb), CAST(:l AS text), "
                "CASE WHEN CAST(:l AS text) IS NULL THEN NULL ELSE now() END)"
            ),
            {
                "id": decision_id,
                "s": f"txn_{uuid.uuid4().hex}",
                "u": f"usr_{uuid.uuid4().hex}",
                "f": json.dumps(features),
                "l": label,
            },
        )
    return decision_id


async def test_labelled_decisions_become_training_rows(app: Any) -> None:
    engine = app.state.resources.engine
    marker = float(uuid.uuid4().int % 10_000_000) + 0.5
    world = WorldConfig(users=120, days=5, seed=5)
    dataset = generate(world)
    fraud_row = {**dataset.rows[0], "amount_mean": marker}
    legit_row = {**dataset.rows[1], "amount_mean": marker}
    await _decision(engine, fraud_row, "fraud")
    await _decision(engine, legit_row, "legit")
    await _decision(engine, {**dataset.rows[2], "amount_mean": marker}, None)  # not reviewed

    async with engine.connect() as conn:
        rows = await labelled(conn)
    mine = [(f, y) for f, y in rows if f.get("amount_mean") == marker]
    assert sorted(y for _, y in mine) == [0, 1]
    assert next(f for f, y in mine if y == 1) == fraud_row  # the snapshot as the check saw it

    plain = train(dataset, world=world, seed=5, rounds=20)
    with_labels = train(dataset, analyst=mine, world=world, seed=5, rounds=20)
    assert with_labels.analyst_rows == 2 and plain.analyst_rows == 0
    assert with_labels.rows == plain.rows + 2
    assert with_labels.data_digest != plain.data_digest


async def _invoke(database_url: str, *args: str) -> Any:
    """A `billfold fraud` command in a thread (it runs its own event loop) on this database."""
    env = {"BILLFOLD_DATABASE_URL": database_url}
    return await asyncio.to_thread(CliRunner().invoke, cli.app, ["fraud", *args], env=env)


async def test_train_promote_roll_back_and_evaluate(
    app: Any, database_url: str, tmp_path: Path
) -> None:
    await _decision(
        app.state.resources.engine, generate(WorldConfig(users=60, days=3)).rows[0], "fraud"
    )
    registry_dir = tmp_path / "models"
    shipped = load_scorer(None).version

    first = await _invoke(
        database_url, "train", *TINY, "--seed", "3", "--model-dir", str(registry_dir)
    )
    assert first.exit_code == 0, first.output
    assert "as challenger" in first.output and "labels" in first.output
    challenger = ModelRegistry(registry_dir).state()["challenger"]
    scorer = load_scorer(registry_dir)
    assert scorer.version == shipped  # a challenger only watches
    assert scorer.challenger is not None and scorer.challenger.version == challenger
    assert scorer.challenger.metadata["training"]["analyst_rows"] >= 1

    promoted = await _invoke(database_url, "promote", "--model-dir", str(registry_dir))
    assert promoted.exit_code == 0, promoted.output
    assert load_scorer(registry_dir).version == challenger

    second = await _invoke(
        database_url,
        "train",
        *TINY,
        "--seed",
        "4",
        "--as",
        "champion",
        "--no-labels",
        "--model-dir",
        str(registry_dir),
    )
    assert second.exit_code == 0, second.output
    newer = load_scorer(registry_dir).version
    assert newer != challenger

    back = await _invoke(
        database_url, "promote", "--version", challenger, "--model-dir", str(registry_dir)
    )
    assert back.exit_code == 0 and load_scorer(registry_dir).version == challenger
    missing = await _invoke(database_url, "promote", "--model-dir", str(registry_dir))
    assert missing.exit_code == 1 and "no challenger" in missing.output

    listed = await _invoke(database_url, "models", "--model-dir", str(registry_dir))
    assert challenger in listed.output and newer in listed.output and "champion" in listed.output

    report = tmp_path / "evaluation.md"
    evaluated = await _invoke(
        database_url, "evaluate", *TINY, "--model-dir", str(registry_dir), "--output", str(report)
    )
    assert evaluated.exit_code == 0, evaluated.output
    text_ = report.read_text()
    assert f"model {challenger}" in text_
    for variant in ("| rules |", "| rules + model |", "| model |"):
        assert variant in text_
    assert "label by action" in text_ and "PR-AUC" in text_
