"""``python -m biometry predict --model MODEL --images DIR --pixel-mm CSV_OR_FLOAT --out DIR``:
predictions of a model on unlabelled images.

Every ``.png``/``.jpg``/``.jpeg`` file directly in ``--images`` is predicted, in sorted order;
HC18 label files (``*_Mask.png``, ``*_Annotation.png``) are left out with a note. ``--pixel-mm`` is
one spacing in mm for every image, or a CSV with ``image,pixel_mm`` or HC18's
``filename,pixel size(mm)`` columns (rows for other images are ignored). Writes
``OUT/predictions.csv`` (the columns of ``evaluate``) and ``OUT/overlays/IMAGE.png`` with the
predicted BPD (green) and OFD (orange). Every input is checked (spacing for each image, each image
decodable) before anything is written.
"""
from __future__ import annotations

import argparse
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from biometry.commands._arguments import add_model, add_out
from biometry.commands.evaluate import (
    add_inference_arguments, check_model_folder, load_predictor,
)
from biometry.errors import BiometryInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = ("_mask", "_annotation")  # HC18 label files beside the images
SPACING_COLUMNS = (("image", "pixel_mm"), ("filename", "pixel size(mm)"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--images", type=Path, required=True, help="folder of PNG/JPEG images")
    parser.add_argument("--pixel-mm", required=True, metavar="CSV_OR_FLOAT",
                        help="pixel spacing in mm for every image, or a CSV (image,pixel_mm or "
                             "HC18's filename,pixel size(mm))")
    add_out(parser)
    add_inference_arguments(parser)
    parser.add_argument("--overlays", type=int, default=-1, metavar="N",
                        help="overlay PNGs to write: the first N images (default: all; 0 = none)")


def run(args: argparse.Namespace) -> int:
    # heavy imports here, not at module level: `python -m biometry` imports every command
    import numpy as np

    from biometry import plots
    from biometry.evaluation import predict_paths
    from biometry.io import read_grayscale

    if args.batch_size < 1:
        raise BiometryInputError(f"--batch-size must be >= 1 but got {args.batch_size}")
    names = find_images(args.images)
    spacing = read_pixel_mm(args.pixel_mm, names)
    check_model_folder(args.model)
    predictor = load_predictor(args)
    paths = [args.images / name for name in names]
    check_images(paths)

    preds = predict_paths(predictor, names, paths, spacing, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preds.write_csv(out / "predictions.csv")
    n_overlays = len(names) if args.overlays < 0 else min(args.overlays, len(names))
    mm = preds.measurements()
    for i in range(n_overlays):
        label = (f"BPD {mm['bpd'][i]:.1f} OFD {mm['ofd'][i]:.1f} HC {mm['hc'][i]:.1f} mm"
                 + ("  FLAGGED" if preds.flagged[i] else ""))
        plots.write_overlay(out / "overlays" / (Path(names[i]).stem + ".png"),
                            read_grayscale(paths[i]), preds.landmarks[i], label=label)
    print(f"{len(names)} images: HC median {float(np.median(mm['hc'])):.1f} mm; flagged "
          f"{int(preds.flagged.sum())} (uncertainty above the model's threshold)")
    print(f"wrote {out / 'predictions.csv'} and {n_overlays} overlays in {out / 'overlays'}")
    return 0


def find_images(folder: Path) -> list[str]:
    """Sorted names of the PNG/JPEG files directly in ``folder`` (HC18 label files left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BiometryInputError(f"{folder}: image folder not found")
    files = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    labels = [n for n in files if Path(n).stem.lower().endswith(LABEL_SUFFIXES)]
    if labels:
        print(f"note: {folder}: left out {len(labels)} HC18 label files (*_Mask, *_Annotation)")
    names = [n for n in files if n not in set(labels)]
    if not names:
        raise BiometryInputError(f"{folder}: no .png/.jpg/.jpeg images")
    return names


def read_pixel_mm(value: str, names: list[str]) -> list[float]:
    """The spacing of each image in ``names``: one positive number for all, or from a CSV."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not (math.isfinite(number) and number > 0):
            raise BiometryInputError(f"--pixel-mm {text}: must be a positive number of mm per "
                                     f"pixel")
        return [number] * len(names)
    path = Path(text)
    if not path.is_file():
        raise BiometryInputError(f"--pixel-mm {text}: neither a number nor an existing CSV file")
    table = read_spacing_csv(path)
    missing = [n for n in names if n not in table]
    if missing:
        raise BiometryInputError(f"{path}: no pixel spacing for image {missing[0]}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [table[n] for n in names]


def read_spacing_csv(path: Path) -> dict[str, float]:
    """``{file name: pixel_mm}`` from a spacing CSV; bad rows raise naming the row."""
    from biometry.io.landmark_csv import read_csv_rows

    header, rows = read_csv_rows(path)
    columns = next((c for c in SPACING_COLUMNS if all(k in header for k in c)), None)
    if columns is None:
        raise BiometryInputError(f"{path}: needs the columns image,pixel_mm or filename,pixel "
                                 f"size(mm) (the header has: {','.join(header) or 'nothing'})")
    name_col, value_col = columns
    table: dict[str, float] = {}
    for row_no, row in enumerate(rows, start=1):
        name = Path(row[name_col]).name
        where = f"{path}: row {row_no} ({name or 'no image'})"
        if not name:
            raise BiometryInputError(f"{path}: row {row_no}: column '{name_col}' is empty")
        try:
            spacing = float(row[value_col])
        except ValueError:
            raise BiometryInputError(f"{where}: column '{value_col}' is not a number: "
                                     f"{row[value_col]!r}") from None
        if not (math.isfinite(spacing) and spacing > 0):
            raise BiometryInputError(f"{where}: column '{value_col}' must be > 0, got "
                                     f"{row[value_col]}")
        if name in table and table[name] != spacing:
            raise BiometryInputError(f"{where}: a second, different spacing for {name}")
        table[name] = spacing
    return table


def check_images(paths: list[Path], *, threads: int = 2) -> None:
    """Decode every image once so a corrupt file fails before anything is written."""
    from biometry.io import read_grayscale

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: read_grayscale(p).shape, paths))

