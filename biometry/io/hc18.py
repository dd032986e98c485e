"""HC18-style folders: ``training_set/NNN_HC.png`` with a filled mask ``NNN_HC_Mask.png`` or the
original outline ``NNN_HC_Annotation.png``, plus ``training_set_pixel_size_and_HC.csv``.

The landmarks are the axes of the head ellipse fitted with OpenCV: OFD = the major-axis endpoints,
BPD = the minor-axis endpoints.

Why the masks need :data:`MASK_AXIS_EXCESS_PX` (measured on all 592 images of the shared subset):
fitting ``cv2.fitEllipse`` to the ``cv2.findContours`` points of a filled mask gives a Ramanujan
perimeter 0.78 mm (5.6 px) longer on average than the CSV head circumference (mean absolute
difference 0.780 mm, max 2.21 mm). The excess is constant in pixels, not in mm nor with head size
(correlation with the axis length -0.07): solving per image for the amount ``d`` to take off both
full axes so that the perimeter matches gives ``d = 1.79 +- 0.06 px`` (min 1.60, max 2.12) once
contour points on the image border are left out (three masks are cut by the border; the straight
cut dragged their fits, by up to 2.2 mm). It is not the contour lying outside the ellipse a mask was
drawn from: ``findContours`` returns the centres of the boundary pixels, and redrawing a
fitted ellipse with ``cv2.ellipse(..., thickness=-1)`` and refitting it gives its axes back within
-0.2 px. Taking half a pixel off each semi-axis (``d = 1``) still leaves 0.345 mm. The masks
themselves are about 0.9 px per semi-axis larger than the expert ellipse, as masks built from the
outer edge of a ~2 px wide outline would be (simulated: +1.6 px on the full axes). With
``d = 1.78`` (the median): mean absolute difference 0.020 mm, bias +0.005 mm, max 0.136 mm over the
592 images; calibrated on half of the subjects (1.774), the other half gives 0.021 mm. ``d = 2``
(a whole pixel per semi-axis) gives 0.092 mm.

Outlines are fitted on all their pixel centres (the centre line of the drawn curve), with no
correction: an outline drawn with ``cv2.ellipse(thickness=1)`` from an ellipse gives its axes back
within about -0.3 px (OpenCV draws a 72-gon slightly inside the ellipse).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from biometry.errors import BiometryInputError
from biometry.geometry import ellipse_landmarks
from biometry.io.images import read_grayscale
from biometry.io.landmark_csv import (
    OUTSIDE_MARGIN_FRAC, beyond_margin_text, collect, default_subject, outside_image, read_csv_rows,
)
from biometry.records import LANDMARK_NAMES, LandmarkRecord

HC18_CSV = "training_set_pixel_size_and_HC.csv"
IMAGE_DIR = "training_set"
FILE_COLUMN, PIXEL_COLUMN, HC_COLUMN = "filename", "pixel size(mm)", "head circumference (mm)"
MASK_AXIS_EXCESS_PX = 1.78
"""Pixels taken off both FULL axes of an ellipse fitted to a filled HC18 mask (module docstring)."""


@dataclass(frozen=True)
class Ellipse:
    """An ellipse as OpenCV's ``RotatedRect``: ``center`` (x, y), FULL ``axes`` (w, h) with ``w``
    along ``angle_deg`` (degrees from x towards y)."""

    center: tuple[float, float]
    axes: tuple[float, float]
    angle_deg: float

    def landmarks(self) -> np.ndarray:
        """BPD (minor axis) and OFD (major axis) endpoints, ``(4, 2)``."""
        return ellipse_landmarks(self.center, self.axes, self.angle_deg)


def is_hc18_folder(path: Path) -> bool:
    return (path / HC18_CSV).is_file()


def read_hc18(folder: Path, *, skip_bad: bool = False, workers: int | None = None):
    """Read an HC18-style folder: ``(records, skipped, rows)`` with ``skipped = [(item, reason)]``
    and ``rows`` a label per record (``"training_set_pixel_size_and_HC.csv row 3 (003_HC.png)"``).

    Each image and its mask or outline is decoded once, in a small thread pool (OpenCV releases
    the GIL). Bad items raise :class:`BiometryInputError` naming the file, or are skipped when
    ``skip_bad``.
    """
    rows = _read_csv(folder / HC18_CSV)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda row: _load_item(folder, *row), rows))
    return collect(results, [filename for _, filename, *_ in rows],
                   [f"{HC18_CSV} row {row_no} ({filename})" for row_no, filename, *_ in rows],
                   skip_bad=skip_bad)


def _read_csv(path: Path) -> list[tuple[int, str, float, float | None]]:
    header, table = read_csv_rows(path)
    for column in (FILE_COLUMN, PIXEL_COLUMN):
        if column not in header:
            raise BiometryInputError(f"{path}: missing column '{column}'")
    rows = [(row_no, *_parse_csv_row(row, path=path, row_no=row_no))
            for row_no, row in enumerate(table, start=1)]
    if not rows:
        raise BiometryInputError(f"{path}: no data rows")
    return rows


def _parse_csv_row(row: dict[str, str], *, path: Path, row_no: int):
    filename = (row.get(FILE_COLUMN) or "").strip()
    where = f"{path}: row {row_no} ({filename or 'no filename'})"
    if not filename or Path(filename).name != filename:
        raise BiometryInputError(f"{where}: column '{FILE_COLUMN}' must be a file name")
    values = []
    for column in (PIXEL_COLUMN, HC_COLUMN):
        text = (row.get(column) or "").strip()
        if column == HC_COLUMN and not text:
            values.append(None)
            continue
        try:
            value = float(text)
        except ValueError:
            raise BiometryInputError(f"{where}: column '{column}' is not a number: '{text}'") from None
        if not value > 0 or not np.isfinite(value):
            raise BiometryInputError(f"{where}: column '{column}' must be > 0, got {text}")
        values.append(value)
    return filename, *values


def _load_item(folder: Path, row_no: int, filename: str, pixel_mm: float, hc_mm: float | None):
    """One CSV row -> LandmarkRecord, or the BiometryInputError it raised (threads return it)."""
    try:
        image_path = folder / IMAGE_DIR / filename
        label_path = label_file(image_path)
        shape = read_grayscale(image_path).shape
        label = read_grayscale(label_path)
        if label.shape != shape:
            raise BiometryInputError(
                f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from the image's "
                f"{shape[1]}x{shape[0]}"
            )
        landmarks = fit_label_ellipse(label, source=label_path).landmarks()
        bad = outside_image(landmarks, shape, margin_frac=OUTSIDE_MARGIN_FRAC)
        if bad is not None:
            x, y = landmarks[bad // 2]
            raise BiometryInputError(
                f"{label_path}: the ellipse's {LANDMARK_NAMES[bad // 2]} endpoint ({x:.1f}, {y:.1f}) "
                f"is {beyond_margin_text(bad, shape)}"
            )
        return LandmarkRecord(
            image=image_path.resolve(),
            landmarks=landmarks,
            pixel_mm=pixel_mm,
            subject=default_subject(filename),
            name=filename,
            hc_mm=hc_mm,
            image_size=shape,
        )
    except BiometryInputError as err:
        return err


def label_file(image_path: Path) -> Path:
    """``NNN_HC_Mask.png`` beside the image, else ``NNN_HC_Annotation.png``."""
    for suffix in ("_Mask", "_Annotation"):
        candidate = image_path.with_name(f"{image_path.stem}{suffix}{image_path.suffix}")
        if candidate.is_file():
            return candidate
    if not image_path.is_file():
        raise BiometryInputError(f"{image_path}: image file not found")
    raise BiometryInputError(
        f"{image_path}: no {image_path.stem}_Mask{image_path.suffix} or "
        f"{image_path.stem}_Annotation{image_path.suffix} beside it"
    )


def fit_label_ellipse(label: np.ndarray, *, source: str | Path = "mask") -> Ellipse:
    """The head ellipse of a label image ``(H, W)``: a filled mask or a drawn outline.

    Pixels above half the maximum are foreground. A label whose foreground covers at least half
    of the region its outer contour encloses is a filled mask: its outer contour points (those
    on the image border left out) are fitted and :data:`MASK_AXIS_EXCESS_PX` is taken off both
    axes. Otherwise it is an outline: all its pixel centres are fitted.
    """
    peak = int(label.max())
    fg = (label > peak / 2).astype(np.uint8) if peak > 0 else np.zeros_like(label, np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise BiometryInputError(f"{source}: no ellipse in the mask (it is blank)")
    outer = max(contours, key=cv2.contourArea).reshape(-1, 2)
    enclosed = np.zeros_like(fg)
    cv2.drawContours(enclosed, [outer], 0, 1, thickness=-1)
    filled = 2 * int(fg.sum()) >= int(enclosed.sum())
    if filled:
        h, w = fg.shape
        inside = (outer[:, 0] > 0) & (outer[:, 0] < w - 1) & (outer[:, 1] > 0) & (outer[:, 1] < h - 1)
        points, excess = outer[inside], MASK_AXIS_EXCESS_PX
    else:
        ys, xs = np.nonzero(fg)
        points, excess = np.stack([xs, ys], axis=1), 0.0
    if len(points) < 5:
        raise BiometryInputError(f"{source}: no ellipse in the mask (only {len(points)} edge pixels)")
    (cx, cy), (aw, ah), angle = cv2.fitEllipse(points.astype(np.float32))
    axes = (aw - excess, ah - excess)
    if not (np.isfinite([cx, cy, *axes]).all() and min(axes) > 1):
        raise BiometryInputError(f"{source}: no ellipse could be fitted to the mask")
    return Ellipse((float(cx), float(cy)), (float(axes[0]), float(axes[1])), float(angle))
