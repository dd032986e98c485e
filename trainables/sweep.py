"""Post-processing tuned on validation after training, at no training cost.

A trial's best weights are measured on the validation split under each variant that
``inference.sweep`` lists, one change at a time from the trial's own steps::

    inference:
      postprocess: [{step: second_look, quantile: 0.2}, {step: mask_fallback, threshold: 0.05}]
      sweep:
        mask_fallback.threshold: [0.03, 0.08, off]   # off: the step removed
        flip_tta: [on]                               # on: the step added with its defaults

The network's passes are cached, so the variants reuse one forward pass per rendering. A variant
replaces the trial's steps only when it beats them by more than the split's own noise: the
upper end of a paired bootstrap interval (95%, over validation images) of its per-image
objective minus the default's must be below 0. On 92 images a gain of a few hundredths of a mm
is luck; this rule keeps the default unless the evidence says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from biometry.inference import LandmarkPredictor, ModelSpec
from biometry.metrics import per_image_errors
from biometry.postprocess import OFF, Step, steps_to_config, with_settings
from biometry.transforms import Letterbox
from trainables.data import PreparedImages

CONFIDENCE = 0.95


@dataclass
class SweepResult:
    """What the sweep measured and kept (``steps``: the trial's or the winning variant's)."""

    steps: list[Step]
    chosen: str  # "default" or the winning variant, e.g. "mask_fallback.threshold=0.08"
    objectives: dict[str, float] = field(default_factory=dict)  # variant -> mean objective (mm)
    gain_mm: float = 0.0  # default's objective minus the kept variant's
    interval_mm: tuple[float, float] = (0.0, 0.0)  # bootstrap interval of variant - default

    def as_metrics(self) -> dict[str, Any]:
        """Flat values reported beside the trial's metric (MLflow params ``postprocess.*``)."""
        out: dict[str, Any] = {"postprocess.chosen": self.chosen,
                               "postprocess.gain_mm": self.gain_mm,
                               "postprocess.interval_low_mm": self.interval_mm[0],
                               "postprocess.interval_high_mm": self.interval_mm[1]}
        for step in steps_to_config(self.steps):
            name = step.pop("step")
            out[f"postprocess.{name}"] = "on"
            out.update({f"postprocess.{name}.{k}": v for k, v in step.items()
                        if v is not None and k not in ("low", "high", "target")})
        return out


def variants(sweep: dict[str, list]) -> list[tuple[str, list[str]]]:
    """``inference.sweep`` -> [(label, settings)]: the default first, then one change each."""
    out = [("default", [])]
    for key, values in sweep.items():
        for value in values:
            text = _value_text(value)
            setting = f"{key.partition('.')[0]}={OFF}" if text == OFF else f"{key}={text}"
            out.append((f"{key}={text}", [setting]))
    return out


def _value_text(value: Any) -> str:
    if value is False or value == OFF:
        return OFF
    if value is True:
        return "on"
    return str(value)


def sweep_postprocess(model: torch.nn.Module, spec: ModelSpec, images: PreparedImages, *,
                      sweep: dict[str, list], train_ofd_px: np.ndarray, resamples: int = 2000,
                      seed: int = 0, device: str | torch.device = "cpu") -> SweepResult:
    """Measure every variant of ``sweep`` on ``images`` (validation) with ``model``; keep the
    best one only when it wins beyond the split's noise (module docstring)."""
    cache: dict = {}
    errors: dict[str, np.ndarray] = {}
    steps_by_label: dict[str, list[Step]] = {}
    for label, settings in variants(sweep):
        steps = with_settings(spec.steps(), settings, where=f"inference.sweep {label}",
                              train_ofd_px=train_ofd_px)
        predictor = LandmarkPredictor(model, spec, device=device, postprocess=steps)
        predictor.use_forward_cache(cache)
        errors[label] = per_image_objective(predictor, images)
        steps_by_label[label] = steps
    objectives = {label: float(np.mean(e)) for label, e in errors.items()}
    best = min(objectives, key=objectives.get)
    low, high = paired_interval(errors[best] - errors["default"], resamples=resamples, seed=seed)
    kept = best if best != "default" and high < 0 else "default"
    return SweepResult(steps=steps_by_label[kept], chosen=kept, objectives=objectives,
                       gain_mm=objectives["default"] - objectives[kept],
                       interval_mm=(low, high) if kept != "default" else (0.0, 0.0))


def per_image_objective(predictor: LandmarkPredictor, images: PreparedImages) -> np.ndarray:
    """(N,) each validation image's share of the search objective: mean |BPD|, |OFD| error, mm."""
    first_looks = [(image, Letterbox(*map(float, box)))
                   for image, box in zip(images.images, images.letterbox)]
    if images.sources is not None:
        coords, _ = predictor.predict(images.sources, letterboxed=first_looks,
                                      pixel_mm=images.pixel_mm)
    else:
        input_mm = np.asarray(images.pixel_mm) / np.asarray(images.letterbox)[:, 0]
        coords, _ = predictor.predict(list(images.images), pixel_mm=input_mm)
        coords = images.to_original(coords)
    return per_image_errors(coords, images.original, images.pixel_mm)["measure_error_mm"]


def paired_interval(differences: np.ndarray, *, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval (:data:`CONFIDENCE`) of the mean of paired differences."""
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
