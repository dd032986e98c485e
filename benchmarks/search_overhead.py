"""What our search costs on top of training: per-trial and fixed overhead of ``search/run.py``.

    python benchmarks/search_overhead.py                      # short and long configs
    python benchmarks/search_overhead.py --configs short --repeats 3
    python benchmarks/search_overhead.py --smoke              # about a minute; *.smoke.json

The same fixed trial config is run N times two ways, each in a fresh process as a user would:

- ``search``: ``python search/run.py`` with a preset and a space written to a temporary folder,
  every parameter with a single choice, one trial at a time (``max_concurrent_trials: 1``, one
  CPU per trial) and ASHA switched off (``grace_period`` = epochs, so no rung is ever reached).
  This includes Ray, the Optuna journal study, MLflow parent/child runs, checkpoints through Ray
  storage and the summary with the exported best model.
- ``plain``: this script's ``--plain-worker`` mode: import, ``prepare_splits`` once, then N
  calls of ``trainables.train.run_trial`` (which also writes its checkpoint every epoch).

Per-trial overhead is the slope of the search's wall time over the number of trials (runs with
1 and N trials) minus the plain loop's median trial time; the fixed overhead is what is left of
the 1-trial search once the plain loop's own start-up (imports, data) is taken off. A second,
independent estimate of the per-trial cost comes from Ray's own files: the gap between one
trial's last report and the next trial's first epoch start. Targets: per-trial overhead under
3 s, and under 5% of a one-minute trial (``overhead_s / 60``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (HC18_DIR, RESULTS_DIR, LoadWindow, fixed_space, log, median,  # noqa: E402
                                read_trial_results, run_search_command, write_result,
                                write_search_files)

TARGET_OVERHEAD_S = 3.0
TARGET_SHARE_OF_MINUTE = 0.05

# The trial configs (a trial-config dict; "data" filled in at run time) and the fixed sampled
# values put in the single-choice space (the keys the smoke/cpu spaces search).
CONFIGS = {
    # a few seconds: overhead dominates, the worst case for the search
    "short": {"data": "synthetic", "trials": 6, "trial": {
        "data": {"input_h": 64, "input_w": 96},
        "model": {"name": "unet", "width": 8, "depth": 3, "output_stride": 2},
        "train": {"epochs": 2, "batch_size": 8, "num_workers": 1, "threads": 1,
                  "device": "cpu"}}},
    # about 20-30 s on 2 cores: 8 epochs of the real HC18 folder at 64x96
    "long": {"data": "hc18", "trials": 3, "trial": {
        "data": {"input_h": 64, "input_w": 96},
        "model": {"name": "unet", "width": 8, "depth": 3, "output_stride": 2},
        "train": {"epochs": 8, "batch_size": 16, "num_workers": 1, "threads": 1,
                  "device": "cpu"}}},
}
FIXED_VALUES = {"model.name": "unet", "train.lr": 2.0e-3, "augment.rotate_deg": 10.0,
                "loss.angle_weight": 0.01}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["short", "long"], choices=sorted(CONFIGS))
    p.add_argument("--trials", type=int, help="N trials per search (default: per config)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: per config)")
    p.add_argument("--repeats", type=int, default=2, help="repeats; medians are reported")
    p.add_argument("--hc18", default=str(HC18_DIR), help="HC18 folder for the 'long' config")
    p.add_argument("--work-dir", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="'short' only, 2 trials of 1 epoch, 1 repeat")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (tests; Ray started here if needed)")
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)  # internal: JSON job file
    args = p.parse_args(argv)
    if args.smoke:
        args.configs, args.trials, args.epochs, args.repeats = ["short"], 2, 1, 1
    return args


def trial_dict(config: dict, data_path: str) -> dict:
    """The preset's trial section with the fixed values applied (what every trial trains)."""
    from trainables.config import set_dotted

    trial = json.loads(json.dumps(config["trial"]))
    trial["data"]["path"] = data_path
    for key, value in FIXED_VALUES.items():
        set_dotted(trial, key, value)
    return trial


def plain_worker(job_path: str) -> int:
    """Internal: the plain loop in a fresh process; prints one JSON line of timings."""
    started = time.perf_counter()
    job = json.loads(Path(job_path).read_text())
    print("PLAIN " + json.dumps(plain_loop(job, started=started)), flush=True)
    return 0


