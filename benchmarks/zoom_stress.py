"""Scale stress test on the validation split: how a model measures heads smaller in the frame.

    python benchmarks/zoom_stress.py --model runs/NAME/best --zooms 1.0 0.7 0.5 [--name NAME]
        [--second-look-quantile Q] [--mask-fallback T] [--mask-small-heads MM]

Each validation image of the model's own subject split is shrunk by a factor and centred on a
black frame of the original size (the head gets smaller in the frame, as in zoomed-out scans);
labels move with it and the pixel spacing is divided by the factor, so errors stay in mm. The
test split is never read. ``--second-look-quantile Q`` replaces the model's second-look range by
the [Q, 1 - Q] quantiles of its own training split's heads (0: no second look), to compare the
option on one set of weights; ``--mask-fallback T`` sets the model's fallback to its mask's
ellipse, ``--mask-small-heads MM`` the HC under which its mask's ellipse measures a head. Writes ``benchmarks/results/zoom_stress_NAME.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info  # noqa: E402
from biometry.evaluation import select_split  # noqa: E402
from biometry.geometry import diameter_lengths  # noqa: E402
from biometry.inference import LandmarkPredictor, load_model_folder  # noqa: E402
from biometry.postprocess import steps_to_config, with_settings  # noqa: E402
from biometry.io import import_dataset  # noqa: E402
from biometry.io import read_grayscale  # noqa: E402
from biometry.metrics import per_image_errors  # noqa: E402
from biometry.transforms import letterbox  # noqa: E402


def zoom_out(image: np.ndarray, landmarks: np.ndarray, factor: float):
    """Shrink ``image`` by ``factor`` onto a black frame of its own size, centred; move labels."""
    h, w = image.shape
    small = cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
    canvas = np.zeros_like(image)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    canvas[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    sx, sy = small.shape[1] / w, small.shape[0] / h
    moved = np.stack([landmarks[:, 0] * sx + x0 + (sx - 1) / 2,
                      landmarks[:, 1] * sy + y0 + (sy - 1) / 2], axis=1)
    return canvas, moved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder, e.g. runs/NAME/best")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/hc18"))
    p.add_argument("--zooms", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    p.add_argument("--name", default=None, help="results name (default: the model folder's parent)")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help="change the model's post-processing (as evaluate --set); "
                        "second_look.quantile=Q refits the range on the training split")
    args = p.parse_args()

    model, spec = load_model_folder(args.model)
    all_records = import_dataset(args.data).records
    records = select_split(all_records, spec, "val", data=args.data)
    train = select_split(all_records, spec, "train", data=args.data)
    boxed = [letterbox(read_grayscale(r.image), r.landmarks, spec.input_hw)[1] for r in train]
    steps = with_settings(spec.steps(), args.set, train_ofd_px=diameter_lengths(np.stack(boxed))[1])
    predictor = LandmarkPredictor(model, spec, postprocess=steps)
    print(f"post-processing: {steps_to_config(steps) or 'none'}")
    images = [cv2.imread(str(r.image), cv2.IMREAD_GRAYSCALE) for r in records]
    spacing = np.array([r.pixel_mm for r in records])
    rows = []
    for factor in args.zooms:
        pairs = [zoom_out(img, r.landmarks.astype(float), factor) for img, r in zip(images, records)]
        coords, _ = predictor.predict([img for img, _ in pairs], pixel_mm=spacing / factor)
        errors = per_image_errors(coords, np.stack([t for _, t in pairs]), spacing / factor)
        row = {"zoom": factor, "images": len(records)}
        for m in ("bpd", "ofd", "hc"):
            a = np.abs(errors[f"{m}_error_mm"])
            row.update({f"{m}_l1_mm": float(a.mean()), f"{m}_median_mm": float(np.median(a))})
        row["hc_over_20mm"] = int((np.abs(errors["hc_error_mm"]) > 20).sum())
        rows.append(row)
        print(f"zoom {factor:.2f}: BPD {row['bpd_l1_mm']:.2f} OFD {row['ofd_l1_mm']:.2f} "
              f"HC {row['hc_l1_mm']:.2f} mm (median {row['hc_median_mm']:.2f}); "
              f"{row['hc_over_20mm']} of {len(records)} images off by over 20 mm of HC")
    name = args.name or Path(args.model).resolve().parent.name
    out = REPO / "benchmarks/results" / f"zoom_stress_{name}.json"
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                               "model": str(Path(args.model).resolve()), "machine": machine_info(),
                               "postprocess": steps_to_config(steps),
                               "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
