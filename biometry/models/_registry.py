"""One registry of architectures, the factory that reads it, and the options every model shares.

Each architecture module defines tiny variant functions that set a few options and call one
builder; ``@register_model`` records them under the function's name::

    @register_model
    def unet(**kwargs) -> UNet:
        return _build_unet(heads=1, **kwargs)

``create_model(name, **kwargs)`` is the only way models are made. An unknown name, a duplicate
registration or an unknown option is a ``ValueError`` with an exact message.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

NORMS = ("batch", "group")
OUTPUT_STRIDES = (1, 2, 4)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Record ``fn`` under ``fn.__name__``; a name registered twice is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered.")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword options ``kwargs``.

    Example:
        >>> import torch
        >>> model = create_model("unet", width=8, output_stride=2)
        >>> model(torch.zeros(2, 1, 64, 96)).shape
        torch.Size([2, 4, 32, 48])
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


@dataclass(frozen=True)
class ModelInfo:
    """What ``model_info`` tells about one registered model (built on the meta device)."""

    name: str
    summary: str  # first line of the model class docstring
    defaults: dict[str, Any]  # every option with its default value
    num_params: int  # trainable parameters with the default options


def model_info(name: str) -> ModelInfo:
    """Options (with defaults) and size of ``name``, without allocating any weights."""
    with torch.device("meta"):
        model = create_model(name)
    doc = (type(model).__doc__ or "").strip().splitlines()
    return ModelInfo(
        name=name,
        summary=doc[0] if doc else "",
        defaults=dataclasses.asdict(model.cfg),
        num_params=count_parameters(model),
    )


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# Options shared by every model


@dataclass(frozen=True)
class ModelOptions:
    """Options every registered model accepts (architectures add their own fields).

    Attributes:
        in_channels: image channels (1 for ultrasound).
        num_keypoints: heatmaps produced, rows BPD1, BPD2, OFD1, OFD2 by default.
        width: channels of the highest-resolution feature maps; deeper levels double it.
        depth: number of 2x down-sampling levels (the input is padded internally to a multiple of
            ``2 ** depth`` and the output cropped back, so any input size works).
        output_stride: heatmap stride relative to the input: 1, 2 or 4. Input height and width
            must be divisible by it; the output is ``(B, num_keypoints, H // s, W // s)``.
        norm: ``"group"`` (GroupNorm, default: independent of batch size, same in train and eval)
            or ``"batch"`` (BatchNorm: a little faster, foldable into the conv for inference).
        mask_head: one more output channel after the heatmaps: logits of the head region (the
            ellipse the four landmarks span), trained by the loss's mask term; split it off with
            :func:`split_mask`.
    """

    in_channels: int = 1
    num_keypoints: int = 4
    norm: str = "group"
    width: int = 16
    depth: int = 4
    output_stride: int = 1
    mask_head: bool = False

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels, low=1)
        check_int("num_keypoints", self.num_keypoints, low=1)
        check_int("width", self.width, low=1)
        check_int("depth", self.depth, low=2, high=6)
        if self.output_stride not in OUTPUT_STRIDES or isinstance(self.output_stride, bool):
            raise ValueError(f"output_stride must be one of 1, 2, 4 but got {self.output_stride!r}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of 'batch', 'group' but got {self.norm!r}.")
        if not isinstance(self.mask_head, bool):
            raise ValueError(f"mask_head must be True or False but got {self.mask_head!r}.")

    @property
    def out_channels(self) -> int:
        """``num_keypoints`` heatmaps, plus the head-region logits with ``mask_head``."""
        return self.num_keypoints + int(self.mask_head)


def split_mask(output: torch.Tensor, num_keypoints: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, h, w) model output -> ((B, num_keypoints, h, w) heatmaps, (B, h, w) head-region
    logits, or None for a model without ``mask_head``)."""
    if output.shape[1] == num_keypoints:
        return output, None
    if output.shape[1] != num_keypoints + 1:
        raise ValueError(f"model output must have {num_keypoints} heatmaps and at most one mask "
                         f"channel but got {output.shape[1]} channels.")
    return output[:, :num_keypoints], output[:, num_keypoints]


def check_model_options(name: str, **kwargs: Any) -> None:
    """Raise the registry's exact ``ValueError`` for an unknown ``name`` or a bad option, without
    allocating weights (the model is built on the meta device): the one check of a model's
    options, for configs as for ``create_model``."""
    with torch.device("meta"):
        create_model(name, **kwargs)


def make_config(cls: type, model: str, kwargs: dict[str, Any]):
    """``cls(**kwargs)``, with an exact message for an option ``cls`` does not have."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in names:
            raise ValueError(
                f"unknown option '{key}' for model '{model}'; choose from: {', '.join(sorted(names))}"
            )
    return cls(**kwargs)


def check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``[low, high]`` (``high=None``: no cap)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer but got {value!r}.")
    if high is None and value < low:
        what = "a positive integer" if low == 1 else f"at least {low}"
        raise ValueError(f"{name} must be {what} but got {value}.")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] but got {value}.")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number but got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive but got {value}.")
