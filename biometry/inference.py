"""Model folders (``model.pt`` + ``model.yaml``) and the one prediction path used everywhere.

Training validation, ``evaluate`` and ``predict`` all go through :class:`LandmarkPredictor`, so the
numbers a search reports are the numbers a user gets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import yaml

from biometry.codec import (
    PAIRINGS,
    HeatmapCodec,
    pair_soft_argmax,
    soft_argmax,
    window_soft_argmax,
)
from biometry.errors import BiometryInputError
from biometry.models import (
    ENSEMBLE,
    ENSEMBLE_COMBINES,
    MeanOfModels,
    create_ensemble,
    create_model,
    split_mask,
)
from biometry.geometry import diameter_lengths, ellipse_landmarks
from biometry.metrics import measurements_mm
from biometry.records import BPD, OFD
from biometry.transforms import Letterbox, Orientation, letterbox, zoom_to, zscore
from biometry.uncertainty import image_uncertainty

MODEL_FORMAT = "biometry-model/1"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and decode its output (``model.yaml``)."""

    architecture: str
    model_kwargs: dict[str, Any]
    input_hw: tuple[int, int]
    stride: int
    sigma: float
    softargmax_beta: float
    orientation: dict[str, Any]
    flip_tta: bool = False
    pairing: str = "ordered"  # "unordered": each pair decoded from its summed maps
    decode: str = "global"  # "window": soft-argmax within codec.window_radius of each peak
    # OFD length in input pixels: {"low", "high", "target"}; a head measured outside [low, high] on
    # the first look is measured again rendered at "target" (see LandmarkPredictor.predict)
    head_scale: dict[str, float] = field(default_factory=dict)
    # a model with a mask channel: an image whose landmark HC and the HC of the ellipse fitted to
    # the mask (first look) differ by more than this fraction is measured by the mask's ellipse
    mask_fallback: float | None = None
    # a model with a mask channel: an image whose first look's mask ellipse measures an HC under
    # this many mm is measured by that ellipse; needs each image's pixel size
    # (LandmarkPredictor.predict(pixel_mm=...)). The mask measures early-gestation heads better
    # than the landmarks do (docs/experiments.md, "small heads by the mask")
    mask_small_head_mm: float | None = None
    uncertainty_threshold: float | None = None
    coverage_target: float = 0.9
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # source and split of the training data
    trial_config: dict[str, Any] = field(default_factory=dict)
    format: str = MODEL_FORMAT

    def codec(self) -> HeatmapCodec:
        return HeatmapCodec(input_hw=tuple(self.input_hw), stride=self.stride, sigma=self.sigma)


def save_model_folder(folder: str | Path, model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write ``model.pt`` (a plain state dict) and ``model.yaml``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / "model.pt.tmp")
    (folder / "model.pt.tmp").replace(folder / "model.pt")
    data = asdict(spec)
    data["input_hw"] = list(spec.input_hw)
    (folder / "model.yaml").write_text(yaml.safe_dump(_plain(data), sort_keys=False))
    return folder


