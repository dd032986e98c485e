"""Post-processing: the steps a model folder lists in ``model.yaml``, run in order by the predictor.

Each step is a small frozen dataclass with keyword-only options checked in ``__post_init__``,
registered under a name (:func:`register_step`, the timm registry habit)::

    postprocess:
      - {step: flip_tta}
      - {step: second_look, quantile: 0.2, low: 39.2, high: 62.0, target: 52.8}
      - {step: mask_fallback, threshold: 0.05}
      - {step: small_heads_by_mask, below_mm: 100}

A step acts in one of two places. ``wrap_forward`` changes how the network looks at a batch (flip
TTA averages a mirrored pass). ``apply`` changes the landmarks of a finished look (a second look,
the mask rules). A step declares what it needs (:data:`NEEDS`): a step that needs the mask channel
cannot be listed for a model without one, and a prediction without pixel sizes is an error when a
step needs them. Nothing is switched off silently.

A new rule is one class here (or in any module that imports :func:`register_step`) and its test.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import yaml

from biometry.errors import BiometryInputError
from biometry.geometry import diameter_lengths
from biometry.metrics import measurements_mm
from biometry.records import BPD, OFD
from biometry.transforms import Letterbox, zoom_to
from biometry.typed import from_mapping

NEEDS = ("mask", "pixel_mm")
OFF = "off"  # ``--set STEP=off`` and a sweep value: the step removed

_STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` listable in ``model.yaml`` under ``cls.name``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a class attribute 'name'.")
    unknown = set(cls.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown needs {sorted(unknown)}; known: {NEEDS}.")
    _STEPS[cls.name] = cls
    return cls


def list_steps() -> list[str]:
    """Registered step names, in registration order (the order ``"on"`` inserts them in)."""
    return list(_STEPS)


@dataclass
class ImageLook:
    """One rendering of one image that the network looked at: its map to the original pixels and
    the head-region logits it predicted (None without a mask channel)."""

    box: Letterbox
    mask: np.ndarray | None = None


# forward(batch (B, 1, H, W) z-scored) -> (coords (B, 4, 2) input px, uncertainty (B,), masks)
Forward = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, list]]
# look([(input image, Letterbox)]) -> (coords (N, 4, 2) original px, uncertainty (N,), looks)
LookFn = Callable[[list], tuple[np.ndarray, np.ndarray, list[ImageLook]]]


@dataclass
class Prediction:
    """What the steps read and change: the current landmarks of N images and how they were seen.

    ``first``: each image's first look; ``kept``: the look each image's landmarks come from now
    (a second look replaces it). ``look`` runs the network on new renderings.
    """

    images: Sequence[np.ndarray]
    pixel_mm: np.ndarray | None
    coords: np.ndarray
    uncertainty: np.ndarray
    first: list[ImageLook]
    kept: list[ImageLook]
    look: LookFn
    stride: int
    input_hw: tuple[int, int]
    _first_ellipses: list | None = field(default=None, repr=False)

    def first_mask_ellipses(self) -> list:
        """Each first look's mask ellipse (4, 2) in original pixels, None where the mask is empty;
        fitted once and shared by every mask step."""
        if self._first_ellipses is None:
            self._first_ellipses = [self.mask_ellipse(look) for look in self.first]
        return self._first_ellipses

    def mask_ellipse(self, look: ImageLook) -> np.ndarray | None:
        from biometry.inference import mask_ellipse_landmarks

        points = mask_ellipse_landmarks(look.mask, self.stride)
        return None if points is None else look.box.to_original(points)


@dataclass(frozen=True, kw_only=True)
class Step:
    """Base class: a step with no options that changes nothing."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    learned: ClassVar[tuple[str, ...]] = ()  # options fit() fills from the training heads
    refit_when: ClassVar[tuple[str, ...]] = ()  # options whose change clears ``learned``

    def fit(self, *, train_ofd_px: np.ndarray) -> Step:
        """This step with what it learns from the training heads (their OFD in input pixels)."""
        return self

    def wrap_forward(self, forward: Forward, *, input_w: int) -> Forward:
        return forward

    def apply(self, prediction: Prediction) -> None:
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, **{f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(self)}}


