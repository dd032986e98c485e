"""One recipe trained with several seeds: how far its figures move, and what combining them does.

    python benchmarks/seed_spread.py --models runs/acc-cpu-v5/final runs/exp/e36/best \\
        runs/exp/e37/best --name acc-cpu-v5 [--test]

Each model folder (the same recipe with another ``train.seed``, on the same subject split) is
evaluated on the validation split the way ``evaluate`` does it (``LandmarkPredictor.predict``:
second looks and the model's mask fallback), with the errors of the early-gestation heads
(HC < 100 mm) apart from the rest and the images off by more than 20 mm of HC. The seeds'
ensemble (``biometry.inference.ensemble_of``: what ``search.final_seeds`` builds), each way of
combining them (``search.final_combine``: their output maps averaged before decoding, or the
median of their decoded landmarks), is evaluated on validation only.
``--test`` adds each single model's test-split reading, to report the spread of one recipe; the
ensemble is never evaluated on the test split here, so that whether to build ensembles into the
product is decided on validation. Prints a table and writes
``benchmarks/results/seed_spread_NAME.json``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import write_result  # noqa: E402
from benchmarks.mask_ellipse import EARLY_HC_MM  # noqa: E402
from benchmarks.mask_ellipse import error_row as mask_error_row  # noqa: E402
from biometry.errors import BiometryInputError  # noqa: E402
from biometry.evaluation import predict_records, select_split  # noqa: E402
from biometry.inference import LandmarkPredictor, ensemble_of, load_model_spec  # noqa: E402
from biometry.io import import_dataset  # noqa: E402
from biometry.models import ENSEMBLE_COMBINES  # noqa: E402
from biometry.metrics import measurements_mm, per_image_errors  # noqa: E402


def error_row(coords: np.ndarray, records) -> dict:
    """``mask_ellipse.error_row`` (all heads, early heads apart, failures) plus the search
    objective and the names of the images off by more than 20 mm of HC."""
    true = np.stack([r.landmarks for r in records]).astype(np.float64)
    spacing = np.array([r.pixel_mm for r in records])
    early = measurements_mm(true, spacing)["hc"] < EARLY_HC_MM
    row = mask_error_row(coords, true, spacing, early)
    hc = np.abs(per_image_errors(coords, true, spacing)["hc_error_mm"])
    row.update({"val_measure_l1_mm": 0.5 * (row["bpd_l1_mm"] + row["ofd_l1_mm"]),
                "early_images": int(early.sum()),
                "images_over_20mm": [r.name for r, bad in zip(records, hc > 20) if bad]})
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="model folders, one per seed")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/hc18"))
    p.add_argument("--name", required=True, help="results name: seed_spread_NAME.json")
    p.add_argument("--test", action="store_true",
                   help="also read each single model (never the ensemble) on the test split")
    args = p.parse_args()
    if len(args.models) < 2:
        raise BiometryInputError("--models needs at least two model folders (the seeds)")

    ensemble_model, ensemble_spec = ensemble_of(args.models)  # refuses seeds of other recipes
    specs = [load_model_spec(folder) for folder in args.models]
    loaded = list(zip(ensemble_model.members, specs))  # each member with its own spec
    records = import_dataset(args.data).records
    splits = ["val", "test"] if args.test else ["val"]
    by_split = {s: select_split(records, specs[0], s, data=args.data) for s in splits}

    rows = []
    for folder, (model, spec) in zip(args.models, loaded):
        predictor = LandmarkPredictor(model, spec)
        row = {"model": folder, "seed": spec.trial_config.get("train", {}).get("seed")}
        for split, split_records in by_split.items():
            row[split] = error_row(predict_records(predictor, split_records).landmarks,
                                   split_records)
        rows.append(row)
    ensembles = {}
    for combine in ENSEMBLE_COMBINES:  # the members already loaded, combined each way
        ensemble = LandmarkPredictor(ensemble_model, replace(ensemble_spec, combine=combine))
        ensembles[combine] = {"models": args.models, "combine": combine,
                              "val": error_row(predict_records(ensemble, by_split["val"])
                                               .landmarks, by_split["val"])}

    def line(label: str, r: dict) -> str:
        early = "-" if not r["early_images"] else f"{r['hc_early_l1_mm']:.2f}"
        return (f"  {label:<34} BPD {r['bpd_l1_mm']:.2f}  OFD {r['ofd_l1_mm']:.2f}  HC "
                f"{r['hc_l1_mm']:.2f} mm  (mean {r['val_measure_l1_mm']:.3f}; HC early {early}, "
                f"rest {r['hc_rest_l1_mm']:.2f}; {len(r['images_over_20mm'])} > 20 mm)")

    for split in splits:
        print(f"{split}: {len(by_split[split])} images")
        for row in rows:
            print(line(f"seed {row['seed']} {row['model']}", row[split]))
        if split == "val":
            for combine, row in ensembles.items():
                print(line(f"ensemble ({combine})", row["val"]))
    spread = {split: {key: [row[split][key] for row in rows]
                      for key in ("bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "val_measure_l1_mm")}
              for split in splits}
    path = write_result(f"seed_spread_{args.name}", {
        "models": rows, "ensembles": ensembles, "spread": spread,
        "note": "test figures, where present, report one recipe's seed spread; nothing is "
                "chosen from them, and the ensemble is not read on the test split"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BiometryInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
