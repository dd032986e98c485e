"""The search space: ranges from YAML (``configs/search/*.yaml``), sampled define-by-run by Optuna.

A space file maps dotted trial-config keys to distributions::

    params:
      train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}      # float
      augment.hflip_p: {low: 0.0, high: 0.5}
      model.name: {choices: [unet, unet_multihead, hrnet_compact]}
      loss.angle_weight: {low: 1.0e-3, high: 1.0, log: true, zero: true}   # or exactly 0
      loss.bpd_channel_weight: {low: 0.5, high: 2.0, log: true}             # BPD vs OFD weight
    conditional:                    # parameters that exist only for one choice of a categorical
      model.name:
        unet: {model.width: {low: 8, high: 24, step: 8}, model.depth: {low: 3, high: 4}}

    postprocess:                    # post-processing variants each trial tries on validation
      mask_fallback.threshold: [0.03, 0.08, off]      # after its last epoch, no retraining
      flip_tta: [on]                                  # (trainables.sweep); off: step removed

``low``/``high`` ints with no ``log`` give an int distribution (``step`` optional). Sampled keys
that contain ``@`` are the sampler's own (a conditional parameter's name, the zero switch); the
trial receives only plain dotted keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from biometry.errors import BiometryInputError
from biometry.typed import from_mapping
from trainables.config import SECTIONS

# virtual keys: sampled as one number, expanded into a real config key
VIRTUAL_KEYS = {"loss.bpd_channel_weight": "loss.channel_weights"}


@dataclass(frozen=True)
class Distribution:
    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None
    zero: bool = False  # also allow exactly 0 (log-uniform plus an explicit zero)

    @property
    def is_int(self) -> bool:
        return (self.choices is None and not self.log and isinstance(self.low, int)
                and isinstance(self.high, int))

    def sample(self, trial, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.zero and not trial.suggest_categorical(f"{name}@enabled", [False, True]):
            return 0.0
        if self.is_int:
            return trial.suggest_int(name, self.low, self.high, step=int(self.step or 1))
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log,
                                   step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Distribution, ...]
    conditional: dict[str, dict[Any, tuple[Distribution, ...]]]
    source: str = "space"
    postprocess: dict[str, list] = dataclasses.field(default_factory=dict)

    def __call__(self, trial) -> dict[str, Any]:
        """Optuna define-by-run function: sample and return the trial's dotted config keys (and
        the post-processing variants, ``inference.sweep``, when the space lists them)."""
        values: dict[str, Any] = {"inference.sweep": dict(self.postprocess)} if self.postprocess else {}
        for dist in self.params:
            values[dist.key] = dist.sample(trial, sampler_name(dist.key))
            for dep in self.conditional.get(dist.key, {}).get(values[dist.key], ()):
                values[dep.key] = dep.sample(trial, f"{dep.key}@{values[dist.key]}")
        return expand_virtual_keys(values)

    def point_from_config(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Sampler names -> the values a flat trial config (``TrialConfig.flat()``) has for them,
        for ``study.enqueue_trial``: the search's first trial is the preset's own config, so its
        best is never worse than that config on validation. Values the space cannot produce
        (outside a range, not a choice) are left to the sampler."""
        values = dict(flat)
        weights = values.get("loss.channel_weights")
        if (isinstance(weights, (list, tuple)) and len(weights) == 4 and weights[0] == weights[1]
                and weights[2] == weights[3] and weights[2] > 0):
            values["loss.bpd_channel_weight"] = weights[0] / weights[2]
        point: dict[str, Any] = {}
        for dist in self.params:
            chosen = values.get(dist.key)
            if not _admit(point, dist, sampler_name(dist.key), chosen):
                continue
            for dep in self.conditional.get(dist.key, {}).get(chosen, ()):
                _admit(point, dep, f"{dep.key}@{chosen}", values.get(dep.key))
        return point

    def keys(self) -> list[str]:
        keys = [d.key for d in self.params]
        keys += [d.key for branches in self.conditional.values() for ds in branches.values()
                 for d in ds]
        return sorted(set(keys))


def _admit(point: dict[str, Any], dist: Distribution, name: str, value: Any) -> bool:
    """Add ``value`` under ``name`` when ``dist`` can produce it; say whether it did."""
    if value is None or isinstance(value, bool) and dist.choices is None:
        return False
    if dist.choices is not None:
        if value not in dist.choices:
            return False
        point[name] = value
        return True
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if dist.zero and value == 0:
        point[f"{name}@enabled"] = False
        return True
    if not dist.low <= value <= dist.high:
        return False
    if dist.is_int and (value != int(value) or (value - dist.low) % int(dist.step or 1)):
        return False
    if dist.zero:
        point[f"{name}@enabled"] = True
    point[name] = int(value) if dist.is_int else float(value)
    return True


