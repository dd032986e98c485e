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
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python search/run.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# stderr carries warnings and errors only (a bad input is ONE line there); stdout the progress
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from biometry.errors import BiometryInputError  # noqa: E402

OBJECTIVE = "val_measure_l1_mm"
BEST_OBJECTIVE = f"best_{OBJECTIVE}"
PRESETS_DIR = REPO_ROOT / "configs" / "presets"
TOP_COLUMNS = ("bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", OBJECTIVE)
# biometry.models.ENSEMBLE_COMBINES, here without importing torch (a preset is checked first)
FINAL_COMBINES = ("maps", "median")


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


def load_preset(name_or_path: str) -> Preset:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise BiometryInputError(f"--preset {name_or_path}: no such preset (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BiometryInputError(f"{path}: invalid YAML ({getattr(err, 'problem', err)})") from None
    unknown = sorted(set(raw) - {"trial", "search"})
    if unknown:
        raise BiometryInputError(f"{path}: unknown key '{unknown[0]}' (expected trial, search)")
    search_raw = raw.get("search") or {}
    fields = {f.name: f for f in dataclasses.fields(SearchSettings)}
    for key, value in search_raw.items():
        if key not in fields:
            raise BiometryInputError(f"{path}: unknown key 'search.{key}'")
        expected = type(getattr(SearchSettings(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            search_raw[key] = float(value)
        elif not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise BiometryInputError(f"{path}: 'search.{key}' must be {expected.__name__} but got "
                                     f"{value!r}")
    settings = SearchSettings(**search_raw)
    settings.validate(str(path))
    return Preset(name=path.stem, trial=raw.get("trial") or {}, search=settings)


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


def validate_space_against_config(space, base_trial: dict, *, samples: int = 8) -> None:
    """Sample the space a few times and build each trial config, so a bad key or value fails
    here, naming it, rather than in trial 37."""
    import optuna

    from search.space import trial_overrides
    from trainables.config import config_from_dict, set_dotted

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        trial = study.ask()
        raw = json.loads(json.dumps(base_trial))
        returned = space(trial)
        # what a trial receives: Ray's OptunaSearch merges the sampled names with the returned dict
        for key, value in trial_overrides({**trial.params, **returned}).items():
            set_dotted(raw, key, value)
        config_from_dict(raw, source=f"{space.source} + preset")
        study.tell(trial, 0.0)


def outlier_names(data_cfg, fraction: float) -> set[str]:
    """Training images to drop for the core subset: the top ``fraction`` by EDA outlier score."""
    if fraction <= 0:
        return set()
    from biometry.eda import outlier_scores
    from trainables.data import load_split_records

    splits = load_split_records(data_cfg.path, split_seed=data_cfg.split_seed,
                                val_fraction=data_cfg.val_fraction,
                                test_fraction=data_cfg.test_fraction, limit=data_cfg.limit)
    scores = outlier_scores(splits["train"])
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    return {name for name, _ in ranked[:int(round(fraction * len(ranked)))]}


def prepare_data(base_cfg):
    """Import, split and decode the data once (a bad file fails here, naming it)."""
    from trainables.data import prepare_splits

    exclude = outlier_names(base_cfg.data, base_cfg.data.exclude_outliers)
    data = prepare_splits(base_cfg.data, exclude=exclude)
    print(f"data: {data.source}: {len(data.train)} train / {len(data.val)} val images "
          f"(test split of {len(data.split_names.get('test', []))} kept out of the search"
          f"{f'; {len(exclude)} outlier labels excluded' if exclude else ''})")
    return data, exclude


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cv2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a corrupt PNG: one line
    try:
        return run_search(args)
    except (BiometryInputError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with --resume", file=sys.stderr)
        return 130


def run_search(args: argparse.Namespace) -> int:
    run_dir, name = resolve_run_dir(args)
    saved = json.loads((run_dir / "search.json").read_text()) if args.resume else None
    if saved and not args.preset:
        args.preset = saved["preset"]
    if args.preset:
        preset = load_preset(args.preset)  # validate before importing Ray and torch (seconds)

    from search import tune_api
    from search.space import load_space
    from search.tracking import MlflowSearchLogger, check_tracking_uri, local_tracking_uri
    from trainables.config import config_from_dict

    tracking_uri = args.mlflow_uri or (saved or {}).get("tracking_uri")
    if tracking_uri:
        check_tracking_uri(tracking_uri)

    # Ray starts here only when the default preset depends on the cluster's GPUs; otherwise
    # the flags, trial config, space and data are all checked before the cluster starts.
    info = None
    if not args.preset:
        info = tune_api.connect()
        args.preset = "gpu" if tune_api.cluster_resources()["GPU"] > 0 else "cpu"
        preset = load_preset(args.preset)
    preset = apply_flags(preset, args)
    settings = preset.search
    if saved:
        preset.trial = saved["trial"]
    base_cfg = config_from_dict(preset.trial, source=f"preset {preset.name}")
    space = load_space(REPO_ROOT / settings.space if not Path(settings.space).is_absolute()
                       else settings.space)
    validate_space_against_config(space, preset.trial)
    if settings.final_overrides:
        final_config(preset.trial, settings.final_overrides,
                     source=f"preset {preset.name} + search.final_overrides")
    # data: the smoke preset makes a synthetic set (in the run folder); everything is decoded
    # once, here
    synthetic = bool(settings.synthetic_images and not args.data
                     and not preset.trial.get("data", {}).get("path"))
    data, exclude = (None, set()) if synthetic else prepare_data(base_cfg)

    if info is None:
        info = tune_api.connect()
    resources = tune_api.cluster_resources()
    tune_api.check_resources(cpus_per_trial=settings.cpus_per_trial,
                             gpus_per_trial=settings.gpus_per_trial)
    storage = args.storage or (saved or {}).get("storage") or str(run_dir.parent)
    if resources["nodes"] > 1 and "://" not in storage and not args.storage:
        raise BiometryInputError(f"the Ray cluster has {resources['nodes']:g} nodes: pass a "
                                 f"shared --storage (NFS path or s3:// / gs:// URI) so every "
                                 f"node can write checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or local_tracking_uri(run_dir)
    check_tracking_uri(tracking_uri)
    if synthetic:
        from biometry.io import write_synthetic_dataset

        csv = write_synthetic_dataset(run_dir / "synthetic", n=settings.synthetic_images, seed=0)
        preset.trial.setdefault("data", {})["path"] = str(csv)
        base_cfg = config_from_dict(preset.trial, source=f"preset {preset.name}")
        data, exclude = prepare_data(base_cfg)
    if not saved:
        write_json(run_dir / "search.json", {
            "name": name, "preset": preset.name, "trial": preset.trial,
            "search": dataclasses.asdict(settings), "storage": storage,
            "tracking_uri": tracking_uri, "data": data.source,
            "excluded_outliers": sorted(exclude)})
        write_json(run_dir / "splits.json", data.split_names)

    print_watch_info(info, run_dir, tracking_uri, resources, preset)
    callback = MlflowSearchLogger(
        tracking_uri=tracking_uri, experiment_name=name, search_name=name, objective=OBJECTIVE,
        artifact_location=None if args.mlflow_uri else (run_dir / "mlartifacts").as_uri(),
        search_params={"preset": preset.name, "num_samples": settings.num_samples,
                       "data": data.source, "exclude_outliers": base_cfg.data.exclude_outliers,
                       **{f"base.{k}": v for k, v in base_cfg.flat().items()}})
    summary = finished_summary(run_dir) if args.resume else None
    if summary is None:
        summary = search(args, settings=settings, preset=preset, base_cfg=base_cfg, space=space,
                         data=data, storage=storage, name=name, run_dir=run_dir,
                         tracking_uri=tracking_uri, callback=callback)
        write_json(run_dir / "summary.json", summary)  # the search is done: --resume won't refit it
    artifact_location = None if args.mlflow_uri else (run_dir / "mlartifacts").as_uri()
    if settings.final_epochs and summary.get("top"):
        if not final_done(summary, settings, run_dir=run_dir):
            final_retrain(summary, settings=settings, run_dir=run_dir, name=name, storage=storage,
                          data=data, base_trial=preset.trial, tracking_uri=tracking_uri,
                          artifact_location=artifact_location)
        elif summary["final"].get("ensemble") and \
                summary["final"].get("combine", "maps") != settings.final_combine:
            recombine_final(summary, combine=settings.final_combine, run_dir=run_dir, name=name,
                            data=data, tracking_uri=tracking_uri,
                            artifact_location=artifact_location)
    callback.finish_search([], summary=summary)
    summary["mlflow_gaps"] = callback.gaps
    write_json(run_dir / "summary.json", summary)
    print_top(summary)
    if callback.gaps:
        print(f"warning: MLflow missed {len(callback.gaps)} updates (first: {callback.gaps[0]}); "
              f"the run folder is complete", file=sys.stderr)
    if not summary.get("top"):
        print(f"error: no trial reported a result; see the trial logs under {storage}/{name}",
              file=sys.stderr)
        return 1
    return 0


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a search that ran to its end (its budget or sample count), else None.

    ``summary.json`` is written only then, so ``--resume`` of such a search does not refit it (it
    cannot grow new trials); it only completes what is missing after it, the final retrain.
    """
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    print(f"search: {run_dir.name} finished earlier ({path}); resuming what follows it")
    return json.loads(path.read_text())


def final_done(summary: dict[str, Any], settings: SearchSettings, *, run_dir: Path) -> bool:
    final = summary.get("final") or {}
    if not final or "error" in final:
        return False
    if final["epochs"] != settings.final_epochs:
        raise BiometryInputError(f"{run_dir}: its final retrain ran {final['epochs']} epochs; "
                                 f"pass --final-epochs {final['epochs']} or another --name")
    if len(final.get("seeds", [0])) != settings.final_seeds:
        raise BiometryInputError(f"{run_dir}: its final retrain trained {len(final['seeds'])} "
                                 f"seed(s), the preset asks for search.final_seeds "
                                 f"{settings.final_seeds}; use another --name")
    if final.get("overrides", {}) != settings.final_overrides:
        raise BiometryInputError(f"{run_dir}: its final retrain ran with search.final_overrides "
                                 f"{final.get('overrides', {})}, the preset now has "
                                 f"{settings.final_overrides}; use another --name")
    return True


def final_config(base_trial: dict, params: dict, *, source: str):
    """The base trial with dotted ``params`` set, validated (a bad override fails naming it)."""
    from trainables.config import config_from_dict, set_dotted

    raw = json.loads(json.dumps(base_trial))
    for key, value in params.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, source=source)


def search(args, *, settings: SearchSettings, preset: Preset, base_cfg, space, data, storage: str,
           name: str, run_dir: Path, tracking_uri: str, callback) -> dict[str, Any]:
    """Run (or resume) the Ray Tune search and summarise it; ``best/`` is its best checkpoint."""
    from search import tune_api
    from trainables.tune_trial import tune_trainable

    experiment_path = f"{storage.rstrip('/')}/{name}"
    max_epochs = base_cfg.train.epochs
    if args.resume and tune_api.can_restore(experiment_path):
        tuner = tune_api.restore_tuner(experiment_path, tune_trainable, data=data,
                                       base_config=preset.trial,
                                       cpus_per_trial=settings.cpus_per_trial,
                                       gpus_per_trial=settings.gpus_per_trial)
    else:
        searcher = tune_api.make_searcher(
            space=space, metric=OBJECTIVE, best_metric=BEST_OBJECTIVE, max_epochs=max_epochs,
            storage_path=run_dir / "optuna.journal", study_name=name, seed=settings.seed,
            n_startup_trials=settings.n_startup_trials,
            points_to_evaluate=[space.point_from_config(base_cfg.flat())]
            if settings.start_from_base else None)
        scheduler = tune_api.make_scheduler(metric=OBJECTIVE, max_t=max_epochs,
                                            grace_period=min(settings.grace_period, max_epochs),
                                            reduction_factor=settings.reduction_factor)
        tuner = tune_api.make_tuner(
            tune_trainable, data=data, base_config=preset.trial, searcher=searcher,
            scheduler=scheduler, num_samples=settings.num_samples,
            max_concurrent=settings.max_concurrent_trials, cpus_per_trial=settings.cpus_per_trial,
            gpus_per_trial=settings.gpus_per_trial,
            time_budget_s=settings.time_budget_min * 60 or None, storage_path=storage, name=name,
            callbacks=[callback], metric=OBJECTIVE, max_failures=settings.max_failures)
    results = tuner.fit()
    return summarize_search(results, run_dir=run_dir, name=name, tracking_uri=tracking_uri)


def summarize_search(results, *, run_dir: Path, name: str, tracking_uri: str) -> dict[str, Any]:
    """Top trials by their best epoch, ``best/`` exported from the best checkpoint."""
    rows = []
    states: dict[str, int] = {}
    best_result, best_value = None, math.inf
    for result in results:
        state = "ERROR" if result.error else "TERMINATED"
        history = result.metrics_dataframe
        if history is None or OBJECTIVE not in getattr(history, "columns", []):
            states[state] = states.get(state, 0) + 1
            continue
        history = history.dropna(subset=[OBJECTIVE])
        if history.empty:
            continue
        best_row, metrics = best_epoch(history)
        epochs = int(history["training_iteration"].max())
        states[state] = states.get(state, 0) + 1
        row = {"trial_id": str(best_row.get("trial_id", "")), "epochs": epochs,
               "best_epoch": int(best_row["training_iteration"]),
               "params": {k: v for k, v in result.config.items() if "@" not in k},
               "metrics": metrics}
        rows.append(row)
        if row["metrics"][OBJECTIVE] < best_value and result.best_checkpoints is not None:
            best_value, best_result = row["metrics"][OBJECTIVE], result
    rows.sort(key=lambda r: r["metrics"][OBJECTIVE])
    summary: dict[str, Any] = {"search": name, "objective": OBJECTIVE, "num_trials": len(results),
                               "trial_states": states, "tracking_uri": tracking_uri,
                               "optuna_storage": str(run_dir / "optuna.journal"),
                               "top": rows[:5]}
    if best_result is not None and rows:
        export_best_checkpoint(best_result, run_dir / "best")
        summary.update(best_trial_id=rows[0]["trial_id"], params=rows[0]["params"],
                       metrics=rows[0]["metrics"], best_model=str(run_dir / "best"),
                       selected_model=str(run_dir / "best"))
    return summary


def best_epoch(history) -> tuple[Any, dict[str, float]]:
    """The row of a trial's lowest objective and its metrics (mm, nme, uncertainty ranking)."""
    row = history.loc[history[OBJECTIVE].idxmin()]
    return row, reported_metrics(row)


def reported_metrics(metrics) -> dict[str, float]:
    """The figures a summary keeps of a report (a dict or a history row): mm, nme, ranking."""
    return {k: float(metrics[k]) for k in metrics.keys()
            if k.endswith("_mm") or k in ("nme", "unc_spearman", "aurc")}


def export_best_checkpoint(result, destination: Path) -> None:
    """Copy the model files of a Ray result's best checkpoint into ``destination``."""
    from search.results import export_model_folder

    checkpoint = min(result.best_checkpoints, key=lambda cm: cm[1].get(OBJECTIVE, math.inf))[0]
    with checkpoint.as_directory() as folder:
        export_model_folder(Path(folder), destination)


def final_retrain(summary: dict[str, Any], *, settings: SearchSettings, run_dir: Path, name: str,
                  storage: str, data, base_trial: dict, tracking_uri: str,
                  artifact_location: str | None) -> None:
    """Train the search's best config again for ``settings.final_epochs`` epochs, alone.

    The search ranks configs by a short training (a trial's epochs, ASHA stopping most of them
    earlier); the winner is then trained for longer, on the slots the search ran trials on
    (``max_concurrent_trials`` times a trial's CPUs as far as one node has them; one GPU). With
    ``final_seeds`` N > 1 it is trained N times at once with the seeds ``train.seed``,
    ``train.seed + 1``, ... sharing those slots; each seed's best epoch goes to
    ``final_members/seedK/`` and ``final/`` is their ensemble (combined the
    ``settings.final_combine`` way), measured on the validation split here. It is a Ray Tune run
    of its own (``NAME-final`` beside the search, resumable with ``--resume``), logged in MLflow
    under the search's parent run with ``role=final`` (one run per seed; the ensemble
    ``role=final_ensemble``). ``best/`` stays the best trial's model; ``final/`` becomes
    ``summary["selected_model"]`` if it validates better.
    """
    from search import tune_api
    from trainables.tune_trial import tune_trainable

    cpus, gpus = tune_api.final_trial_resources(cpus_per_trial=settings.cpus_per_trial,
                                                gpus_per_trial=settings.gpus_per_trial,
                                                slots=settings.max_concurrent_trials)
    params = {**summary["params"], **settings.final_overrides, "train.epochs": settings.final_epochs}
    first_seed = final_config(base_trial, params, source="final retrain").train.seed
    seeds = [first_seed + k for k in range(settings.final_seeds)]
    cpus, gpus = tune_api.share_resources(cpus, gpus, parts=len(seeds))  # the seeds share them
    if any(key.startswith("data.") for key in settings.final_overrides):  # e.g. another input size
        data, _ = prepare_data(final_config(base_trial, params, source="final retrain"))
    if not gpus and base_trial.get("train", {}).get("threads"):
        params["train.threads"] = max(1, int(cpus))  # the trial's own threads are one slot's
    if len(seeds) > 1:
        params["train.seed"] = tune_api.grid(seeds)
    final_name = f"{name}-final"
    path = f"{storage.rstrip('/')}/{final_name}"
    changed = "".join(f", {k}={v}" for k, v in settings.final_overrides.items())
    what = f"seeds {', '.join(map(str, seeds))} at once, " if len(seeds) > 1 else ""
    print(f"\nfinal retrain: the best config for {settings.final_epochs} epochs{changed}, {what}on "
          f"{cpus:g} CPU / {gpus:g} GPU each ({path})")
    callback = final_logger(name, tracking_uri=tracking_uri, artifact_location=artifact_location)
    if tune_api.can_restore(path):
        tuner = tune_api.restore_tuner(path, tune_trainable, data=data, base_config=base_trial,
                                       cpus_per_trial=cpus, gpus_per_trial=gpus)
    else:
        tuner = tune_api.make_tuner(
            tune_trainable, data=data, base_config=base_trial, searcher=None, scheduler=None,
            num_samples=1, max_concurrent=len(seeds), cpus_per_trial=cpus, gpus_per_trial=gpus,
            time_budget_s=None, storage_path=storage, name=final_name, callbacks=[callback],
            metric=OBJECTIVE, max_failures=settings.max_failures, param_space=params)
    results = list(tuner.fit())
    final = {"epochs": settings.final_epochs, "overrides": settings.final_overrides,
             "seeds": seeds, "path": path}
    members, folders = [], []
    for result in sorted(results, key=lambda r: r.config.get("train.seed", first_seed)):
        seed = result.config.get("train.seed", first_seed)
        history = result.metrics_dataframe
        if result.error or history is None or OBJECTIVE not in history.columns:
            members.append({"seed": seed, "error": str(result.error)})
            continue
        best_row, metrics = best_epoch(history)
        folder = run_dir / ("final" if len(seeds) == 1 else f"final_members/seed{seed}")
        export_best_checkpoint(result, folder)
        members.append({"seed": seed, "best_epoch": int(best_row["training_iteration"]),
                        "metrics": metrics, "model": str(folder)})
        folders.append(folder)
    if not folders:
        print(f"warning: the final retrain gave no result ({members[0]['error']}); best/ stays "
              f"the search's", file=sys.stderr)
        summary["final"] = {**final, "error": members[0]["error"]}
        return
    failed = [m["seed"] for m in members if "error" in m]
    if failed:
        print(f"warning: the final retrain of seed(s) {failed} gave no result; final/ holds the "
              f"other seeds", file=sys.stderr)
    for member in members if len(seeds) > 1 else []:
        if "metrics" in member:
            print(f"final retrain, seed {member['seed']}: {OBJECTIVE} "
                  f"{member['metrics'][OBJECTIVE]:.3f} mm at epoch {member['best_epoch']}")
    if len(seeds) == 1:
        final.update(best_epoch=members[0]["best_epoch"], metrics=members[0]["metrics"])
        select_final(summary, final, run_dir=run_dir, where=f"at epoch {final['best_epoch']}")
    else:
        final["members"] = members
        ensemble_final(summary, final, combine=settings.final_combine, run_dir=run_dir,
                       name=name, data=data, callback=callback)


def final_logger(name: str, *, tracking_uri: str, artifact_location: str | None):
    from search.tracking import MlflowSearchLogger

    return MlflowSearchLogger(tracking_uri=tracking_uri, experiment_name=name, search_name=name,
                              objective=OBJECTIVE, artifact_location=artifact_location,
                              trial_role="final")


def ensemble_final(summary: dict[str, Any], final: dict[str, Any], *, combine: str,
                   run_dir: Path, name: str, data, callback) -> None:
    """``final/`` = the ensemble of ``final["members"]`` that trained, combined the ``combine``
    way, measured on validation, logged in MLflow (``role=final_ensemble``, tag ``combine``) and
    selected if it validates better than the best trial."""
    folders = [Path(m["model"]) for m in final["members"] if "error" not in m]
    metrics = save_ensemble(folders, data=data, destination=run_dir / "final", combine=combine)
    final.update(ensemble=True, combine=combine, metrics=metrics)
    final["ensemble_run_id"] = callback.log_extra_run(
        role="final_ensemble", run_name=f"{name}-final-ensemble-{combine}",
        params={"seeds": [m["seed"] for m in final["members"] if "error" not in m],
                "members": [str(f) for f in folders], "combine": combine},
        metrics=metrics, model_folder=run_dir / "final", tags={"combine": combine})
    select_final(summary, final, run_dir=run_dir,
                 where=f"for the {combine} ensemble of {len(folders)} seeds")


def select_final(summary: dict[str, Any], final: dict[str, Any], *, run_dir: Path,
                 where: str) -> None:
    selected = final["metrics"][OBJECTIVE] < summary["metrics"][OBJECTIVE]
    final.update(model=str(run_dir / "final"), selected=selected)
    summary["final"] = final
    summary["selected_model"] = str(run_dir / ("final" if selected else "best"))
    print(f"final retrain: {OBJECTIVE} {final['metrics'][OBJECTIVE]:.3f} mm {where} (best trial "
          f"{summary['metrics'][OBJECTIVE]:.3f} mm); selected model: {summary['selected_model']}")


def recombine_final(summary: dict[str, Any], *, combine: str, run_dir: Path, name: str, data,
                    tracking_uri: str, artifact_location: str | None) -> None:
    """A finished final retrain's seeds combined another way: ``final/`` rebuilt from
    ``final_members/``, measured and selected again; nothing is retrained."""
    final = dict(summary["final"])
    print(f"final retrain: done earlier; its ensemble combined the "
          f"{final.get('combine', 'maps')} way, the preset asks for {combine}: rebuilding final/ "
          f"from its seeds")
    callback = final_logger(name, tracking_uri=tracking_uri, artifact_location=artifact_location)
    ensemble_final(summary, final, combine=combine, run_dir=run_dir, name=name, data=data,
                   callback=callback)


def save_ensemble(folders: list[Path], *, data, destination: Path,
                  combine: str) -> dict[str, float]:
    """Write the ensemble of the model ``folders`` (combined the ``combine`` way) to
    ``destination``, measured on the validation split the way a trial measures an epoch; return
    its metrics."""
    from biometry.inference import LandmarkPredictor, ensemble_of, save_model_folder
    from trainables.train import validate_into_spec

    model, spec = ensemble_of(folders, combine=combine)
    metrics = validate_into_spec(LandmarkPredictor(model, spec), data.val)
    save_model_folder(destination, model, spec)
    return reported_metrics(metrics)


def print_watch_info(info: dict, run_dir: Path, tracking_uri: str, resources: dict,
                     preset: Preset) -> None:
    from search import tune_api

    url = tune_api.dashboard_url(info)
    s = preset.search
    print(f"search: preset {preset.name}, {s.num_samples} trials, {s.max_concurrent_trials} at "
          f"once, {s.cpus_per_trial:g} CPU / {s.gpus_per_trial:g} GPU each; cluster "
          f"{resources['CPU']:g} CPU, {resources['GPU']:g} GPU, {resources['nodes']:g} node(s)")
    if s.time_budget_min:
        print(f"time budget: {s.time_budget_min:g} min, then the best found so far is kept")
    print(f"run folder: {run_dir}")
    if url:
        print(f"Ray dashboard: {url} (token auth: `ray get-auth-token` prints the token; trials "
              f"show as actors with their logs)")
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}")
    print(f"Optuna: optuna-dashboard {run_dir / 'optuna.journal'}")


def print_top(summary: dict[str, Any]) -> None:
    rows = summary.get("top", [])
    if not rows:
        print("no trial reported a result")
        return
    print(f"\ntop {len(rows)} trials by {OBJECTIVE} (best epoch; mm):")
    print(f"{'trial':<14}{'epoch':>6}{'BPD':>8}{'OFD':>8}{'HC':>8}{'mean':>8}  params")
    for row in rows:
        m = row["metrics"]
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(row["params"].items()))
        print(f"{row['trial_id']:<14}{row['best_epoch']:>6}{m['bpd_l1_mm']:>8.2f}"
              f"{m['ofd_l1_mm']:>8.2f}{m['hc_l1_mm']:>8.2f}{m[OBJECTIVE]:>8.2f}  {params}")
    if "best_model" in summary:
        print(f"\nbest model: {summary['best_model']}\nsummary: "
              f"{Path(summary['best_model']).parent / 'summary.json'}")
    if summary.get("selected_model", summary.get("best_model")) != summary.get("best_model"):
        print(f"selected model (the final retrain validates better): {summary['selected_model']}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
