"""Accuracy end to end: one search on HC18, its best model, evaluated on the held-out test subjects.

    python benchmarks/accuracy.py --data ../shared/data/hc18 --preset cpu --time-budget-min 60

Runs ``search/run.py`` (the test split never reaches it; with the preset's ``final_epochs`` it
ends with a final retrain of the best config), then ``python -m biometry evaluate --split test`` on
the model it selected on validation (``best/``, or ``final/`` when the retrain validates
better), and writes ``benchmarks/results/accuracy_<preset>.json`` with the figures, the targets of
issue 11, the commands and the machine. ``--resume`` continues the search of ``--name``
(for a finished search: only its missing final retrain) before evaluating.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"cpu": {"bpd_l1_mm": 1.0, "ofd_l1_mm": 1.6, "hc_l1_mm": 3.0},
           "gpu": {"bpd_l1_mm": 1.0, "ofd_l1_mm": 1.5, "hc_l1_mm": 2.0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/hc18"))
    p.add_argument("--preset", default="cpu")
    p.add_argument("--time-budget-min", type=float, default=60.0)  # str() as when typed
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--name", default=time.strftime("accuracy-%Y%m%d-%H%M%S"))
    p.add_argument("--out", default=str(REPO / "runs"))
    p.add_argument("--resume", action="store_true",
                   help="continue the search --name (a finished one: only what follows it, the "
                        "final retrain), then evaluate")
    p.add_argument("--flip-tta", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help="evaluate with this post-processing change (evaluate --set); repeatable")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))

    run_dir = Path(args.out) / args.name
    search_cmd = [sys.executable, "search/run.py", "--data", args.data, "--preset", args.preset,
                  "--time-budget-min", str(args.time_budget_min), "--num-samples",
                  str(args.num_samples), "--out", args.out, "--name", args.name]
    started = time.time()
    load_start = os.getloadavg()
    resume_cmd = [sys.executable, "search/run.py", "--resume", "--out", args.out, "--name",
                  args.name]
    subprocess.run(resume_cmd if args.resume else search_cmd, cwd=REPO, check=True)
    search_seconds = time.time() - started

    search = json.loads((run_dir / "summary.json").read_text())
    # the model the search selected on validation: best/ or, after a better final retrain, final/
    model = search.get("selected_model", str(run_dir / "best"))
    eval_dir = run_dir / "test-eval"
    eval_cmd = [sys.executable, "-m", "biometry", "evaluate", "--model", model,
                "--data", args.data, "--split", "test", "--out", str(eval_dir)]
    eval_cmd += inference_flags(args)
    subprocess.run(eval_cmd, cwd=REPO, check=True)
    test = json.loads((eval_dir / "summary.json").read_text())
    base = evaluate_base_trial(run_dir, search, args)

    keys = ("bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "bpd_median_mm", "ofd_median_mm",
            "hc_median_mm", "hc_bias_mm", "hc_loa_low_mm", "hc_loa_high_mm", "nme",
            "unc_spearman", "aurc", "error_at_90_coverage_mm")
    targets = TARGETS.get(args.preset, TARGETS["cpu"])
    result = {
        "commands": [" ".join(search_cmd), " ".join(eval_cmd)],
        "resumed_with": " ".join(resume_cmd) if args.resume else None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "mlflow": mlflow_ids(search),
        "search_minutes": round(search_seconds / 60, 1),
        "num_trials": search.get("num_trials"), "trial_states": search.get("trial_states"),
        "best_params": search.get("params"), "best_val": search.get("metrics"),
        "selected_model": model, "final_retrain": search.get("final"),
        "test": {k: test.get(k) for k in keys}, "test_images": test.get("n_images"),
        "targets": targets,
        "targets_met": {k: bool(test.get(k) is not None and test[k] <= v)
                        for k, v in targets.items()},
        "base_trial": base,
    }
    out = REPO / "benchmarks/results" / f"accuracy_{args.preset}.json"
    if args.resume and out.is_file():  # keep the search's own time and machine figures
        earlier = json.loads(out.read_text())
        if earlier.get("commands", [""])[0] == result["commands"][0]:
            result["resume_minutes"] = result["search_minutes"]
            result["resume_machine"] = result["machine"]
            for key in ("search_minutes", "machine"):
                result[key] = earlier.get(key, result[key])
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["test"], indent=2))
    print(f"targets met: {result['targets_met']}; wrote {out}")
    return 0


KEYS = ("bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "bpd_median_mm", "ofd_median_mm", "hc_median_mm")


def find_base_trial(run_dir: Path) -> Path | None:
    """The trial whose sampled values all equal the preset's own config (the enqueued first
    trial), read from ``search.json`` and each trial's ``params.json``."""
    sys.path.insert(0, str(REPO))
    from trainables.config import config_from_dict

    base = config_from_dict(json.loads((run_dir / "search.json").read_text())["trial"]).flat()
    for params_file in sorted(run_dir.glob("trial_*/params.json")):
        params = json.loads(params_file.read_text())
        # the sampler's own names and the post-processing variants are not the config's values
        plain = {k: v for k, v in params.items() if "@" not in k and k != "inference.sweep"}
        if plain and all(_same(base.get(k), v) for k, v in plain.items()):
            return params_file.parent
    return None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def inference_flags(args) -> list[str]:
    """The evaluate options this benchmark passes on to every evaluation."""
    flags = ["--set", "flip_tta=on"] if args.flip_tta else []
    for setting in args.set:
        flags += ["--set", setting]
    return flags


