"""One trial's configuration: typed dataclasses loaded from YAML and validated with exact messages.

A trial config has five sections. Every key is optional (defaults below); an unknown key, a wrong
type or an out-of-range value raises :class:`BiometryInputError` naming the file and the key::

    data:    {path: null, input_h: 128, input_w: 192, split_seed: 0, exclude_outliers: 0.0}
    model:   {name: unet, width: 16, depth: 4, output_stride: 2, options: {}}
    augment: {...}   # biometry.transforms.AugmentConfig
    loss:    {...}   # biometry.losses.LossConfig
    train:   {epochs: 30, batch_size: 16, lr: 2e-3, ...}
    inference: {decode: global, pairing: ordered, postprocess: [], sweep: {}, ...}

``inference`` is how the saved model decodes and post-processes; it becomes the model's
``ModelSpec`` (``model.yaml``). Rules that span sections are checked too: a mask step needs
``loss.mask_weight > 0``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from biometry.codec import DECODES, PAIRINGS, WINDOW_SIGMAS
from biometry.errors import BiometryInputError
from biometry.losses import LossConfig
from biometry.postprocess import check_needs, create_steps, list_steps
from biometry.transforms import AugmentConfig
from biometry.typed import from_mapping


@dataclass
class DataConfig:
    path: str | None = None  # HC18 folder or landmark CSV; None = the bundled HC18 sample
    input_h: int = 128
    input_w: int = 192
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    exclude_outliers: float = 0.0  # drop this top fraction of training labels by outlier score
    limit: int = 0  # use only the first N records (0 = all); for tests and quick looks

    def validate(self) -> None:
        _check(self.input_h >= 32 and self.input_w >= 32, "data.input_h/input_w", "must be >= 32",
               (self.input_h, self.input_w))
        _check(0 < self.val_fraction < 1, "data.val_fraction", "must be in (0, 1)", self.val_fraction)
        _check(0 <= self.test_fraction < 1, "data.test_fraction", "must be in [0, 1)",
               self.test_fraction)
        _check(0 <= self.exclude_outliers < 0.5, "data.exclude_outliers", "must be in [0, 0.5)",
               self.exclude_outliers)
        _check(self.limit >= 0, "data.limit", "cannot be negative", self.limit)


@dataclass
class ModelConfig:
    """The trial's model: a registered architecture and its options. The registry checks them
    (``biometry.models.check_model_options``): one set of rules for configs and models alike."""

    name: str = "unet"
    width: int = 16
    depth: int = 4
    output_stride: int = 2
    options: dict[str, Any] = field(default_factory=dict)  # architecture-specific keyword arguments

    def validate(self) -> None:
        from biometry.models import list_models

        from biometry.models import check_model_options

        _check(self.name in list_models(), "model.name",
               f"must be one of {', '.join(list_models())}", self.name)
        try:
            check_model_options(self.name, **self.kwargs())
        except (ValueError, TypeError) as err:
            raise BiometryInputError(f"model ({self.name}): {err}") from None

    def kwargs(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "output_stride": self.output_stride,
                **self.options}


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    min_lr_ratio: float = 0.02  # cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # per-step decay of the weight average that is validated; 0 = none
    sigma: float = 2.0  # heatmap Gaussian sigma in heatmap pixels
    softargmax_beta: float = 20.0
    # draw training images so that head sizes (HC in mm) are more even: count(bin) ** -power,
    # 0 = the split's own mix, 1 = every HC bin equally (trainables.data.head_size_weights)
    balance_head_size: float = 0.0
    num_workers: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # only on CUDA
    channels_last: bool = True  # only on CUDA
    threads: int = 0  # torch CPU threads; 0 = leave torch's default

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "train.lr", "must be positive", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "cannot be negative", self.weight_decay)
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "cannot be negative",
               self.warmup_epochs)
        _check(0 < self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in (0, 1]",
               self.min_lr_ratio)
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.sigma > 0, "train.sigma", "must be positive", self.sigma)
        _check(self.softargmax_beta > 0, "train.softargmax_beta", "must be positive",
               self.softargmax_beta)
        _check(0 <= self.balance_head_size <= 1, "train.balance_head_size", "must be in [0, 1]",
               self.balance_head_size)
        _check(self.num_workers >= 0, "train.num_workers", "cannot be negative", self.num_workers)
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda",
               self.device)


# train keys of the first config format and where they live now
MOVED_TRAIN_KEYS = {
    "flip_tta": "inference.postprocess: [{step: flip_tta}]",
    "second_look_quantile": "inference.postprocess: [{step: second_look, quantile: Q}]",
    "mask_fallback": "inference.postprocess: [{step: mask_fallback, threshold: T}]",
    "mask_small_head_mm": "inference.postprocess: [{step: small_heads_by_mask, below_mm: MM}]",
    "decode": "inference.decode", "pairing": "inference.pairing",
    "coverage_target": "inference.coverage_target",
}


@dataclass
class InferenceConfig:
    """How the saved model decodes and post-processes (its ``ModelSpec``), and the post-processing
    variants tried on validation after the last epoch (``sweep``; trainables.postprocess_sweep)."""

    decode: str = "global"  # biometry.codec.DECODES; training's coordinate loss always uses global
    pairing: str = "ordered"  # ordered | unordered (biometry.codec.pair_soft_argmax), also trained
    window_sigmas: float = WINDOW_SIGMAS  # decoding window half size in sigmas
    coverage_target: float = 0.9  # uncertainty threshold keeps this share of validation images
    # steps as in model.yaml; a second_look step gets its head range from the training heads
    postprocess: list[dict[str, Any]] = field(default_factory=list)
    # {"STEP.KEY": [values], "STEP": [off|on]}: each value tried alone against postprocess
    sweep: dict[str, list] = field(default_factory=dict)
    sweep_resamples: int = 2000  # paired bootstrap resamples of the noise rule

    def validate(self) -> None:
        _check(self.decode in DECODES, "inference.decode", f"must be one of {', '.join(DECODES)}",
               self.decode)
        _check(self.pairing in PAIRINGS, "inference.pairing",
               f"must be one of {', '.join(PAIRINGS)}", self.pairing)
        _check(self.window_sigmas > 0, "inference.window_sigmas", "must be positive",
               self.window_sigmas)
        _check(0 < self.coverage_target <= 1, "inference.coverage_target", "must be in (0, 1]",
               self.coverage_target)
        _check(self.sweep_resamples >= 100, "inference.sweep_resamples", "must be >= 100",
               self.sweep_resamples)
        create_steps(self.postprocess, where="'inference.postprocess'")
        for key, values in self.sweep.items():
            step = str(key).partition(".")[0]
            _check(step in list_steps(), f"inference.sweep.{key}",
                   f"must name a step ({', '.join(list_steps())})", key)
            _check(isinstance(values, list) and len(values) > 0, f"inference.sweep.{key}",
                   "must be a non-empty list of values", values)

    def steps_for_sweep(self) -> list[str]:
        """Steps a sweep value can switch on."""
        return [str(k) for k, values in self.sweep.items() if "." not in str(k)
                and any(v is True or v == "on" for v in values)]


@dataclass
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate_across_sections(self) -> None:
        """A mask step, listed or switched on by the sweep, needs the mask channel."""
        from biometry.postprocess import create_step

        listed = create_steps(self.inference.postprocess, where="'inference.postprocess'")
        swept = [create_step({"step": name}) for name in self.inference.steps_for_sweep()]
        names = {step.name for step in listed}
        for key in self.inference.sweep:
            step, _, option = str(key).partition(".")
            _check(not option or step in names, f"inference.sweep.{key}",
                   f"changes an option of '{step}', which inference.postprocess does not list",
                   key)
        check_needs(listed + swept, has_mask=self.loss.mask_weight > 0,
                    where="'inference.postprocess' / 'inference.sweep'")

    @property
    def input_hw(self) -> tuple[int, int]:
        return (self.data.input_h, self.data.input_w)

    def model_kwargs(self) -> dict[str, Any]:
        """``create_model`` options: the model section's, plus ``mask_head`` when the loss
        trains a head-region mask (``loss.mask_weight`` above 0)."""
        kwargs = self.model.kwargs()
        if self.loss.mask_weight > 0:
            kwargs["mask_head"] = True
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"model.name": "unet", ...}``: for MLflow params and tables."""
        return dict(_flatten(self.to_dict()))


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(TrialConfig)}


