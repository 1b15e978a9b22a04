"""How rule hits and the model's score become one decision. Pure: the same function decides a
live check, a backtest and `billfold fraud evaluate`."""

from __future__ import annotations

from collections.abc import Iterable

from billfold.fraud.models import (
    SEVERITY,
    Action,
    Assessment,
    Features,
    ModelScore,
    RuleHit,
    Thresholds,
)

# The anomaly detector alone is weak evidence: it may raise the score by this much at most.
ANOMALY_POINTS = 200
ALLOW_LIST = "allow"


def model_points(model: ModelScore | None) -> int:
    """The model's share of the score: its fraud probability on 0-1000, plus at most
    `ANOMALY_POINTS` for an unusual pattern that the classifier has not learned."""
    if model is None:
        return 0
    points = round(1000 * model.probability) + round(ANOMALY_POINTS * max(0.0, model.anomaly))
    return min(1000, points)


def combine(
    hits: Iterable[RuleHit],
    model: ModelScore | None,
    thresholds: Thresholds,
    *,
    features: Features,
    rule_version: str | None = None,
    degraded: bool = False,
) -> Assessment:
    """One action from enforced rule hits (shadow hits are kept for the record only) and the
    model. The score is the larger of the rules' summed points and the model's points; the
    action is the score's band or the most severe direct action, whichever is worse. An
    allow-list hit (a rule with action `allow` and reason code starting `allow_list`) wins over
    everything but a direct block. A user who passed a step-up for this attempt is not
    challenged again."""
    hits = tuple(hits)
    enforced = [h for h in hits if not h.shadow]
    rules_score = min(1000, sum(max(0, h.score) for h in enforced))
    score = max(rules_score, model_points(model))
    shift = thresholds.degraded_shift if degraded else 0
    action: Action = "allow"
    if score >= thresholds.block - shift:
        action = "block"
    elif score >= thresholds.review - shift:
        action = "review"
    elif score >= thresholds.challenge - shift:
        action = "challenge"
    direct = [h.action for h in enforced if h.action is not None and h.action != ALLOW_LIST]
    for floor in direct:
        if SEVERITY[floor] > SEVERITY[action]:
            action = floor
    allow_listed = any(
        h.action == ALLOW_LIST and h.reason_code.startswith("allow_list") for h in enforced
    )
    if allow_listed and "block" not in direct:
        action = "allow"
    if action == "challenge" and bool(features.get("stepped_up")):
        action = "allow"
    reasons = [h.reason_code for h in enforced if h.score > 0 or h.action is not None]
    explanations = [h.description for h in enforced if h.score > 0 or h.action is not None]
    if model is not None and model_points(model) >= thresholds.challenge - shift:
        reasons.append("model_score")
        top = sorted(model.contributions, key=lambda c: -c.weight)[:3]
        named = ", ".join(f"{c.feature}={c.value}" for c in top if c.weight > 0)
        explanations.append(
            f"The model puts fraud at {model.probability:.0%}"
            + (f", mostly because of {named}" if named else "")
        )
    if degraded:
        reasons.append("degraded_features")
        explanations.append("Live features were unavailable; stricter thresholds applied")
    return Assessment(
        action=action,
        score=score,
        reasons=tuple(dict.fromkeys(reasons)),
        explanations=tuple(explanations),
        hits=hits,
        model=model,
        rule_version=rule_version,
        features=dict(features),
        degraded=degraded,
    )
