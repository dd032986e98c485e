"""What ``evaluate`` and ``predict`` share: run a predictor over image files, build the
``predictions.csv`` table, the ``summary.json`` metrics and the uncertainty triage.

Everything goes through :class:`biometry.inference.LandmarkPredictor`, the one prediction path the
search validates with, so ``evaluate`` on the validation split gives the numbers the search logged.

Example::

    predictor = LandmarkPredictor.from_folder("runs/NAME/best")
    records = load_records("data/hc18")
    preds = predict_records(predictor, records)
    preds.write_csv("out/predictions.csv")
    summary = evaluation_summary(preds, np.stack([r.landmarks for r in records]))
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from biometry import atomic
from biometry.constants import SPLITS
from biometry.errors import BiometryInputError
from biometry.io import read_grayscale, split_by_subject
from biometry.metrics import (
    error_at_coverage,
    landmark_errors,
    measurements_mm,
    per_image_errors,
    summarize,
)
from biometry.records import LANDMARK_NAMES, LandmarkRecord

PREDICTION_COLUMNS = (
    "image", "bpd_x1", "bpd_y1", "bpd_x2", "bpd_y2", "ofd_x1", "ofd_y1", "ofd_x2", "ofd_y2",
    "bpd_mm", "ofd_mm", "hc_mm", "uncertainty", "flagged",
)
"""``predictions.csv`` columns (``shared/docs/interfaces.md``): keep exactly."""

COVERAGES = (0.8, 0.9)
"""Coverages at which ``summary.json`` reports the error of the kept (least uncertain) images."""


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Predictions for N images.

    Attributes:
        names: image names as the user gave them (relative to the data folder / image folder).
        landmarks: float64 (N, 4, 2) in original image pixels, rows BPD1, BPD2, OFD1, OFD2.
        pixel_mm: float64 (N,) pixel spacing in mm.
        uncertainty: float64 (N,) per-image uncertainty (larger = less certain).
        flagged: int (N,) 1 where ``uncertainty`` is above the model's threshold.
    """

    names: list[str]
    landmarks: np.ndarray
    pixel_mm: np.ndarray
    uncertainty: np.ndarray
    flagged: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def measurements(self) -> dict[str, np.ndarray]:
        """``{"bpd", "ofd", "hc"}`` in mm; HC is the Ramanujan perimeter of the BPD x OFD
        ellipse."""
        return measurements_mm(self.landmarks, self.pixel_mm)

    def table(self) -> pd.DataFrame:
        """The ``predictions.csv`` table, columns :data:`PREDICTION_COLUMNS`."""
        mm = self.measurements()
        frame = pd.DataFrame({"image": self.names})
        coords = self.landmarks.reshape(len(self), 8)
        for i, column in enumerate(PREDICTION_COLUMNS[1:9]):
            frame[column] = coords[:, i]
        for m in ("bpd", "ofd", "hc"):
            frame[f"{m}_mm"] = mm[m]
        frame["uncertainty"] = self.uncertainty
        frame["flagged"] = self.flagged.astype(int)
        return frame[list(PREDICTION_COLUMNS)]

    def write_csv(self, path: str | Path) -> Path:
        """Write ``predictions.csv`` (coordinates and mm to 4 decimals, uncertainty to 6
        significant digits)."""
        path = Path(path)
        frame = self.table()
        rounded = {c: 4 for c in PREDICTION_COLUMNS[1:12]}
        frame = frame.round(rounded)
        frame["uncertainty"] = [float(f"{u:.6g}") for u in frame["uncertainty"]]
        atomic.write_text(path, frame.to_csv(index=False, lineterminator="\n"))
        return path


def read_predictions_csv(path: str | Path) -> pd.DataFrame:
    """Read a ``predictions.csv`` back (``image`` kept as text)."""
    return pd.read_csv(path, dtype={"image": str})