def sampler_name(key: str) -> str:
    """Optuna's name for a parameter. Ray's OptunaSearch passes every sampled name on to the
    trial beside the returned values, so a virtual key is sampled under an ``@`` name."""
    if key in VIRTUAL_KEYS:
        return f"{VIRTUAL_KEYS[key]}@{key.rpartition('.')[2]}"
    return key


def expand_virtual_keys(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "loss.bpd_channel_weight" in out:
        weight = float(out.pop("loss.bpd_channel_weight"))
        out["loss.channel_weights"] = [weight, weight, 1.0, 1.0]
    return out


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys of a sampled configuration (the sampler's ``@`` names dropped)."""
    return {k: v for k, v in config.items() if "@" not in k}


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise BiometryInputError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BiometryInputError(f"{path}: invalid YAML ({getattr(err, 'problem', err)})") from None
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: Any, *, source: str = "space") -> SearchSpace:
    if not isinstance(raw, dict) or "params" not in raw:
        raise BiometryInputError(f"{source}: expected a mapping with 'params' (and optionally "
                                 f"'conditional' and 'postprocess')")
    unknown = sorted(set(raw) - {"params", "conditional", "postprocess"})
    if unknown:
        raise BiometryInputError(f"{source}: unknown key '{unknown[0]}'")
    params = _distributions(raw["params"], source, "params")
    by_key = {d.key: d for d in params}
    conditional: dict[str, dict[Any, tuple[Distribution, ...]]] = {}
    for parent, branches in (raw.get("conditional") or {}).items():
        where = f"conditional.{parent}"
        if parent not in by_key or by_key[parent].choices is None:
            raise BiometryInputError(f"{source}: '{where}' must name a categorical in 'params'")
        if not isinstance(branches, dict):
            raise BiometryInputError(f"{source}: '{where}' must map choices to parameters")
        for choice in branches:
            if choice not in by_key[parent].choices:
                raise BiometryInputError(f"{source}: '{where}.{choice}' is not one of the "
                                         f"choices {list(by_key[parent].choices)}")
        conditional[parent] = {choice: _distributions(dists or {}, source, f"{where}.{choice}")
                               for choice, dists in branches.items()}
    return SearchSpace(params=params, conditional=conditional, source=source,
                       postprocess=_postprocess_variants(raw.get("postprocess"), source))


def _postprocess_variants(raw: Any, source: str) -> dict[str, list]:
    """The space's ``postprocess`` section, checked as ``inference.sweep`` is."""
    from trainables.config import InferenceConfig

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BiometryInputError(f"{source}: 'postprocess' must map STEP or STEP.KEY to a list "
                                 f"of values")
    try:
        InferenceConfig(sweep=dict(raw)).validate()
    except BiometryInputError as err:
        raise BiometryInputError(f"{source}: postprocess: {err}") from None
    return dict(raw)


def _distributions(raw: Any, source: str, where: str) -> tuple[Distribution, ...]:
    if not isinstance(raw, dict):
        raise BiometryInputError(f"{source}: '{where}' must be a mapping of dotted keys")
    return tuple(_distribution(key, spec, source, f"{where}.{key}") for key, spec in raw.items())


def _distribution(key: str, spec: Any, source: str, where: str) -> Distribution:
    _check_config_key(key, source, where)
    if not isinstance(spec, dict):
        raise BiometryInputError(f"{source}: '{where}' must be a mapping such as "
                                 f"{{low: 0, high: 1}} or {{choices: [a, b]}}")
    unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(Distribution)} | (
        {"key"} & set(spec)))
    if unknown:  # before the bounds: a misspelt 'choices' is named as what it is
        raise BiometryInputError(f"{source}: unknown key '{where}.{unknown[0]}'")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise BiometryInputError(f"{source}: '{where}.choices' must be a non-empty list")
    if "choices" not in spec:
        for bound in ("low", "high"):
            value = spec.get(bound)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise BiometryInputError(f"{source}: '{where}.{bound}' must be a number but got "
                                         f"{value!r}")
    typed = from_mapping(Distribution, spec, source=source, section=where,
                         base=Distribution(key=key))
    if typed.choices is not None:
        return typed
    low, high = typed.low, typed.high
    if low > high:
        raise BiometryInputError(f"{source}: '{where}' has low {low} > high {high}")
    if typed.log and low <= 0:
        raise BiometryInputError(f"{source}: '{where}.low' must be positive for log but got {low}")
    return typed


def _check_config_key(key: str, source: str, where: str) -> None:
    real = VIRTUAL_KEYS.get(key, key)
    section, _, name = real.partition(".")
    if section not in SECTIONS:
        raise BiometryInputError(f"{source}: '{where}' is not a trial config key (sections: "
                                 f"{', '.join(SECTIONS)})")
    fields = {f.name for f in dataclasses.fields(SECTIONS[section]())}
    if name not in fields:
        raise BiometryInputError(f"{source}: '{where}' is not a trial config key; "
                                 f"'{section}' has {', '.join(sorted(fields))}")
