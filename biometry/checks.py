"""Plausibility checks of landmark sets, the one place swapped BPD/OFD columns are fixed, and the
margin by which a landmark may lie outside its image."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biometry.geometry import centre_offset, diameter_angle_deg, diameter_lengths
from biometry.records import BPD, LANDMARK_NAMES, OFD, LandmarkRecord

OUTSIDE_MARGIN_FRAC = 0.10
"""How far outside the image a landmark may lie: this fraction of the image's width for x, of its
height for y (80 px and 54 px on an 800x540 HC18 image).

Heads cut by the frame are ordinary in ultrasound, and the endpoints of their diameters are then
measurements a little outside the image (HC18's ``346_HC``: an ellipse endpoint at y = -1.2 px).
A tenth of the image covers a head whose edge the frame cuts, while coordinates of another image
size or in other units (mm, a resized copy, x and y exchanged) land further out and are refused.
"""


@dataclass(frozen=True)
class SwapReport:
    """Rows whose "BPD" is longer than their "OFD".

    Attributes:
        n_rows: number of rows checked.
        n_swapped: rows with BPD longer than OFD.
        swapped_mask: bool array (n_rows,), True where swapped.
        majority_swapped: more than half of the rows are swapped (the columns look exchanged).
        swapped_rows: labels of the swapped rows (set by :func:`fix_swapped_semantics`).
    """

    n_rows: int
    n_swapped: int
    swapped_mask: np.ndarray
    majority_swapped: bool
    swapped_rows: tuple[str, ...] = ()


def detect_swapped_semantics(landmarks: np.ndarray) -> SwapReport:
    """Find rows of ``landmarks (N, 4, 2)`` whose BPD is longer than their OFD.

    >>> import numpy as np
    >>> ok = [[0, -3], [0, 3], [-5, 0], [5, 0]]
    >>> detect_swapped_semantics(np.array([ok, ok, ok])[:, [2, 3, 0, 1]]).majority_swapped
    True
    """
    lm = np.asarray(landmarks, dtype=float).reshape(-1, 4, 2)
    bpd, ofd = diameter_lengths(lm)
    mask = bpd > ofd
    n_swapped = int(mask.sum())
    return SwapReport(len(lm), n_swapped, mask, majority_swapped=2 * n_swapped > len(lm))


def swap_pairs(landmarks: np.ndarray) -> np.ndarray:
    """Exchange the BPD and OFD rows of ``(..., 4, 2)`` landmarks."""
    return np.asarray(landmarks)[..., [*OFD, *BPD], :]


def fix_swapped_semantics(
    records: Sequence[LandmarkRecord], source: str, *, rows: Sequence[str] | None = None
) -> tuple[list[LandmarkRecord], SwapReport]:
    """Exchange the BPD and OFD of every record whose BPD is longer than its OFD: BPD is the
    shorter diameter by definition, so such a row is never trained on as it is.

    Prints one warning line on stderr naming ``source``: when most rows are swapped, that the
    columns look exchanged; otherwise the rows fixed, by ``rows`` (a label per record such as
    ``"row 3 (a.png)"``; default: the record names). Returns the records and the report on the
    records as given, its ``swapped_rows`` holding the labels of the fixed rows.
    """
    records = list(records)
    report = detect_swapped_semantics(np.array([r.landmarks for r in records]).reshape(-1, 4, 2))
    if not report.n_swapped:
        return records, report
    labels = list(rows) if rows is not None else [r.name for r in records]
    report = dataclasses.replace(report, swapped_rows=tuple(
        label for label, swapped in zip(labels, report.swapped_mask) if swapped))
    print(f"warning: {source}: {_swap_warning(report)}", file=sys.stderr)
    fixed = [dataclasses.replace(r, landmarks=swap_pairs(r.landmarks)) if swapped else r
             for r, swapped in zip(records, report.swapped_mask)]
    return fixed, report


def _swap_warning(report: SwapReport, *, listed: int = 10) -> str:
    if report.majority_swapped:
        return (f"{report.n_swapped} of {report.n_rows} rows have BPD longer than OFD: the BPD and "
                "OFD columns look swapped; using them swapped")
    named = ", ".join(report.swapped_rows[:listed]) + (" ..." if report.n_swapped > listed else "")
    return (f"BPD longer than OFD in {report.n_swapped} of {report.n_rows} rows, each fixed by "
            f"exchanging its BPD and OFD (BPD is the shorter by definition): {named}")


def implausible_rows(
    records: Sequence[LandmarkRecord],
    *,
    max_angle_deviation_deg: float = 20.0,
    max_centre_offset_frac: float = 0.1,
    min_ratio: float = 0.55,
    max_pixel_mm_factor: float = 4.0,
) -> list[tuple[str, list[str]]]:
    """Records whose landmarks do not look like the two axes of a head, with the reasons.

    Args:
        records: the records to check.
        max_angle_deviation_deg: flag when the BPD and OFD lines deviate from perpendicular by
            more than this.
        max_centre_offset_frac: flag when the two midpoints are further apart than this fraction
            of the OFD length.
        min_ratio: flag when BPD / OFD (the cephalic index) is below this.
        max_pixel_mm_factor: flag a pixel size more than this factor above or below the median of
            ``records`` (HC18's spacings span 0.38x to 3.1x their median; a mm/cm slip is 10x).

    Returns ``[(record.name, reasons)]`` in record order, only for records with reasons, e.g.
    ``("017_HC.png", ["bpd longer than ofd", "angle 62 deg far from 90"])``.
    """
    if not records:
        return []
    lm = np.array([r.landmarks for r in records], dtype=float).reshape(-1, 4, 2)
    bpd, ofd = diameter_lengths(lm)
    angle = diameter_angle_deg(lm)
    offset = centre_offset(lm)
    pixel_factor = np.array([r.pixel_mm for r in records], dtype=float)
    pixel_factor /= np.median(pixel_factor)
    flagged = []
    for i, record in enumerate(records):
        reasons = []
        if bpd[i] == 0 or ofd[i] == 0:
            reasons.append("bpd has zero length" if bpd[i] == 0 else "ofd has zero length")
        elif bpd[i] > ofd[i]:
            reasons.append("bpd longer than ofd")
        elif bpd[i] / ofd[i] < min_ratio:
            reasons.append(f"bpd/ofd ratio {bpd[i] / ofd[i]:.2f} below {min_ratio:g}")
        if np.isfinite(angle[i]) and 90 - angle[i] > max_angle_deviation_deg:
            reasons.append(f"angle {angle[i]:.0f} deg far from 90")
        if offset[i] > max_centre_offset_frac * max(bpd[i], ofd[i]):
            reasons.append(f"centres {offset[i]:.0f} px apart")
        if max(pixel_factor[i], 1 / pixel_factor[i]) > max_pixel_mm_factor:
            reasons.append(f"pixel size {record.pixel_mm:g} mm, {pixel_factor[i]:.2g}x the median")
        if reasons:
            flagged.append((record.name, reasons))
    return flagged


def distance_outside_image(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Pixels each of ``landmarks (4, 2)`` lies outside the image ``(height, width)`` (pixel
    centres at integers, so the image spans [-0.5, W - 0.5] x [-0.5, H - 0.5]); 0 inside."""
    height, width = image_size
    points = np.asarray(landmarks, dtype=float).reshape(-1, 2)
    low = np.maximum(-0.5 - points, 0.0)
    high = np.maximum(points - np.array([width - 0.5, height - 0.5]), 0.0)
    return np.hypot(*np.maximum(low, high).T)


def cut_off_heads(records: Sequence[LandmarkRecord]) -> dict:
    """Records with a landmark outside their image (a head cut by the frame; the importers accept
    them up to :data:`OUTSIDE_MARGIN_FRAC`), in record order; records of unknown image size are
    not checked.

    Returns ``{"n": 1, "margin_frac": 0.1, "images": [{"image": name, "landmarks": ["bpd2"],
    "max_outside_px": 1.2}]}``.
    """
    found = []
    for record in records:
        if not all(record.image_size):
            continue
        distance = distance_outside_image(record.landmarks, record.image_size)
        if distance.max() > 0:
            found.append({"image": record.name,
                          "landmarks": [LANDMARK_NAMES[i] for i in np.flatnonzero(distance > 0)],
                          "max_outside_px": round(float(distance.max()), 2)})
    return {"n": len(found), "margin_frac": OUTSIDE_MARGIN_FRAC, "images": found}