def predict_files(predictor, paths: Sequence[str | Path], *, batch_size: int = 16,
                  threads: int = 2,
                  pixel_mm: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and predict image files batch by batch (only one batch is held in memory).
    ``pixel_mm``: each file's pixel size, for a model that measures small heads by its mask.

    Returns ``(landmarks (N, 4, 2) original pixels, uncertainty (N,))``. A file that cannot be
    decoded raises :class:`BiometryInputError` naming it.
    """
    if batch_size < 1:
        raise BiometryInputError(f"--batch-size must be >= 1 but got {batch_size}")
    coords, uncertainty = [], []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(paths), batch_size):
            images = list(pool.map(read_grayscale, paths[start:start + batch_size]))
            spacing = None if pixel_mm is None else pixel_mm[start:start + batch_size]
            c, u = predictor.predict(images, batch_size=batch_size, pixel_mm=spacing)
            coords.append(c)
            uncertainty.append(np.asarray(u, dtype=np.float64).reshape(-1))
    if not coords:
        return np.zeros((0, 4, 2)), np.zeros(0)
    return np.concatenate(coords).astype(np.float64), np.concatenate(uncertainty)


def predict_paths(predictor, names: Sequence[str], paths: Sequence[str | Path],
                  pixel_mm: Sequence[float], *, batch_size: int = 16) -> Predictions:
    """Predict image files and package the result with names, spacing and the triage flag."""
    landmarks, uncertainty = predict_files(predictor, paths, batch_size=batch_size,
                                           pixel_mm=list(pixel_mm))
    return Predictions(names=list(names), landmarks=landmarks,
                       pixel_mm=np.asarray(pixel_mm, dtype=np.float64), uncertainty=uncertainty,
                       flagged=np.asarray(predictor.flagged(uncertainty), dtype=int))


def predict_records(predictor, records: Sequence[LandmarkRecord], *,
                    batch_size: int = 16) -> Predictions:
    """Predict labelled records (their labels are not used)."""
    return predict_paths(predictor, [r.name for r in records], [r.image for r in records],
                         [r.pixel_mm for r in records], batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# The model's own split
# ---------------------------------------------------------------------------------------------


def select_split(records: list[LandmarkRecord], spec, split: str, *, data: str | Path,
                 skipped: int = 0) -> list[LandmarkRecord]:
    """The records of ``split`` as the model's training split them (``model.yaml`` ``data``).

    Training imported ``data.source``, kept its first ``trial_config.data.limit`` records (when
    set) and split them by subject with ``split_seed`` and ``(1 - val - test, val, test)``; this
    repeats it. When ``data`` is not the training source (or ``skipped`` records are missing) the
    split is recomputed on what was given, with a warning on stderr: its subjects need not be
    those the model was trained or tuned on.
    """
    if split not in SPLITS:
        raise BiometryInputError(f"--split {split}: must be one of {', '.join(SPLITS)}")
    if split == "all":
        return list(records)
    info = spec.data or {}
    missing = [k for k in ("split_seed", "val_fraction", "test_fraction") if k not in info]
    if missing:
        raise BiometryInputError(f"model.yaml: 'data.{missing[0]}' is missing, so the training "
                                 f"split cannot be reproduced; use --split all")
    val, test = float(info["val_fraction"]), float(info["test_fraction"])
    same = same_data(info.get("source"), data)
    if not same:
        _warn(f"{data} is not the model's training data ({info.get('source')}); the {split} "
              f"split is recomputed on its subjects and may overlap the training subjects")
    elif skipped:
        _warn(f"{skipped} records were skipped, so the {split} split may differ from training")
    limit = int((spec.trial_config.get("data") or {}).get("limit") or 0) if same else 0
    if limit:
        records = records[:limit]
    parts = split_by_subject(records, fractions=(1.0 - val - test, val, test),
                             seed=int(info["split_seed"]))
    chosen = parts[split]
    if not chosen:
        raise BiometryInputError(f"--split {split}: no records (model.yaml data: val_fraction "
                                 f"{val:g}, test_fraction {test:g}, {len(records)} records)")
    return chosen


def same_data(source: str | None, data: str | Path) -> bool:
    """Whether ``data`` is the training ``source`` (a folder and its ``landmarks.csv`` count as
    the same)."""
    if not source:
        return False

    def canonical(p: str | Path) -> Path:
        p = Path(p).expanduser().resolve()
        return p.parent if p.name == "landmarks.csv" else p

    return canonical(source) == canonical(data)


# ---------------------------------------------------------------------------------------------
# Metrics and triage
# ---------------------------------------------------------------------------------------------


def per_image_table(preds: Predictions, true: np.ndarray) -> pd.DataFrame:
    """One row per image: reference and predicted mm, signed errors, landmark errors, NME,
    uncertainty and flag (``per_image.csv``), in the order of ``preds``."""
    errors = per_image_errors(preds.landmarks, true, preds.pixel_mm)
    frame = pd.DataFrame({"image": preds.names, "pixel_mm": preds.pixel_mm})
    for m in ("bpd", "ofd", "hc"):
        for kind in ("true", "pred", "error"):
            frame[f"{m}_{kind}_mm"] = errors[f"{m}_{kind}_mm"]
    frame["measure_error_mm"] = errors["measure_error_mm"]
    per_landmark = landmark_errors(preds.landmarks, true)
    for i, name in enumerate(LANDMARK_NAMES):
        frame[f"{name}_error_px"] = per_landmark[:, i]
    frame["landmark_error_px"] = errors["landmark_error_px"]
    frame["landmark_error_mm"] = errors["landmark_error_mm"]
    frame["nme"] = errors["nme"]
    frame["uncertainty"] = preds.uncertainty
    frame["flagged"] = preds.flagged.astype(int)
    return frame


def evaluation_summary(preds: Predictions, true: np.ndarray, *, threshold: float | None = None,
                       coverage_target: float | None = None,
                       meta: dict | None = None) -> dict:
    """The content of ``summary.json``.

    ``meta`` (model, data, split, ...) comes first; then every ``summarize(...).as_dict()``
    metric (``val_measure_l1_mm``, ``bpd_l1_mm`` ... ``hc_loa_high_mm``, ``nme``,
    ``unc_spearman``, ``aurc``); the mean landmark error in px and mm, overall and per landmark
    (``bpd1_error_px``, ``bpd1_error_mm``, ...); and the triage: the model's
    ``uncertainty_threshold`` and ``coverage_target``, ``n_flagged``, ``flagged_fraction``, the
    error of the unflagged and flagged images and ``error_at_80_coverage_mm`` /
    ``error_at_90_coverage_mm`` (mean of |BPD error| and |OFD error| over the least uncertain
    80% / 90%). Non-finite numbers (e.g. the SD of one image) are written as null.
    """
    true = np.asarray(true, dtype=np.float64)
    out: dict = {**(meta or {}), "n_images": len(preds)}
    out.update(summarize(preds.landmarks, true, preds.pixel_mm,
                         uncertainty=preds.uncertainty).as_dict())
    errors = per_image_errors(preds.landmarks, true, preds.pixel_mm)
    out["landmark_error_px"] = float(errors["landmark_error_px"].mean())
    out["landmark_error_mm"] = float(errors["landmark_error_mm"].mean())
    per_landmark = landmark_errors(preds.landmarks, true)
    for i, name in enumerate(LANDMARK_NAMES):
        out[f"{name}_error_px"] = float(per_landmark[:, i].mean())
        out[f"{name}_error_mm"] = float((per_landmark[:, i] * preds.pixel_mm).mean())
    out.update(triage(preds.uncertainty, errors["measure_error_mm"], preds.flagged,
                      threshold=threshold, coverage_target=coverage_target))
    return {k: _json_number(v) for k, v in out.items()}


def triage(uncertainty: np.ndarray, errors: np.ndarray, flagged: np.ndarray, *,
           threshold: float | None, coverage_target: float | None) -> dict:
    """Uncertainty triage numbers (see :func:`evaluation_summary`); ``errors`` per image in mm."""
    flagged = np.asarray(flagged, dtype=bool)
    errors = np.asarray(errors, dtype=np.float64)
    out = {
        "uncertainty_threshold": threshold,
        "coverage_target": coverage_target,
        "n_flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.mean()),
        "kept_measure_l1_mm": float(errors[~flagged].mean()) if (~flagged).any() else None,
        "flagged_measure_l1_mm": float(errors[flagged].mean()) if flagged.any() else None,
    }
    for c in COVERAGES:
        out[f"error_at_{round(c * 100)}_coverage_mm"] = error_at_coverage(uncertainty, errors, c)
    return out


def worst_images(preds: Predictions, true: np.ndarray, k: int = 10) -> np.ndarray:
    """Indices of the ``k`` images with the largest mean |BPD|/|OFD| error, worst first."""
    errors = per_image_errors(preds.landmarks, true, preds.pixel_mm)["measure_error_mm"]
    return np.argsort(-errors, kind="stable")[:k]


def summary_text(summary: dict) -> str:
    """A few lines for the terminal."""
    def f(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{v:.2f}"

    lines = [f"{summary.get('n_images')} images ({summary.get('split', 'all')}): "
             f"BPD {f('bpd_l1_mm')} / OFD {f('ofd_l1_mm')} / HC {f('hc_l1_mm')} mm mean |error|, "
             f"NME {summary['nme']:.4f}"]
    lines.append(f"HC bias {f('hc_bias_mm')} mm, limits of agreement {f('hc_loa_low_mm')} to "
                 f"{f('hc_loa_high_mm')} mm")
    lines.append(f"uncertainty: Spearman {f('unc_spearman')}, AURC {f('aurc')} mm; error kept at "
                 f"80% {f('error_at_80_coverage_mm')} mm, at 90% {f('error_at_90_coverage_mm')} "
                 f"mm; flagged {summary['n_flagged']} of {summary['n_images']}")
    return "\n".join(lines)


def _json_number(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
