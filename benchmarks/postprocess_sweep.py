"""What the post-training sweep picks on validation against the preset's hand-picked steps.

    python benchmarks/postprocess_sweep.py --name cpu-base            # train the cpu preset's
                                                                     # base trial, then sweep
    python benchmarks/postprocess_sweep.py --model runs/NAME/best     # sweep a trained model

Trains (or loads) one model, then measures it on the validation split under every variant that
``configs/search/default.yaml``'s ``postprocess`` section lists (trainables/sweep.py, the same code
a trial runs after its last epoch). Writes ``benchmarks/results/postprocess_sweep_NAME.json``:
each variant's objective, the kept variant and the paired bootstrap interval. The test split is
never read.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import HC18_DIR, REPO_ROOT, write_result  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HC18_DIR), help="HC18 folder or landmark CSV")
    p.add_argument("--model", default=None, help="a trained model folder (default: train one)")
    p.add_argument("--preset", default="cpu", help="preset whose base trial is trained")
    p.add_argument("--space", default="configs/search/default.yaml")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--name", required=True, help="results name")
    return p.parse_args(argv)


def base_config(args):
    from trainables.config import config_from_dict, with_overrides

    preset = yaml.safe_load((REPO_ROOT / "configs" / "presets" / f"{args.preset}.yaml").read_text())
    overrides = {"data.path": str(args.data)}
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    raw, _ = with_overrides(preset["trial"], overrides)
    return config_from_dict(raw, source=f"{args.preset} preset")


def main(argv=None) -> int:
    from biometry.inference import load_model_folder
    from search.space import load_space
    from trainables.data import prepare_splits
    from trainables.train import run_trial, training_ofd_px
    from trainables.sweep import sweep_postprocess

    args = parse_args(argv)
    cfg = base_config(args)
    data = prepare_splits(cfg.data)
    with tempfile.TemporaryDirectory(prefix="pp-sweep-") as tmp:
        folder = Path(args.model) if args.model else Path(tmp) / "best"
        if not args.model:
            run_trial(cfg, data=data, out_dir=tmp)
        model, spec = load_model_folder(folder)
    sweep = load_space(REPO_ROOT / args.space).postprocess
    result = sweep_postprocess(model, spec, data.val, sweep=sweep,
                               train_ofd_px=training_ofd_px(data),
                               resamples=cfg.inference.sweep_resamples, seed=cfg.train.seed)
    for label, value in sorted(result.objectives.items(), key=lambda kv: kv[1]):
        print(f"  {label:<36} {value:.4f} mm")
    print(f"kept: {result.chosen} (gain {result.gain_mm:.4f} mm, interval "
          f"{result.interval_mm[0]:+.4f} to {result.interval_mm[1]:+.4f})")
    write_result(f"postprocess_sweep_{args.name}", {
        "validation_images": len(data.val),
        "preset_steps": cfg.inference.postprocess, "sweep": sweep,
        "objectives_mm": result.objectives, "chosen": result.chosen, "gain_mm": result.gain_mm,
        "interval_mm": list(result.interval_mm), "kept_steps": spec.postprocess
        if result.chosen == "default" else [s.to_dict() for s in result.steps]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
