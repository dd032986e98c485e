"""Does training on the core subset (the search's ``--exclude-outliers Q``) help on held-out data?

    python benchmarks/core_subset.py [--epochs 8] [--budget-min 7.5] [--out FILE]

Trains the cpu preset's trial config (``configs/presets/cpu.yaml`` at 96x144, few epochs) on the shared HC18
data with ``exclude_outliers`` 0 and 0.05 and compares the validation metrics; the validation
split is never filtered. Exclusion goes the way the search does it: names from
:func:`biometry.eda.core_subset` on the TRAIN split, then ``prepare_splits(cfg.data,
exclude=names)``. Runs, in order of priority, while the time budget lasts:

1. HC18 as shipped, Q = 0 and 0.05, seed 0;
2. HC18 with 5% of the TRAIN labels corrupted (an endpoint moved by 15% of the OFD, BPD and OFD
   exchanged, or the OFD pulled in by 25%), Q = 0 and 0.05, seed 0: the case the option is for;
3. HC18 as shipped with seed 1 (the seed-to-seed spread is noise the difference must beat).

A pair is started only when it is expected to end within the budget (the first always runs).
Each pair is compared on the same validation images at the last epoch (no epoch chosen on val):
the mean difference of the per-image measurement error and its paired-bootstrap 95% interval,
which covers the sampling of the 92 validation images but not the training seed.

Writes ``benchmarks/results/core_subset.json`` with the machine, the load averages and every run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/core_subset.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from biometry.checks import swap_pairs  # noqa: E402
from biometry.eda import core_subset, outlier_table  # noqa: E402
from biometry.io import load_records, write_landmark_csv  # noqa: E402
import yaml  # noqa: E402

from trainables.config import config_from_dict, with_overrides  # noqa: E402
from trainables.sweep import per_image_objective  # noqa: E402
from trainables.data import load_split_records, prepare_splits  # noqa: E402
from trainables.train import OBJECTIVE, run_trial  # noqa: E402

HC18_DIR = REPO_ROOT.parent / "shared" / "data" / "hc18"
RESULT = REPO_ROOT / "benchmarks" / "results" / "core_subset.json"
METRICS = (OBJECTIVE, "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "nme")
NOISE_FRACTION = 0.05
PAIRS = [("clean", 0), ("noisy", 0), ("clean", 1)]  # each runs Q = 0 and Q = 0.05, in this order
FRACTIONS = (0.0, 0.05)
BOOTSTRAP = 2000


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.lower().startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": model, "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()}


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def corrupt(landmarks: np.ndarray, kind: str, image_hw: tuple[int, int]) -> np.ndarray:
    """One wrong label, kept inside the image (see tests/test_eda.py)."""
    lm = np.array(landmarks, dtype=float)
    if kind in ("shift_bpd", "shift_ofd"):
        k, other = (0, lm[1]) if kind == "shift_bpd" else (3, lm[2])
        direction = np.array([-(lm[k] - other)[1], (lm[k] - other)[0]])
        step = 0.15 * np.linalg.norm(lm[3] - lm[2]) * direction / np.linalg.norm(direction)
        height, width = image_hw
        moved = lm[k] + step
        inside = 0 <= moved[0] <= width - 1 and 0 <= moved[1] <= height - 1
        lm[k] = moved if inside else lm[k] - step
    elif kind == "swap":
        lm = swap_pairs(lm)
    else:  # shorten
        centre = lm[2:].mean(axis=0)
        lm[2:] = centre + 0.75 * (lm[2:] - centre)
    return lm


def noisy_copy(folder: Path, split: dict) -> tuple[Path, set[str]]:
    """A landmark CSV of HC18 with NOISE_FRACTION of the train rows corrupted (val and test
    untouched): ``(csv path, corrupted names as the CSV names them)``."""
    records = load_records(HC18_DIR)
    train = {r.name for r in split["train"]}
    rng = np.random.default_rng(0)
    train_rows = [i for i, r in enumerate(records) if r.name in train]
    chosen = rng.choice(train_rows, int(round(NOISE_FRACTION * len(train_rows))), replace=False)
    kinds = ("shift_bpd", "swap", "shorten", "shift_ofd")
    for j, i in enumerate(sorted(chosen)):
        r = records[i]
        wrong = corrupt(r.landmarks, kinds[j % 4], r.image_size)
        records[i] = dataclasses.replace(r, landmarks=wrong)
    path = write_landmark_csv(records, folder / "landmarks.csv", link_images=True)
    with open(path, newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    return path, {names[i] for i in chosen}


def one_run(cfg, labels: str, fraction: float, seed: int, path_and_corrupted, prepared: dict,
            clean_split: dict, tmp: Path) -> tuple[dict, np.ndarray]:
    """Train one arm; return its record and the per-image validation measurement error (mm) of
    the last epoch's model."""
    from biometry.inference import LandmarkPredictor

    path, corrupted = path_and_corrupted
    data_cfg = dataclasses.replace(cfg.data, path=str(path), exclude_outliers=fraction)
    if (labels, fraction) not in prepared:  # the search's way: names from the TRAIN split
        split = load_split_records(data_cfg.path, split_seed=data_cfg.split_seed,
                                   val_fraction=data_cfg.val_fraction,
                                   test_fraction=data_cfg.test_fraction, limit=data_cfg.limit)
        if [Path(r.name).name for r in split["val"]] != [r.name for r in clean_split["val"]]:
            raise RuntimeError(f"{path}: the validation split differs from HC18's")
        _, excluded = core_subset(split["train"], exclude_fraction=fraction)
        table = {row.image: row for row in outlier_table(split["train"])}
        prepared[labels, fraction] = (prepare_splits(data_cfg, exclude=set(excluded)),
                                      [table[n] for n in excluded], len(split["train"]))
    data, excluded_rows, n_train = prepared[labels, fraction]
    run_cfg = dataclasses.replace(cfg, data=data_cfg,
                                  train=dataclasses.replace(cfg.train, seed=seed))
    epochs: list[dict] = []
    last_errors: list[np.ndarray] = []

    def reporter(metrics: dict, checkpoint: Path) -> None:
        epochs.append(dict(metrics))
        if metrics["epoch"] == run_cfg.train.epochs:  # per-image errors of the last model
            predictor = LandmarkPredictor.from_folder(checkpoint)
            last_errors.append(per_image_objective(predictor, data.val))

    run_trial(run_cfg, data=data, out_dir=tmp / "trial", reporter=reporter,
              log=lambda line: print(f"[{labels} Q={fraction} seed {seed}] {line}", flush=True))
    best = min(epochs, key=lambda m: m[OBJECTIVE])
    excluded_names = {row.image for row in excluded_rows}
    record = {
        "labels": labels, "exclude_outliers": fraction, "seed": seed,
        "n_train": len(data.train), "n_train_before_exclusion": n_train, "n_val": len(data.val),
        "n_corrupted_train_labels": len(corrupted),
        "n_corrupted_excluded": len(excluded_names & corrupted),
        "excluded": [{"image": r.image, "score": round(r.score, 3), "reasons": list(r.reasons)}
                     for r in excluded_rows],
        "last_epoch": {k: round(float(epochs[-1][k]), 4) for k in METRICS},
        "last_epoch_check_mm": round(float(last_errors[0].mean()), 4),
        "best_epoch": {"epoch": int(best["epoch"]),
                       **{k: round(float(best[k]), 4) for k in METRICS}},
        "val_objective_per_epoch": [round(float(m[OBJECTIVE]), 4) for m in epochs],
        "mean_epoch_seconds": round(statistics.mean(m["epoch_seconds"] for m in epochs), 2),
        "load_avg_after": load_avg(),
    }
    return record, last_errors[0]


