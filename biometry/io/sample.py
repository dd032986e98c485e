"""The small real HC18 sample bundled in the package, and the script that (re)builds it.

``python -m biometry.io.sample HC18_DIR [--n 120]`` rebuilds ``biometry/sample_data/hc18_sample/``
from an HC18-style folder: one image per subject for ``n`` subjects spread evenly over the sorted
subject ids, downscaled to half size (800x540 -> 400x270, ``cv2.INTER_AREA``; odd sizes padded by one black
row/column first), saved as PNG
(compression 9), with ``landmarks.csv`` (landmark CSV with ``subject`` and ``hc_mm``; ``pixel_mm``
doubled) and a README with the CC BY 4.0 credit.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import cv2
import numpy as np

from biometry.io.images import read_grayscale
from biometry.io.landmark_csv import write_landmark_csv
from biometry.records import LandmarkRecord

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "hc18_sample"
SAMPLE_CSV = "landmarks.csv"
SCALE = 0.5

CREDITS = """\
# HC18 sample (bundled)

{n} fetal head ultrasound images from {n} distinct subjects of the HC18 challenge training set,
downscaled to half size (400x270 for the 800x540 originals), landmarks derived from the expert
ellipses (BPD = the minor-axis endpoints, OFD = the major-axis endpoints of the ellipse fitted to
each expert mask).
`landmarks.csv` is a landmark CSV (`image,pixel_mm,bpd_x1,...,ofd_y2,subject,hc_mm`); `pixel_mm`
is the original pixel size doubled; `hc_mm` is the challenge's head circumference.
Rebuild with `python -m biometry.io.sample HC18_DIR`.

Source and credit: HC18 challenge, "Automated measurement of fetal head circumference"
(van den Heuvel et al., PLoS ONE 2018), data on Zenodo, DOI 10.5281/zenodo.1322001, licensed
CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Credit: T. L. A. van den Heuvel,
D. de Bruijn, C. L. de Korte, B. van Ginneken, Radboud University Medical Center.
Changes: images downscaled to half size, a subset of subjects, landmarks derived from the expert
ellipses.
"""


def bundled_sample_path() -> Path:
    """The landmark CSV of the bundled HC18 sample (``.../sample_data/hc18_sample/landmarks.csv``)."""
    return SAMPLE_DIR / SAMPLE_CSV


def build_sample(hc18_dir: str | Path, out_dir: str | Path = SAMPLE_DIR, *, n: int = 120) -> Path:
    """Write the half-size sample of ``n`` subjects of ``hc18_dir`` into ``out_dir``; return its CSV.

    Deterministic: the same folder gives the same files.
    """
    from biometry.io import load_records

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = choose_one_per_subject(load_records(hc18_dir), n=n)
    records = [_downscale(r, out_dir) for r in chosen]
    (out_dir / "README.md").write_text(CREDITS.format(n=len(records)), encoding="utf-8")
    return write_landmark_csv(records, out_dir / SAMPLE_CSV)


def choose_one_per_subject(records: list[LandmarkRecord], *, n: int) -> list[LandmarkRecord]:
    """The first image (shortest, then smallest name) of ``n`` subjects spread evenly over the
    sorted subject ids."""
    by_subject: dict[str, LandmarkRecord] = {}
    for r in sorted(records, key=lambda r: (len(r.name), r.name)):
        by_subject.setdefault(r.subject, r)
    subjects = sorted(by_subject)
    picks = np.unique(np.linspace(0, len(subjects) - 1, min(n, len(subjects))).round().astype(int))
    return [by_subject[subjects[i]] for i in picks]


def _downscale(record: LandmarkRecord, out_dir: Path) -> LandmarkRecord:
    """Half-size copy of the record's image in ``out_dir`` (an odd height or width is first
    padded with one black row or column at the bottom/right, so the scale is exactly 1/2)."""
    image = read_grayscale(record.image)
    h, w = image.shape
    image = cv2.copyMakeBorder(image, 0, h % 2, 0, w % 2, cv2.BORDER_CONSTANT, value=0)
    size = (image.shape[1] // 2, image.shape[0] // 2)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    path = out_dir / record.name
    cv2.imwrite(str(path), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return dataclasses.replace(
        record,
        image=path.resolve(),
        landmarks=(record.landmarks + 0.5) * SCALE - 0.5,
        pixel_mm=record.pixel_mm / SCALE,
        image_size=(size[1], size[0]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biometry.io.sample", description=__doc__.splitlines()[0])
    parser.add_argument("hc18_dir", type=Path, help="HC18-style folder (training_set/ + CSV)")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (default: the bundled one)")
    parser.add_argument("--n", type=int, default=120, help="number of subjects (default 120)")
    args = parser.parse_args(argv)
    csv_path = build_sample(args.hc18_dir, args.out, n=args.n)
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
