"""Which model decides (the champion) and which one is watched in shadow (the challenger).

A registry is a directory of artifacts (`<version>/model.txt, anomaly.onnx, metadata.json`) and a
`registry.json` naming the champion and challenger, with the history of promotions. Two of them
are consulted: the one shipped inside the package (`artifacts/`, a committed champion so a fresh
clone scores without training) and the deployment's own (`BILLFOLD_FRAUD_MODEL_DIR`, default
`<data_dir>/fraud-models`), where `billfold fraud train` installs new versions and whose choice,
when it has one, wins. Processes load the models when they start."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from billfold.config import Settings
from billfold.fraud.model.scorer import Artifact, LightGBMScorer, ModelUnavailable
from billfold.fraud.model.training import METADATA_FILE, Trained
from billfold.fraud.models import Thresholds

Role = Literal["champion", "challenger"]
SHIPPED = Path(__file__).parent / "artifacts"
REGISTRY_FILE = "registry.json"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    version: str
    role: Role | None
    created_at: str
    metrics: dict[str, Any]
    directory: Path


class ModelRegistry:
    """The champion/challenger choice of one directory of artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.root / REGISTRY_FILE).read_text())
        except FileNotFoundError:
            state = {}
        state.setdefault("champion", None)
        state.setdefault("challenger", None)
        state.setdefault("history", [])
        return state

    def _write(self, state: dict[str, Any]) -> None:
        # Atomic: a process starting meanwhile reads the old choice or the new, never half.
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the serving user
        os.replace(tmp, self.root / REGISTRY_FILE)

    def _record(self, state: dict[str, Any], event: str, version: str | None) -> None:
        state["history"].append(
            {"at": datetime.now(UTC).isoformat(), "event": event, "version": version}
        )

    def has(self, version: str) -> bool:
        return (self.root / version / METADATA_FILE).is_file()

    def install(self, trained: Trained, role: Role, thresholds: Thresholds | None = None) -> Path:
        """Save a trained model and make it the champion or the challenger."""
        path = trained.save(self.root, thresholds)
        self.assign(trained.version, role)
        return path

    def assign(self, version: str, role: Role) -> None:
        """Make an installed version the champion (e.g. a rollback) or the challenger."""
        if not self.has(version):
            raise ModelUnavailable(f"no model {version} in {self.root}")
        state = self.state()
        state[role] = version
        if role == "champion" and state["challenger"] == version:
            state["challenger"] = None
        self._record(state, f"set_{role}", version)
        self._write(state)

    def promote(self) -> str:
        """The challenger becomes the champion; returns its version."""
        state = self.state()
        version = state["challenger"]
        if not version:
            raise ModelUnavailable(f"no challenger in {self.root}")
        state["champion"], state["challenger"] = version, None
        self._record(state, "promote", version)
        self._write(state)
        return str(version)

    def drop_challenger(self) -> None:
        state = self.state()
        state["challenger"] = None
        self._record(state, "drop_challenger", None)
        self._write(state)

    def models(self) -> list[ModelInfo]:
        """Every installed version, newest first."""
        state = self.state()
        found: list[ModelInfo] = []
        if not self.root.is_dir():
            return found
        for meta_file in self.root.glob(f"*/{METADATA_FILE}"):
            meta = json.loads(meta_file.read_text())
            version = meta["version"]
            role: Role | None = (
                "champion"
                if version == state["champion"]
                else "challenger"
                if version == state["challenger"]
                else None
            )
            found.append(
                ModelInfo(
                    version, role, meta["created_at"], meta.get("metrics", {}), meta_file.parent
                )
            )
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def artifact(self, role: Role) -> Artifact | None:
        version = self.state()[role]
        return Artifact(self.root / version) if version else None


def load_scorer(model_dir: Path | None = None) -> LightGBMScorer:
    """The scorer the service runs: the deployment's champion if it chose one, else the shipped
    champion; the deployment's challenger, if any, in shadow. Raises `ModelUnavailable` when no
    champion loads (the service then decides on rules alone, stricter)."""
    local = ModelRegistry(model_dir) if model_dir is not None else None
    champion = local.artifact("champion") if local is not None else None
    if champion is None:
        shipped = ModelRegistry(SHIPPED).artifact("champion")
        if shipped is None:
            raise ModelUnavailable("no champion model is installed or shipped")
        champion = shipped
    challenger = local.artifact("challenger") if local is not None else None
    return LightGBMScorer(champion, challenger)


def model_dir(settings: Settings) -> Path:
    """The deployment's registry directory (`fraud_model_dir`, else data_dir/fraud-models)."""
    return settings.fraud_model_dir or settings.data_dir / "fraud-models"