def paired_difference(base: np.ndarray, other: np.ndarray) -> dict:
    """Mean per-image difference ``other - base`` (mm) with a paired-bootstrap 95% interval."""
    diff = np.asarray(other) - np.asarray(base)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"q0_mm": round(float(np.mean(base)), 4), "q0.05_mm": round(float(np.mean(other)), 4),
            "diff_mm": round(float(diff.mean()), 4),
            "diff_95ci_mm": [round(float(low), 4), round(float(high), 4)],
            "images_better_with_q0.05": int((diff < 0).sum()), "n_images": len(diff)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget-min", type=float, default=7.5,
                        help="start no pair (but the first) that would end after this "
                             "(default 7.5)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--smoke-test", action="store_true",
                        help="check the script: 1 epoch on 120 images, one pair, into /tmp")
    args = parser.parse_args(argv)
    limit = 0
    if args.smoke_test:
        args.epochs, args.budget_min, limit = 1, 0.0, 120
        args.out = Path(tempfile.gettempdir()) / "core_subset_smoke.json"
    started = time.perf_counter()
    result = {"benchmark": "core_subset", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "load_avg_before": load_avg(), "runs": [], "pairs": [],
              "skipped": []}
    preset = yaml.safe_load((REPO_ROOT / "configs" / "presets" / "cpu.yaml").read_text())
    raw, _ = with_overrides(preset["trial"], {
        "data.path": str(HC18_DIR), "data.input_h": 96, "data.input_w": 144,
        "train.epochs": args.epochs, "data.limit": limit})
    cfg = config_from_dict(raw, source="configs/presets/cpu.yaml trial")
    result["config"] = cfg.flat()

    with tempfile.TemporaryDirectory(prefix="core-subset-") as tmp:
        clean_split = load_split_records(str(HC18_DIR), split_seed=cfg.data.split_seed,
                                         val_fraction=cfg.data.val_fraction,
                                         test_fraction=cfg.data.test_fraction,
                                         limit=cfg.data.limit)
        paths = {"clean": (HC18_DIR, set())}
        prepared: dict = {}
        durations: list[float] = []
        for labels, seed in PAIRS:
            elapsed = time.perf_counter() - started
            estimate = 2 * statistics.mean(durations) if durations else 0.0
            if durations and elapsed + estimate > 60 * args.budget_min:
                result["skipped"].append({"labels": labels, "seed": seed, "why": (
                    f"time budget: {elapsed:.0f} s used, a pair takes about {estimate:.0f} s")})
                continue
            if labels not in paths:
                paths[labels] = noisy_copy(Path(tmp) / labels, clean_split)
            errors = {}
            for fraction in FRACTIONS:
                run_started = time.perf_counter()
                run, errors[fraction] = one_run(cfg, labels, fraction, seed, paths[labels],
                                                prepared, clean_split, Path(tmp))
                durations.append(time.perf_counter() - run_started)
                run["seconds"] = round(durations[-1], 1)
                result["runs"].append(run)
            result["pairs"].append({"labels": labels, "seed": seed,
                                    **paired_difference(*(errors[q] for q in FRACTIONS))})

    result["summary"] = summarize(result)
    result["load_avg_after"] = load_avg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


def summarize(result: dict) -> dict:
    """The pairs (last-epoch validation error, Q=0.05 minus Q=0) and the seed spread at Q=0."""
    summary = {"metric": f"last-epoch {OBJECTIVE} on the validation split (mm, lower is better); "
                         "diff = Q 0.05 minus Q 0 on the same images",
               "pairs": result["pairs"]}
    base = [r["last_epoch"][OBJECTIVE] for r in result["runs"]
            if r["labels"] == "clean" and r["exclude_outliers"] == 0.0]
    if len(base) > 1:
        summary["clean_q0_seed_spread_mm"] = round(max(base) - min(base), 4)
    return summary


if __name__ == "__main__":
    sys.exit(main())
