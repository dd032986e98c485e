"""Data for one trial: decoded and letterboxed once, kept in memory, augmented in DataLoader workers.

The search prepares :class:`PreparedSplits` once on the driver and shares it through Ray's object
store, so trials never decode images again. Only the train and val splits are ever handed to a
trial: the test split stays out of tuning.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from biometry.codec import HeatmapCodec
from biometry.io import bundled_sample_path, load_records, read_grayscale, split_by_subject
from biometry.metrics import measurements_mm
from biometry.records import LandmarkRecord
from biometry.transforms import AugmentConfig, Orientation, build_augmentation, letterbox, zscore


@dataclass
class PreparedImages:
    """One split, letterboxed to the model input.

    Shapes: images (N, H, W) uint8; landmarks (N, 4, 2) input px; original (N, 4, 2) original px;
    letterbox (N, 3) = (scale, pad_x, pad_y); pixel_mm (N,) original spacing. ``sources``: the
    decoded original images (validation keeps them, so that it measures through
    ``LandmarkPredictor.predict`` exactly as ``evaluate`` does, second look included).
    """

    images: np.ndarray
    landmarks: np.ndarray
    original: np.ndarray
    letterbox: np.ndarray
    pixel_mm: np.ndarray
    names: list[str]
    subjects: list[str]
    sources: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map (N, K, 2) input-pixel points back to original pixels."""
        scale = self.letterbox[:, None, 0:1]
        pad = self.letterbox[:, None, 1:3]
        return (points - pad) / scale


@dataclass
class PreparedSplits:
    input_hw: tuple[int, int]
    train: PreparedImages
    val: PreparedImages
    orientation: Orientation
    source: str
    split_names: dict[str, list[str]] = field(default_factory=dict)  # all splits, test included


def prepare_images(records: list[LandmarkRecord], input_hw: tuple[int, int], *,
                   threads: int = 2, keep_sources: bool = False) -> PreparedImages:
    """Decode and letterbox every record once (cv2 releases the GIL, so threads help)."""

    def one(record: LandmarkRecord):
        source = read_grayscale(record.image)
        image, points, box = letterbox(source, record.landmarks, input_hw)
        return image, points, (box.scale, box.pad_x, box.pad_y), source if keep_sources else None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        decoded = list(pool.map(one, records))
    return PreparedImages(
        images=np.stack([d[0] for d in decoded]).astype(np.uint8),
        landmarks=np.stack([d[1] for d in decoded]).astype(np.float32),
        original=np.stack([r.landmarks for r in records]).astype(np.float64),
        letterbox=np.array([d[2] for d in decoded], dtype=np.float64),
        pixel_mm=np.array([r.pixel_mm for r in records], dtype=np.float64),
        names=[r.name for r in records],
        subjects=[r.subject for r in records],
        sources=[d[3] for d in decoded] if keep_sources else None,
    )


def load_split_records(path: str | None, *, split_seed: int = 0, val_fraction: float = 0.15,
                       test_fraction: float = 0.15, limit: int = 0) -> dict[str, list[LandmarkRecord]]:
    """Import ``path`` (None = the bundled HC18 sample) and split it by subject."""
    source = Path(path) if path else bundled_sample_path()
    records = load_records(source)
    if limit:
        records = records[:limit]
    train_fraction = 1.0 - val_fraction - test_fraction
    return split_by_subject(records, fractions=(train_fraction, val_fraction, test_fraction),
                            seed=split_seed)


def prepare_splits(data_cfg, *, exclude: set[str] | None = None) -> PreparedSplits:
    """Everything a trial needs from disk, done once. ``exclude`` drops training images by name
    (the core-subset option); validation is never filtered."""
    splits = load_split_records(data_cfg.path, split_seed=data_cfg.split_seed,
                                val_fraction=data_cfg.val_fraction,
                                test_fraction=data_cfg.test_fraction, limit=data_cfg.limit)
    train_records = [r for r in splits["train"] if not exclude or r.name not in exclude]
    input_hw = (data_cfg.input_h, data_cfg.input_w)
    train = prepare_images(train_records, input_hw)
    val = prepare_images(splits["val"], input_hw, keep_sources=True)
    return PreparedSplits(
        input_hw=input_hw,
        train=train,
        val=val,
        orientation=Orientation.fit(train.landmarks),
        source=str(data_cfg.path or bundled_sample_path()),
        split_names={name: [r.name for r in recs] for name, recs in splits.items()},
    )


def head_size_weights(images: PreparedImages, *, power: float, bins: int = 6) -> np.ndarray:
    """Sampling weight per image that evens out head sizes (HC in mm, i.e. gestational age).

    log HC is cut into ``bins`` equal-width bins over the split's range (head size grows by
    factors, so an early-gestation head of 60 mm and one of 80 mm are as different as 180 and
    240 mm) and each image weighs ``count(bin) ** -power``: 0 keeps the split's own mix, 1 draws
    every bin equally often. Early-gestation heads are the ones the model fits worst, on the
    training images too (docs/experiments.md, "Early-gestation heads"); on HC18 this sampling
    did not help. Mean weight 1.
    """
    if not 0 <= power <= 1:
        raise ValueError(f"power must be in [0, 1], got {power}")
    log_hc = np.log(measurements_mm(images.original, images.pixel_mm)["hc"])
    edges = np.histogram_bin_edges(log_hc, bins=bins)
    which = np.clip(np.digitize(log_hc, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    weights = counts[which] ** -power
    return weights / weights.mean()


class HeatmapDataset(Dataset):
    """Augment (image and keypoints together), fix endpoint order, z-score, encode heatmaps.

    Returns ``(image (1, H, W) float32, heatmaps (4, h, w) float32, keypoints (4, 2) input px)``.
    The albumentations pipeline is built lazily in each worker and seeded from
    ``torch.initial_seed()``, which the DataLoader sets per worker and per epoch from its seeded
    generator, so augmentation is repeatable and differs between workers.
    """

    def __init__(self, images: PreparedImages, *, codec: HeatmapCodec, orientation: Orientation,
                 augment: AugmentConfig | None = None):
        self.images = images
        self.codec = codec
        self.orientation = orientation
        self.augment_cfg = augment
        self._pipeline = None
        self._pipeline_seed = None

    def __len__(self) -> int:
        return len(self.images)

    def _augmentation(self):
        seed = torch.initial_seed() % (2**32)
        if self._pipeline is None or self._pipeline_seed != seed:
            self._pipeline = build_augmentation(self.augment_cfg, seed=seed)
            self._pipeline_seed = seed
        return self._pipeline

    def __getitem__(self, index: int):
        image = self.images.images[index]
        keypoints = self.images.landmarks[index]
        if self.augment_cfg is not None:
            out = self._augmentation()(image=image, keypoints=keypoints)
            image, keypoints = out["image"], np.asarray(out["keypoints"], dtype=np.float32)
        keypoints = self.orientation.apply(keypoints).astype(np.float32)
        heatmaps = self.codec.encode(keypoints)
        return (torch.from_numpy(zscore(image))[None], torch.from_numpy(heatmaps),
                torch.from_numpy(keypoints))
