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

Per-trial overhead (the headline): in steady state the search finishes one trial per period
(the time between two trials' last reports, from Ray's event files, sub-millisecond). Take off
that trial's training time (the trainer's ``epoch_seconds`` summed) and what is left is the
search's per-trial cost plus the trial's own set-up (model, DataLoader worker, checkpoints); the
plain loop's trials pay the same set-up, so the overhead is the median non-training time per
trial in the search minus the same in the plain loop. This cancels the training time, which
moves with the machine's load by far more than the overhead does. Cross-checks: the naive
period minus plain trial time, and the slope of the search's wall time over the number of trials
(1 and N). The fixed overhead is what is left of the 1-trial search once one period and the
plain loop's own start-up (interpreter, imports, data) are taken off. Targets: per-trial
overhead under 3 s, and under 5% of a one-minute trial (``overhead_s / 60``).

Variants: ``shipped`` is the product as it is; ``reuse_actors`` is a what-if in which the
benchmark's search driver patches ``TuneConfig(reuse_actors=True)`` into ``search.tune_api``
(the product passes False, so every trial starts a new Ray worker process).

``--analyze-only`` recomputes the figures from the raw runs kept in the JSON.
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

from benchmarks._common import (  # noqa: E402
    HC18_DIR, RESULTS_DIR, LoadWindow, fixed_space, log, median, read_trial_results,
    run_search_command, write_result, write_search_files)

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
    p.add_argument("--smoke", action="store_true",
                   help="'short' only, 2 trials of 1 epoch, 1 repeat")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (tests; Ray started here if needed)")
    p.add_argument("--variants", nargs="*", default=["shipped", "reuse_actors"],
                   choices=["shipped", "reuse_actors"],
                   help="shipped: the product as it is; reuse_actors: what-if with "
                        "TuneConfig(reuse_actors=True) patched in by the benchmark's driver")
    p.add_argument("--analyze-only", action="store_true",
                   help="recompute the figures from the raw runs kept in OUT_DIR's JSON")
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)  # internal: JSON job file
    args = p.parse_args(argv)
    if args.smoke:
        args.configs, args.trials, args.epochs, args.repeats = ["short"], 2, 1, 1
        args.variants = ["shipped"]
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


def run_search(trial: dict, n: int, folder: Path, name: str, *, in_process: bool = False,
               reuse_actors: bool = False) -> dict:
    epochs = trial["train"]["epochs"]
    preset = write_search_files(folder / name, trial=trial, space=fixed_space(FIXED_VALUES),
                                search={"num_samples": n, "grace_period": epochs,
                                        "reduction_factor": 2, "max_concurrent_trials": 1,
                                        "cpus_per_trial": 1, "gpus_per_trial": 0,
                                        "n_startup_trials": 1, "seed": 0})
    result = run_search_command(preset=preset, out=folder / "runs", name=name,
                                log_path=folder / f"{name}.log", in_process=in_process,
                                reuse_actors=reuse_actors)
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
    plain: list[dict] = []
    searches: dict[str, dict[str, list]] = {v: {"1": [], "n": []} for v in args.variants}
    for r in range(args.repeats):  # interleaved, so a change of load hits every kind
        log(f"{key} repeat {r + 1}/{args.repeats}: plain loop of {n}")
        plain.append(run_plain(trial, n, folder, in_process=args.in_process))
        log(f"  plain {plain[-1]['wall_s']:.1f}s (trials "
            f"{[round(x, 2) for x in plain[-1]['trial_wall_s']]})")
        for variant in args.variants:
            for count, slot in ((1, "1"), (n, "n")):
                result = run_search(trial, count, folder, f"{key}-{variant}-{count}-r{r}",
                                    in_process=args.in_process,
                                    reuse_actors=variant == "reuse_actors")
                searches[variant][slot].append(result)
                log(f"  {variant} search of {count}: {result['wall_s']:.1f}s; periods "
                    f"{[round(g, 2) for g in result['trial_period_s']]}")
    raw = {v: {"search_1": runs["1"], f"search_{n}": runs["n"]} for v, runs in searches.items()}
    return config_figures(key, trial, n, plain, raw)


def config_figures(key: str, trial: dict, n: int, plain: list[dict],
                   searches: dict[str, dict[str, list]]) -> dict:
    """Figures of one config from its raw runs (also used by ``--analyze-only``)."""
    plain_trial_s = median(w for p in plain for w in p["trial_wall_s"])
    plain_nontraining_s = median(w - e for p in plain
                                 for w, e in zip(p["trial_wall_s"], p["epoch_seconds_sum"]))
    plain_fixed_s = median(p["fixed_s"] for p in plain)
    variants = {v: variant_figures(runs["search_1"], runs[f"search_{n}"], n=n,
                                   plain_trial_s=plain_trial_s, plain_fixed_s=plain_fixed_s,
                                   plain_nontraining_s=plain_nontraining_s)
                for v, runs in searches.items()}
    for v, fig in variants.items():
        log(f"{key} {v}: overhead {fig['per_trial_overhead_s']:.2f}s per trial "
            f"({fig['per_trial_overhead_share_of_60s_trial']:.1%} of a 60 s trial; non-training "
            f"time per trial {fig['search_nontraining_s']:.2f}s in the search vs "
            f"{plain_nontraining_s:.2f}s plain); period {fig['search_trial_period_s']:.2f}s vs "
            f"plain trial {plain_trial_s:.2f}s; life in Ray "
            f"{fig['decomposition_s']['trial_life_in_ray']:.2f}s + gap "
            f"{fig['decomposition_s']['gap_between_trials']:.2f}s; fixed "
            f"{fig['fixed_overhead_s']:.1f}s")
    return {"config": key, "trial": trial, "fixed_values": FIXED_VALUES, "trials_per_search": n,
            "plain_trial_s": plain_trial_s, "plain_nontraining_s_per_trial": plain_nontraining_s,
            "plain_fixed_s": plain_fixed_s,
            "plain_training_seconds_per_trial": median(x for p in plain
                                                       for x in p["epoch_seconds_sum"]),
            "variants": variants,
            "target_met_as_shipped": variants.get("shipped", {}).get("target", {}).get("met"),
            "plain_runs": plain}


