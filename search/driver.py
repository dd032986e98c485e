"""The search driver: plan (check everything before a trial starts), run, summarize.

:func:`run_search` is the whole command behind ``python search/run.py``; the CLI and presets are
in :mod:`search.cli`, the final retrain in :mod:`search.final`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biometry.atomic import write_json
from biometry.constants import BEST_OBJECTIVE, OBJECTIVE
from biometry.errors import BiometryInputError
from search.cli import Preset, SearchSettings, apply_flags, load_preset, resolve_run_dir, space_file
from search.final import final_config, final_done, final_params, final_retrain, recombine_final
from search.results import best_epoch, export_best_checkpoint


@dataclass
class SearchPlan:
    """A search run's inputs, gathered and checked before any trial starts."""

    run_dir: Path
    name: str
    preset: Preset
    base_cfg: Any  # trainables.config.TrialConfig of preset.trial
    space: Any  # search.space.SearchSpace
    saved: dict | None  # search.json of the run being resumed
    tracking_uri: str | None
    synthetic: bool  # the smoke preset's data: made in the run folder, once it exists
    info: dict | None = None  # the Ray connection, once made
    data: Any = None  # trainables.data.PreparedSplits
    exclude: set = field(default_factory=set)
    storage: str = ""
    resources: dict = field(default_factory=dict)

    @property
    def settings(self) -> SearchSettings:
        return self.preset.search


def run_search(args: argparse.Namespace) -> int:
    """The command: plan, search (unless it finished earlier), final retrain, summary."""
    plan = plan_search(args)
    join_cluster(plan, storage=args.storage)
    prepare_run_folder(plan)
    print_watch_info(plan.info, plan.run_dir, plan.tracking_uri, plan.resources, plan.preset)
    artifact_location = None if args.mlflow_uri else (plan.run_dir / "mlartifacts").as_uri()
    callback = search_logger(plan, artifact_location=artifact_location)
    summary = finished_summary(plan.run_dir) if args.resume else None
    if summary is None:
        summary = search(plan, resume=args.resume, callback=callback)
        write_json(plan.run_dir / "summary.json", summary)  # done: --resume won't refit it
    if plan.settings.final_epochs and summary.get("top"):
        run_final(summary, plan, artifact_location=artifact_location)
    return finish(summary, plan, callback=callback)


def plan_search(args: argparse.Namespace) -> SearchPlan:
    """Run folder, preset, flags, trial config, space and data, each checked in turn.

    Ray starts here only when the default preset depends on the cluster's GPUs; otherwise the
    flags, trial config, space and data are all checked before the cluster starts.
    """
    run_dir, name = resolve_run_dir(args)
    saved = json.loads((run_dir / "search.json").read_text()) if args.resume else None
    if saved and not args.preset:
        args.preset = saved["preset"]
    preset = load_preset(args.preset) if args.preset else None  # before Ray and torch (seconds)

    from search import tune_api
    from search.space import load_space
    from search.tracking import check_tracking_uri
    from trainables.config import config_from_dict

    tracking_uri = args.mlflow_uri or (saved or {}).get("tracking_uri")
    if tracking_uri:
        check_tracking_uri(tracking_uri)
    info = None
    if preset is None:
        info = tune_api.connect()
        args.preset = "gpu" if tune_api.cluster_resources()["GPU"] > 0 else "cpu"
        preset = load_preset(args.preset)
    preset = apply_flags(preset, args)
    if saved:
        preset.trial = saved["trial"]
    base_cfg = config_from_dict(preset.trial, source=f"preset {preset.name}")
    space = load_space(space_file(preset.search.space))
    validate_space_against_config(space, preset.trial)
    if preset.search.final_overrides:
        final_config(preset.trial, preset.search.final_overrides,
                     source=f"preset {preset.name} + search.final_overrides")
    synthetic = bool(preset.search.synthetic_images and not args.data
                     and not preset.trial.get("data", {}).get("path"))
    plan = SearchPlan(run_dir=run_dir, name=name, preset=preset, base_cfg=base_cfg, space=space,
                      saved=saved, tracking_uri=tracking_uri, synthetic=synthetic, info=info)
    if not synthetic:  # everything is decoded once, here
        plan.data, plan.exclude = prepare_data(base_cfg)
    return plan