def config_from_dict(raw: dict[str, Any] | None, *, source: str = "config") -> TrialConfig:
    """Build and validate a :class:`TrialConfig`; errors name ``source`` and the dotted key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise BiometryInputError(f"{source}: the top level must be a mapping of sections "
                                 f"({', '.join(SECTIONS)}) but got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise BiometryInputError(f"{source}: unknown key '{unknown[0]}'; "
                                 f"sections are {', '.join(SECTIONS)}")
    sections = {name: _section_from_dict(name, factory, raw.get(name), source)
                for name, factory in SECTIONS.items()}
    cfg = TrialConfig(**sections)
    try:
        for name in ("data", "model", "train", "inference"):
            getattr(cfg, name).validate()
        cfg.validate_across_sections()
    except BiometryInputError as err:
        raise BiometryInputError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | Path, *, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Read a trial YAML (``yaml.safe_load``) and apply dotted ``overrides`` such as
    ``{"data.path": "/x"}``."""
    path = Path(path)
    if not path.is_file():
        raise BiometryInputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BiometryInputError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return config_from_dict(raw, source=str(path))


def with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict, list[str]]:
    """A copy of the trial config ``base`` with dotted ``overrides`` (a sampled configuration),
    and the mask steps it leaves out: where the sample turns the mask channel off
    (``loss.mask_weight`` 0), the steps and sweep values that need it are removed from its
    ``inference`` section and named, since the sample, not the user, made them impossible."""
    import copy

    from biometry.postprocess import create_step

    raw = copy.deepcopy(base)
    for dotted, value in overrides.items():
        if "@" not in dotted:  # names with "@" are the sampler's own (see search/space.py)
            set_dotted(raw, dotted, value)
    if (raw.get("loss") or {}).get("mask_weight", LossConfig().mask_weight):
        return raw, []
    inference = raw.get("inference") or {}

    def needs_mask(name: str) -> bool:
        return name in list_steps() and "mask" in create_step({"step": name}).needs

    kept = [s for s in inference.get("postprocess") or [] if not needs_mask(s.get("step"))]
    dropped = [s["step"] for s in inference.get("postprocess") or [] if s not in kept]
    sweep = {k: v for k, v in (inference.get("sweep") or {}).items()
             if not needs_mask(str(k).partition(".")[0])}
    if inference:
        raw["inference"] = {**inference, "postprocess": kept, "sweep": sweep}
    return raw, dropped


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    node = raw.setdefault(section, {})
    if node is None:
        node = raw[section] = {}
    node[key] = value


def _section_from_dict(name: str, factory, values: Any, source: str):
    if name == "train" and isinstance(values, dict):
        moved = [key for key in values if key in MOVED_TRAIN_KEYS]
        if moved:
            raise BiometryInputError(f"{source}: 'train.{moved[0]}' moved to "
                                     f"{MOVED_TRAIN_KEYS[moved[0]]}")
    default = factory()
    return from_mapping(type(default), values, source=source, section=name, base=default)


def _check(ok: bool, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise BiometryInputError(f"'{key}' {requirement} but got {value!r}.")


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
