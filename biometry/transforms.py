"""Image and landmark transforms: letterbox, augmentation, z-score, dynamic orientation.

Coordinates follow ``docs/architecture.md``: (x, y) with pixel centres at integer coordinates,
landmark arrays ``(..., 4, 2)`` with rows BPD1, BPD2, OFD1, OFD2.
"""
from __future__ import annotations

import numbers
import random
import warnings
from dataclasses import asdict, dataclass, fields

import albumentations as A
import cv2
import numpy as np

from biometry.errors import BiometryInputError
from biometry.records import BPD, OFD

DEFAULT_INPUT_HW = (272, 400)
"""Model input (H, W): an 800x540 image letterboxes to 400x270 (scale 0.5) plus 2 rows of padding;
both sides divide by 16."""


def _check_hw(name: str, hw) -> tuple[int, int]:
    ok = (
        isinstance(hw, (tuple, list))
        and len(hw) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in hw)
    )
    if not ok:
        raise ValueError(f"{name} must be two positive integers (height, width) but got {hw!r}.")
    return int(hw[0]), int(hw[1])


# ---------------------------------------------------------------------------------------------
# Letterbox
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letterbox:
    """The map between original image pixels and model input pixels: ``input = orig * scale + pad``.

    ``pad_x``/``pad_y`` are offsets of the map, not the amount of padding: the padding sits at the
    right and bottom and moves nothing, so the offset is the half-pixel term ``(scale - 1) / 2`` that
    a resize with pixel centres at integer coordinates implies.

    Example:
        >>> box = Letterbox(scale=0.5, pad_x=-0.25, pad_y=-0.25)
        >>> box.to_input(np.array([[0.5, 1.5]])).tolist()
        [[0.0, 0.5]]
    """

    scale: float
    pad_x: float
    pad_y: float

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) original pixels -> (..., 2) input pixels (float64)."""
        return np.asarray(points, dtype=np.float64) * self.scale + np.array([self.pad_x, self.pad_y])

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) input pixels -> (..., 2) original pixels (float64)."""
        return (np.asarray(points, dtype=np.float64) - np.array([self.pad_x, self.pad_y])) / self.scale


def letterbox(
    image: np.ndarray,
    landmarks: np.ndarray | None,
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW,
) -> tuple[np.ndarray, np.ndarray | None, Letterbox]:
    """Resize ``image`` isotropically to fit ``input_hw`` and pad the right/bottom with 0.

    Shrinking uses ``cv2.INTER_AREA``, enlarging ``cv2.INTER_LINEAR``.

    Args:
        image: uint8 (H, W).
        landmarks: (4, 2) (or any (..., 2)) in original pixels, or None.
        input_hw: (h, w) of the model input.

    Returns:
        image uint8 (h, w); landmarks in input pixels (float64) or None; the ``Letterbox``.
    """
    h, w = _check_hw("input_hw", input_hw)
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a 2-D uint8 array but got shape {image.shape} and dtype {image.dtype}."
        )
    src_h, src_w = image.shape
    scale = min(h / src_h, w / src_w)
    # fx/fy (not dsize) so that OpenCV maps both axes with exactly ``scale``; INTER_AREA shifts
    # detail by up to ~0.15 px when it enlarges, so enlarging uses INTER_LINEAR.
    interpolation = cv2.INTER_AREA if scale <= 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=interpolation)
    resized = resized[:h, :w]
    out = np.zeros((h, w), dtype=np.uint8)
    out[: resized.shape[0], : resized.shape[1]] = resized
    offset = 0.5 * (scale - 1.0)
    box = Letterbox(scale=float(scale), pad_x=offset, pad_y=offset)
    points = None if landmarks is None else box.to_input(landmarks)
    return out, points, box


