"""Evaluation figures: Bland–Altman, risk–coverage, the failure atlas and landmark overlays.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state, safe in worker threads); overlays are drawn with OpenCV on the original pixels. Every
function writes one file and returns its path.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from biometry.metrics import LOA_Z, aurc, risk_coverage, spearman

# BGR colours for OpenCV overlays
PRED_BPD = (0, 200, 0)  # green
PRED_OFD = (0, 140, 255)  # orange
REFERENCE = (255, 200, 0)  # cyan-blue: the reference (ground truth) in the failure atlas
ATLAS_PRED = (40, 40, 230)  # red: the prediction in the failure atlas
ATLAS_TILE_WIDTH = 480  # px: atlas tiles are drawn at full resolution, then shrunk to this


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


def bland_altman(pred_mm: np.ndarray, true_mm: np.ndarray, path: str | Path, *, name: str,
                 flagged: np.ndarray | None = None) -> Path:
    """Bland–Altman plot of one measurement: difference (pred - ref) against the mean of the two,
    with the bias and the 95% limits of agreement (bias ± 1.96 SD); flagged images in red."""
    pred = np.asarray(pred_mm, dtype=np.float64)
    true = np.asarray(true_mm, dtype=np.float64)
    mean, diff = 0.5 * (pred + true), pred - true
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    flags = np.zeros(diff.size, bool) if flagged is None else np.asarray(flagged, bool)
    ax.scatter(mean[~flags], diff[~flags], s=14, alpha=0.7, color="tab:blue", label="kept")
    if flags.any():
        ax.scatter(mean[flags], diff[flags], s=18, alpha=0.8, color="tab:red", marker="x",
                   label="flagged (uncertain)")
    ax.axhline(bias, color="k", lw=1.2, label=f"bias {bias:+.2f} mm")
    if np.isfinite(sd):
        for v, text in ((bias - LOA_Z * sd, "-1.96 SD"), (bias + LOA_Z * sd, "+1.96 SD")):
            ax.axhline(v, color="0.4", lw=1, ls="--")
            ax.annotate(f"{text}: {v:+.2f}", (1.0, v), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=8, color="0.3")
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel(f"mean of predicted and reference {name.upper()} (mm)")
    ax.set_ylabel(f"predicted - reference {name.upper()} (mm)")
    ax.set_title(f"Bland–Altman: {name.upper()} (n={diff.size}, SD {sd:.2f} mm)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _save(fig, path)


def risk_coverage_plot(uncertainty: np.ndarray, errors: np.ndarray, path: str | Path, *,
                       coverages: Sequence[float] = (0.8, 0.9),
                       threshold_coverage: float | None = None, unit: str = "mm") -> Path:
    """Risk (mean error of the kept images) against coverage when images are kept from the least
    uncertain up, beside the oracle (kept by true error) and the no-triage level; dotted lines at
    ``coverages`` and a solid one at the model threshold's coverage on this data."""
    coverage, risk = risk_coverage(uncertainty, errors)
    _, oracle = risk_coverage(errors, errors)
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    area, rho = aurc(uncertainty, errors), spearman(uncertainty, errors)
    ax.plot(coverage, risk, color="tab:blue", lw=1.8, label=f"uncertainty (AURC {area:.2f} {unit})")
    ax.plot(coverage, oracle, color="tab:green", lw=1, ls="--",
            label=f"oracle (AURC {float(oracle.mean()):.2f} {unit})")
    ax.axhline(float(np.mean(errors)), color="0.5", lw=1, ls=":", label="no triage")
    for c in coverages:
        ax.axvline(c, color="0.7", lw=0.8, ls=":")
    if threshold_coverage is not None:
        ax.axvline(threshold_coverage, color="tab:red", lw=1,
                   label=f"model threshold ({threshold_coverage:.0%} kept)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of images kept)")
    ax.set_ylabel(f"mean error of kept images ({unit})")
    ax.set_title(f"Risk–coverage (Spearman {rho:.2f}, n={len(coverage)})")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def draw_overlay(image: np.ndarray, landmarks: np.ndarray, *, reference: np.ndarray | None = None,
                 label: str | None = None) -> np.ndarray:
    """BGR copy of a grey ``image (H, W)`` with the predicted BPD (green) and OFD (orange) lines;
    with ``reference``, the reference in blue and the prediction in red instead."""
    canvas = cv2.cvtColor(np.asarray(image, dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(image.shape) / 400))
    if reference is not None:
        _draw_pairs(canvas, reference, (REFERENCE, REFERENCE), thickness)
        _draw_pairs(canvas, landmarks, (ATLAS_PRED, ATLAS_PRED), thickness)
    else:
        _draw_pairs(canvas, landmarks, (PRED_BPD, PRED_OFD), thickness)
    if label:
        scale = 0.45 * thickness
        for colour, width in (((0, 0, 0), 3 * thickness), ((255, 255, 255), thickness)):
            cv2.putText(canvas, label, (6, 20 * thickness), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        colour, width, cv2.LINE_AA)
    return canvas


def _draw_pairs(canvas: np.ndarray, landmarks: np.ndarray, colours, thickness: int) -> None:
    points = np.round(np.asarray(landmarks, dtype=np.float64) * 16).astype(np.int32)  # 4 bits
    for (i, j), colour in zip(((0, 1), (2, 3)), colours):
        cv2.line(canvas, points[i], points[j], colour, thickness, cv2.LINE_AA, shift=4)
        for k in (i, j):
            cv2.circle(canvas, points[k], 3 * thickness * 16, colour, thickness, cv2.LINE_AA,
                       shift=4)


def write_overlay(path: str | Path, image: np.ndarray, landmarks: np.ndarray, **kwargs) -> Path:
    """:func:`draw_overlay` written as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), draw_overlay(image, landmarks, **kwargs)):
        raise OSError(f"{path}: cannot write the image")
    return path


def failure_atlas(images: Sequence[np.ndarray], pred: np.ndarray, true: np.ndarray,
                  titles: Sequence[str], path: str | Path, *, columns: int = 5) -> Path:
    """One grid PNG: each image with the reference (blue) and predicted (red) BPD/OFD lines."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    cols = min(columns, max(n, 1))
    fig = _figure(3.6 * cols, 2.9 * rows)
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        canvas = draw_overlay(images[k], pred[k], reference=true[k])
        if canvas.shape[1] > ATLAS_TILE_WIDTH:  # a tile is ~360 px wide: drawing more is waste
            factor = ATLAS_TILE_WIDTH / canvas.shape[1]
            canvas = cv2.resize(canvas, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        ax.imshow(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB))
        ax.set_title(titles[k], fontsize=7)
        ax.set_axis_off()
    fig.suptitle("worst images: reference (blue) vs prediction (red)", fontsize=10)
    return _save(fig, path)
