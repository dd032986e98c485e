"""Model folders (``model.pt`` + ``model.yaml``) and the one prediction path used everywhere.

Training validation, ``evaluate`` and ``predict`` all go through :class:`LandmarkPredictor`, so the
numbers a search reports are the numbers a user gets. The predictor runs the network, decodes with
the codec and then the model's post-processing steps (:mod:`biometry.postprocess`), and nothing
else.
"""
from __future__ import annotations

import hashlib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import yaml

from biometry import atomic
from biometry.codec import DECODES, PAIRINGS, WINDOW_SIGMAS, HeatmapCodec
from biometry.errors import BiometryInputError
from biometry.geometry import ellipse_landmarks
from biometry.models import ENSEMBLE, ENSEMBLE_COMBINES, MeanOfModels, create_ensemble, create_model, split_mask
from biometry.onnx_model import holds_onnx_network, load_onnx_network
from biometry.postprocess import (
    ImageLook,
    Prediction,
    Step,
    check_needs,
    create_steps,
    needs_pixel_mm,
)
from biometry.transforms import Letterbox, Orientation, letterbox, zscore
from biometry.typed import from_mapping
from biometry.yamlfile import read_yaml
from biometry.uncertainty import image_uncertainty

MODEL_FORMAT = "biometry-model/2"
LEGACY_FORMAT = "biometry-model/1"  # rules as fields (flip_tta, head_scale, mask_*), read as steps
LEGACY_PAIR_SIGMAS = 3.0  # the unordered decoding's window before one radius served every decoder


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model, decode its output and post-process it
    (``model.yaml``)."""

    architecture: str
    model_kwargs: dict[str, Any]
    input_hw: tuple[int, int]
    stride: int
    sigma: float
    softargmax_beta: float
    orientation: dict[str, Any]
    pairing: str = "ordered"  # "unordered": each pair decoded from its summed maps
    decode: str = "global"  # biometry.codec.DECODES
    window_sigmas: float = WINDOW_SIGMAS  # decoding window half size, in sigmas
    # the post-processing steps, in order: [{"step": NAME, **options}] (biometry.postprocess)
    postprocess: list[dict[str, Any]] = field(default_factory=list)
    combine: str | None = None  # an ensemble's strategy: "median" of landmarks or "maps" averaged
    uncertainty_threshold: float | None = None
    coverage_target: float = 0.9
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # source and split of the training data
    trial_config: dict[str, Any] = field(default_factory=dict)
    format: str = MODEL_FORMAT

    def codec(self) -> HeatmapCodec:
        return HeatmapCodec(input_hw=tuple(self.input_hw), stride=self.stride, sigma=self.sigma,
                            window_sigmas=self.window_sigmas)

    def has_mask(self) -> bool:
        """Whether the model predicts a head-region mask (every member, for an ensemble)."""
        if self.architecture == ENSEMBLE:
            members = self.model_kwargs.get("members") or []
            return bool(members) and all((m.get("model_kwargs") or {}).get("mask_head")
                                         for m in members)
        return bool(self.model_kwargs.get("mask_head"))

    def steps(self) -> list[Step]:
        return create_steps(self.postprocess)


def save_model_folder(folder: str | Path, model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write ``model.pt`` (a plain state dict) and ``model.yaml``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic.write_file(folder / "model.pt", lambda tmp: torch.save(state, tmp))
    write_model_spec(folder, spec)
    return folder


def write_model_spec(folder: str | Path, spec: ModelSpec) -> None:
    data = asdict(spec)
    data["input_hw"] = list(spec.input_hw)
    data["format"] = MODEL_FORMAT
    atomic.write_text(Path(folder) / "model.yaml", yaml.safe_dump(_plain(data), sort_keys=False))


def set_model_postprocess(folder: str | Path, steps: list[dict[str, Any]]) -> None:
    """Rewrite a model folder's post-processing steps (the weights stay): what a trial's
    post-training sweep kept."""
    spec = load_model_spec(folder)
    spec.postprocess = list(steps)
    _check_spec(spec, Path(folder) / "model.yaml")
    write_model_spec(folder, spec)


def load_model_spec(folder: str | Path) -> ModelSpec:
    """``model.yaml`` checked: unknown keys, bad values and steps the model cannot run are one
    line naming the file and the key. A folder of the first format loads with its rules as
    steps."""
    spec_path = Path(folder) / "model.yaml"
    raw = read_yaml(spec_path, missing="a model folder holds model.pt and model.yaml, e.g. "
                                      "runs/NAME/best")
    if not isinstance(raw, dict) or raw.get("format") not in (MODEL_FORMAT, LEGACY_FORMAT):
        raise BiometryInputError(f"{spec_path}: 'format' must be {MODEL_FORMAT}")
    if raw["format"] == LEGACY_FORMAT:
        raw = _from_legacy(raw, spec_path)
    missing = [f.name for f in fields(ModelSpec) if f.default is MISSING
               and f.default_factory is MISSING and f.name not in raw]
    if missing:
        raise BiometryInputError(f"{spec_path}: missing key '{missing[0]}'")
    spec = from_mapping(ModelSpec, raw, source=str(spec_path))
    spec.input_hw = tuple(spec.input_hw)
    _check_spec(spec, spec_path)
    return spec


def _check_spec(spec: ModelSpec, path: Path) -> None:
    for key, allowed in (("pairing", PAIRINGS), ("decode", DECODES)):
        if getattr(spec, key) not in allowed:
            raise BiometryInputError(f"{path}: '{key}' must be one of {', '.join(allowed)} but got "
                                     f"{getattr(spec, key)!r}")
    is_ensemble = spec.architecture == ENSEMBLE
    if (spec.combine is not None or is_ensemble) and spec.combine not in ENSEMBLE_COMBINES:
        raise BiometryInputError(f"{path}: 'combine' must be one of {', '.join(ENSEMBLE_COMBINES)} "
                                 f"for an ensemble and empty otherwise but got {spec.combine!r}")
    if spec.combine is not None and not is_ensemble:
        raise BiometryInputError(f"{path}: 'combine' is for an ensemble; this model is "
                                 f"{spec.architecture}")
    steps = create_steps(spec.postprocess, where=f"{path}: postprocess")
    check_needs(steps, has_mask=spec.has_mask(), where=f"{path}: postprocess")


def _from_legacy(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """A first-format ``model.yaml``: its rule fields become the steps they ran as, in the order
    they ran; mask rules of a model without a mask channel are dropped (they never ran)."""
    raw = dict(raw)
    steps = []
    if raw.pop("flip_tta", False):
        steps.append({"step": "flip_tta"})
    scale = raw.pop("head_scale", None) or {}
    if scale:
        if not isinstance(scale, dict):
            raise BiometryInputError(f"{path}: 'head_scale' must be empty or a mapping but got "
                                     f"{scale!r}")
        steps.append({"step": "second_look", "quantile": None, **scale})
    kwargs = dict(raw.get("model_kwargs") or {})
    members = kwargs.get("members") or []
    has_mask = (all((m.get("model_kwargs") or {}).get("mask_head") for m in members) if members
                else bool(kwargs.get("mask_head")))
    for key, step, option in (("mask_fallback", "mask_fallback", "threshold"),
                              ("mask_small_head_mm", "small_heads_by_mask", "below_mm")):
        value = raw.pop(key, None)
        if value is not None and has_mask:
            steps.append({"step": step, option: value})
    if raw.get("architecture") == ENSEMBLE:
        raw["combine"] = kwargs.pop("combine", "maps")
        raw["model_kwargs"] = kwargs
    if raw.get("pairing") == "unordered":
        raw["window_sigmas"] = LEGACY_PAIR_SIGMAS
    raw.update(postprocess=steps, format=MODEL_FORMAT)
    return raw


def load_model_folder(folder: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the model from ``model.yaml`` and load ``model.pt`` with ``weights_only=True``;
    an exported folder (ONNX files instead of ``model.pt``) runs through onnxruntime."""
    folder = Path(folder)
    spec = load_model_spec(folder)
    if holds_onnx_network(folder):
        return load_onnx_network(folder, spec, device=device), spec
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
                   "decode", "window_sigmas", "data")