def zoom_to(image: np.ndarray, center: np.ndarray, scale: float,
            input_hw: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Render ``image`` at ``scale`` with ``center`` (original pixels) at the middle of an
    ``input_hw`` frame, 0 outside the image: the second, scale-normalised look of a head.

    The shift is whole input pixels, so the map stays a ``Letterbox`` (``input = orig * scale +
    pad``) and ``Letterbox.to_original`` brings predictions back.
    """
    h, w = _check_hw("input_hw", input_hw)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number but got {scale!r}.")
    interpolation = cv2.INTER_AREA if scale <= 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.asarray(image), (0, 0), fx=scale, fy=scale, interpolation=interpolation)
    offset = 0.5 * (scale - 1.0)
    cx, cy = np.asarray(center, dtype=np.float64) * scale + offset
    dx, dy = round((w - 1) / 2 - cx), round((h - 1) / 2 - cy)
    out = np.zeros((h, w), dtype=np.uint8)
    # the part of the resized image that lands inside the frame
    x0, y0 = max(0, dx), max(0, dy)
    x1, y1 = min(w, dx + resized.shape[1]), min(h, dy + resized.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = resized[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    return out, Letterbox(scale=float(scale), pad_x=offset + dx, pad_y=offset + dy)


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-image z-score: float32 of the same shape, mean 0 and std 1 (std 0 gives all zeros)."""
    x = np.asarray(image, dtype=np.float32)
    mean = float(x.mean())
    std = float(x.std())
    if std < 1e-6:
        return np.zeros_like(x)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] but got {value}.")