def plain_loop(job: dict, *, started: float) -> dict:
    from trainables.config import config_from_dict
    from trainables.data import prepare_splits
    from trainables.train import keep_checkpoint, run_trial

    imported = time.perf_counter()
    cfg = config_from_dict(job["trial"], source="plain loop")
    data = prepare_splits(cfg.data)
    prepared = time.perf_counter()
    trials = []
    for i in range(job["trials"]):
        epoch_seconds: list[float] = []
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="plain-trial-") as out:

            def report(metrics: dict, checkpoint: Path, out=Path(out)) -> None:
                # what run_trial does without a reporter: keep the checkpoint and best model
                epoch_seconds.append(metrics["epoch_seconds"])
                keep_checkpoint(checkpoint, out, is_best=metrics["best_epoch"] == metrics["epoch"])

            run_trial(cfg, data=data, out_dir=out, reporter=report, log=lambda m: None)
        trials.append({"wall_s": time.perf_counter() - t0, "epoch_seconds": epoch_seconds})
    return {"import_s": imported - started, "prepare_s": prepared - imported, "trials": trials}


def run_plain(trial: dict, n: int, folder: Path, *, in_process: bool = False) -> dict:
    job = folder / "plain_job.json"
    job.write_text(json.dumps({"trial": trial, "trials": n}))
    with LoadWindow() as window:
        t0 = time.perf_counter()
        if in_process:  # smoke tests only: no interpreter start-up in the fixed cost
            out = plain_loop(json.loads(job.read_text()), started=t0)
        else:
            proc = subprocess.run([sys.executable, __file__, "--plain-worker", str(job)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"plain loop failed:\n{proc.stderr[-2000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("PLAIN "))
            out = json.loads(line[len("PLAIN "):])
        wall = time.perf_counter() - t0
    trial_walls = [t["wall_s"] for t in out["trials"]]
    return {"wall_s": wall, "trial_wall_s": trial_walls,
            "fixed_s": wall - sum(trial_walls),  # interpreter, imports, data, exit
            "epoch_seconds_sum": [sum(t["epoch_seconds"]) for t in out["trials"]],
            "import_s": out["import_s"], "prepare_s": out["prepare_s"], **window.as_dict()}


def run_search(trial: dict, n: int, folder: Path, name: str, *, in_process: bool = False) -> dict:
    epochs = trial["train"]["epochs"]
    preset = write_search_files(folder / name, trial=trial, space=fixed_space(FIXED_VALUES),
                                search={"num_samples": n, "grace_period": epochs,
                                        "reduction_factor": 2, "max_concurrent_trials": 1,
                                        "cpus_per_trial": 1, "gpus_per_trial": 0,
                                        "n_startup_trials": 1, "seed": 0})
    result = run_search_command(preset=preset, out=folder / "runs", name=name,
                                log_path=folder / f"{name}.log", in_process=in_process)
    trials = read_trial_results(Path(result["run_dir"]))
    if len(trials) != n or any(len(t["rows"]) != epochs for t in trials):
        raise RuntimeError(f"{name}: expected {n} trials of {epochs} epochs, got "
                           f"{[len(t['rows']) for t in trials]}")
    # from Ray's files: one trial after another, the period between two trials' ends is what a
    # trial costs in steady state; its life in Ray (start to last report) and the gap after it
    ends = [t["end"] for t in trials]
    result.update(trials=n, epoch_seconds_sum=[sum(r["epoch_seconds"] for r in t["rows"])
                                               for t in trials],
                  trial_period_s=[b - a for a, b in zip(ends, ends[1:])],
                  trial_life_s=[t["end"] - t["start"] for t in trials],
                  between_trial_gap_s=[b["start"] - a["end"] for a, b in zip(trials, trials[1:])])
    return result


def measure_config(key: str, args, folder: Path, data_paths: dict) -> dict:
    config = CONFIGS[key]
    n = args.trials or config["trials"]
    trial = trial_dict(config, data_paths[config["data"]])
    if args.epochs:
        trial["train"]["epochs"] = args.epochs
    plain, search_1, search_n = [], [], []
    for r in range(args.repeats):  # interleaved, so a change of load hits every kind
        log(f"{key} repeat {r + 1}/{args.repeats}: plain loop of {n}")
        plain.append(run_plain(trial, n, folder, in_process=args.in_process))
        log(f"  plain {plain[-1]['wall_s']:.1f}s (trials {plain[-1]['trial_wall_s']}); "
            f"search of 1")
        search_1.append(run_search(trial, 1, folder, f"{key}-1-r{r}", in_process=args.in_process))
        log(f"  search of 1 {search_1[-1]['wall_s']:.1f}s; search of {n}")
        search_n.append(run_search(trial, n, folder, f"{key}-{n}-r{r}", in_process=args.in_process))
        log(f"  search of {n} {search_n[-1]['wall_s']:.1f}s; periods "
            f"{[round(g, 2) for g in search_n[-1]['trial_period_s']]}")
    plain_trial_s = median(w for p in plain for w in p["trial_wall_s"])
    # headline: steady-state period between trial ends in the N-trial searches (Ray's files)
    period = median(x for s in search_n for x in s["trial_period_s"])
    per_trial = period - plain_trial_s
    # cross-check: slope of the end-to-end wall time over the number of trials
    slopes = [(sn["wall_s"] - s1["wall_s"]) / (n - 1) for s1, sn in zip(search_1, search_n)]
    slope = median(slopes)
    # fixed: a 1-trial search less one trial's period, less the plain loop's own start-up
    fixed = median(s1["wall_s"] for s1 in search_1) - period - median(p["fixed_s"] for p in plain)
    life = median(x for s in search_1 + search_n for x in s["trial_life_s"])
    gap = median(x for s in search_n for x in s["between_trial_gap_s"])
    in_trial_plain = median(x for p in plain for x in p["epoch_seconds_sum"])
    in_trial_search = median(x for s in search_1 + search_n for x in s["epoch_seconds_sum"])
    met = per_trial < TARGET_OVERHEAD_S and per_trial / 60 < TARGET_SHARE_OF_MINUTE
    row = {
        "config": key, "trial": trial, "fixed_values": FIXED_VALUES, "trials_per_search": n,
        "plain_trial_s": plain_trial_s,
        "search_trial_period_s": period,
        "per_trial_overhead_s": per_trial,
        "per_trial_overhead_share_of_this_trial": per_trial / plain_trial_s,
        "per_trial_overhead_share_of_60s_trial": per_trial / 60.0,
        "decomposition_s": {"trial_life_in_ray": life, "gap_between_trials": gap,
                            "note": "life = params.json written -> last report; gap = last "
                                    "report -> next trial's params.json"},
        "cross_check_wall_slope": {"search_wall_per_extra_trial_s": slope,
                                   "per_trial_overhead_s": slope - plain_trial_s,
                                   "note": "(wall of N-trial search - wall of 1-trial search) / "
                                           "(N-1): includes the end-of-search summary per trial "
                                           "and the start-up noise of two Ray clusters"},
        "fixed_overhead_s": fixed,
        "training_seconds_per_trial": {"plain": in_trial_plain, "search": in_trial_search,
                                       "note": "sum of the trainer's epoch_seconds: the "
                                               "training itself, inside and outside Ray"},
        "target": {"per_trial_overhead_below_s": TARGET_OVERHEAD_S,
                   "share_of_60s_trial_below": TARGET_SHARE_OF_MINUTE, "met": met},
        "runs": {"plain": plain, "search_1": search_1, f"search_{n}": search_n,
                 "slopes_s": slopes},
    }
    log(f"{key}: plain trial {plain_trial_s:.2f}s; search period {period:.2f}s per trial -> "
        f"overhead {per_trial:.2f}s ({per_trial / plain_trial_s:.0%} of this trial, "
        f"{per_trial / 60:.1%} of a 60 s trial); wall slope {slope:.2f}s; life in Ray "
        f"{life:.2f}s + gap {gap:.2f}s; fixed {fixed:.1f}s")
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    from biometry.io import write_synthetic_dataset

    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-overhead-")
        args.work_dir = Path(tmp.name)
    folder = args.work_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data_paths = {"synthetic": str(write_synthetic_dataset(folder / "synthetic", n=24, seed=0)),
                  "hc18": str(Path(args.hc18).resolve())}
    started = time.time()
    rows = [measure_config(key, args, folder, data_paths) for key in args.configs]
    payload = {
        "settings": {"configs": args.configs, "repeats": args.repeats,
                     "concurrency": 1, "cpus_per_trial": 1, "asha": "off (grace_period = epochs)",
                     "ray": "a fresh local cluster per search (RAY_ADDRESS=local)",
                     "tracking": "MLflow SQLite store in the run folder (the default)"},
        "targets": {"per_trial_overhead_below_s": TARGET_OVERHEAD_S,
                    "share_of_60s_trial_below": TARGET_SHARE_OF_MINUTE},
        "configs": rows,
        "met": all(r["target"]["met"] for r in rows),
        "wall_s": time.time() - started,
    }
    path = write_result("search_overhead", payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
