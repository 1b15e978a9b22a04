"""Training: a LightGBM classifier (is this fraud?) and an IsolationForest anomaly detector (is
this unusual?) on the synthetic world plus the analysts' labels, saved as a versioned artifact.

An artifact is a directory: `model.txt` (LightGBM's own text format, pinned by the LightGBM
version in metadata), `anomaly.onnx` (the IsolationForest as ONNX, run by onnxruntime) and
`metadata.json` (version, feature order, anomaly calibration, thresholds, metrics, the training
data's digest). The IsolationForest is written as ONE ONNX `TreeEnsembleRegressor` whose leaves
hold each tree's path length, rather than through skl2onnx's converter: that one builds ~30
ONNX nodes per tree, and 3,000 tiny operators cost 1-5 ms per row, while a single tree ensemble
answers in ~10 µs with the same scores (checked against scikit-learn in the tests)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import onnx
import sklearn
from onnx import TensorProto, helper
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, precision_score, recall_score

from billfold.fraud.model.synthetic import Dataset, WorldConfig, generate
from billfold.fraud.models import MODEL_FEATURES, FeatureValue, Thresholds

ARTIFACT_FORMAT = 1
MODEL_FILE, ANOMALY_FILE, METADATA_FILE = "model.txt", "anomaly.onnx", "metadata.json"
EULER_GAMMA = 0.5772156649015329

# Small and deterministic: the champion is committed to the repository and must rebuild the
# same from the same data; one thread, as the machines that train also serve.
LGB_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
    "verbose": -1,
}
ROUNDS = 200
ANALYST_WEIGHT = 5.0  # a reviewer's verdict on a real case outweighs a simulated row
ANOMALY_TREES, ANOMALY_SAMPLES, ANOMALY_FIT_ROWS = 100, 256, 20_000
# IP velocity is left to the rules and lists: a simulated world of a few thousand users cannot
# reproduce carrier NAT and office networks shared by thousands, so a model would learn that a
# busy IP is a bad one and flag everyone behind one.
LEFT_TO_RULES = ("ip_count_1h", "ip_users_24h")
INPUTS: tuple[str, ...] = tuple(n for n in MODEL_FEATURES if n not in LEFT_TO_RULES)
# More attempts, more declines, more people on one device or paying one recipient, faster
# travel: never less suspicious. Without these constraints a tree ensemble may allow the fourth
# attempt of a burst it sent to review on the third.
INCREASING = (
    "user_count_1m",
    "user_count_1h",
    "user_count_24h",
    "card_count_1m",
    "card_count_1h",
    "card_declines_1h",
    "user_declines_24h",
    "device_users_24h",
    "recipient_senders_24h",
    "user_recipients_24h",
    "speed_kmh",
)
MONOTONE = [1 if name in INCREASING else 0 for name in INPUTS]


def as_matrix(
    rows: Iterable[Mapping[str, FeatureValue]], names: Sequence[str] = INPUTS
) -> np.ndarray:
    """Rows of features → a float64 matrix in `names` order (bools as 0/1, a missing or
    non-numeric value as NaN, which LightGBM treats as missing)."""
    return np.array([[model_input(row.get(name)) for name in names] for row in rows]).reshape(
        -1, len(names)
    )


def model_input(value: FeatureValue) -> float:
    """One feature as the model takes it: a number, NaN when missing or non-numeric."""
    if value is None or isinstance(value, str):
        return math.nan
    return float(value)


def digest(
    matrix: np.ndarray, labels: np.ndarray, weights: np.ndarray, params: Mapping[str, Any]
) -> str:
    """The fingerprint of what was trained: same rows, labels, weights and parameters → same
    digest (and so the same version name)."""
    h = hashlib.sha256()
    for part in (matrix, labels, weights):
        h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def holdout(dataset: Dataset, share: float = 0.25) -> tuple[list[int], list[int]]:
    """Train and test row indices split by user (a user's rows never sit on both sides), by a
    hash of the user id so the split is stable."""
    train: list[int] = []
    test: list[int] = []
    for i, user in enumerate(dataset.users):
        bucket = int.from_bytes(hashlib.sha256(user.encode()).digest()[:4], "big") / 2**32
        (test if bucket < share else train).append(i)
    return train, test


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the mean path length of an unsuccessful search in a binary search tree of n
    points (Liu et al., Isolation Forest), as scikit-learn's IsolationForest uses it."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + EULER_GAMMA) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def iforest_to_onnx(forest: IsolationForest, n_features: int) -> bytes:
    """The forest as one ONNX tree ensemble that outputs the SUM of the trees' path lengths
    (each leaf: its depth + c(samples in the leaf) - 1, as scikit-learn scores it)."""
    if any(len(f) != n_features for f in forest.estimators_features_):
        raise ValueError("the forest must be fitted on every feature (max_features=1.0)")
    attrs: dict[str, Any] = {
        k: []
        for k in (
            "nodes_treeids",
            "nodes_nodeids",
            "nodes_featureids",
            "nodes_values",
            "nodes_modes",
            "nodes_truenodeids",
            "nodes_falsenodeids",
            "target_treeids",
            "target_nodeids",
            "target_ids",
            "target_weights",
        )
    }
    for t, estimator in enumerate(forest.estimators_):
        tree = estimator.tree_
        depths = tree.compute_node_depths()  # the root is 1
        path = depths + average_path_length(tree.n_node_samples) - 1.0
        for n in range(tree.node_count):
            leaf = tree.children_left[n] == -1
            attrs["nodes_treeids"].append(t)
            attrs["nodes_nodeids"].append(n)
            attrs["nodes_featureids"].append(0 if leaf else int(tree.feature[n]))
            attrs["nodes_values"].append(0.0 if leaf else float(tree.threshold[n]))
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else int(tree.children_left[n]))
            attrs["nodes_falsenodeids"].append(0 if leaf else int(tree.children_right[n]))
            if leaf:
                attrs["target_treeids"].append(t)
                attrs["target_nodeids"].append(n)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(float(path[n]))
    node = helper.make_node(
        "TreeEnsembleRegressor",
        ["X"],
        ["path_length"],
        domain="ai.onnx.ml",
        n_targets=1,
        aggregate_function="SUM",
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "isolation_forest",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("path_length", TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
        producer_name="billfold",
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def raw_anomaly(path_lengths: np.ndarray, trees: int, samples: int) -> np.ndarray:
    """scikit-learn's anomaly score (0.5 ordinary .. 1 isolated at once) from summed path
    lengths: 2 ** -(mean path length / c(samples))."""
    c = float(average_path_length(np.array([samples]))[0])
    return np.power(2.0, -(path_lengths / trees) / c)


def anomaly_input(matrix: np.ndarray) -> np.ndarray:
    """What the anomaly detector is fed: float32, missing values as 0."""
    return np.nan_to_num(matrix, nan=0.0).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Maps the raw anomaly score to 0..1: 0 at the median legitimate row, 1 at the rarest
    (the 99.9th percentile of legitimate training rows) and beyond."""

    trees: int
    samples: int
    low: float
    high: float

    def scale(self, raw: np.ndarray) -> np.ndarray:
        return np.clip((raw - self.low) / max(self.high - self.low, 1e-9), 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Metrics:
    rows: int
    frauds: int
    pr_auc: float
    precision: float
    recall: float
    threshold: float


@dataclass(slots=True)
class Trained:
    """A trained model pair with what is needed to save and describe it."""

    booster: lightgbm.Booster
    anomaly_onnx: bytes
    calibration: Calibration
    data_digest: str
    metrics: dict[str, Metrics]
    rows: int
    analyst_rows: int
    world: dict[str, Any]
    version: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def metadata(self, thresholds: Thresholds) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "features": list(INPUTS),
            "classifier": {
                "library": "lightgbm",
                "library_version": lightgbm.__version__,
                "file": MODEL_FILE,
                "params": {**LGB_PARAMS, "monotone_increasing": list(INCREASING)},
                "rounds": self.booster.num_trees(),
            },
            "anomaly": {
                "library": "scikit-learn IsolationForest → ONNX TreeEnsembleRegressor",
                "library_version": sklearn.__version__,
                "file": ANOMALY_FILE,
                **asdict(self.calibration),
            },
            "thresholds": asdict(thresholds),
            "training": {
                "data_digest": self.data_digest,
                "rows": self.rows,
                "analyst_rows": self.analyst_rows,
                "world": self.world,
            },
            "metrics": {name: asdict(m) for name, m in self.metrics.items()},
        }

    def save(self, directory: Path, thresholds: Thresholds | None = None) -> Path:
        """Write the artifact into `directory/<version>/` and return that path."""
        target = directory / self.version
        target.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(target / MODEL_FILE))
        (target / ANOMALY_FILE).write_bytes(self.anomaly_onnx)
        meta = self.metadata(thresholds or Thresholds())
        (target / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return target


def predict(booster: lightgbm.Booster, matrix: np.ndarray) -> np.ndarray:
    """Fraud probabilities of many rows."""
    return np.asarray(booster.predict(matrix, num_threads=1), dtype=np.float64)


def _metrics(labels: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> Metrics:
    flagged = probability >= threshold
    frauds = int(labels.sum())
    return Metrics(
        rows=len(labels),
        frauds=frauds,
        pr_auc=round(float(average_precision_score(labels, probability)), 4) if frauds else 0.0,
        precision=round(float(precision_score(labels, flagged, zero_division=0)), 4),
        recall=round(float(recall_score(labels, flagged, zero_division=0)), 4),
        threshold=threshold,
    )


def train(
    dataset: Dataset,
    *,
    analyst: Sequence[tuple[Mapping[str, FeatureValue], int]] = (),
    world: WorldConfig | None = None,
    seed: int = 7,
    rounds: int = ROUNDS,
) -> Trained:
    """Fit the classifier on the synthetic training users plus every analyst label, measure it
    on the held-out users, and fit the anomaly detector on legitimate training rows."""
    train_idx, test_idx = holdout(dataset)
    matrix = as_matrix(dataset.rows)
    labels = np.array(dataset.labels, dtype=np.float64)
    x_train, y_train = matrix[train_idx], labels[train_idx]
    w_train = np.ones(len(train_idx))
    if analyst:
        x_train = np.vstack([x_train, as_matrix(row for row, _ in analyst)])
        y_train = np.concatenate([y_train, np.array([float(y) for _, y in analyst])])
        w_train = np.concatenate([w_train, np.full(len(analyst), ANALYST_WEIGHT)])

    params = {**LGB_PARAMS, "seed": seed, "monotone_constraints": MONOTONE}
    booster = lightgbm.train(
        params,
        lightgbm.Dataset(
            x_train, y_train, weight=w_train, feature_name=list(INPUTS), free_raw_data=True
        ),
        num_boost_round=rounds,
    )

    legit = x_train[y_train == 0]
    rng = np.random.default_rng(seed)
    if len(legit) > ANOMALY_FIT_ROWS:
        legit = legit[rng.choice(len(legit), ANOMALY_FIT_ROWS, replace=False)]
    samples = min(ANOMALY_SAMPLES, len(legit))
    forest = IsolationForest(
        n_estimators=ANOMALY_TREES, max_samples=samples, random_state=seed, n_jobs=1
    ).fit(anomaly_input(legit))
    onnx_bytes = iforest_to_onnx(forest, len(INPUTS))
    raw = -forest.score_samples(anomaly_input(legit))
    calibration = Calibration(
        trees=ANOMALY_TREES,
        samples=samples,
        low=float(np.quantile(raw, 0.5)),
        high=float(np.quantile(raw, 0.999)),
    )

    metrics = {"train": _metrics(y_train, predict(booster, x_train))}
    if test_idx:
        metrics["holdout"] = _metrics(labels[test_idx], predict(booster, matrix[test_idx]))
    data_digest = digest(x_train, y_train, w_train, {**params, "rounds": rounds})
    trained = Trained(
        booster=booster,
        anomaly_onnx=onnx_bytes,
        calibration=calibration,
        data_digest=data_digest,
        metrics=metrics,
        rows=len(y_train),
        analyst_rows=len(analyst),
        world=_world_dict(world),
    )
    trained.version = f"{datetime.now(UTC):%Y%m%d}-{data_digest[:10]}"
    return trained


def _world_dict(world: WorldConfig | None) -> dict[str, Any]:
    if world is None:
        return {}
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(world).items()}


def train_synthetic(
    world: WorldConfig | None = None,
    analyst: Sequence[tuple[Mapping[str, FeatureValue], int]] = (),
    rounds: int = ROUNDS,
) -> Trained:
    """Generate the world, then `train` on it (what `billfold fraud train` runs)."""
    world = world or WorldConfig()
    return train(generate(world), analyst=analyst, world=world, seed=world.seed, rounds=rounds)
