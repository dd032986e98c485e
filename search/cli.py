"""The search: Ray Tune + Optuna TPE + ASHA over biometry heatmap models, tracked in MLflow.

    python search/run.py --num-samples 200                 # bundled HC18 sample, cpu or gpu preset
    python search/run.py --preset smoke --out /tmp/s       # 2 trials x 1 epoch, synthetic data
    python search/run.py --resume --name NAME              # continue an interrupted search

The run folder ``OUT/NAME`` holds Ray Tune's experiment, the MLflow store (unless
``--mlflow-uri``), the Optuna study (``optuna.journal``), ``best/`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from biometry.constants import ENSEMBLE_COMBINES
from biometry.errors import BiometryInputError, run_cli
from biometry.typed import from_mapping

os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# stderr carries warnings and errors only (a bad input is ONE line there); stdout the progress
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

FINAL_COMBINES = ENSEMBLE_COMBINES
CONFIG_PACKAGE = "configs"  # presets/NAME.yaml and search/NAME.yaml ship inside it

# what the final retrain must share with the search: its data split (it is validated, and
# selected, on the search's validation split) and its length (search.final_epochs)
FINAL_FIXED_KEYS = {
    **{f"data.{k}": "the retrain validates on the search's split"
       for k in ("path", "split_seed", "val_fraction", "test_fraction", "limit", "exclude_outliers")},
    "train.epochs": "set search.final_epochs instead",
}


@dataclass
class SearchSettings:
    """The ``search:`` section of a preset; flags override it."""

    space: str = "configs/search/default.yaml"
    num_samples: int = 200
    grace_period: int = 8
    reduction_factor: float = 3.0
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    time_budget_min: float = 0.0  # 0 = no budget
    seed: int = 0
    n_startup_trials: int = 10
    max_failures: int = 0
    start_from_base: bool = True  # the first trial is the preset's own config (Optuna enqueue)
    # > 0: after the search, train the best config again for this many epochs on the search's
    # slots (final/), selected if it validates better than best/ (docs/experiments.md)
    final_epochs: int = 0
    # dotted trial-config keys the final retrain sets on top of the best config (a larger input,
    # say: the search ranks configs cheaply, the retrain spends more); {} = the best config as is
    final_overrides: dict = dataclasses.field(default_factory=dict)
    # > 1: the final retrain trains the best config with this many seeds at once (train.seed,
    # train.seed + 1, ...) on its slots, and final/ is their ensemble
    final_seeds: int = 1
    # how final/ combines the seeds (FINAL_COMBINES): "median" of their decoded landmarks, or
    # "maps", their output maps averaged before decoding (docs/experiments.md, "median of the
    # seeds"); --resume with another value rebuilds final/ from the seeds, retraining nothing
    final_combine: str = "median"
    synthetic_images: int = 0  # > 0: train on this many synthetic images (smoke tests)

    def validate(self, source: str) -> None:
        checks = [
            (self.num_samples >= 1, "num_samples", "must be >= 1", self.num_samples),
            (self.grace_period >= 1, "grace_period", "must be >= 1", self.grace_period),
            (self.reduction_factor > 1, "reduction_factor", "must be > 1", self.reduction_factor),
            (self.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1",
             self.max_concurrent_trials),
            (self.time_budget_min >= 0, "time_budget_min", "cannot be negative",
             self.time_budget_min),
            (self.max_failures >= 0, "max_failures", "cannot be negative", self.max_failures),
            (self.final_epochs >= 0, "final_epochs", "cannot be negative", self.final_epochs),
            (self.final_seeds >= 1, "final_seeds", "must be >= 1", self.final_seeds),
            (self.final_combine in FINAL_COMBINES, "final_combine",
             f"must be one of {FINAL_COMBINES}", self.final_combine),
        ]
        for ok, key, requirement, value in checks:
            if not ok:
                raise BiometryInputError(f"{source}: 'search.{key}' {requirement} but got {value!r}")
        for key in self.final_overrides:
            if not isinstance(key, str) or key.count(".") != 1 or key.startswith("search."):
                raise BiometryInputError(f"{source}: 'search.final_overrides' key {key!r} must be "
                                         f"a dotted trial-config key such as 'data.input_h'")
            if key in FINAL_FIXED_KEYS:
                raise BiometryInputError(f"{source}: 'search.final_overrides.{key}' cannot be "
                                         f"changed: {FINAL_FIXED_KEYS[key]}")


@dataclass
class Preset:
    name: str
    trial: dict[str, Any]
    search: SearchSettings


def packaged_config(relative: str) -> Path:
    """A file of the installed ``configs`` package, e.g. ``presets/cpu.yaml``."""
    return Path(str(importlib.resources.files(CONFIG_PACKAGE).joinpath(relative)))


def space_file(space: str | Path) -> Path:
    """The search space a preset or ``--space`` names: an existing file, else the packaged one a
    ``configs/search/NAME.yaml`` path names (what the bundled presets say)."""
    path = Path(space)
    prefix = f"{CONFIG_PACKAGE}/"
    if not path.is_file() and path.as_posix().startswith(prefix):
        packaged = packaged_config(path.as_posix()[len(prefix):])
        if packaged.is_file():
            return packaged
    return path.absolute()  # a missing file: load_space names it


def load_preset(name_or_path: str) -> Preset:
    path = Path(name_or_path)
    if not path.suffix:
        path = packaged_config(f"presets/{name_or_path}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in packaged_config("presets").glob("*.yaml")))
        raise BiometryInputError(f"--preset {name_or_path}: no such preset (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BiometryInputError(f"{path}: invalid YAML ({getattr(err, 'problem', err)})") from None
    unknown = sorted(set(raw) - {"trial", "search"})
    if unknown:
        raise BiometryInputError(f"{path}: unknown key '{unknown[0]}' (expected trial, search)")
    settings = search_settings(raw.get("search") or {}, source=path)
    return Preset(name=path.stem, trial=raw.get("trial") or {}, search=settings)


def search_settings(search_raw: dict[str, Any], *, source: Path) -> SearchSettings:
    """A preset's ``search:`` section, type-checked key by key (biometry.typed)."""
    settings = from_mapping(SearchSettings, search_raw, source=str(source), section="search")
    settings.validate(str(source))
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python search/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, help="trials to run (default: the preset's, 200)")
    p.add_argument("--data", help="HC18 folder or landmark CSV (default: the bundled HC18 sample)")
    p.add_argument("--preset", help="cpu | gpu | smoke | a YAML path (default: gpu if the Ray "
                                    "cluster has GPUs, else cpu)")
    p.add_argument("--space", help="search space YAML (default: the preset's)")
    p.add_argument("--name", help="run name (default: search-YYYYmmdd-HHMMSS; with --resume the "
                                  "newest run in --out)")
    p.add_argument("--out", default="runs", help="folder of run folders (default: ./runs)")
    p.add_argument("--storage", help="Ray Tune storage (a shared path or s3://, gs:// URI; "
                                     "required on a multi-node cluster; default: --out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--mlflow-uri", help="MLflow tracking server (default: a store in the run "
                                        "folder)")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="fractions allowed, e.g. 0.5")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the preset's)")
    p.add_argument("--time-budget-min", type=float, help="stop starting trials after M minutes")
    p.add_argument("--max-failures", type=int, help="restarts of a failing trial from its last "
                                                    "checkpoint (default: the preset's)")
    p.add_argument("--seed", type=int, help="sampler seed (default: the preset's)")
    p.add_argument("--final-epochs", type=int, help="retrain the best config for N epochs after "
                                                    "the search (0 = no; default: the preset's)")
    p.add_argument("--final-seeds", type=int, help="train the final retrain with N seeds at once "
                                                   "and keep their ensemble (default: the "
                                                   "preset's)")
    p.add_argument("--final-combine", choices=FINAL_COMBINES,
                   help="how final/ combines the seeds: the median of their landmarks or their "
                        "maps averaged (default: the preset's)")
    p.add_argument("--exclude-outliers", type=float, help="drop this top fraction of training "
                                                          "labels by EDA outlier score")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def resolve_run_dir(args: argparse.Namespace) -> tuple[Path, str]:
    out = Path(args.out).resolve()
    if args.name:
        name = args.name
    elif args.resume:
        candidates = sorted((p for p in out.glob("*") if (p / "search.json").is_file()),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise BiometryInputError(f"--resume: no search to resume in {out}")
        name = candidates[-1].name
    else:
        name = time.strftime("search-%Y%m%d-%H%M%S")
    if "/" in name or name in (".", ".."):
        raise BiometryInputError(f"--name {name!r}: a plain folder name is required")
    run_dir = out / name
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise BiometryInputError(f"--out {args.out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):  # also read-only and immutable folders, even for root
        raise BiometryInputError(f"--out {args.out}: cannot write in {existing}")
    if args.resume and not (run_dir / "search.json").is_file():
        raise BiometryInputError(f"--resume: {run_dir} holds no search (search.json missing)")
    if not args.resume and (run_dir / "search.json").is_file():
        raise BiometryInputError(f"{run_dir}: a search already exists there; pass --resume to "
                                 f"continue it or another --name")
    return run_dir, name


def apply_flags(preset: Preset, args: argparse.Namespace) -> Preset:
    s = preset.search
    overrides = {"num_samples": args.num_samples, "cpus_per_trial": args.cpus_per_trial,
                 "gpus_per_trial": args.gpus_per_trial, "time_budget_min": args.time_budget_min,
                 "seed": args.seed, "space": args.space, "max_failures": args.max_failures,
                 "max_concurrent_trials": args.max_concurrent, "final_epochs": args.final_epochs,
                 "final_seeds": args.final_seeds, "final_combine": args.final_combine}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    s.validate("command line")
    trial = json.loads(json.dumps(preset.trial))
    if args.data:
        trial.setdefault("data", {})["path"] = str(Path(args.data).resolve())
    if args.exclude_outliers is not None:
        trial.setdefault("data", {})["exclude_outliers"] = args.exclude_outliers
    return Preset(name=preset.name, trial=trial, search=s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cv2
    import optuna

    from search.driver import run_search  # here: the driver imports this module

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a corrupt PNG: one line
    return run_cli(lambda: run_search(args), debug=args.debug,
                   interrupted="interrupted: continue with --resume")