def _ordered(low_name: str, low: float, high_name: str, high: float) -> None:
    if low > high:
        raise ValueError(f"{low_name} must be <= {high_name} but got {low} > {high}.")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, applied to the letterboxed uint8 image (input resolution).

    A setting at its neutral value (0 degrees, scale 1..1, probability 0, ...) leaves its transform
    out of the pipeline.

    Args:
        rotate_deg: rotation drawn uniformly from [-rotate_deg, rotate_deg] degrees.
        scale_min: smallest isotropic zoom factor.
        scale_max: largest isotropic zoom factor.
        translate_frac: shift drawn from [-translate_frac, translate_frac] of width/height.
        affine_p: probability of the rotate/scale/translate step.
        zoom_out_min: smallest zoom of the zoom-out draw (1 = none): heads smaller in the frame than
            the training images hold (early gestation, deep fields of view).
        zoom_out_p: share of the affine steps whose zoom is drawn from [zoom_out_min, scale_min]
            instead of [scale_min, scale_max], so most samples keep the usual scale.
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip.
        brightness: brightness change drawn from [-brightness, brightness] (fraction of 255).
        contrast: contrast change drawn from [-contrast, contrast].
        gamma_min: smallest gamma (1 = unchanged).
        gamma_max: largest gamma.
        noise_std: largest Gaussian noise std as a fraction of 255.
        blur_sigma: largest Gaussian blur sigma in input pixels.
        intensity_p: probability of each intensity step (brightness/contrast, gamma, noise, blur).

    Example:
        >>> cfg = AugmentConfig(rotate_deg=20.0, hflip_p=0.5)
        >>> aug = build_augmentation(cfg, seed=0)
    """

    rotate_deg: float = 15.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    translate_frac: float = 0.05
    affine_p: float = 0.8
    zoom_out_min: float = 1.0
    zoom_out_p: float = 0.0
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    gamma_min: float = 0.8
    gamma_max: float = 1.2
    noise_std: float = 0.02
    blur_sigma: float = 0.0
    intensity_p: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{f.name} must be a number but got {value!r}.")
            if not np.isfinite(value):
                raise ValueError(f"{f.name} must be finite but got {value}.")
        _in_range("rotate_deg", self.rotate_deg, 0, 180)
        if self.scale_min <= 0:
            raise ValueError(f"scale_min must be positive but got {self.scale_min}.")
        _ordered("scale_min", self.scale_min, "scale_max", self.scale_max)
        _in_range("translate_frac", self.translate_frac, 0, 0.5)
        if self.zoom_out_min <= 0:
            raise ValueError(f"zoom_out_min must be positive but got {self.zoom_out_min}.")
        for name in ("affine_p", "zoom_out_p", "hflip_p", "vflip_p", "intensity_p", "brightness", "contrast", "noise_std"):
            _in_range(name, getattr(self, name), 0, 1)
        if self.gamma_min <= 0:
            raise ValueError(f"gamma_min must be positive but got {self.gamma_min}.")
        _ordered("gamma_min", self.gamma_min, "gamma_max", self.gamma_max)
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma cannot be negative but got {self.blur_sigma}.")

    @classmethod
    def off(cls) -> AugmentConfig:
        """The identity augmentation (every step left out)."""
        return cls(
            rotate_deg=0.0, scale_min=1.0, scale_max=1.0, translate_frac=0.0, zoom_out_min=1.0,
            zoom_out_p=0.0, hflip_p=0.0,
            vflip_p=0.0, brightness=0.0, contrast=0.0, gamma_min=1.0, gamma_max=1.0,
            noise_std=0.0, blur_sigma=0.0,
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _affine(cfg: AugmentConfig, scale: tuple[float, float], p: float) -> A.Affine:
    t = cfg.translate_frac
    return A.Affine(
        rotate=(-cfg.rotate_deg, cfg.rotate_deg),
        scale=scale,
        keep_ratio=True,
        translate_percent={"x": (-t, t), "y": (-t, t)},
        interpolation=cv2.INTER_LINEAR,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        p=p,
    )


def _zooms_out(cfg: AugmentConfig) -> bool:
    return cfg.zoom_out_p > 0 and cfg.zoom_out_min < cfg.scale_min


def _geometric(cfg: AugmentConfig) -> list:
    steps = []
    moves = (cfg.rotate_deg > 0 or cfg.scale_min != 1 or cfg.scale_max != 1
             or cfg.translate_frac > 0 or _zooms_out(cfg))
    if moves and cfg.affine_p > 0:
        usual = (cfg.scale_min, cfg.scale_max)
        if _zooms_out(cfg):
            # OneOf weighs its children by their p: zoom_out_p of the affine steps zoom out
            steps.append(A.OneOf([
                _affine(cfg, usual, p=1.0 - cfg.zoom_out_p),
                _affine(cfg, (cfg.zoom_out_min, cfg.scale_min), p=cfg.zoom_out_p),
            ], p=cfg.affine_p))
        else:
            steps.append(_affine(cfg, usual, p=cfg.affine_p))
    if cfg.hflip_p > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip_p))
    if cfg.vflip_p > 0:
        steps.append(A.VerticalFlip(p=cfg.vflip_p))
    return steps


def _intensity(cfg: AugmentConfig) -> list:
    p = cfg.intensity_p
    if p == 0:
        return []
    steps = []
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=(-cfg.brightness, cfg.brightness),
                contrast_limit=(-cfg.contrast, cfg.contrast),
                p=p,
            )
        )
    if cfg.gamma_min != 1 or cfg.gamma_max != 1:
        steps.append(A.RandomGamma(gamma_limit=(100 * cfg.gamma_min, 100 * cfg.gamma_max), p=p))
    if cfg.noise_std > 0:
        steps.append(A.GaussNoise(std_range=(0.0, cfg.noise_std), p=p))
    if cfg.blur_sigma > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, max(cfg.blur_sigma, 0.1)), p=p))
    return steps


def augmentation_steps(cfg: AugmentConfig) -> list:
    """The albumentations transforms ``build_augmentation`` composes: geometric, then intensity."""
    return _geometric(cfg) + _intensity(cfg)


def _generators(seed) -> tuple[np.random.Generator, random.Random]:
    seq = np.random.SeedSequence(seed)
    return np.random.default_rng(seq), random.Random(int(seq.generate_state(1)[0]))


def build_augmentation(cfg: AugmentConfig, *, seed: int | None = None) -> A.Compose:
    """An ``A.Compose`` of ``augmentation_steps(cfg)`` for a uint8 image and ``xy`` keypoints.

    All steps draw from one shared random stream seeded by ``seed`` (albumentations' own
    ``Compose(seed=...)`` gives every step its own copy of the same stream, so e.g. the two flips
    would always fire together). For results that do not depend on DataLoader workers, pass a
    per-sample seed to ``augment``.
    """
    aug = _compose(augmentation_steps(cfg))
    aug.set_random_state(*_generators(seed))
    return aug


def _compose(steps: list) -> A.Compose:
    with warnings.catch_warnings():
        # a pipeline without a geometric step has nothing to do for keypoints: that is fine
        warnings.filterwarnings("ignore", message="Got processor for keypoints")
        return A.Compose(steps, keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))


def augment(
    aug: A.Compose,
    image: np.ndarray,
    landmarks: np.ndarray,
    *,
    seed: int | tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``aug`` to one image and its landmarks.

    Args:
        aug: from ``build_augmentation``.
        image: uint8 (h, w) at input resolution.
        landmarks: (K, 2) in input pixels; points pushed outside the image are kept.
        seed: when given (an int or a tuple such as ``(base_seed, epoch, index)``) the result
            depends on it alone, whatever the worker or call order; None continues ``aug``'s stream.

    Returns:
        image uint8 (h, w); landmarks float64 (K, 2) in input pixels.
    """
    if seed is not None:
        aug.set_random_state(*_generators(seed))
    points = np.asarray(landmarks, dtype=np.float64)
    out = aug(image=image, keypoints=points.reshape(-1, 2))
    keypoints = np.asarray(out["keypoints"], dtype=np.float64).reshape(points.shape)
    return out["image"], keypoints


