"""Reading a search's results: checkpoints, each trial's best epoch, model folders exported."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from biometry import atomic
from biometry.constants import OBJECTIVE

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
    return atomic.replace_dir(checkpoint, destination, files=MODEL_FILES)


def best_epoch(history) -> tuple[Any, dict[str, float]]:
    """The row of a trial's lowest objective and its metrics (mm, nme, uncertainty ranking)."""
    row = history.loc[history[OBJECTIVE].idxmin()]
    return row, reported_metrics(row)


def reported_metrics(metrics) -> dict[str, float]:
    """The figures a summary keeps of a report (a dict or a history row): mm, nme, ranking.
    The post-processing sweep's own figures (``postprocess.*``) are reported apart."""
    keys = [k for k in metrics.keys() if not str(k).startswith("postprocess.")
            and (str(k).endswith("_mm") or k in ("nme", "unc_spearman", "aurc"))]
    return {k: float(metrics[k]) for k in keys if _is_number(metrics[k])}


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def export_best_checkpoint(result, destination: Path) -> None:
    """Copy the model files of a Ray result's best checkpoint into ``destination``."""
    checkpoint = min(result.best_checkpoints, key=lambda cm: cm[1].get(OBJECTIVE, math.inf))[0]
    with checkpoint.as_directory() as folder:
        export_model_folder(Path(folder), destination)
    apply_swept_postprocess(result.metrics or {}, destination)


# the last report of a trial whose post-processing was swept carries the kept steps (JSON)
SWEPT_STEPS = "postprocess_steps"


def apply_swept_postprocess(last_result: dict, folder: Path) -> None:
    """Give an exported best checkpoint the steps its trial's post-training sweep kept (the
    checkpoint was saved at the best epoch, before the sweep ran)."""
    import json

    from biometry.inference import set_model_postprocess

    if last_result.get(SWEPT_STEPS):
        set_model_postprocess(folder, json.loads(last_result[SWEPT_STEPS]))