def ensemble_of(folders: list[str | Path], *, combine: str = "maps",
                device: str | torch.device = "cpu"):
    """The model folders ``folders`` (one recipe, several seeds) as one ensemble and its spec,
    combined the ``combine`` way (:data:`~biometry.models.ENSEMBLE_COMBINES`).

    The spec is the first member's (decoding, post-processing) with
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
                        "model_kwargs": {"members": members}, "combine": combine})
    model = MeanOfModels([model for model, _ in loaded])
    return model.to(device).eval(), spec


def _shared_value(spec: ModelSpec, key: str):
    value = getattr(spec, key)
    if key == "input_hw":
        return tuple(value)
    if key == "data" and value.get("source"):  # one folder, however its path was written
        return {**value, "source": str(Path(value["source"]).resolve())}
    return value


def heatmap_uncertainty(heatmaps: torch.Tensor, spread: torch.Tensor | None, codec: HeatmapCodec,
                        *, beta: float) -> torch.Tensor:
    """(B,) uncertainty in input pixels: the mean spread of the whole-map distributions, so stray
    mass that a window decoding ignores still counts against the image (the unordered decoding's
    own per-endpoint spread where it has one)."""
    if spread is None:
        return torch.as_tensor(image_uncertainty(heatmaps.float(), beta=beta, stride=codec.stride))
    return codec.stride * spread.mean(dim=-1)


class LandmarkPredictor:
    """Run a model on images: letterbox, z-score, forward, decode, back to original pixels, then
    the model's post-processing steps in order.

    ``postprocess``: steps (or ``{"step": ...}`` entries) that replace the model's list.
    An ensemble combines its members the way its spec says (``combine``): ``"maps"`` runs the
    averaged network once; ``"median"`` runs every step for each member and keeps the median of
    their landmarks and uncertainties (:func:`median_of`).

    Example::

        predictor = LandmarkPredictor.from_folder("runs/NAME/best")
        coords, uncertainty = predictor.predict([image], pixel_mm=[0.15])  # (N, 4, 2), (N,)
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, *,
                 device: str | torch.device = "cpu",
                 postprocess: Sequence[Step | dict] | None = None):
        self.model = model.eval()
        self.spec = spec
        self.device = torch.device(device)
        self.codec = spec.codec()
        self.orientation = Orientation.from_dict(spec.orientation)
        self.steps = create_steps(spec.postprocess if postprocess is None else list(postprocess))
        check_needs(self.steps, has_mask=spec.has_mask(), where="postprocess")
        self.members = self._median_members() if spec.combine == "median" else []
        self._cache: dict | None = None
        self._forward = self._network_forward
        for step in self.steps:
            self._forward = step.wrap_forward(self._forward, input_w=spec.input_hw[1])

    def _median_members(self) -> list[LandmarkPredictor]:
        if not isinstance(self.model, MeanOfModels):
            raise BiometryInputError(f"a 'median' ensemble needs an ensemble model but got "
                                     f"{type(self.model).__name__}")
        infos = self.spec.model_kwargs["members"]
        return [LandmarkPredictor(member, replace(self.spec, architecture=info["architecture"],
                                                  model_kwargs=dict(info.get("model_kwargs") or {}),
                                                  combine=None),
                                  device=self.device, postprocess=self.steps)
                for member, info in zip(self.model.members, infos)]

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str = "cpu",
                    postprocess: Sequence[Step | dict] | None = None):
        model, spec = load_model_folder(folder, device=device)
        return cls(model, spec, device=device, postprocess=postprocess)

    def use_forward_cache(self, cache: dict) -> None:
        """Remember the network's passes in ``cache`` (shared by predictors of one model that
        differ only in their steps, e.g. a post-processing sweep)."""
        self._cache = cache
        for member in self.members:
            member.use_forward_cache(cache)

    def _network_forward(self, batch: torch.Tensor):
        if self._cache is None:
            return self._network_pass(batch)
        key = (id(self.model), hashlib.blake2b(batch.numpy().tobytes(), digest_size=16).digest())
        if key not in self._cache:
            self._cache[key] = self._network_pass(batch)
        coords, uncertainty, masks = self._cache[key]
        return coords.copy(), uncertainty.copy(), masks

    @torch.no_grad()
    def _network_pass(self, batch: torch.Tensor):
        """(B, 1, H, W) z-scored input -> (coords (B, 4, 2) input px, uncertainty (B,), the
        head-region logits of each image: an empty list without a mask channel)."""
        batch = batch.to(self.device)
        heatmaps, mask = split_mask(self.model(batch).float())
        masks = [] if mask is None else list(mask.cpu().numpy())
        coords, spread = self.codec.decode(heatmaps, beta=self.spec.softargmax_beta,
                                           pairing=self.spec.pairing, decode=self.spec.decode)
        uncertainty = heatmap_uncertainty(heatmaps, spread, self.codec,
                                          beta=self.spec.softargmax_beta)
        coords = self.orientation.apply(coords.cpu().numpy())
        return coords, np.asarray(uncertainty.cpu()), masks

    def predict(self, images: list[np.ndarray], *, batch_size: int = 16,
                letterboxed: list[tuple[np.ndarray, Letterbox]] | None = None,
                pixel_mm: Sequence[float] | np.ndarray | None = None):
        """Original uint8 images of any size -> (coords (N, 4, 2) original px, uncertainty (N,)).

        ``letterboxed``: the images already letterboxed to the input, with their ``Letterbox``
        (validation keeps them from data preparation, so it does not redo them every epoch).
        ``pixel_mm``: each image's pixel size; an error when a step needs it and it is missing.
        """
        if self.members:
            return median_of([member.predict(images, batch_size=batch_size,
                                             letterboxed=letterboxed, pixel_mm=pixel_mm)
                              for member in self.members])
        spacing = self._check_pixel_mm(pixel_mm, len(images))
        first = letterboxed or [letterbox(img, None, self.spec.input_hw)[::2] for img in images]

        def look(boxed):
            return self._look(boxed, batch_size)

        coords, uncertainty, looks = look(first)
        prediction = Prediction(images=images, pixel_mm=spacing, coords=coords,
                                uncertainty=uncertainty, first=looks, kept=list(looks), look=look,
                                stride=self.codec.stride, input_hw=tuple(self.spec.input_hw))
        for step in self.steps:
            step.apply(prediction)
        return prediction.coords, prediction.uncertainty

    def _check_pixel_mm(self, pixel_mm, count: int) -> np.ndarray | None:
        if pixel_mm is None:
            needing = needs_pixel_mm(self.steps)
            if needing:
                raise ValueError(f"the post-processing step '{needing[0]}' needs each image's "
                                 f"pixel size: pass pixel_mm")
            return None
        spacing = np.asarray(pixel_mm, dtype=np.float64).reshape(-1)
        if len(spacing) != count:
            raise ValueError(f"pixel_mm holds {len(spacing)} values for {count} images.")
        return spacing

    def _look(self, boxed: list, batch_size: int):
        """[(input image, Letterbox)] -> (coords (N, 4, 2) original px, uncertainty (N,), one
        :class:`ImageLook` per image)."""
        coords, uncertainty, looks = [], [], []
        for start in range(0, len(boxed), batch_size):
            chunk = boxed[start:start + batch_size]
            batch = torch.from_numpy(np.stack([zscore(image) for image, _ in chunk]))[:, None]
            pred, unc, masks = self._forward(batch)
            for i, (_, box) in enumerate(chunk):
                coords.append(box.to_original(pred[i]))
                looks.append(ImageLook(box=box, mask=masks[i] if masks else None))
            uncertainty.append(unc)
        return np.stack(coords), np.concatenate(uncertainty).astype(np.float64), looks

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