def validate_space_against_config(space, base_trial: dict, *, samples: int = 8) -> None:
    """Sample the space a few times and build each trial config, so a bad key or value fails
    here, naming it, rather than in trial 37."""
    import optuna

    from search.space import trial_overrides
    from trainables.config import config_from_dict, with_overrides

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        trial = study.ask()
        returned = space(trial)
        # what a trial receives: Ray's OptunaSearch merges the sampled names with the returned
        # dict, and the trainable applies them as trainables.tune_trial does
        raw, _ = with_overrides(base_trial, trial_overrides({**trial.params, **returned}))
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


def join_cluster(plan: SearchPlan, *, storage: str | None) -> None:
    """Connect to Ray, refuse per-trial resources it can never give, choose the storage
    (``storage``: the ``--storage`` flag)."""
    from search import tune_api

    if plan.info is None:
        plan.info = tune_api.connect()
    plan.resources = tune_api.cluster_resources()
    tune_api.check_resources(cpus_per_trial=plan.settings.cpus_per_trial,
                             gpus_per_trial=plan.settings.gpus_per_trial)
    plan.storage = storage or (plan.saved or {}).get("storage") or str(plan.run_dir.parent)
    if plan.resources["nodes"] > 1 and "://" not in plan.storage and not storage:
        raise BiometryInputError(f"the Ray cluster has {plan.resources['nodes']:g} nodes: pass a "
                                 f"shared --storage (NFS path or s3:// / gs:// URI) so every "
                                 f"node can write checkpoints")


def prepare_run_folder(plan: SearchPlan) -> None:
    """The run folder with its MLflow store, the smoke preset's data, ``search.json`` (what
    ``--resume`` reads) and ``splits.json``."""
    from search.tracking import check_tracking_uri, local_tracking_uri

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    plan.tracking_uri = plan.tracking_uri or local_tracking_uri(plan.run_dir)
    check_tracking_uri(plan.tracking_uri)
    if plan.synthetic:
        from biometry.io import write_synthetic_dataset
        from trainables.config import config_from_dict

        csv = write_synthetic_dataset(plan.run_dir / "synthetic",
                                      n=plan.settings.synthetic_images, seed=0)
        plan.preset.trial.setdefault("data", {})["path"] = str(csv)
        plan.base_cfg = config_from_dict(plan.preset.trial, source=f"preset {plan.preset.name}")
        plan.data, plan.exclude = prepare_data(plan.base_cfg)
    if not plan.saved:
        write_json(plan.run_dir / "search.json", {
            "name": plan.name, "preset": plan.preset.name, "trial": plan.preset.trial,
            "search": dataclasses.asdict(plan.settings), "storage": plan.storage,
            "tracking_uri": plan.tracking_uri, "data": plan.data.source,
            "excluded_outliers": sorted(plan.exclude)})
        write_json(plan.run_dir / "splits.json", plan.data.split_names)


def search_logger(plan: SearchPlan, *, artifact_location: str | None):
    """The MLflow callback: a parent run for the search, a child run per trial."""
    from search.tracking import MlflowSearchLogger

    cfg = plan.base_cfg
    return MlflowSearchLogger(
        tracking_uri=plan.tracking_uri, experiment_name=plan.name, search_name=plan.name,
        objective=OBJECTIVE, artifact_location=artifact_location,
        search_params={"preset": plan.preset.name, "num_samples": plan.settings.num_samples,
                       "data": plan.data.source, "exclude_outliers": cfg.data.exclude_outliers,
                       **{f"base.{k}": v for k, v in cfg.flat().items()}})


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