def evaluate_base_trial(run_dir: Path, search: dict, args) -> dict | None:
    """The search's first trial is the preset's own config (enqueued): evaluate its best
    checkpoint on the test split too, so the JSON says what the search added over it."""
    from search.results import best_checkpoint_folder

    trial_dir = find_base_trial(run_dir)
    if trial_dir is None:
        return {"note": "no trial ran the preset's own config"}
    trial_id = trial_dir.name.removeprefix("trial_")
    checkpoint = best_checkpoint_folder(trial_dir, search.get("objective", "val_measure_l1_mm"))
    if checkpoint is None:
        return {"trial_id": trial_id, "note": "no finished checkpoint"}
    selected_best = Path(search.get("selected_model", run_dir / "best")) == run_dir / "best"
    if trial_id == search.get("best_trial_id") and selected_best:
        return {"trial_id": trial_id, "is_best": True, "checkpoint": str(checkpoint),
                "note": "the preset's own config was the search's best; see test"}
    out = run_dir / "test-eval-base"
    subprocess.run([sys.executable, "-m", "biometry", "evaluate", "--model", str(checkpoint),
                    "--data", args.data, "--split", "test", "--out", str(out), "--atlas", "0",
                    *inference_flags(args)], cwd=REPO, check=True)
    summary = json.loads((out / "summary.json").read_text())
    import yaml

    metrics = (yaml.safe_load((checkpoint / "model.yaml").read_text()) or {}).get("metrics") or {}
    return {"trial_id": trial_id, "is_best": False, "checkpoint": str(checkpoint),
            "val_measure_l1_mm": metrics.get("val_measure_l1_mm"),
            "test": {k: summary.get(k) for k in KEYS}}


def mlflow_ids(search: dict) -> dict:
    """The search's parent run, the best trial's run and the final retrain's runs (a seed's
    each, and their ensemble's) in its MLflow store."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(search["tracking_uri"])
        experiment = client.get_experiment_by_name(search["search"])
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parent = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags]
        best = [r.info.run_id for r in runs
                if r.data.tags.get("ray_trial_id") == search.get("best_trial_id")]
        final = [r.info.run_id for r in runs if r.data.tags.get("role") == "final"]
        ensemble = [r.info.run_id for r in runs if r.data.tags.get("role") == "final_ensemble"]
        return {"tracking_uri": search["tracking_uri"], "experiment": search["search"],
                "parent_run_id": parent[0] if parent else None,
                "best_trial_run_id": best[0] if best else None,
                "final_retrain_run_id": final[0] if final else None,
                "final_retrain_run_ids": final,  # one per seed with search.final_seeds
                "final_ensemble_run_id": ensemble[0] if ensemble else None}
    except Exception as err:  # the figures matter more than the ids
        return {"error": f"{type(err).__name__}: {err}"}


if __name__ == "__main__":
    sys.exit(main())