# ---------------------------------------------------------------------------------------------
# Dynamic orientation (BiometryNet)
# ---------------------------------------------------------------------------------------------


def _dominant_direction(diffs: np.ndarray) -> np.ndarray:
    """Leading eigenvector of sum(d d^T) over (N, 2) differences, its larger component positive."""
    vals, vecs = np.linalg.eigh(diffs.T @ diffs)
    u = vecs[:, np.argmax(vals)]
    if u[np.argmax(np.abs(u))] < 0:
        u = -u
    return u / np.linalg.norm(u)


def _direction(name: str, value) -> np.ndarray:
    u = np.asarray(value, dtype=np.float64)
    if u.shape != (2,) or not np.all(np.isfinite(u)) or np.linalg.norm(u) == 0:
        raise BiometryInputError(f"orientation: {name} must be a non-zero [x, y] pair but got {value!r}.")
    return u / np.linalg.norm(u)


@dataclass(frozen=True)
class Orientation:
    """BiometryNet's dynamic orientation: one dominant direction per landmark pair.

    ``fit`` finds each pair's direction once on training labels (the sign of a pair's difference
    vector is arbitrary, so the direction is the leading eigenvector of ``sum(d d^T)``); ``apply``
    orders each pair so that endpoint 1 has the smaller projection on that direction. Labels and
    predictions then share one order after any flip or rotation. A direction's sign makes its larger
    component positive: a near-horizontal pair runs left to right, a near-vertical one top to bottom.

    Example:
        >>> pts = np.array([[[0, 10], [0, 0], [10, 5], [-10, 5]]], dtype=float)
        >>> Orientation.fit(pts).apply(pts)[0].tolist()
        [[0.0, 0.0], [0.0, 10.0], [-10.0, 5.0], [10.0, 5.0]]
    """

    bpd_direction: tuple[float, float]
    ofd_direction: tuple[float, float]

    @classmethod
    def fit(cls, landmarks: np.ndarray) -> Orientation:
        """Fit on training labels (N, 4, 2)."""
        pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 4, 2)
        if len(pts) == 0:
            raise ValueError("landmarks must hold at least one (4, 2) set but got none.")
        bpd = _dominant_direction(pts[:, BPD[1]] - pts[:, BPD[0]])
        ofd = _dominant_direction(pts[:, OFD[1]] - pts[:, OFD[0]])
        return cls(bpd_direction=tuple(map(float, bpd)), ofd_direction=tuple(map(float, ofd)))

    def apply(self, landmarks: np.ndarray) -> np.ndarray:
        """(..., 4, 2) -> (..., 4, 2) float64 with each pair ordered by projection (ties kept)."""
        pts = np.array(landmarks, dtype=np.float64)
        for pair, direction in ((BPD, self.bpd_direction), (OFD, self.ofd_direction)):
            first, second = pts[..., pair[0], :].copy(), pts[..., pair[1], :].copy()
            swap = (second @ np.asarray(direction) < first @ np.asarray(direction))[..., None]
            pts[..., pair[0], :] = np.where(swap, second, first)
            pts[..., pair[1], :] = np.where(swap, first, second)
        return pts

    def to_dict(self) -> dict[str, list[float]]:
        return {"bpd_direction": list(self.bpd_direction), "ofd_direction": list(self.ofd_direction)}

    @classmethod
    def from_dict(cls, data: dict) -> Orientation:
        if not isinstance(data, dict):
            raise BiometryInputError(f"orientation must be a mapping but got {data!r}.")
        directions = []
        for key in ("bpd_direction", "ofd_direction"):
            if key not in data:
                raise BiometryInputError(f"orientation: missing key '{key}'.")
            directions.append(tuple(map(float, _direction(key, data[key]))))
        return cls(bpd_direction=directions[0], ofd_direction=directions[1])
