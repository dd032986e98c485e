"""Best validation error over compute: our TPE + ASHA against random search and plain Optuna.

    python benchmarks/search_efficiency.py --seeds 0 1 2 --budget-min 4     # ~30 min on 2 cores
    python benchmarks/search_efficiency.py --analyze-only --work-dir DIR     # JSON + PNG again
    python benchmarks/search_efficiency.py --smoke                          # about a minute

Three methods search the same space (``--space``, default ``configs/search/default.yaml``, with
every architecture's width fixed to ``--width`` to keep trials small) on the real HC18 folder at
``--input-hw`` for ``--epochs`` epochs, each for ``--budget-min`` minutes per seed:

- ``ours``: ``search/run.py`` (Ray Tune, prune-aware Optuna TPE, ASHA, MLflow) with the cpu
  preset's search settings (2 trials at once, ``n_startup_trials`` 8, reduction factor 3) and a
  grace period scaled by the cpu preset's grace_period / epochs, run in a fresh process with a
  private Ray cluster (see ``benchmarks/_common.py``).
- ``random``: a plain Optuna loop, ``RandomSampler(seed)``, no early stopping: every trial
  trains all its epochs.
- ``tpe_median``: plain Optuna, ``TPESampler(seed)`` (Optuna 5 defaults) with its
  ``MedianPruner()`` (defaults), no Ray: a define-by-run objective calling
  ``trainables.train.run_trial`` whose reporter calls ``trial.report`` / ``should_prune`` and
  raises ``optuna.TrialPruned``.

Per seed, ``ours`` runs alone (its two trials use both cores), then ``random`` and
``tpe_median`` run side by side (one core each), so each phase loads the machine alike. Compute
is counted in trained epochs (the primary axis: independent of the machine's load) and in
trial-seconds (the trainer's ``epoch_seconds`` summed). A method's curve is the best
``val_measure_l1_mm`` of any epoch reported so far against the compute spent so far. Target:
``ours`` reaches the best value ``random`` ends with using at most half of ``random``'s compute.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    HC18_DIR, REPO_ROOT, RESULTS_DIR, LoadWindow, load_average, log, machine_info, median,
    read_trial_results, run_search_command, write_result, write_search_files)

METHODS = ("ours", "random", "tpe_median")
LABELS = {"ours": "ours: TPE + ASHA (Ray Tune)", "random": "random search, full trials",
          "tpe_median": "plain Optuna TPE + MedianPruner"}
TARGET_COMPUTE_FRACTION = 0.5


class BudgetSpent(Exception):
    """The plain loop's time budget ran out in the middle of a trial."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HC18_DIR), help="HC18 folder or landmark CSV")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--budget-min", type=float, default=4.0, help="minutes per method per seed")
    p.add_argument("--epochs", type=int, default=8, help="epochs of a full trial")
    p.add_argument("--input-hw", default="64x96", help="model input HxW")
    p.add_argument("--width", type=int, default=8,
                   help="fix every architecture's width to this (0: the space's own ranges)")
    p.add_argument("--space", default="configs/search/default.yaml")
    p.add_argument("--drop-keys", nargs="*", default=[],
                   help="space keys left out (the recorded run left out loss.bpd_channel_weight, "
                        "which made every Ray trial fail before commit f6176cc)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--concurrency", type=int, default=2, help="ours: trials at once")
    p.add_argument("--max-trials", type=int, default=0,
                   help="also stop each method after this many trials (0: budget only)")
    p.add_argument("--sequential-plain", action="store_true",
                   help="run random and tpe_median one after the other (default: side by side)")
    p.add_argument("--work-dir", type=Path, help="run folders and raw events (default: temp)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--analyze-only", action="store_true",
                   help="re-read WORK_DIR/events/*.json and write the JSON and PNG")
    p.add_argument("--smoke", action="store_true", help="synthetic data, seconds of budget")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (tests; Ray started here if needed)")
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)  # internal: JSON job file
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.budget_min, args.epochs, args.width, args.max_trials = [0], 5, 1, 4, 2
        args.input_hw, args.data = "64x96", "synthetic"
    return args


