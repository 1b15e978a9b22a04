"""`billfold fraud evaluate`: how well the decisions separate fraud from honest traffic on a
held-out set, for the rules alone and for the rules with the model, through the very `combine`
a live check uses.

A row counts as flagged when the decision is not `allow` (challenge, review or block: each
stops the money until someone or something confirms it). Precision and recall are of that flag
at the configured thresholds; PR-AUC ranks the rows by the decision's 0-1000 score; the
confusion matrix splits each label by action. The rule set is passed in (the model package does
not import the rules: `billfold fraud evaluate` hands it `compile_rules(DEFAULT_RULES)`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score

from billfold.fraud.model.scorer import Artifact
from billfold.fraud.model.synthetic import Dataset
from billfold.fraud.models import SEVERITY, ModelScore, RuleEvaluator, RuleHit, Thresholds
from billfold.fraud.scoring import combine

ACTIONS: tuple[str, ...] = tuple(SEVERITY)  # allow, challenge, review, block


@dataclass(frozen=True, slots=True)
class Outcome:
    """One variant's results on the held-out rows."""

    name: str
    rows: int
    frauds: int
    precision: float
    recall: float
    pr_auc: float
    tp: int
    fp: int
    fn: int
    tn: int
    # label ("fraud"/"legit") -> action -> rows
    matrix: dict[str, dict[str, int]] = field(default_factory=dict)
    # fraud pattern → share of its rows flagged
    recall_by_pattern: dict[str, float] = field(default_factory=dict)


def outcome(name: str, dataset: Dataset, actions: Sequence[str], scores: Sequence[int]) -> Outcome:
    """The metrics of one list of decisions against the dataset's labels."""
    labels = np.array(dataset.labels)
    flagged = np.array([a != "allow" for a in actions])
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    tn = int((~flagged & (labels == 0)).sum())
    matrix = {
        "legit": {a: 0 for a in ACTIONS},
        "fraud": {a: 0 for a in ACTIONS},
    }
    for label, action in zip(dataset.labels, actions, strict=True):
        matrix["fraud" if label else "legit"][action] += 1
    per_pattern: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    for pattern, action in zip(dataset.patterns, actions, strict=True):
        if pattern != "legit":
            per_pattern[pattern] += 1
            caught[pattern] += action != "allow"
    frauds = int(labels.sum())
    return Outcome(
        name=name,
        rows=len(labels),
        frauds=frauds,
        precision=round(tp / (tp + fp), 4) if tp + fp else 0.0,
        recall=round(tp / (tp + fn), 4) if tp + fn else 0.0,
        pr_auc=round(float(average_precision_score(labels, np.array(scores))), 4)
        if 0 < frauds < len(labels)
        else 0.0,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        matrix=matrix,
        recall_by_pattern={p: round(caught[p] / n, 4) for p, n in sorted(per_pattern.items())},
    )


def evaluate(
    dataset: Dataset,
    rules: RuleEvaluator,
    artifact: Artifact | None,
    thresholds: Thresholds,
) -> list[Outcome]:
    """Rules alone, then (with an artifact) rules + model and the model alone."""
    hits: list[list[RuleHit]] = [rules.evaluate(row) for row in dataset.rows]
    variants: list[tuple[str, list[list[RuleHit]], bool]] = [("rules", hits, False)]
    if artifact is not None:
        variants += [("rules + model", hits, True), ("model", [[] for _ in hits], True)]
        batch = artifact.batch(dataset.rows)
    results: list[Outcome] = []
    for name, variant_hits, with_model in variants:
        actions: list[str] = []
        scores: list[int] = []
        for i, row in enumerate(dataset.rows):
            model = (
                ModelScore(
                    probability=float(batch.probability[i]),
                    anomaly=float(batch.anomaly[i]),
                    version=artifact.version,
                )
                if with_model and artifact is not None
                else None
            )
            decision = combine(
                variant_hits[i], model, thresholds, features=row, rule_version=rules.version
            )
            actions.append(decision.action)
            scores.append(decision.score)
        results.append(outcome(name, dataset, actions, scores))
    return results


def render(results: Sequence[Outcome], thresholds: Thresholds, title: str = "") -> str:
    """The results as Markdown: a summary table, then each variant's confusion matrix."""
    lines: list[str] = []
    if title:
        lines += [title, ""]
    lines += [
        f"Thresholds: challenge ≥ {thresholds.challenge}, review ≥ {thresholds.review}, "
        f"block ≥ {thresholds.block}; flagged = any action but allow.",
        "",
        "| variant | rows | frauds | precision | recall | PR-AUC | TP | FP | FN | TN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.rows} | {r.frauds} | {r.precision:.3f} | {r.recall:.3f} | "
            f"{r.pr_auc:.3f} | {r.tp} | {r.fp} | {r.fn} | {r.tn} |"
        )
    for r in results:
        lines += [
            "",
            f"{r.name}: label by action",
            "",
            "| label | " + " | ".join(ACTIONS) + " |",
            "|---|" + "---:|" * len(ACTIONS),
        ]
        for label in ("legit", "fraud"):
            lines.append(
                f"| {label} | " + " | ".join(str(r.matrix[label][a]) for a in ACTIONS) + " |"
            )
        if r.recall_by_pattern:
            caught = ", ".join(f"{p} {v:.0%}" for p, v in r.recall_by_pattern.items())
            lines += ["", f"{r.name}: recall by pattern: {caught}"]
    return "\n".join(lines)
