"""Scoring one payment or transfer: the champion's fraud probability, its anomaly score and the
features that weighed most; a challenger, if any, scored in shadow beside it.

Per-row cost matters (the whole check has a 5 ms p99 budget): `Booster.predict` spends ~50 µs
of Python and parameter parsing around a row, so one row goes through LightGBM's own single-row
C API, set up once per artifact (`SingleRowPredictor`, ~10 µs); the ONNX anomaly is ~15 µs; the
per-feature contributions (`pred_contrib`) cost ~250 µs, so they are computed only when the
probability is high enough for someone to read them."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import onnxruntime
from lightgbm.basic import _C_API_DTYPE_FLOAT64, _C_API_PREDICT_NORMAL, _LIB, _safe_call

from billfold.fraud.model.training import (
    ANOMALY_FILE,
    METADATA_FILE,
    MODEL_FILE,
    Calibration,
    anomaly_input,
    as_matrix,
    average_path_length,
    model_input,
    predict,
    raw_anomaly,
)
from billfold.fraud.models import MODEL_FEATURES, Contribution, FeatureValue, ModelScore

# Below this probability nobody reads the explanation (the model's points stay well under the
# challenge band), so the costly per-feature contributions are skipped.
EXPLAIN_ABOVE = 0.2
TOP_CONTRIBUTIONS = 5


class ModelUnavailable(Exception):
    """No usable model artifact (missing, corrupt, or made for other features)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Scores of many rows at once (evaluation and backtests)."""

    probability: np.ndarray
    anomaly: np.ndarray


class SingleRowPredictor:
    """LightGBM's `LGBM_BoosterPredictForMatSingleRowFast`: the prediction parameters are
    parsed once here, not on every call as `Booster.predict` does (the same numbers: a unit test
    compares them). The booster serialises single-row predictions itself, so threads may share
    one."""

    def __init__(self, booster: lightgbm.Booster, columns: int) -> None:
        self._booster = booster  # the handle below lives as long as the booster
        self._config = ctypes.c_void_p()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle,
                ctypes.c_int(_C_API_PREDICT_NORMAL),
                ctypes.c_int(0),  # from the first iteration
                ctypes.c_int(booster.best_iteration),  # as `predict` does; <= 0: all
                ctypes.c_int(_C_API_DTYPE_FLOAT64),
                ctypes.c_int32(columns),
                b"num_threads=1",
                ctypes.byref(self._config),
            )
        )
        self.columns = columns

    def __call__(self, row: np.ndarray) -> float:
        """The probability of one C-contiguous float64 row of `columns` values."""
        if row.dtype != np.float64 or row.size != self.columns or not row.flags.c_contiguous:
            raise ValueError("a single row of float64 features is expected")
        length = ctypes.c_int64()
        result = ctypes.c_double()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFast(
                self._config,
                row.ctypes.data_as(ctypes.c_void_p),
                ctypes.byref(length),
                ctypes.byref(result),
            )
        )
        return result.value

    def __del__(self) -> None:
        if self._config:
            _LIB.LGBM_FastConfigFree(self._config)
            self._config = ctypes.c_void_p()


class Artifact:
    """One trained model pair loaded from its directory."""

    def __init__(self, directory: Path) -> None:
        try:
            self.metadata: dict[str, Any] = json.loads((directory / METADATA_FILE).read_text())
            self.version: str = self.metadata["version"]
            self.features: tuple[str, ...] = tuple(self.metadata["features"])
            self.booster = lightgbm.Booster(model_file=str(directory / MODEL_FILE))
            options = onnxruntime.SessionOptions()
            # One thread and no spinning: a check is one row; extra threads only add wake-ups.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(
                (directory / ANOMALY_FILE).read_bytes(),
                options,
                providers=["CPUExecutionProvider"],
            )
            anomaly = self.metadata["anomaly"]
            self.calibration = Calibration(
                trees=int(anomaly["trees"]),
                samples=int(anomaly["samples"]),
                low=float(anomaly["low"]),
                high=float(anomaly["high"]),
            )
        except Exception as exc:  # files, JSON, LightGBM and onnxruntime (its own error types)
            raise ModelUnavailable(f"cannot load the model in {directory}: {exc}") from exc
        # The artifact names its inputs in order; one this code does not compute would be fed
        # NaN forever, so such a model is refused rather than silently blind.
        unknown = set(self.features) - set(MODEL_FEATURES)
        if unknown or self.booster.num_feature() != len(self.features):
            raise ModelUnavailable(
                f"model {self.version} expects features this code does not provide: "
                f"{sorted(unknown)}"
            )
        self.directory = directory
        self._c = float(average_path_length(np.array([self.calibration.samples]))[0])
        self._predict_one = SingleRowPredictor(self.booster, len(self.features))
        # Only the output the anomaly needs: onnxruntime then fetches nothing else.
        self._anomaly_output = [self.session.get_outputs()[0].name]

    def values(self, features: Mapping[str, FeatureValue]) -> list[float]:
        """The model's inputs in its order (`as_matrix`'s row: missing or non-numeric is NaN)."""
        return [model_input(features.get(name)) for name in self.features]

    def vector(self, features: Mapping[str, FeatureValue]) -> np.ndarray:
        return np.array([self.values(features)], dtype=np.float64)

    def anomaly(self, matrix: np.ndarray) -> np.ndarray:
        (paths,) = self.session.run(None, {"X": anomaly_input(matrix)})
        raw = raw_anomaly(
            paths[:, 0].astype(np.float64), self.calibration.trees, self.calibration.samples
        )
        return self.calibration.scale(raw)

    def anomaly_one(self, values: list[float]) -> float:
        """`anomaly` of one row (`values`) in plain floats: numpy's per-call overhead on
        1-element arrays would cost more than the forest itself. Missing values are 0, as
        `anomaly_input` makes them (an infinity stays one: a tree compares it as it would
        float32's largest number)."""
        x = np.array([[0.0 if v != v else v for v in values]], dtype=np.float32)
        (paths,) = self.session.run(self._anomaly_output, {"X": x})
        raw = 2.0 ** (-(float(paths[0, 0]) / self.calibration.trees) / self._c)
        low, high = self.calibration.low, self.calibration.high
        return min(1.0, max(0.0, (raw - low) / max(high - low, 1e-9)))

    def score(self, features: Mapping[str, FeatureValue], *, explain: bool = True) -> ModelScore:
        values = self.values(features)
        row = np.array([values], dtype=np.float64)
        probability = self._predict_one(row)
        contributions: tuple[Contribution, ...] = ()
        if explain and probability >= EXPLAIN_ABOVE:
            contributions = self.contributions(row, features)
        return ModelScore(
            probability=round(probability, 6),
            anomaly=round(self.anomaly_one(values), 6),
            version=self.version,
            contributions=contributions,
        )

    def contributions(
        self, row: np.ndarray, features: Mapping[str, FeatureValue]
    ) -> tuple[Contribution, ...]:
        """The features that moved the fraud log-odds most (SHAP values from LightGBM), largest
        first by magnitude."""
        weights = self.booster.predict(row, pred_contrib=True, num_threads=1)[0][:-1]  # no bias
        order = np.argsort(-np.abs(weights))[:TOP_CONTRIBUTIONS]
        return tuple(
            Contribution(
                feature=self.features[i],
                value=features.get(self.features[i]),
                weight=round(float(weights[i]), 4),
            )
            for i in order
            if weights[i] != 0
        )

    def batch(self, rows: Sequence[Mapping[str, FeatureValue]]) -> Batch:
        """Scores of many rows in one call (evaluation, backtests)."""
        matrix = as_matrix(rows, self.features)
        return Batch(
            probability=predict(self.booster, matrix),
            anomaly=self.anomaly(matrix),
        )


class LightGBMScorer:
    """The `Scorer` of the fraud service: the champion decides, a challenger (if registered)
    is scored in shadow on the same features and reported beside it, never enforced."""

    def __init__(self, champion: Artifact, challenger: Artifact | None = None) -> None:
        self.champion = champion
        self.challenger = challenger
        self.version = champion.version

    def score(self, features: Mapping[str, FeatureValue]) -> ModelScore:
        score = self.champion.score(features)
        if self.challenger is None:
            return score
        shadow = self.challenger.score(features, explain=False)
        return ModelScore(
            probability=score.probability,
            anomaly=score.anomaly,
            version=score.version,
            contributions=score.contributions,
            challenger=shadow,
        )