def parse_hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def base_trial(args, data: str) -> dict:
    """The trial config every method starts from (the cpu preset's, made small)."""
    from search.cli import load_preset

    trial = load_preset("cpu").trial
    h, w = parse_hw(args.input_hw)
    trial["data"] = {**trial.get("data", {}), "path": data, "input_h": h, "input_w": w}
    trial["model"] = {**trial["model"], "width": args.width or trial["model"]["width"], "depth": 3}
    trial["train"] = {**trial["train"], "epochs": args.epochs, "device": "cpu"}
    return trial


def space_dict(args) -> dict:
    """``--space`` with every ``model.width`` fixed to ``--width`` (if given)."""
    import yaml

    path = Path(args.space)
    raw = yaml.safe_load((path if path.is_absolute() else REPO_ROOT / path).read_text())
    for key in args.drop_keys:
        raw["params"].pop(key, None)
    if args.width:
        for branches in (raw.get("conditional") or {}).values():
            for params in branches.values():
                if "model.width" in params:
                    params["model.width"] = {"choices": [args.width]}
        if "model.width" in raw["params"]:
            raw["params"]["model.width"] = {"choices": [args.width]}
    return raw


def ours_settings(args) -> dict:
    from search.cli import load_preset

    preset = load_preset("cpu")
    cpu = preset.search
    grace = max(1, round(args.epochs * cpu.grace_period / preset.trial["train"]["epochs"]))
    return {"num_samples": args.max_trials or 100000, "grace_period": grace,
            "reduction_factor": cpu.reduction_factor, "max_concurrent_trials": args.concurrency,
            "cpus_per_trial": 1, "gpus_per_trial": 0, "n_startup_trials": cpu.n_startup_trials,
            "time_budget_min": args.budget_min}


# ---------------------------------------------------------------------------------------------
# the three methods


def run_ours(args, folder: Path, seed: int, data: str) -> dict:
    name = f"ours-s{seed}"
    search = {**ours_settings(args), "seed": seed}
    preset = write_search_files(folder / name, trial=base_trial(args, data), space=space_dict(args),
                                search=search)
    result = run_search_command(preset=preset, out=folder / "runs", name=name,
                                log_path=folder / f"{name}.log", in_process=args.in_process,
                                num_cpus=2)
    events = []
    for number, trial in enumerate(read_trial_results(Path(result["run_dir"]))):
        for row in trial["rows"]:
            events.append({"trial": number, "epoch": row["epoch"], "value": row["value"],
                           "epoch_seconds": row["epoch_seconds"], "time": row["time"]})
    return {"method": "ours", "seed": seed, "settings": search, "events": events,
            "wall_s": result["wall_s"], "load_before": result["load_before"],
            "load_after": result["load_after"], "log": result["log"]}


def plain_worker(job_path: str) -> int:
    """Internal: one plain Optuna loop (``random`` or ``tpe_median``); writes its events."""
    job = json.loads(Path(job_path).read_text())
    result = plain_loop(job)
    Path(job["out"]).write_text(json.dumps(result))
    return 0


def plain_loop(job: dict) -> dict:

    import optuna

    from search.space import space_from_dict, trial_overrides
    from trainables.config import config_from_dict, with_overrides
    from trainables.data import prepare_splits
    from trainables.train import OBJECTIVE, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    method, seed, budget_s = job["method"], job["seed"], job["budget_s"]
    space = space_from_dict(job["space"], source="benchmark space")
    base = job["trial"]
    data = prepare_splits(config_from_dict(base, source="benchmark trial").data)
    if method == "random":
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    else:
        sampler, pruner = optuna.samplers.TPESampler(seed=seed), optuna.pruners.MedianPruner()
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    events: list[dict] = []
    load_before = load_average()
    started = time.time()
    deadline = started + budget_s

    def objective(trial: optuna.Trial) -> float:
        raw, _ = with_overrides(base, trial_overrides(space(trial)))  # as the search's trainable
        cfg = config_from_dict(raw, source="benchmark trial")

        def report(metrics: dict, _checkpoint: Path) -> None:
            value = float(metrics[OBJECTIVE])
            events.append({"trial": trial.number, "epoch": int(metrics["epoch"]), "value": value,
                           "epoch_seconds": float(metrics["epoch_seconds"]), "time": time.time()})
            if time.time() > deadline:
                raise BudgetSpent()
            if method == "tpe_median":
                trial.report(value, step=int(metrics["epoch"]))
                if trial.should_prune():
                    raise optuna.TrialPruned()

        with tempfile.TemporaryDirectory(prefix="bench-eff-") as out:
            best = run_trial(cfg, data=data, out_dir=out, reporter=report, log=lambda m: None)
        value = float(best.get(OBJECTIVE, math.nan))
        return value if math.isfinite(value) else float("inf")

    try:
        study.optimize(objective, timeout=budget_s, n_trials=job.get("max_trials"))
    except BudgetSpent:
        pass
    states = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"method": method, "seed": seed, "events": events, "wall_s": time.time() - started,
            "load_before": load_before, "load_after": load_average(), "trial_states": states,
            "settings": {"sampler": type(sampler).__name__, "pruner": type(pruner).__name__,
                         "sampler_seed": seed, "budget_s": budget_s,
                         "max_trials": job.get("max_trials")}}


