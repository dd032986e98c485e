"""Synthetic ellipse heads with known landmarks: a fast, deterministic stand-in for real data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from biometry.geometry import ellipse_landmarks, ellipse_perimeter
from biometry.io.landmark_csv import write_landmark_csv
from biometry.records import LandmarkRecord


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    n: int = 16,
    seed: int = 0,
    image_hw: tuple[int, int] = (270, 400),
    pixel_mm: float = 0.3,
) -> Path:
    """Write ``n`` synthetic head images and their landmark CSV into ``out_dir``; return the CSV.

    Each image is a bright skull ring on a dark speckled background, with a faint midline along
    the OFD. The head ellipse (the ring's outer edge) has a random centre, angle, OFD of 55-80% of
    the shorter image side and BPD/OFD between 0.70 and 0.85, fully inside the image. Images come
    in pairs per subject, named like HC18 (``003_HC.png``, ``003_2HC.png``: subject ``003``);
    ``hc_mm`` is the Ramanujan perimeter of the ellipse. The same arguments give the same bytes.

    Args:
        out_dir: folder to write into (created if needed).
        n: number of images.
        seed: seed of everything random.
        image_hw: (height, width) of the images in pixels.
        pixel_mm: pixel spacing written to the CSV.

    >>> import tempfile
    >>> from biometry.io import load_records
    >>> csv_path = write_synthetic_dataset(tempfile.mkdtemp(), n=4)
    >>> len(load_records(csv_path))
    4
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        subject = f"{i // 2:03d}"
        name = f"{subject}_HC.png" if i % 2 == 0 else f"{subject}_2HC.png"
        image, landmarks = _head_image(rng, image_hw)
        path = out_dir / name
        cv2.imwrite(str(path), image)
        bpd, ofd = np.linalg.norm(landmarks[[1, 3]] - landmarks[[0, 2]], axis=1)
        records.append(LandmarkRecord(
            image=path.resolve(),
            landmarks=landmarks,
            pixel_mm=pixel_mm,
            subject=subject,
            name=name,
            hc_mm=float(ellipse_perimeter(bpd, ofd)) * pixel_mm,
            image_size=tuple(image_hw),
        ))
    return write_landmark_csv(records, out_dir / "landmarks.csv")


def _head_image(rng: np.random.Generator, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One image ``uint8 (H, W)`` and its landmarks ``(4, 2)``."""
    h, w = image_hw
    ofd = rng.uniform(0.55, 0.8) * min(h, w)
    bpd = rng.uniform(0.70, 0.85) * ofd
    angle = rng.uniform(-90.0, 90.0)
    t = np.radians(angle)
    half_x = np.hypot(ofd * np.cos(t), bpd * np.sin(t)) / 2
    half_y = np.hypot(ofd * np.sin(t), bpd * np.cos(t)) / 2
    margin = 3.0
    center = (rng.uniform(half_x + margin, w - 1 - half_x - margin),
              rng.uniform(half_y + margin, h - 1 - half_y - margin))
    thickness = max(2, int(round(0.05 * ofd)))

    ring = np.zeros((h, w), np.float32)
    inner = (ofd - thickness, bpd - thickness)
    cv2.ellipse(ring, (center, inner, angle), 1.0, thickness, cv2.LINE_AA)
    ring = cv2.GaussianBlur(ring, (0, 0), 1.2)
    midline = np.zeros((h, w), np.float32)
    u = np.array([np.cos(t), np.sin(t)]) * (ofd / 2 - thickness) * 0.8
    p, q = (np.add(center, s * u).round().astype(int) for s in (-1, 1))
    cv2.line(midline, tuple(p.tolist()), tuple(q.tolist()), 1.0, 1, cv2.LINE_AA)

    background = rng.gamma(2.0, 12.0, size=(h, w)).astype(np.float32)
    speckle = rng.gamma(4.0, 0.25, size=(h, w)).astype(np.float32)
    image = background + (rng.uniform(170, 230) * ring + 60 * midline) * speckle
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, ellipse_landmarks(center, (ofd, bpd), angle)
