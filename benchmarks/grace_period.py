"""Evidence for ASHA's grace period: how well does an early epoch rank configs by their final value?

Trains N configs sampled from the search space to the preset's full length (no early stopping),
records every epoch's ``val_measure_l1_mm``, and for each epoch k reports the Spearman correlation
between the value at k and the best value over all epochs, plus how often the final winner would
have survived a cut to the top 1/reduction_factor at k.

    python benchmarks/grace_period.py --configs 6 --preset cpu [--data PATH] [--epochs 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from search.cli import load_preset  # noqa: E402
from search.space import load_space, trial_overrides  # noqa: E402
from trainables.config import config_from_dict, set_dotted  # noqa: E402
from trainables.data import prepare_splits  # noqa: E402
from trainables.train import OBJECTIVE, run_trial  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=6)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--data", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/grace_period.json"))
    args = p.parse_args()

    preset = load_preset(args.preset)
    base = json.loads(json.dumps(preset.trial))
    if args.data:
        set_dotted(base, "data.path", str(Path(args.data).resolve()))
    if args.epochs:
        set_dotted(base, "train.epochs", args.epochs)
    set_dotted(base, "train.threads", 2)
    base_cfg = config_from_dict(base, source="grace_period")
    data = prepare_splits(base_cfg.data)
    space = load_space(REPO / preset.search.space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))

    curves, params = [], []
    started = time.time()
    for i in range(args.configs):
        trial = study.ask()
        raw = json.loads(json.dumps(base))
        overrides = trial_overrides(space(trial))
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        cfg = config_from_dict(raw, source=f"config {i}")
        curve: list[float] = []
        run_trial(cfg, data=data, out_dir=Path("/tmp/grace"), log=lambda _: None,
                  reporter=lambda m, _f, c=curve: c.append(float(m[OBJECTIVE])))
        study.tell(trial, min(curve))
        curves.append(curve)
        params.append(overrides)
        print(f"config {i}: final best {min(curve):.2f} mm; curve "
              f"{' '.join(f'{v:.1f}' for v in curve)}", flush=True)

    values = np.array(curves)  # (configs, epochs)
    final = values.min(axis=1)
    winner = int(final.argmin())
    keep = max(1, int(len(final) / args.reduction_factor))
    per_epoch = []
    for k in range(values.shape[1]):
        rho = float(spearmanr(values[:, k], final).statistic) if len(final) > 2 else float("nan")
        survivors = np.argsort(values[:, k])[:keep]
        per_epoch.append({"epoch": k + 1, "spearman_vs_final": rho,
                          "winner_in_top_1_over_rf": bool(winner in survivors)})
        print(f"epoch {k + 1:>2}: spearman {rho:+.2f}  winner kept: {winner in survivors}")
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "date": time.strftime("%Y-%m-%d %H:%M")},
        "data": data.source, "train_images": len(data.train), "val_images": len(data.val),
        "seconds": time.time() - started, "curves": curves, "params": params,
        "per_epoch": per_epoch,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
