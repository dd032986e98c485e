"""The one record type every importer returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LANDMARK_NAMES = ("bpd1", "bpd2", "ofd1", "ofd2")
BPD = (0, 1)  # rows of ``landmarks`` holding the BPD endpoints
OFD = (2, 3)  # rows holding the OFD endpoints


@dataclass(frozen=True)
class LandmarkRecord:
    """One labelled image.

    Attributes:
        image: absolute path of the image file.
        landmarks: float64 array (4, 2) of (x, y) in original image pixels, rows BPD1, BPD2, OFD1,
            OFD2 (x right, y down). Endpoint order within a pair carries no meaning.
        pixel_mm: pixel spacing in mm (> 0).
        subject: subject id; records of one subject never go to different splits.
        name: the image as the user names it (relative to the data folder / CSV folder).
        hc_mm: reference head circumference in mm when the source gives one.
        image_size: (height, width) of the original image when known (0, 0 otherwise).
    """

    image: Path
    landmarks: np.ndarray
    pixel_mm: float
    subject: str
    name: str
    hc_mm: float | None = None
    image_size: tuple[int, int] = field(default=(0, 0))