def _number(value, key: str, *, low: float = 0.0, strict: bool = False, optional: bool = False):
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"'{key}' must be a number {bound} but got {value!r}.")


@register_step
@dataclass(frozen=True, kw_only=True)
class FlipTTA(Step):
    """Test-time augmentation: the mirrored image's landmarks mirrored back, averaged in."""

    name: ClassVar[str] = "flip_tta"

    def wrap_forward(self, forward: Forward, *, input_w: int) -> Forward:
        from biometry.inference import match_pairs

        def flipped_too(batch: torch.Tensor):
            coords, uncertainty, masks = forward(batch)
            mirrored = np.array(forward(torch.flip(batch, dims=[3]))[0], dtype=np.float32)
            mirrored[..., 0] = input_w - 1 - mirrored[..., 0]
            return 0.5 * (coords + match_pairs(mirrored, coords)), uncertainty, masks

        return flipped_too


@register_step
@dataclass(frozen=True, kw_only=True)
class SecondLook(Step):
    """A head whose first-look OFD (input pixels) lies outside the training heads' ``[quantile,
    1 - quantile]`` range (``low``, ``high``) is looked at again, rendered centred with its OFD at
    the training median (``target``): more pixels for a small head, a known scale for any.

    A later look is kept only when its OFD is within ``tolerance`` of the target; one that is not
    is followed by another from its own estimate, up to ``looks``; when none agrees the first look
    stands.
    """

    name: ClassVar[str] = "second_look"
    learned: ClassVar[tuple[str, ...]] = ("low", "high", "target")
    refit_when: ClassVar[tuple[str, ...]] = ("quantile",)
    quantile: float | None = 0.2
    low: float | None = None
    high: float | None = None
    target: float | None = None
    tolerance: float = 0.25
    looks: int = 2

    def __post_init__(self):
        if self.quantile is not None and not 0 < self.quantile < 0.5:
            raise ValueError(f"'quantile' must be in (0, 0.5) but got {self.quantile!r}.")
        for key in ("low", "high", "target"):
            _number(getattr(self, key), key, strict=True, optional=True)
        fitted = [getattr(self, k) is not None for k in ("low", "high", "target")]
        if any(fitted) and not all(fitted):
            raise ValueError("'low', 'high' and 'target' are set together or not at all.")
        if all(fitted) and not self.low <= self.target <= self.high:
            raise ValueError(f"'low' <= 'target' <= 'high' must hold but got {self.low!r}, "
                             f"{self.target!r}, {self.high!r}.")
        _number(self.tolerance, "tolerance", strict=True)
        if not (isinstance(self.looks, int) and not isinstance(self.looks, bool) and self.looks >= 1):
            raise ValueError(f"'looks' must be an integer >= 1 but got {self.looks!r}.")

    @property
    def fitted(self) -> bool:
        return self.target is not None

    def fit(self, *, train_ofd_px: np.ndarray) -> SecondLook:
        if self.quantile is None:
            return self
        low, target, high = np.quantile(np.asarray(train_ofd_px, dtype=np.float64),
                                        [self.quantile, 0.5, 1.0 - self.quantile])
        return dataclasses.replace(self, low=float(low), high=float(high), target=float(target))

    def apply(self, prediction: Prediction) -> None:
        if not self.fitted:
            raise ValueError("the 'second_look' step has no head range yet (low, high, target): "
                             "fit it on training heads first")
        boxes = [look.box for look in prediction.first]
        ofd = _input_ofd(prediction.coords, boxes)
        pending = np.flatnonzero((ofd < self.low) | (ofd > self.high))
        estimate = prediction.coords.copy()
        for _ in range(self.looks):
            if len(pending) == 0:
                break
            renders = [self._render(prediction, i, estimate[i], boxes[i]) for i in pending]
            found, found_unc, looks = prediction.look(renders)
            ratio = _input_ofd(found, [box for _, box in renders]) / self.target
            agrees = np.abs(np.log(np.maximum(ratio, 1e-9))) <= np.log1p(self.tolerance)
            prediction.coords[pending[agrees]] = found[agrees]
            prediction.uncertainty[pending[agrees]] = found_unc[agrees]
            for j in np.flatnonzero(agrees):
                prediction.kept[pending[j]] = looks[j]
            estimate[pending] = found
            pending = pending[~agrees]

    def _render(self, prediction: Prediction, i: int, coords: np.ndarray, first_box: Letterbox):
        """(image i rendered centred on ``coords`` at the target scale, its Letterbox)."""
        ofd = max(float(diameter_lengths(coords)[1]), 1e-6)
        centre = 0.5 * (coords[list(OFD)].mean(axis=0) + coords[list(BPD)].mean(axis=0))
        # never more than 4x the first look's scale: a collapsed first look must not blow up
        scale = min(self.target / ofd, 4.0 * first_box.scale)
        return zoom_to(prediction.images[i], centre, scale, prediction.input_hw)