def variant_figures(search_1: list[dict], search_n: list[dict], *, n: int,
                    plain_trial_s: float, plain_fixed_s: float,
                    plain_nontraining_s: float) -> dict:
    """Headline: what a trial costs beyond its training, in the search minus in the plain loop.

    In steady state the search finishes one trial per period (end to end, from Ray's event
    files); take off that trial's own training time (the trainer's ``epoch_seconds`` summed) and
    what is left is the search's per-trial cost plus the trial's set-up (model, DataLoader
    worker, checkpoints). The plain loop's trials pay the same set-up, so subtracting their
    non-training time leaves the search's own overhead. Training time itself moves with the
    machine's load by far more than the overhead; this difference cancels it.
    """
    nontraining = []  # period k ends with trial k+1 (trials in start order, one at a time)
    for run in search_n:
        nontraining += [p - e for p, e in zip(run["trial_period_s"], run["epoch_seconds_sum"][1:])]
    search_nontraining = median(nontraining)
    per_trial = search_nontraining - plain_nontraining_s
    period = median(x for s in search_n for x in s["trial_period_s"])
    slopes = [(sn["wall_s"] - s1["wall_s"]) / (n - 1) for s1, sn in zip(search_1, search_n)]
    slope = median(slopes)
    # fixed: a 1-trial search less one trial's period, less the plain loop's own start-up
    fixed = median(s1["wall_s"] for s1 in search_1) - period - plain_fixed_s
    met = per_trial < TARGET_OVERHEAD_S and per_trial / 60 < TARGET_SHARE_OF_MINUTE
    return {
        "per_trial_overhead_s": per_trial,
        "per_trial_overhead_share_of_this_trial": per_trial / plain_trial_s,
        "per_trial_overhead_share_of_60s_trial": per_trial / 60.0,
        "search_nontraining_s": search_nontraining,
        "search_nontraining_s_per_period": nontraining,
        "search_trial_period_s": period,
        "naive_period_minus_plain_trial_s": period - plain_trial_s,
        "decomposition_s": {
            "trial_life_in_ray": median(x for s in search_1 + search_n for x in s["trial_life_s"]),
            "gap_between_trials": median(x for s in search_n for x in s["between_trial_gap_s"]),
            "note": "life = the driver starts the trial -> its last report; gap = last report "
                    "-> the driver starts the next trial (event-file wall times)"},
        "cross_check_wall_slope": {
            "search_wall_per_extra_trial_s": slope, "per_trial_overhead_s": slope - plain_trial_s,
            "slopes_s": slopes,
            "note": "(wall of N-trial search - wall of 1-trial search) / (N-1) - plain trial: "
                    "includes the end-of-search summary per trial, the start-up noise of two Ray "
                    "clusters and the load's effect on training time"},
        "fixed_overhead_s": fixed,
        "training_seconds_per_trial": median(x for s in search_1 + search_n
                                             for x in s["epoch_seconds_sum"]),
        "target": {"per_trial_overhead_below_s": TARGET_OVERHEAD_S,
                   "share_of_60s_trial_below": TARGET_SHARE_OF_MINUTE, "met": met},
        "runs": {"search_1": search_1, f"search_{n}": search_n},
    }


def analyze_only(args) -> int:
    """Recompute the figures from the raw runs in an existing ``search_overhead.json``."""
    path = args.out_dir / ("search_overhead.smoke.json" if args.smoke else "search_overhead.json")
    old = json.loads(path.read_text())
    rows = []
    for c in old["configs"]:
        n = c["trials_per_search"]
        rows.append(config_figures(c["config"], c["trial"], n, c["plain_runs"],
                                   {v: f["runs"] for v, f in c["variants"].items()}))
    payload = {k: v for k, v in old.items()
               if k not in ("benchmark", "smoke", "command", "machine", "configs")}
    payload.update(configs=rows, measured={"command": old["command"], "machine": old["machine"]},
                   met_as_shipped=all(r["target_met_as_shipped"] for r in rows)
                   if "shipped" in old["settings"]["variants"] else None)
    out = write_result("search_overhead", payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"rewrote {out} from its raw runs")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    if args.analyze_only:
        return analyze_only(args)
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
        "settings": {"configs": args.configs, "repeats": args.repeats, "variants": args.variants,
                     "concurrency": 1, "cpus_per_trial": 1, "asha": "off (grace_period = epochs)",
                     "ray": "a fresh private local cluster per search, no dashboard "
                            "(benchmarks/_common.py search driver)",
                     "tracking": "MLflow SQLite store in the run folder (the default)"},
        "targets": {"per_trial_overhead_below_s": TARGET_OVERHEAD_S,
                    "share_of_60s_trial_below": TARGET_SHARE_OF_MINUTE},
        "configs": rows,
        "met_as_shipped": all(r["target_met_as_shipped"] for r in rows)
        if "shipped" in args.variants else None,
        "wall_s": time.time() - started,
    }
    path = write_result("search_overhead", payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