def load_model_spec(folder: str | Path) -> ModelSpec:
    folder = Path(folder)
    spec_path = folder / "model.yaml"
    if not spec_path.is_file():
        raise BiometryInputError(f"{spec_path}: not found (a model folder holds model.pt and "
                                 f"model.yaml, e.g. runs/NAME/best)")
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as err:
        raise BiometryInputError(f"{spec_path}: invalid YAML ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT:
        raise BiometryInputError(f"{spec_path}: 'format' must be {MODEL_FORMAT}")
    known = set(ModelSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BiometryInputError(f"{spec_path}: unknown key '{unknown[0]}'")
    try:
        spec = ModelSpec(**raw)
    except TypeError as err:
        raise BiometryInputError(f"{spec_path}: {err}") from None
    spec.input_hw = tuple(spec.input_hw)
    _check_head_scale(spec_path, spec.head_scale)
    fallback = spec.mask_fallback
    if fallback is not None and not (isinstance(fallback, (int, float))
                                     and not isinstance(fallback, bool) and fallback >= 0):
        raise BiometryInputError(f"{spec_path}: 'mask_fallback' must be empty or a number >= 0 "
                                 f"but got {fallback!r}")
    small = spec.mask_small_head_mm
    if small is not None and not (isinstance(small, (int, float)) and not isinstance(small, bool)
                                  and math.isfinite(small) and small > 0):
        raise BiometryInputError(f"{spec_path}: 'mask_small_head_mm' must be empty or a number "
                                 f"> 0 but got {small!r}")
    return spec


def _check_head_scale(path: Path, scale) -> None:
    if scale in (None, {}):
        return
    numbers = isinstance(scale, dict) and all(
        isinstance(scale.get(k), (int, float)) and not isinstance(scale.get(k), bool)
        and math.isfinite(scale[k]) and scale[k] > 0 for k in ("low", "high", "target"))
    if not numbers or not scale["low"] <= scale["target"] <= scale["high"]:
        raise BiometryInputError(f"{path}: 'head_scale' must be empty or hold positive numbers "
                                 f"low <= target <= high (OFD in input pixels) but got {scale!r}")


def load_model_folder(folder: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the model from ``model.yaml`` and load ``model.pt`` with ``weights_only=True``."""
    folder = Path(folder)
    spec = load_model_spec(folder)
    weights = folder / "model.pt"
    if not weights.is_file():
        raise BiometryInputError(f"{weights}: not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise BiometryInputError(f"{weights}: cannot load weights ({type(err).__name__})") from None
    try:
        if spec.architecture == ENSEMBLE:
            model = create_ensemble(**dict(spec.model_kwargs or {}))
        else:
            model = create_model(spec.architecture, **dict(spec.model_kwargs or {}))
    except (ValueError, TypeError) as err:  # unknown architecture or option
        raise BiometryInputError(f"{folder / 'model.yaml'}: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise BiometryInputError(f"{weights}: weights do not match {spec.architecture} "
                                 f"{spec.model_kwargs}") from None
    return model.to(device).eval(), spec


# what the members of an ensemble must share: one output layout, one decoding, one subject split
ENSEMBLE_SHARED = ("input_hw", "stride", "sigma", "softargmax_beta", "orientation", "pairing",
                   "decode", "data")


def ensemble_of(folders: list[str | Path], *, combine: str = "maps",
                device: str | torch.device = "cpu"):
    """The model folders ``folders`` (one recipe, several seeds) as one ensemble and its spec,
    combined the ``combine`` way (:data:`~biometry.models.ENSEMBLE_COMBINES`).

    The spec is the first member's (decoding, second looks, mask fallback) with
    :data:`~biometry.models.ENSEMBLE` as its architecture and the members' architectures, options
    and seeds as its options; its ``metrics`` and ``uncertainty_threshold`` are the first member's
    until the caller measures the ensemble. A member whose output layout, decoding or data split
    differs from the first's is an error naming its folder and the key.
    """
    if not folders:
        raise BiometryInputError("an ensemble needs at least one model folder")
    if combine not in ENSEMBLE_COMBINES:
        raise BiometryInputError(f"ensemble combine must be one of {ENSEMBLE_COMBINES} but got "
                                 f"{combine!r}")
    loaded = [load_model_folder(folder) for folder in folders]
    first = loaded[0][1]
    for folder, (_, spec) in zip(folders, loaded):
        if spec.architecture == ENSEMBLE:
            raise BiometryInputError(f"{Path(folder) / 'model.yaml'}: an ensemble member cannot "
                                     f"itself be an ensemble")
        for key in ENSEMBLE_SHARED:
            if _shared_value(spec, key) != _shared_value(first, key):
                raise BiometryInputError(f"{Path(folder) / 'model.yaml'}: '{key}' differs from "
                                         f"{Path(folders[0]) / 'model.yaml'}; the members of an "
                                         f"ensemble share it")
    members = [{"architecture": spec.architecture, "model_kwargs": dict(spec.model_kwargs),
                "seed": spec.trial_config.get("train", {}).get("seed")} for _, spec in loaded]
    spec = ModelSpec(**{**asdict(first), "architecture": ENSEMBLE,
                        "model_kwargs": {"members": members, "combine": combine}})
    model = MeanOfModels([model for model, _ in loaded], combine=combine)
    return model.to(device).eval(), spec


def _shared_value(spec: ModelSpec, key: str):
    value = getattr(spec, key)
    if key == "input_hw":
        return tuple(value)
    if key == "data" and value.get("source"):  # one folder, however its path was written
        return {**value, "source": str(Path(value["source"]).resolve())}
    return value


def pair_radius(codec: HeatmapCodec) -> int:
    """Window half size of the unordered decoding: 3 sigma, at least 2 heatmap pixels."""
    return max(2, math.ceil(3 * codec.sigma))


DECODES = ("global", "window")
# LandmarkPredictor(mask_fallback=MASK_FALLBACK_OFF): no mask fallback, whatever the model's setting
MASK_FALLBACK_OFF = "off"
SECOND_LOOKS = 2  # looks after the first, at most, for a head outside the training range
# a later look agrees with its rendering when its OFD is within 25% of the target (chosen on the
# validation split, docs/experiments.md "Scale")
SECOND_LOOK_TOLERANCE = 0.25


def head_scale_range(ofd_lengths: np.ndarray, quantile: float) -> dict[str, float]:
    """``ModelSpec.head_scale`` from the training heads' OFD lengths in input pixels: a head
    below their ``quantile`` or above their ``1 - quantile`` quantile gets a second look at their
    median (``{}``, no second look, when ``quantile`` is 0)."""
    if quantile <= 0:
        return {}
    low, target, high = np.quantile(np.asarray(ofd_lengths, dtype=np.float64),
                                    [quantile, 0.5, 1.0 - quantile])
    return {"low": float(low), "high": float(high), "target": float(target),
            "tolerance": SECOND_LOOK_TOLERANCE}


def decode_coords(heatmaps: torch.Tensor, codec: HeatmapCodec, *, beta: float,
                  pairing: str = "ordered", decode: str = "global") -> torch.Tensor:
    """(B, 4, h, w) raw model output -> (B, 4, 2) input-pixel coordinates (differentiable)."""
    return _decode(heatmaps.float(), codec, beta=beta, pairing=pairing, decode=decode)[0]


def decode_heatmaps(heatmaps: torch.Tensor, codec: HeatmapCodec, *, beta: float,
                    pairing: str = "ordered", decode: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4, h, w) raw model output -> ((B, 4, 2) input-pixel coordinates, differentiable;
    (B,) uncertainty in input pixels: the mean spread of the whole-map distributions, so stray
    mass that a window decoding ignores still counts against the image)."""
    heatmaps = heatmaps.float()
    coords, spread = _decode(heatmaps, codec, beta=beta, pairing=pairing, decode=decode)
    if spread is None:
        return coords, image_uncertainty(heatmaps, beta=beta, stride=codec.stride)
    return coords, codec.stride * spread.mean(dim=-1)


def _decode(heatmaps, codec, *, beta, pairing, decode):
    """-> (input-pixel coordinates, per-endpoint spread of the unordered decoding or None)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS} but got {pairing!r}.")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES} but got {decode!r}.")
    if pairing == "unordered":
        coords, spread = pair_soft_argmax(heatmaps, beta=beta, radius=pair_radius(codec))
        return codec.to_input_coords(coords), spread
    if decode == "window":
        coords = window_soft_argmax(heatmaps, beta=beta, radius=codec.window_radius)
    else:
        coords = soft_argmax(heatmaps, beta=beta)
    return codec.to_input_coords(coords), None


class LandmarkPredictor:
    """Run a model on images: letterbox, z-score, forward, soft-argmax, back to original pixels.

    Example::

        predictor = LandmarkPredictor.from_folder("runs/NAME/best")
        coords, uncertainty = predictor.predict([image])  # original pixels, (N, 4, 2) and (N,)
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, *, device: str | torch.device = "cpu",
                 flip_tta: bool | None = None, mask_fallback: float | str | None = None,
                 mask_small_head_mm: float | str | None = None):
        self.model = model.eval()
        self.spec = spec
        self.device = torch.device(device)
        self.codec = spec.codec()
        self.orientation = Orientation.from_dict(spec.orientation)
        self.flip_tta = spec.flip_tta if flip_tta is None else flip_tta
        if mask_fallback == MASK_FALLBACK_OFF:
            self.mask_fallback = None
        else:
            self.mask_fallback = spec.mask_fallback if mask_fallback is None else mask_fallback
        if mask_small_head_mm == MASK_FALLBACK_OFF:
            self.mask_small_head_mm = None
        else:
            self.mask_small_head_mm = (spec.mask_small_head_mm if mask_small_head_mm is None
                                       else mask_small_head_mm)
        # a "median" ensemble: each member predicts on its own, the landmarks' median is kept
        self.members = [
            LandmarkPredictor(member, replace(spec, architecture=info["architecture"],
                                              model_kwargs=dict(info.get("model_kwargs") or {})),
                              device=device, flip_tta=self.flip_tta,
                              mask_fallback=MASK_FALLBACK_OFF if self.mask_fallback is None
                              else self.mask_fallback,
                              mask_small_head_mm=MASK_FALLBACK_OFF
                              if self.mask_small_head_mm is None else self.mask_small_head_mm)
            for member, info in zip(model.members, spec.model_kwargs["members"])
        ] if isinstance(model, MeanOfModels) and model.combine == "median" else []

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str = "cpu", flip_tta: bool | None = None,
                    mask_fallback: float | str | None = None,
                    mask_small_head_mm: float | str | None = None):
        model, spec = load_model_folder(folder, device=device)
        return cls(model, spec, device=device, flip_tta=flip_tta, mask_fallback=mask_fallback,
                   mask_small_head_mm=mask_small_head_mm)

    def predict_input(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 1, H, W) z-scored input -> (coords (B, 4, 2) input px, uncertainty (B,))."""
        if self.members:
            return median_of([member.predict_input(batch) for member in self.members])
        return self._forward(batch)[:2]

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor, *, with_masks: bool = False):
        """``predict_input`` plus, ``with_masks``, the head-region logits of each image (an
        empty list for a model without a mask channel)."""
        batch = batch.to(self.device)
        heatmaps, mask = split_mask(self.model(batch).float())
        masks = [] if mask is None or not with_masks else list(mask.cpu().numpy())
        coords, uncertainty = decode_heatmaps(heatmaps, self.codec, beta=self.spec.softargmax_beta,
                                              pairing=self.spec.pairing, decode=self.spec.decode)
        coords = self.orientation.apply(coords.cpu().numpy())
        uncertainty = np.asarray(uncertainty.cpu() if torch.is_tensor(uncertainty) else uncertainty)
        if self.flip_tta:
            flipped = split_mask(self.model(torch.flip(batch, dims=[3])).float())[0]
            coords_f = decode_coords(flipped, self.codec, beta=self.spec.softargmax_beta,
                                     pairing=self.spec.pairing, decode=self.spec.decode)
            coords_f = coords_f.cpu().numpy()
            coords_f[..., 0] = self.spec.input_hw[1] - 1 - coords_f[..., 0]
            coords = 0.5 * (coords + match_pairs(coords_f, coords))
        return coords, uncertainty, masks

    def predict(self, images: list[np.ndarray], *, batch_size: int = 16,
                letterboxed: list[tuple[np.ndarray, Letterbox]] | None = None,
                pixel_mm: Sequence[float] | np.ndarray | None = None):
        """Original uint8 images of any size -> (coords (N, 4, 2) original px, uncertainty (N,)).

        ``letterboxed``: the images already letterboxed to the input, with their ``Letterbox``
        (validation keeps them from data preparation, so it does not redo them every epoch).
        ``pixel_mm``: each image's pixel size; with it, a model with ``mask_small_head_mm``
        measures a head whose mask ellipse is smaller than that by the ellipse (without it, never).

        With ``spec.head_scale``, a head whose first-look OFD lies outside the range of the
        training heads is looked at again, rendered centred so that its OFD is the training
        median: a small head in a wide field of view is then measured with more pixels and at a
        scale the model was trained on. A later look is kept only when it agrees with the scale
        it was rendered for (its OFD within ``tolerance`` of the target); one that does not is
        followed by another from its own estimate, up to ``SECOND_LOOKS``, and when none agrees
        the first look stands.

        A ``"median"`` ensemble runs all of that for each member and keeps the median of the
        members' landmarks and uncertainties (:func:`median_of`).
        """
        if self.members:
            return median_of([member.predict(images, batch_size=batch_size,
                                             letterboxed=letterboxed, pixel_mm=pixel_mm)
                              for member in self.members])
        first = letterboxed or [letterbox(img, None, self.spec.input_hw)[::2] for img in images]
        boxes = [box for _, box in first]
        small_heads = self.mask_small_head_mm is not None and pixel_mm is not None
        fallback = self.mask_fallback is not None or small_heads
        coords, uncertainty, masks = self._predict_boxed(first, batch_size, keep_masks=fallback)
        pending = np.flatnonzero(self.needs_second_look(coords, boxes))
        estimate = coords.copy()
        kept_masks, kept_boxes = list(masks), list(boxes)  # the look the landmarks come from
        for _ in range(SECOND_LOOKS):
            if len(pending) == 0:
                break
            looks = [self._second_look(images[i], estimate[i], boxes[i]) for i in pending]
            found, found_unc, found_masks = self._predict_boxed(looks, batch_size,
                                                                keep_masks=fallback)
            agrees = self._agrees_with_scale(found, [box for _, box in looks])
            coords[pending[agrees]] = found[agrees]
            uncertainty[pending[agrees]] = found_unc[agrees]
            for j in np.flatnonzero(agrees) if masks else ():
                kept_masks[pending[j]], kept_boxes[pending[j]] = found_masks[j], looks[j][1]
            estimate[pending] = found
            pending = pending[~agrees]
        if masks:  # each first look's mask ellipse, fitted once for both rules
            ellipses = [self._mask_ellipse(logits, box) for logits, box in zip(masks, boxes)]
        if masks and self.mask_fallback is not None:
            coords = self._fall_back_to_mask(coords, ellipses, list(zip(kept_masks, kept_boxes)),
                                             boxes)
        if masks and small_heads:
            coords = self._measure_small_heads_by_mask(coords, ellipses,
                                                       np.asarray(pixel_mm, dtype=np.float64))
        return coords, uncertainty

    def _mask_ellipse(self, logits: np.ndarray, box: Letterbox) -> np.ndarray | None:
        """(4, 2) original-pixel axis endpoints of the ellipse fitted to one look's mask."""
        points = mask_ellipse_landmarks(logits, self.codec.stride)
        return None if points is None else box.to_original(points)

    def _measure_small_heads_by_mask(self, coords: np.ndarray, ellipses: list,
                                     pixel_mm: np.ndarray) -> np.ndarray:
        """Give each image whose first-look mask ellipse (``ellipses``, None where the mask is
        empty) measures an HC under ``mask_small_head_mm`` that ellipse's axis endpoints. A kept
        second look's mask measured worse on validation (docs/experiments.md, "small heads by
        the mask")."""
        if len(pixel_mm) != len(coords):
            raise ValueError(f"pixel_mm holds {len(pixel_mm)} values for {len(coords)} images.")
        out = coords.copy()
        for i, points in enumerate(ellipses):
            if points is not None and (measurements_mm(points[None], pixel_mm[i])["hc"][0]
                                       < self.mask_small_head_mm):
                out[i] = match_pairs(points[None], coords[i][None])[0]
        return out

    def _fall_back_to_mask(self, coords: np.ndarray, ellipses: list, kept: list,
                           first_boxes: list) -> np.ndarray:
        """Give each image whose landmarks' HC differs from the HC of its first look's mask
        ellipse by more than ``mask_fallback`` (a fraction of the mask's) that ellipse's axis
        endpoints (docs/experiments.md, "the mask as a measurement").

        ``ellipses``: each first look's mask ellipse (None where the mask is empty); ``kept``:
        (head-region logits, Letterbox) of the look the landmarks were kept from. Where that is
        not the first look (a second look), the first look's mask is trusted only if the kept
        look's mask agrees with it to the same fraction: a head small in the frame gets a coarse
        first-look mask, and the second look's disagrees with it.
        """
        out = coords.copy()
        t = self.mask_fallback
        for i, (points, (kept_logits, kept_box)) in enumerate(zip(ellipses, kept)):
            if points is None:
                continue
            hc_mask, hc_landmarks = measurements_mm(np.stack([points, coords[i]]), 1.0)["hc"]
            if kept_box is not first_boxes[i]:
                other = self._mask_ellipse(kept_logits, kept_box)
                if other is None or abs(measurements_mm(other[None], 1.0)["hc"][0]
                                        - hc_mask) > t * hc_mask:
                    continue
            if abs(hc_landmarks - hc_mask) > t * hc_mask:
                out[i] = match_pairs(points[None], coords[i][None])[0]
        return out

    def _predict_boxed(self, boxed: list, batch_size: int, *, keep_masks: bool = False):
        """[(input image, Letterbox)] -> (coords (N, 4, 2) original px, uncertainty (N,), the
        head-region logits of each image: an empty list unless ``keep_masks`` and the model has
        a mask channel)."""
        coords, uncertainty, masks = [], [], []
        for start in range(0, len(boxed), batch_size):
            chunk = boxed[start:start + batch_size]
            batch = torch.from_numpy(np.stack([zscore(image) for image, _ in chunk]))[:, None]
            pred, unc, chunk_masks = self._forward(batch, with_masks=keep_masks)
            coords.extend(box.to_original(pred[i]) for i, (_, box) in enumerate(chunk))
            uncertainty.append(unc)
            masks.extend(chunk_masks)
        return np.stack(coords), np.concatenate(uncertainty).astype(np.float64), masks

    @staticmethod
    def _input_ofd(coords: np.ndarray, boxes: list) -> np.ndarray:
        """(N,) OFD lengths in the input pixels of each look."""
        return diameter_lengths(coords)[1] * np.array([box.scale for box in boxes])

    def needs_second_look(self, coords: np.ndarray, boxes: list) -> np.ndarray:
        """(N,) bool: the first look's OFD, in input pixels, lies outside ``spec.head_scale``."""
        scale = self.spec.head_scale
        if not scale or len(coords) == 0:
            return np.zeros(len(coords), dtype=bool)
        ofd = self._input_ofd(coords, boxes)
        return (ofd < scale["low"]) | (ofd > scale["high"])

    def _agrees_with_scale(self, coords: np.ndarray, boxes: list) -> np.ndarray:
        scale = self.spec.head_scale
        ratio = self._input_ofd(coords, boxes) / scale["target"]
        tolerance = scale.get("tolerance", SECOND_LOOK_TOLERANCE)
        return np.abs(np.log(np.maximum(ratio, 1e-9))) <= np.log1p(tolerance)

    def _second_look(self, image: np.ndarray, coords: np.ndarray, first_box: Letterbox):
        """(image rendered centred on the estimate at the target scale, its Letterbox)."""
        ofd = max(float(diameter_lengths(coords)[1]), 1e-6)
        centre = 0.5 * (coords[list(OFD)].mean(axis=0) + coords[list(BPD)].mean(axis=0))
        # never more than 4x the first look's scale: a collapsed first look must not blow up
        scale = min(self.spec.head_scale["target"] / ofd, 4.0 * first_box.scale)
        return zoom_to(image, centre, scale, self.spec.input_hw)

    def flagged(self, uncertainty: np.ndarray) -> np.ndarray:
        threshold = self.spec.uncertainty_threshold
        if threshold is None:
            return np.zeros(len(uncertainty), dtype=int)
        return (np.asarray(uncertainty) > threshold).astype(int)


def mask_ellipse_landmarks(logits: np.ndarray, stride: int) -> np.ndarray | None:
    """(h, w) head-region logits -> (4, 2) BPD1, BPD2, OFD1, OFD2 of the ellipse fitted (OpenCV)
    to the largest region above 0, in input pixels; None when there is none.

    The logits are up-sampled to input pixels first (bilinear, which keeps the codec's pixel
    centres), and each fitted axis gets one pixel back: a contour runs through the centres of the
    boundary pixels, half a pixel inside the edge on either side.
    """
    h, w = logits.shape
    full = cv2.resize(np.asarray(logits, dtype=np.float32), (w * stride, h * stride),
                      interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((full > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    contours = [c for c in contours if len(c) >= 5]
    if not contours:
        return None
    (cx, cy), (d1, d2), angle = cv2.fitEllipse(max(contours, key=cv2.contourArea))
    return ellipse_landmarks((cx, cy), (d1 + 1, d2 + 1), angle)


def median_of(predictions: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[(coords (N, 4, 2), uncertainty (N,))] of several models -> their median coordinate by
    coordinate (each model's endpoint pairs ordered like the first model's first:
    :func:`match_pairs`) and their median uncertainty."""
    reference = predictions[0][0]
    coords = np.stack([match_pairs(coords, reference) for coords, _ in predictions])
    uncertainty = np.stack([np.asarray(unc, dtype=np.float64) for _, unc in predictions])
    return np.median(coords, axis=0), np.median(uncertainty, axis=0)


def match_pairs(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Order each endpoint pair of ``points`` (..., 4, 2) like the nearer assignment to
    ``reference``: two predictions of one image can order a pair differently, and averaging
    mismatched endpoints would shrink the diameter."""
    out = points.copy()
    for pair in ((0, 1), (2, 3)):
        a, b = pair
        straight = (np.linalg.norm(points[..., a, :] - reference[..., a, :], axis=-1)
                    + np.linalg.norm(points[..., b, :] - reference[..., b, :], axis=-1))
        crossed = (np.linalg.norm(points[..., b, :] - reference[..., a, :], axis=-1)
                   + np.linalg.norm(points[..., a, :] - reference[..., b, :], axis=-1))
        swap = crossed < straight
        out[swap, a], out[swap, b] = points[swap, b], points[swap, a]
    return out


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> YAML-safe Python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