def run_plain(args, folder: Path, seeds_methods: list[tuple[int, str]], data: str) -> list[dict]:
    """Plain loops, side by side in their own processes (or in this one for tests)."""
    jobs = []
    for seed, method in seeds_methods:
        job = {"method": method, "seed": seed, "budget_s": args.budget_min * 60,
               "max_trials": args.max_trials or None,
               "space": space_dict(args), "trial": base_trial(args, data),
               "out": str(folder / f"{method}-s{seed}.result.json")}
        job_path = folder / f"{method}-s{seed}.job.json"
        job_path.write_text(json.dumps(job))
        jobs.append((job, job_path))
    if args.in_process:
        return [plain_loop(job) for job, _ in jobs]
    results = []
    groups = [[j] for j in jobs] if args.sequential_plain else [jobs]
    for group in groups:
        procs = []
        for job, job_path in group:
            log_file = (folder / f"{job['method']}-s{job['seed']}.log").open("w")
            procs.append((subprocess.Popen([sys.executable, __file__, "--plain-worker",
                                            str(job_path)], stdout=log_file,
                                           stderr=subprocess.STDOUT, cwd=REPO_ROOT), job))
        for proc, job in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"{job['method']} seed {job['seed']} failed; see "
                                   f"{folder / (job['method'] + '-s' + str(job['seed']) + '.log')}")
            results.append(json.loads(Path(job["out"]).read_text()))
    return results


# ---------------------------------------------------------------------------------------------
# analysis


def curve(events: list[dict]) -> dict:
    """Best-so-far over cumulative epochs and trial-seconds, events in the order they happened."""
    events = sorted(events, key=lambda e: e["time"])
    epochs, seconds, best = [], [], []
    total_s, current = 0.0, math.inf
    for i, e in enumerate(events, start=1):
        total_s += e["epoch_seconds"]
        if math.isfinite(e["value"]):
            current = min(current, e["value"])
        epochs.append(i)
        seconds.append(total_s)
        best.append(current)
    return {"epochs": epochs, "trial_seconds": seconds, "best": best}


def compute_to_reach(c: dict, target: float, axis: str) -> float | None:
    for x, b in zip(c[axis], c["best"]):
        if b <= target:
            return x
    return None


def best_at(c: dict, budget: float, axis: str) -> float:
    values = [b for x, b in zip(c[axis], c["best"]) if x <= budget]
    return values[-1] if values else math.inf