def _input_ofd(coords: np.ndarray, boxes: list[Letterbox]) -> np.ndarray:
    """(N,) OFD lengths in the input pixels of each look."""
    return diameter_lengths(coords)[1] * np.array([box.scale for box in boxes])


@register_step
@dataclass(frozen=True, kw_only=True)
class MaskFallback(Step):
    """An image whose landmarks' HC differs from the HC of its first look's mask ellipse by more
    than ``threshold`` (a fraction of the mask's) is measured by that ellipse.

    Where the landmarks come from a second look, the first look's mask is trusted only if the kept
    look's mask agrees with it to the same fraction: a head small in the frame gets a coarse
    first-look mask, and the second look's disagrees with it.
    """

    name: ClassVar[str] = "mask_fallback"
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})
    threshold: float = 0.05

    def __post_init__(self):
        _number(self.threshold, "threshold")

    def apply(self, prediction: Prediction) -> None:
        from biometry.inference import match_pairs

        t = self.threshold
        for i, points in enumerate(prediction.first_mask_ellipses()):
            if points is None:
                continue
            coords = prediction.coords[i]
            hc_mask, hc_landmarks = measurements_mm(np.stack([points, coords]), 1.0)["hc"]
            kept = prediction.kept[i]
            if kept is not prediction.first[i]:
                other = prediction.mask_ellipse(kept)
                if other is None or abs(measurements_mm(other[None], 1.0)["hc"][0]
                                        - hc_mask) > t * hc_mask:
                    continue
            if abs(hc_landmarks - hc_mask) > t * hc_mask:
                prediction.coords[i] = match_pairs(points[None], coords[None])[0]


@register_step
@dataclass(frozen=True, kw_only=True)
class SmallHeadsByMask(Step):
    """An image whose first-look mask ellipse measures an HC under ``below_mm`` is measured by
    that ellipse: the mask measures early-gestation heads better than the landmarks do
    (docs/experiments.md, "small heads by the mask")."""

    name: ClassVar[str] = "small_heads_by_mask"
    needs: ClassVar[frozenset[str]] = frozenset({"mask", "pixel_mm"})
    below_mm: float = 100.0

    def __post_init__(self):
        _number(self.below_mm, "below_mm", strict=True)

    def apply(self, prediction: Prediction) -> None:
        from biometry.inference import match_pairs

        for i, points in enumerate(prediction.first_mask_ellipses()):
            if points is not None and (measurements_mm(points[None], prediction.pixel_mm[i])["hc"][0]
                                       < self.below_mm):
                prediction.coords[i] = match_pairs(points[None], prediction.coords[i][None])[0]