def search(plan: SearchPlan, *, resume: bool, callback) -> dict[str, Any]:
    """Run (or resume) the Ray Tune search and summarise it; ``best/`` is its best checkpoint."""
    from search import tune_api
    from trainables.tune_trial import tune_trainable

    experiment_path = f"{plan.storage.rstrip('/')}/{plan.name}"
    if resume and tune_api.can_restore(experiment_path):
        tuner = tune_api.restore_tuner(experiment_path, tune_trainable, data=plan.data,
                                       base_config=plan.preset.trial,
                                       cpus_per_trial=plan.settings.cpus_per_trial,
                                       gpus_per_trial=plan.settings.gpus_per_trial)
    else:
        tuner = new_tuner(plan, callback=callback)
    results = tuner.fit()
    return summarize_search(results, run_dir=plan.run_dir, name=plan.name,
                            tracking_uri=plan.tracking_uri)


def new_tuner(plan: SearchPlan, *, callback):
    """A fresh search: seeded TPE (the preset's own config first), ASHA, the trial table."""
    from search import tune_api
    from trainables.tune_trial import tune_trainable

    settings, max_epochs = plan.settings, plan.base_cfg.train.epochs
    searcher = tune_api.make_searcher(
        space=plan.space, metric=OBJECTIVE, best_metric=BEST_OBJECTIVE, max_epochs=max_epochs,
        storage_path=plan.run_dir / "optuna.journal", study_name=plan.name, seed=settings.seed,
        n_startup_trials=settings.n_startup_trials,
        points_to_evaluate=[plan.space.point_from_config(plan.base_cfg.flat())]
        if settings.start_from_base else None)
    scheduler = tune_api.make_scheduler(metric=OBJECTIVE, max_t=max_epochs,
                                        grace_period=min(settings.grace_period, max_epochs),
                                        reduction_factor=settings.reduction_factor)
    return tune_api.make_tuner(
        tune_trainable, data=plan.data, base_config=plan.preset.trial, searcher=searcher,
        scheduler=scheduler, num_samples=settings.num_samples,
        max_concurrent=settings.max_concurrent_trials, cpus_per_trial=settings.cpus_per_trial,
        gpus_per_trial=settings.gpus_per_trial,
        time_budget_s=settings.time_budget_min * 60 or None, storage_path=plan.storage,
        name=plan.name, callbacks=[callback], metric=OBJECTIVE,
        max_failures=settings.max_failures)


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


def run_final(summary: dict[str, Any], plan: SearchPlan, *, artifact_location: str | None) -> None:
    """The final retrain, unless it ran already; a finished one whose seeds were combined
    another way than the preset now asks has ``final/`` rebuilt from them."""
    settings = plan.settings
    common = dict(run_dir=plan.run_dir, name=plan.name, tracking_uri=plan.tracking_uri,
                  artifact_location=artifact_location)
    if not final_done(summary, settings, run_dir=plan.run_dir):
        data = plan.data
        if any(key.startswith("data.") for key in settings.final_overrides):  # another input size
            data, _ = prepare_data(final_config(plan.preset.trial, final_params(summary, settings),
                                                source="final retrain"))
        final_retrain(summary, settings=settings, storage=plan.storage, data=data,
                      base_trial=plan.preset.trial, **common)
    elif summary["final"].get("ensemble") and \
            summary["final"].get("combine", "maps") != settings.final_combine:
        recombine_final(summary, combine=settings.final_combine, data=plan.data, **common)


def finish(summary: dict[str, Any], plan: SearchPlan, *, callback) -> int:
    """Close the MLflow parent run, write ``summary.json``, print the top trials; the status."""
    callback.finish_search([], summary=summary)
    summary["mlflow_gaps"] = callback.gaps
    write_json(plan.run_dir / "summary.json", summary)
    print_top(summary)
    if callback.gaps:
        print(f"warning: MLflow missed {len(callback.gaps)} updates (first: {callback.gaps[0]}); "
              f"the run folder is complete", file=sys.stderr)
    if not summary.get("top"):
        print(f"error: no trial reported a result; see the trial logs under "
              f"{plan.storage}/{plan.name}", file=sys.stderr)
        return 1
    return 0


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