def analyze(runs: list[dict]) -> dict:
    per_seed = []
    for seed in sorted({r["seed"] for r in runs}):
        by_method = {r["method"]: r for r in runs if r["seed"] == seed}
        curves = {m: curve(r["events"]) for m, r in by_method.items()}
        row: dict = {"seed": seed, "methods": {}}
        for m, c in curves.items():
            r = by_method[m]
            trials = {e["trial"] for e in r["events"]}
            row["methods"][m] = {
                "final_best": c["best"][-1] if c["best"] else None,
                "epochs": c["epochs"][-1] if c["epochs"] else 0,
                "trial_seconds": c["trial_seconds"][-1] if c["trial_seconds"] else 0.0,
                "trials_started": len(trials),
                "trials_full_length": sum(
                    1 for t in trials if max(e["epoch"] for e in r["events"] if e["trial"] == t)
                    >= max(e["epoch"] for e in r["events"])),
                "wall_s": r["wall_s"], "load_before": r["load_before"],
                "load_after": r["load_after"], **({"trial_states": r["trial_states"]}
                                                  if "trial_states" in r else {})}
        if "random" in curves and curves["random"]["best"]:
            ref = curves["random"]
            target = ref["best"][-1]
            row["random_final_best"] = target
            for m in curves:
                if m == "random":
                    continue
                for axis in ("epochs", "trial_seconds"):
                    needed = compute_to_reach(curves[m], target, axis)
                    fraction = needed / ref[axis][-1] if needed is not None else None
                    row["methods"][m][f"{axis}_to_reach_random_final_best"] = needed
                    row["methods"][m][f"{axis}_fraction_of_random"] = fraction
            common = min(c["epochs"][-1] for c in curves.values() if c["epochs"])
            row["equal_compute_epochs"] = common
            row["best_at_equal_epochs"] = {m: best_at(c, common, "epochs")
                                           for m, c in curves.items()}
        per_seed.append(row)

    summary: dict = {}
    for m in ("ours", "tpe_median"):
        fractions = [s["methods"].get(m, {}).get("epochs_fraction_of_random") for s in per_seed
                     if m in s["methods"]]
        if not fractions:
            continue
        reached = [f for f in fractions if f is not None]
        seconds = [s["methods"].get(m, {}).get("trial_seconds_fraction_of_random")
                   for s in per_seed if m in s["methods"]]
        summary[m] = {
            "seeds": len(fractions),
            "seeds_reaching_random_best": len(reached),
            "epochs_fraction_of_random_per_seed": fractions,
            "median_epochs_fraction_of_random":
                median([f if f is not None else math.inf for f in fractions]),
            "seeds_within_half": sum(1 for f in reached if f <= TARGET_COMPUTE_FRACTION),
            "trial_seconds_fraction_of_random_per_seed": seconds,
            "median_trial_seconds_fraction_of_random":
                median([f if f is not None else math.inf for f in seconds]),
            "seeds_within_half_trial_seconds": sum(1 for f in seconds
                                                   if f is not None
                                                   and f <= TARGET_COMPUTE_FRACTION),
            "median_best_at_equal_epochs": median(s["best_at_equal_epochs"][m] for s in per_seed
                                                  if "best_at_equal_epochs" in s),
        }
    if "random" in {r["method"] for r in runs}:
        summary["random"] = {"median_best_at_equal_epochs": median(
            s["best_at_equal_epochs"]["random"] for s in per_seed if "best_at_equal_epochs" in s)}
    ours = summary.get("ours")
    target = {"ours_reaches_random_final_best_with_at_most_fraction": TARGET_COMPUTE_FRACTION,
              "met_means": "in every seed, measured in epochs (the load-independent axis); "
                           "trial-seconds given beside it"}
    if ours:
        target["met"] = ours["seeds_within_half"] == ours["seeds"]
        target["met_in_seeds_epochs"] = f"{ours['seeds_within_half']} of {ours['seeds']}"
        target["met_in_seeds_trial_seconds"] = (f"{ours['seeds_within_half_trial_seconds']} of "
                                                f"{ours['seeds']}")
    return {"per_seed": per_seed, "summary": summary, "target": target}


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"ours": "tab:blue", "random": "tab:orange", "tpe_median": "tab:green"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, axis, xlabel in ((axes[0], "epochs", "compute: epochs trained (all trials)"),
                             (axes[1], "trial_seconds", "compute: trial-seconds (sum of epochs)")):
        for r in runs:
            c = curve(r["events"])
            if not c["best"]:
                continue
            style = styles[seeds.index(r["seed"]) % len(styles)]
            xs, ys = zip(*[(x, b) for x, b in zip(c[axis], c["best"]) if math.isfinite(b)])
            wide = r["method"] == "random"  # drawn wide and pale: the others start alike
            ax.step(xs, ys, where="post", color=colors[r["method"]], linestyle=style,
                    linewidth=4 if wide else 1.5, alpha=0.45 if wide else 1.0,
                    zorder=1 if wide else 2, label=f"{LABELS[r['method']]}, seed {r['seed']}")
            if r["method"] == "random":
                ax.axhline(ys[-1], color=colors["random"], linestyle=style, linewidth=0.6,
                           alpha=0.6)
                ax.axvline(xs[-1] / 2, color="grey", linestyle=style, linewidth=0.6, alpha=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best val_measure_l1_mm so far (mm)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.005, "thin horizontal: random's final best; thin vertical: half of random's "
             "compute (target: ours crosses the horizontal line left of the vertical one)",
             ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    tmp = None
    if args.work_dir is None:
        if args.analyze_only:
            raise SystemExit("--analyze-only needs --work-dir")
        tmp = tempfile.TemporaryDirectory(prefix="bench-efficiency-")
        args.work_dir = Path(tmp.name)
    folder = args.work_dir.resolve()
    events_dir = folder / "events"
    events_dir.mkdir(parents=True, exist_ok=True)

    if not args.analyze_only:
        from biometry.io import write_synthetic_dataset

        data = (str(write_synthetic_dataset(folder / "synthetic", n=24, seed=0))
                if args.data == "synthetic" else str(Path(args.data).resolve()))
        (folder / "settings.json").write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/search_efficiency.py", *sys.argv[1:]])
            if argv is None else f"main({argv})",
            "data": data, "seeds": args.seeds, "budget_min": args.budget_min,
            "epochs": args.epochs, "input_hw": args.input_hw, "width": args.width,
            "max_trials": args.max_trials,
            "space": args.space, "dropped_keys": args.drop_keys, "space_used": space_dict(args),
            "concurrency": args.concurrency,
            "plain_side_by_side": not args.sequential_plain, "methods": args.methods,
            "trial": base_trial(args, data), "ours_search": ours_settings(args),
            "started": machine_info()["date"]}, indent=2))
        for seed in args.seeds:
            with LoadWindow() as window:
                if "ours" in args.methods:
                    log(f"seed {seed}: ours for {args.budget_min:g} min")
                    result = run_ours(args, folder, seed, data)
                    (events_dir / f"ours-s{seed}.json").write_text(json.dumps(result))
                    log(f"  ours: {len(result['events'])} epochs, best "
                        f"{min([e['value'] for e in result['events']] or [math.nan]):.2f} mm")
                plain = [(seed, m) for m in args.methods if m != "ours"]
                if plain:
                    log(f"seed {seed}: {', '.join(m for _, m in plain)} for {args.budget_min:g} "
                        f"min {'one after the other' if args.sequential_plain else 'side by side'}")
                    for result in run_plain(args, folder, plain, data):
                        (events_dir / f"{result['method']}-s{seed}.json").write_text(
                            json.dumps(result))
                        log(f"  {result['method']}: {len(result['events'])} epochs, best "
                            f"{min([e['value'] for e in result['events']] or [math.nan]):.2f} mm")
            log(f"seed {seed} done; load {window.before} -> {window.after}")

    runs = [json.loads(p.read_text()) for p in sorted(events_dir.glob("*.json"))]
    settings = json.loads((folder / "settings.json").read_text())
    analysis = analyze(runs)
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    name = "search_efficiency"
    png = args.out_dir / (f"{name}.smoke.png" if args.smoke else f"{name}.png")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    plot(runs, png, f"{settings['input_hw']} input, width {settings['width']}, "
         f"{settings['epochs']} epochs, {settings['budget_min']:g} min per method per seed, "
         f"seeds {settings['seeds']}; {machine['cpu_model']}, {machine['cpu_cores']} cores, "
         f"1-min load {min(l[0] for l in loads if l)}-{max(l[0] for l in loads if l)}; "
         f"{settings['started'][:10]}")
    payload = {
        "settings": settings,
        "gpu": "not measured: no GPU device was lent to this task (CPU only)",
        "png": str(png.relative_to(REPO_ROOT)) if png.is_relative_to(REPO_ROOT) else str(png),
        **analysis,
        "runs": [{k: v for k, v in r.items() if k != "events"} | {
            "curve": curve(r["events"]), "events": r["events"]} for r in runs],
    }
    path = write_result(name, payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"wrote {path} and {png}")
    summary = analysis["summary"]
    print(json.dumps({"summary": summary, "target": analysis["target"]}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
