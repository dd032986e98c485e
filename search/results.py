"""Reading a finished (or interrupted) search from its run folder: checkpoints, best model, table."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import yaml

MODEL_FILES = ("model.pt", "model.yaml")


def checkpoint_value(folder: Path, objective: str) -> float:
    """The validation value a checkpoint was saved with (its ``model.yaml`` metrics)."""
    try:
        spec = yaml.safe_load((folder / "model.yaml").read_text())
        return float(spec["metrics"][objective])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return math.inf


def best_checkpoint_folder(trial_dir: str | Path, objective: str) -> Path | None:
    """The trial's kept checkpoint with the lowest objective (Ray keeps the best and the latest)."""
    trial_dir = Path(trial_dir)
    if not trial_dir.is_dir():
        return None
    folders = [p for p in trial_dir.glob("checkpoint_*") if (p / "model.pt").is_file()]
    if not folders:
        return None
    best = min(folders, key=lambda p: checkpoint_value(p, objective))
    return best if math.isfinite(checkpoint_value(best, objective)) else None


def export_model_folder(checkpoint: Path, destination: Path) -> Path:
    """Copy a checkpoint's model files into ``destination`` (replacing it atomically)."""
    staging = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(checkpoint / name, staging / name)
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination
