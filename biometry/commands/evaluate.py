"""``python -m biometry evaluate --model MODEL --data DATA --out DIR``: predictions and metrics of
a model on labelled data.

Writes to ``DIR``:

- ``predictions.csv``: ``image,bpd_x1,...,ofd_y2,bpd_mm,ofd_mm,hc_mm,uncertainty,flagged``
  (original image pixels; ``flagged`` = uncertainty above the threshold stored with the model);
- ``per_image.csv``: reference and predicted mm, signed errors, per-landmark errors, NME;
- ``summary.json``: every metric of ``biometry.metrics.summarize`` plus per-landmark errors and the
  uncertainty triage (Spearman, AURC, error of the kept images at 80% and 90% coverage);
- ``bland_altman_bpd.png``, ``bland_altman_ofd.png``, ``bland_altman_hc.png``,
  ``risk_coverage.png``, ``failure_atlas.png`` and ``atlas/NN_IMAGE.png`` (the worst images at
  full resolution, reference in blue, prediction in red).

``--split train|val|test`` repeats the model's own subject split (``model.yaml`` ``data``) on
``DATA``, so the held-out test subjects can be evaluated. The model and data are loaded and checked
before anything is written.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from biometry.constants import SPLITS
from biometry.commands._arguments import add_data_out_skip, add_model, add_out
from biometry.errors import BiometryInputError

ATLAS_SIZE = 10
NO_POSTPROCESS = "none"


def load_predictor(args):
    """The model folder ``--model`` with its post-processing as ``--postprocess`` and ``--set``
    say (``LandmarkPredictor``)."""
    from biometry.inference import LandmarkPredictor, load_model_folder

    model, spec = load_model_folder(args.model, device=resolve_device(args.device))
    steps = postprocess_steps(spec, getattr(args, "postprocess", None),
                              getattr(args, "set", None) or [])
    return LandmarkPredictor(model, spec, device=resolve_device(args.device), postprocess=steps)


def postprocess_steps(spec, source: str | None, settings: list[str]):
    """The model's steps, replaced by ``source`` (a YAML list of steps, or ``none``) and then
    changed by ``settings`` (``STEP.KEY=VALUE``, ``STEP=off``, ``STEP=on``)."""
    from biometry.postprocess import check_needs, create_steps, with_settings

    if source is None:
        steps = spec.steps()
    elif source == NO_POSTPROCESS:
        steps = []
    else:
        steps = create_steps(_read_steps_file(Path(source)), where=f"--postprocess {source}")
    steps = with_settings(steps, settings)
    check_needs(steps, has_mask=spec.has_mask(), where="--postprocess/--set")
    for step in steps:
        if getattr(step, "fitted", True) is False:
            raise BiometryInputError(f"--postprocess/--set: step '{step.name}' has no head range; "
                                     f"set its low, high and target (OFD in input pixels)")
    return steps


def _read_steps_file(path: Path):
    from biometry.yamlfile import read_yaml

    raw = read_yaml(path, missing=f"--postprocess takes a YAML list of steps, or "
                                  f"'{NO_POSTPROCESS}'")
    return raw.get("postprocess") if isinstance(raw, dict) else raw


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``evaluate`` and ``predict``: how the model is run."""
    parser.add_argument("--postprocess", default=None, metavar="FILE|none",
                        help="post-processing steps that replace the model's: a YAML list "
                             "(or a model.yaml), or 'none' for none (default: the model's)")
    parser.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                        help="change one step option (e.g. mask_fallback.threshold=0.08), "
                             "or STEP=off / STEP=on; repeatable")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="images per forward pass (default 16)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where the model runs (default cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_data_out_skip(parser, positional=False)
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="evaluate all records (default) or one split of the model's own "
                             "subject split (from model.yaml)")
    add_inference_arguments(parser)
    parser.add_argument("--atlas", type=int, default=ATLAS_SIZE, metavar="K",
                        help=f"worst images in the failure atlas (default {ATLAS_SIZE}; 0 = none)")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise BiometryInputError(f"--batch-size must be >= 1 but got {args.batch_size}")
    if args.atlas < 0:
        raise BiometryInputError(f"--atlas cannot be negative but got {args.atlas}")
    check_model_folder(args.model)
    # heavy imports here, not at module level: `python -m biometry` imports every command
    from biometry.evaluation import (
        evaluation_summary,
        per_image_table,
        predict_records,
        select_split,
        summary_text,
    )
    from biometry.io import import_dataset
    from biometry.postprocess import steps_to_config

    predictor = load_predictor(args)
    imported = import_dataset(args.data, skip_bad=args.skip_bad)
    records = select_split(imported.records, predictor.spec, args.split, data=args.data,
                           skipped=len(imported.skipped))

    preds = predict_records(predictor, records, batch_size=args.batch_size)
    true = np.stack([r.landmarks for r in records]).astype(np.float64)
    spec = predictor.spec
    summary = evaluation_summary(preds, true, threshold=spec.uncertainty_threshold,
                                 coverage_target=spec.coverage_target, meta={
                                     "model": str(Path(args.model).resolve()),
                                     "data": str(args.data), "split": args.split,
                                     "postprocess": steps_to_config(predictor.steps),
                                     "skipped": len(imported.skipped)})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preds.write_csv(out / "predictions.csv")
    per_image_table(preds, true).to_csv(out / "per_image.csv", index=False, float_format="%.6g")
    summary["plots"] = write_plots(out, preds, true, records, summary, atlas=args.atlas)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(summary_text(summary))
    print(f"wrote {out / 'predictions.csv'}, {out / 'summary.json'} and "
          f"{len(summary['plots'])} plots")
    return 0


