"""Plausibility checks of landmark sets, and the one place swapped BPD/OFD columns are fixed."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biometry.geometry import centre_offset, diameter_angle_deg, diameter_lengths
from biometry.records import BPD, OFD, LandmarkRecord


@dataclass(frozen=True)
class SwapReport:
    """Rows whose "BPD" is longer than their "OFD".

    Attributes:
        n_rows: number of rows checked.
        n_swapped: rows with BPD longer than OFD.
        swapped_mask: bool array (n_rows,), True where swapped.
        majority_swapped: more than half of the rows are swapped (the columns look exchanged).
    """

    n_rows: int
    n_swapped: int
    swapped_mask: np.ndarray
    majority_swapped: bool


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
    records: Sequence[LandmarkRecord], source: str
) -> tuple[list[LandmarkRecord], SwapReport]:
    """Exchange the BPD and OFD of every record when most rows have BPD longer than OFD.

    Prints one warning line on stderr naming ``source`` when it does. Rows swapped on their own
    (a minority) are left as they are: :func:`implausible_rows` lists them. Returns the records
    (fixed or not) and the report on the records as given.
    """
    records = list(records)
    report = detect_swapped_semantics(np.array([r.landmarks for r in records]).reshape(-1, 4, 2))
    if not report.majority_swapped:
        return records, report
    print(
        f"warning: {source}: {report.n_swapped} of {report.n_rows} rows have BPD longer than OFD: "
        "the BPD and OFD columns look swapped; using them swapped",
        file=sys.stderr,
    )
    fixed = [dataclasses.replace(r, landmarks=swap_pairs(r.landmarks)) for r in records]
    return fixed, report


def implausible_rows(
    records: Sequence[LandmarkRecord],
    *,
    max_angle_deviation_deg: float = 20.0,
    max_centre_offset_frac: float = 0.1,
    min_ratio: float = 0.55,
) -> list[tuple[str, list[str]]]:
    """Records whose landmarks do not look like the two axes of a head, with the reasons.

    Args:
        records: the records to check.
        max_angle_deviation_deg: flag when the BPD and OFD lines deviate from perpendicular by
            more than this.
        max_centre_offset_frac: flag when the two midpoints are further apart than this fraction
            of the OFD length.
        min_ratio: flag when BPD / OFD (the cephalic index) is below this.

    Returns ``[(record.name, reasons)]`` in record order, only for records with reasons, e.g.
    ``("017_HC.png", ["bpd longer than ofd", "angle 62 deg far from 90"])``.
    """
    if not records:
        return []
    lm = np.array([r.landmarks for r in records], dtype=float).reshape(-1, 4, 2)
    bpd, ofd = diameter_lengths(lm)
    angle = diameter_angle_deg(lm)
    offset = centre_offset(lm)
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
        if reasons:
            flagged.append((record.name, reasons))
    return flagged
