"""The head-region mask as a second measurement, on the training and validation splits.

    python benchmarks/mask_ellipse.py --model runs/NAME/final [--splits train val] [--name NAME]

For a model trained with ``loss.mask_weight`` (a ``mask_head`` channel), each image of the model's
own subject split is measured twice: by the landmarks (``LandmarkPredictor.predict``, the path
``evaluate`` uses, second looks included, the ``small_heads_by_mask`` step removed so that small
heads are not turned into the mask's measurement) and by an ellipse fitted (OpenCV) to the mask channel of
the first look, its axes taken as OFD and BPD. A hybrid keeps the landmarks unless the two HCs
disagree by more than a fraction ``t`` of the mask's, and then takes the mask's ellipse (the first
look's mask only; ``LandmarkPredictor``'s fallback also asks a second look's mask to agree, see
docs/experiments.md, "the mask as a measurement"). Prints
BPD/OFD/HC errors in mm per variant (all heads, heads under 100 mm HC, images off by more than
20 mm) and writes ``benchmarks/results/mask_ellipse_NAME.json``. The test split is never read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info  # noqa: E402
from biometry.evaluation import select_split  # noqa: E402
from biometry.inference import LandmarkPredictor, load_model_folder, mask_ellipse_landmarks  # noqa: E402,E501
from biometry.postprocess import with_settings  # noqa: E402
from biometry.io import import_dataset, read_grayscale  # noqa: E402
from biometry.metrics import measurements_mm, per_image_errors  # noqa: E402
from biometry.models import split_mask  # noqa: E402
from biometry.transforms import letterbox, zscore  # noqa: E402

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)
EARLY_HC_MM = 100.0


def mask_measurements(predictor: LandmarkPredictor, images: list[np.ndarray]) -> np.ndarray:
    """(N, 4, 2) original-pixel landmarks of the mask's ellipse (NaN where the mask is empty)."""
    out = np.full((len(images), 4, 2), np.nan)
    for i, image in enumerate(images):
        boxed, _, box = letterbox(image, None, predictor.spec.input_hw)
        with torch.no_grad():
            output = predictor.model(torch.from_numpy(zscore(boxed))[None, None].to(predictor.device))
        _, logits = split_mask(output.float())
        if logits is None:
            raise SystemExit(f"{predictor.spec.architecture}: the model has no mask channel "
                             f"(train it with loss.mask_weight above 0)")
        points = mask_ellipse_landmarks(logits[0].cpu().numpy(), predictor.spec.stride)
        if points is not None:
            out[i] = box.to_original(points)
    return out


def error_row(pred: np.ndarray, true: np.ndarray, spacing: np.ndarray, early: np.ndarray) -> dict:
    errors = per_image_errors(pred, true, spacing)
    row = {}
    for m in ("bpd", "ofd", "hc"):
        a = np.abs(errors[f"{m}_error_mm"])
        row[f"{m}_l1_mm"] = float(np.nanmean(a))
    hc = np.abs(errors["hc_error_mm"])
    row.update({"hc_early_l1_mm": float(np.nanmean(hc[early])),
                "hc_rest_l1_mm": float(np.nanmean(hc[~early])),
                "hc_over_20mm": int((hc > 20).sum()),
                "hc_bias_mm": float(np.nanmean(errors["hc_error_mm"]))})
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder, e.g. runs/NAME/final")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/hc18"))
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--name", default=None, help="results name (default: the model folder's parent)")
    args = p.parse_args()

    model, spec = load_model_folder(args.model)
    predictor = LandmarkPredictor(model, spec, postprocess=with_settings(
        spec.steps(), ["small_heads_by_mask=off"]))
    all_records = import_dataset(args.data).records
    results = {}
    for split in args.splits:
        records = select_split(all_records, predictor.spec, split, data=args.data)
        images = [read_grayscale(r.image) for r in records]
        true = np.stack([r.landmarks for r in records]).astype(np.float64)
        spacing = np.array([r.pixel_mm for r in records])
        early = measurements_mm(true, spacing)["hc"] < EARLY_HC_MM
        landmarks, _ = predictor.predict(images)
        from_mask = mask_measurements(predictor, images)
        hc_landmarks = measurements_mm(landmarks, spacing)["hc"]
        hc_mask = measurements_mm(from_mask, spacing)["hc"]
        disagreement = np.abs(hc_landmarks - hc_mask) / hc_mask  # NaN (never switch) without mask
        rows = [{"variant": "landmarks", **error_row(landmarks, true, spacing, early)},
                {"variant": "mask ellipse", **error_row(from_mask, true, spacing, early)}]
        for t in THRESHOLDS:
            switch = disagreement > t
            hybrid = np.where(switch[:, None, None], from_mask, landmarks)
            rows.append({"variant": f"hybrid t={t}", "switched": int(switch.sum()),
                         **error_row(hybrid, true, spacing, early)})
        print(f"{split}: {len(records)} images, {int(early.sum())} with HC < {EARLY_HC_MM:.0f} mm")
        for row in rows:
            print(f"  {row['variant']:<14} BPD {row['bpd_l1_mm']:.2f} OFD {row['ofd_l1_mm']:.2f} "
                  f"HC {row['hc_l1_mm']:.2f} mm (early {row['hc_early_l1_mm']:.2f}, rest "
                  f"{row['hc_rest_l1_mm']:.2f}, bias {row['hc_bias_mm']:+.2f}); "
                  f"{row['hc_over_20mm']} off by > 20 mm"
                  + (f"; {row['switched']} switched" if "switched" in row else ""))
        results[split] = {"images": len(records), "early_images": int(early.sum()), "rows": rows}
    name = args.name or Path(args.model).resolve().parent.name
    out = REPO / "benchmarks/results" / f"mask_ellipse_{name}.json"
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                               "model": str(Path(args.model).resolve()), "machine": machine_info(),
                               "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