def create_step(entry: Any, *, where: str = "postprocess") -> Step:
    """``{"step": NAME, **options}`` (or a :class:`Step`) -> the step; bad entries raise
    :class:`BiometryInputError` naming ``where`` and the step."""
    if isinstance(entry, Step):
        return entry
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), str):
        raise BiometryInputError(f"{where}: each entry must be a mapping with a 'step' name but got "
                                 f"{entry!r}")
    name = entry["step"]
    if name not in _STEPS:
        raise BiometryInputError(f"{where}: unknown step '{name}'; known: {', '.join(_STEPS)}")
    options = {k: v for k, v in entry.items() if k != "step"}
    cls = _STEPS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:  # named here: a step's options are not dotted config keys
        raise BiometryInputError(f"{where}: step '{name}' has no option '{unknown[0]}'"
                                 + (f"; its options: {', '.join(sorted(known))}" if known else ""))
    return from_mapping(cls, options, source=where, section=name)


def create_steps(entries: Any, *, where: str = "postprocess") -> list[Step]:
    """A ``postprocess`` list -> its steps, each named once."""
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise BiometryInputError(f"{where}: must be a list of steps but got {entries!r}")
    steps = [create_step(entry, where=where) for entry in entries]
    names = [step.name for step in steps]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BiometryInputError(f"{where}: step '{repeated[0]}' is listed twice")
    return steps


def steps_to_config(steps: Sequence[Step]) -> list[dict[str, Any]]:
    return [step.to_dict() for step in steps]


def check_needs(steps: Sequence[Step], *, has_mask: bool, where: str) -> None:
    """A step that needs the mask channel on a model without one is an error naming it."""
    for step in steps:
        if "mask" in step.needs and not has_mask:
            raise BiometryInputError(f"{where}: step '{step.name}' needs the model's mask channel "
                                     f"and this model has none (loss.mask_weight 0)")


def needs_pixel_mm(steps: Sequence[Step]) -> list[str]:
    return [step.name for step in steps if "pixel_mm" in step.needs]


def with_settings(steps: Sequence[Step], settings: Sequence[str], *, where: str = "--set",
                  train_ofd_px: np.ndarray | None = None) -> list[Step]:
    """``steps`` changed by ``STEP.KEY=VALUE`` (an option; VALUE is YAML), ``STEP=off`` (removed)
    or ``STEP=on`` (added with its defaults at its registry place; a step that learns from the
    training heads needs ``train_ofd_px``)."""
    current = {step.name: step.to_dict() for step in steps}
    for setting in settings:
        key, sep, raw = str(setting).partition("=")
        name, _, option = key.strip().partition(".")
        if not sep or not name:
            raise BiometryInputError(f"{where}: '{setting}' must be STEP.KEY=VALUE, STEP=off or "
                                     f"STEP=on")
        value = yaml.safe_load(raw) if raw.strip() else None
        if name not in _STEPS:
            raise BiometryInputError(f"{where}: unknown step '{name}' in '{setting}'; known: "
                                     f"{', '.join(_STEPS)}")
        if not option:
            _switch(current, name, value, setting=setting, where=where)
        elif name not in current:
            raise BiometryInputError(f"{where}: '{setting}': the model lists no '{name}' step "
                                     f"(its steps: {', '.join(current) or 'none'}); add it with "
                                     f"{name}=on")
        else:
            current[name][option] = value
            if option in _STEPS[name].refit_when:  # a learned range no longer matches
                for learned in _STEPS[name].learned:
                    current[name].pop(learned, None)
    ordered = [current[name] for name in _STEPS if name in current]
    out = create_steps(ordered, where=where)
    if train_ofd_px is not None:
        out = [step.fit(train_ofd_px=train_ofd_px) for step in out]
    return out


def _switch(current: dict, name: str, value, *, setting: str, where: str) -> None:
    if value is False or value == OFF:
        current.pop(name, None)
    elif value is True or value == "on":
        current.setdefault(name, {"step": name})
    else:
        raise BiometryInputError(f"{where}: '{setting}': a step is switched with {name}=off or "
                                 f"{name}=on")