def write_plots(out: Path, preds, true: np.ndarray, records, summary: dict, *,
                atlas: int) -> list[str]:
    """Bland–Altman per measurement, the risk–coverage curve and the failure atlas."""
    from biometry import plots
    from biometry.evaluation import worst_images
    from biometry.io import read_grayscale
    from biometry.metrics import per_image_errors

    errors = per_image_errors(preds.landmarks, true, preds.pixel_mm)
    written = []
    for m in ("bpd", "ofd", "hc"):
        written.append(plots.bland_altman(errors[f"{m}_pred_mm"], errors[f"{m}_true_mm"],
                                          out / f"bland_altman_{m}.png", name=m,
                                          flagged=preds.flagged))
    has_threshold = summary["uncertainty_threshold"] is not None
    kept = 1.0 - summary["flagged_fraction"] if has_threshold else None
    written.append(plots.risk_coverage_plot(preds.uncertainty, errors["measure_error_mm"],
                                            out / "risk_coverage.png", threshold_coverage=kept))
    if atlas:
        worst = worst_images(preds, true, k=atlas)
        images = [read_grayscale(records[i].image) for i in worst]
        titles = [f"{records[i].name}: BPD {errors['bpd_error_mm'][i]:+.1f}, OFD "
                  f"{errors['ofd_error_mm'][i]:+.1f} mm, unc {preds.uncertainty[i]:.3g}"
                  for i in worst]
        written.append(plots.failure_atlas(images, preds.landmarks[worst], true[worst], titles,
                                           out / "failure_atlas.png"))
        for rank, (i, image) in enumerate(zip(worst, images), start=1):
            stem = Path(records[i].name).with_suffix("").as_posix().replace("/", "_")
            label = f"#{rank} mean |err| {errors['measure_error_mm'][i]:.1f} mm"
            written.append(plots.write_overlay(out / "atlas" / f"{rank:02d}_{stem}.png", image,
                                               preds.landmarks[i], reference=true[i], label=label))
    return [str(p) for p in written]


def check_model_folder(path: Path) -> None:
    if not Path(path).is_dir():
        raise BiometryInputError(f"{path}: model folder not found (a model folder holds model.pt "
                                 f"and model.yaml, e.g. runs/NAME/best)")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BiometryInputError("--device cuda: no CUDA device is available")
    return name
