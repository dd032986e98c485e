"""Trials per hour with 1 and 2 concurrent trials (and, on a GPU machine, per GPU share).

    python benchmarks/scaling.py                                  # CPU: 1 and 2 at once
    python benchmarks/scaling.py --gpus-per-trial 0.25 0.5 1      # on a machine with GPUs
    python benchmarks/scaling.py --smoke                          # about a minute

Each point runs our search (``search.run.main`` in a fresh process with a private Ray cluster,
see ``benchmarks/_common.py``) over ``--trials`` identical trials (every parameter of the space
has one choice, ASHA off with ``grace_period`` = epochs) with ``max_concurrent_trials`` = the
concurrency and one CPU per trial. Two throughputs are reported: steady state, ``trials /
(last trial end - first trial start)`` from Ray's event files, and end to end, ``trials / wall
time`` of the whole command (Ray start, data, MLflow, summary included).

GPU points (``--gpus-per-trial``): concurrency = GPUs / share, device cuda, the gpu preset's
input size unless ``--gpu-input-hw``. Without a GPU they are recorded as not measured, with the
reason; nothing is guessed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    HC18_DIR, NO_GPU_NOTE, RESULTS_DIR, fixed_space, log, median, read_trial_results,
    run_search_command, write_result, write_search_files)

FIXED_VALUES = {"model.name": "unet", "train.lr": 2.0e-3, "augment.rotate_deg": 10.0,
                "loss.angle_weight": 0.01}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 2],
                   help="CPU points: trials at once")
    p.add_argument("--gpus-per-trial", type=float, nargs="*", default=[],
                   help="GPU points, e.g. 0.25 0.5 1 (needs a GPU)")
    p.add_argument("--trials", type=int, default=6, help="trials per point")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--input-hw", default="64x96", help="CPU trials' input, HxW")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--gpu-input-hw", default="544x800")
    p.add_argument("--gpu-width", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2, help="repeats per point; medians reported")
    p.add_argument("--data", default=str(HC18_DIR), help="HC18 folder or landmark CSV")
    p.add_argument("--work-dir", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true",
                   help="2 synthetic trials of 1 epoch, 2 at once, no repeat")
    p.add_argument("--in-process", action="store_true",
                   help="run the searches in this process (tests; Ray started here if needed)")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials, args.epochs, args.repeats, args.data = 2, 1, 1, "synthetic"
        args.concurrency = [2]
    return args


def parse_hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def trial_config(args, *, gpu: bool) -> dict:
    h, w = parse_hw(args.gpu_input_hw if gpu else args.input_hw)
    return {"data": {"input_h": h, "input_w": w},
            "model": {"name": "unet", "width": args.gpu_width if gpu else args.width,
                      "depth": 5 if gpu else args.depth, "output_stride": 4 if gpu else 2},
            "train": {"epochs": args.epochs, "batch_size": 16, "num_workers": 3 if gpu else 1,
                      "threads": 0 if gpu else 1, "device": "cuda" if gpu else "cpu"}}


def run_point(args, folder: Path, data: str, *, concurrency: int, gpus: float, label: str,
              repeat: int, num_cpus: int) -> dict:
    trial = trial_config(args, gpu=gpus > 0)
    name = f"{label}-r{repeat}"
    preset = write_search_files(folder / name, trial=trial, space=fixed_space(FIXED_VALUES),
                                search={"num_samples": args.trials,
                                        "grace_period": args.epochs, "reduction_factor": 2,
                                        "max_concurrent_trials": concurrency,
                                        "cpus_per_trial": 4 if gpus > 0 else 1,
                                        "gpus_per_trial": gpus,
                                        "n_startup_trials": 1, "seed": 0})
    result = run_search_command(preset=preset, out=folder / "runs", name=name, data=data,
                                log_path=folder / f"{name}.log", num_cpus=num_cpus,
                                in_process=args.in_process)
    trials = read_trial_results(Path(result["run_dir"]))
    if len(trials) != args.trials:
        raise RuntimeError(f"{name}: {len(trials)} trials reported, expected {args.trials}")
    span = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    result.update(
        trials=len(trials), span_s=span,
        trials_per_hour_steady=3600 * len(trials) / span,
        trials_per_hour_end_to_end=3600 * len(trials) / result["wall_s"],
        trial_life_s=[t["end"] - t["start"] for t in trials],
        epoch_seconds=median(r["epoch_seconds"] for t in trials for r in t["rows"]))
    log(f"{name}: {result['trials_per_hour_steady']:.0f} trials/h steady "
        f"({result['trials_per_hour_end_to_end']:.0f} end to end; median epoch "
        f"{result['epoch_seconds']:.2f}s); load {result['load_before']} -> {result['load_after']}")
    return result


def summarize_point(label: str, runs: list[dict], **extra) -> dict:
    return {"point": label, **extra,
            "trials_per_hour_steady": median(r["trials_per_hour_steady"] for r in runs),
            "trials_per_hour_end_to_end": median(r["trials_per_hour_end_to_end"] for r in runs),
            "median_epoch_seconds": median(r["epoch_seconds"] for r in runs),
            "runs": runs}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from biometry.io import write_synthetic_dataset

    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-scaling-")
        args.work_dir = Path(tmp.name)
    folder = args.work_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = (str(write_synthetic_dataset(folder / "synthetic", n=24, seed=0))
            if args.data == "synthetic" else str(Path(args.data).resolve()))
    started = time.time()

    # CPU points, interleaved over repeats so that a change of load hits every point
    cpu_runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    for r in range(args.repeats):
        for c in args.concurrency:
            cpu_runs[c].append(run_point(args, folder, data, concurrency=c, gpus=0.0,
                                         label=f"cpu-c{c}", repeat=r,
                                         num_cpus=max(2, c)))
    cpu_points = [summarize_point(f"{c} concurrent", runs, concurrency=c, cpus_per_trial=1,
                                  gpus_per_trial=0) for c, runs in cpu_runs.items()]
    base = cpu_points[0]["trials_per_hour_steady"] if cpu_points else None
    for p in cpu_points:
        p["speedup_vs_first"] = p["trials_per_hour_steady"] / base if base else None

    n_gpus = torch.cuda.device_count()
    gpu_section: dict = {"requested_gpus_per_trial": args.gpus_per_trial, "gpus": n_gpus}
    if n_gpus == 0:
        gpu_section["status"] = NO_GPU_NOTE
        gpu_section["points"] = []
    else:
        points = []
        for share in args.gpus_per_trial:
            concurrency = max(1, int(n_gpus / share))
            runs = [run_point(args, folder, data, concurrency=concurrency, gpus=share,
                              label=f"gpu-{share:g}", repeat=r, num_cpus=0)
                    for r in range(args.repeats)]
            points.append(summarize_point(f"{share:g} GPU per trial", runs, cpus_per_trial=4,
                                          gpus_per_trial=share, concurrency=concurrency))
        gpu_section.update(status="measured", devices=[torch.cuda.get_device_name(i)
                                                        for i in range(n_gpus)], points=points)

    payload = {
        "settings": {"trials": args.trials, "epochs": args.epochs, "repeats": args.repeats,
                     "cpu_trial": trial_config(args, gpu=False),
                     "gpu_trial": trial_config(args, gpu=True), "data": data,
                     "fixed_values": FIXED_VALUES, "asha": "off (grace_period = epochs)"},
        "cpu": cpu_points,
        "gpu": gpu_section,
        "wall_s": time.time() - started,
    }
    path = write_result("scaling", payload, out_dir=args.out_dir, smoke=args.smoke)
    log(f"wrote {path}")
    print(json.dumps({p["point"]: round(p["trials_per_hour_steady"]) for p in cpu_points}))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
