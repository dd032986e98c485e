"""Image files: grayscale reading with one-line errors, and linking images beside a CSV."""
from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from biometry.errors import BiometryInputError


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode an image file as 8-bit grey, ``uint8 (H, W)``.

    Raises :class:`BiometryInputError` naming the file when it is missing, unreadable, or not a
    decodable image (e.g. a truncated PNG).
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise BiometryInputError(f"{path}: image file not found") from None
    except OSError as err:
        raise BiometryInputError(f"{path}: cannot read the image: {err.strerror or err}") from None
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise BiometryInputError(f"{path}: cannot decode the image (corrupt or not an image)")
    return image


def link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` as a hard link, or a copy across file systems.

    An identical file already at ``dst`` is kept; a different one raises
    :class:`BiometryInputError` (nothing is overwritten).
    """
    if dst.exists():
        if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
            return
        raise BiometryInputError(f"{dst}: exists and differs from {src}; not overwriting it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
