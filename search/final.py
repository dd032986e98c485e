"""The final retrain: the search's best config trained again, longer, alone or as seeds at once.

``final/`` is its model (one seed) or the ensemble of its seeds (``final_members/seedK/``);
``summary.json`` names whichever of ``best/`` and ``final/`` validates better as
``selected_model``. A finished retrain's seeds can be combined another way without retraining.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biometry import atomic
from biometry.constants import OBJECTIVE
from biometry.errors import BiometryInputError
from search.results import best_epoch, export_best_checkpoint, reported_metrics

if TYPE_CHECKING:
    from search.cli import SearchSettings


def final_config(base_trial: dict, params: dict, *, source: str):
    """The base trial with dotted ``params`` set, validated (a bad override fails naming it)."""
    from trainables.config import config_from_dict, set_dotted

    raw = json.loads(json.dumps(base_trial))
    for key, value in params.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, source=source)


def final_params(summary: dict[str, Any], settings: SearchSettings) -> dict[str, Any]:
    """The best trial's sampled keys, with the retrain's overrides and length on top."""
    return {**summary["params"], **settings.final_overrides, "train.epochs": settings.final_epochs}


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
    ``summary["selected_model"]`` if it validates better. ``data`` is what the retrain trains
    and validates on (prepared again by the driver when ``final_overrides`` change the data).
    """
    from search import tune_api

    cpus, gpus = tune_api.final_trial_resources(cpus_per_trial=settings.cpus_per_trial,
                                                gpus_per_trial=settings.gpus_per_trial,
                                                slots=settings.max_concurrent_trials)
    params = final_params(summary, settings)
    first_seed = final_config(base_trial, params, source="final retrain").train.seed
    seeds = [first_seed + k for k in range(settings.final_seeds)]
    cpus, gpus = tune_api.share_resources(cpus, gpus, parts=len(seeds))  # the seeds share them
    if not gpus and base_trial.get("train", {}).get("threads"):
        params["train.threads"] = max(1, int(cpus))  # the trial's own threads are one slot's
    if len(seeds) > 1:
        params["train.seed"] = tune_api.grid(seeds)
    path = f"{storage.rstrip('/')}/{name}-final"
    changed = "".join(f", {k}={v}" for k, v in settings.final_overrides.items())
    what = f"seeds {', '.join(map(str, seeds))} at once, " if len(seeds) > 1 else ""
    print(f"\nfinal retrain: the best config for {settings.final_epochs} epochs{changed}, {what}on "
          f"{cpus:g} CPU / {gpus:g} GPU each ({path})")
    callback = final_logger(name, tracking_uri=tracking_uri, artifact_location=artifact_location)
    results = fit_final(path, storage=storage, name=f"{name}-final", data=data,
                        base_trial=base_trial, params=params, seeds=seeds, cpus=cpus, gpus=gpus,
                        max_failures=settings.max_failures, callback=callback)
    final = {"epochs": settings.final_epochs, "overrides": settings.final_overrides,
             "seeds": seeds, "path": path}
    members = export_members(results, first_seed=first_seed, run_dir=run_dir,
                             one_seed=len(seeds) == 1)
    conclude_final(summary, final, members, settings=settings, run_dir=run_dir, name=name,
                   data=data, callback=callback)


def fit_final(path: str, *, storage: str, name: str, data, base_trial: dict, params: dict,
              seeds: list[int], cpus: float, gpus: float, max_failures: int, callback) -> list:
    """Run (or resume, from ``path``) the retrain's Ray Tune run; its results, one per seed."""
    from search import tune_api
    from trainables.tune_trial import tune_trainable

    if tune_api.can_restore(path):
        tuner = tune_api.restore_tuner(path, tune_trainable, data=data, base_config=base_trial,
                                       cpus_per_trial=cpus, gpus_per_trial=gpus)
    else:
        tuner = tune_api.make_tuner(
            tune_trainable, data=data, base_config=base_trial, searcher=None, scheduler=None,
            num_samples=1, max_concurrent=len(seeds), cpus_per_trial=cpus, gpus_per_trial=gpus,
            time_budget_s=None, storage_path=storage, name=name, callbacks=[callback],
            metric=OBJECTIVE, max_failures=max_failures, param_space=params)
    return list(tuner.fit())


def export_members(results: list, *, first_seed: int, run_dir: Path,
                   one_seed: bool) -> list[dict[str, Any]]:
    """One entry per seed, in seed order: its best epoch exported (to ``final/`` for one seed,
    else ``final_members/seedK/``) with its metrics, or the error it ended with."""
    members = []
    for result in sorted(results, key=lambda r: r.config.get("train.seed", first_seed)):
        seed = result.config.get("train.seed", first_seed)
        history = result.metrics_dataframe
        if result.error or history is None or OBJECTIVE not in history.columns:
            members.append({"seed": seed, "error": str(result.error)})
            continue
        best_row, metrics = best_epoch(history)
        folder = run_dir / ("final" if one_seed else f"final_members/seed{seed}")
        export_best_checkpoint(result, folder)
        members.append({"seed": seed, "best_epoch": int(best_row["training_iteration"]),
                        "metrics": metrics, "model": str(folder)})
    return members


def conclude_final(summary: dict[str, Any], final: dict[str, Any], members: list[dict], *,
                   settings: SearchSettings, run_dir: Path, name: str, data, callback) -> None:
    """Record the retrain in ``summary``: its one seed or its seeds' ensemble, selected if it
    validates better than the best trial; an error when no seed gave a result."""
    if all("error" in m for m in members):
        print(f"warning: the final retrain gave no result ({members[0]['error']}); best/ stays "
              f"the search's", file=sys.stderr)
        summary["final"] = {**final, "error": members[0]["error"]}
        return
    failed = [m["seed"] for m in members if "error" in m]
    if failed:
        print(f"warning: the final retrain of seed(s) {failed} gave no result; final/ holds the "
              f"other seeds", file=sys.stderr)
    if len(final["seeds"]) == 1:
        final.update(best_epoch=members[0]["best_epoch"], metrics=members[0]["metrics"])
        select_final(summary, final, run_dir=run_dir, where=f"at epoch {final['best_epoch']}")
        return
    for member in members:
        if "metrics" in member:
            print(f"final retrain, seed {member['seed']}: {OBJECTIVE} "
                  f"{member['metrics'][OBJECTIVE]:.3f} mm at epoch {member['best_epoch']}")
    final["members"] = members
    ensemble_final(summary, final, combine=settings.final_combine, run_dir=run_dir, name=name,
                   data=data, callback=callback)


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
    its metrics. The folder is written beside ``destination`` and swapped in whole."""
    from biometry.inference import LandmarkPredictor, ensemble_of, save_model_folder
    from trainables.train import validate_into_spec

    model, spec = ensemble_of(folders, combine=combine)
    metrics = validate_into_spec(LandmarkPredictor(model, spec), data.val)
    atomic.write_dir(destination, lambda folder: save_model_folder(folder, model, spec))
    return reported_metrics(metrics)
