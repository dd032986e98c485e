"""Data import and export: every importer returns ``list[LandmarkRecord]`` through
:func:`load_records`, which also fixes swapped BPD/OFD (columns or single rows) in one place.

>>> from biometry.io import bundled_sample_path, load_records, split_by_subject
>>> records = load_records(bundled_sample_path())
>>> sorted(split_by_subject(records))
['test', 'train', 'val']
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biometry.checks import SwapReport, fix_swapped_semantics
from biometry.errors import BiometryInputError
from biometry.io.hc18 import HC18_CSV, is_hc18_folder, read_hc18
from biometry.io.images import read_grayscale
from biometry.io.landmark_csv import read_landmark_csv, write_landmark_csv
from biometry.io.splits import split_by_subject
from biometry.io.synthetic import write_synthetic_dataset
from biometry.records import LandmarkRecord

__all__ = [
    "ImportResult",
    "bundled_sample_path",
    "import_dataset",
    "load_records",
    "read_grayscale",
    "split_by_subject",
    "write_landmark_csv",
    "write_synthetic_dataset",
]

LANDMARK_CSV_IN_FOLDER = "landmarks.csv"


def bundled_sample_path() -> Path:
    """The landmark CSV of the small real HC18 sample bundled in the package (120 half-size
    images, one per subject; see ``biometry/sample_data/hc18_sample/README.md``)."""
    from biometry.io import sample  # imported here so ``python -m biometry.io.sample`` runs cleanly

    return sample.bundled_sample_path()


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_dataset` found.

    Attributes:
        source: the data set path as given.
        records: the records, BPD/OFD already exchanged in every row whose BPD was the longer.
        skipped: ``[(item, reason)]`` left out with ``skip_bad``.
        swap: swapped-row report on the landmarks as given.
        repeated: ``[(kept row, dropped row)]``: rows naming an image an earlier row names with
            the same label, dropped.
    """

    source: Path
    records: list[LandmarkRecord]
    skipped: list[tuple[str, str]]
    swap: SwapReport
    repeated: list[tuple[str, str]] = field(default_factory=list)


def load_records(path: str | Path, *, skip_bad: bool = False) -> list[LandmarkRecord]:
    """Import a data set: an HC18-style folder or a landmark CSV (see :func:`import_dataset`)."""
    return import_dataset(path, skip_bad=skip_bad).records


def import_dataset(path: str | Path, *, skip_bad: bool = False) -> ImportResult:
    """Import a data set with the details ``inspect`` reports.

    Args:
        path: an HC18-style folder (with ``training_set_pixel_size_and_HC.csv``), a landmark CSV,
            or a folder holding ``landmarks.csv``.
        skip_bad: leave out bad rows/images with one warning line each on stderr and a count,
            instead of raising :class:`BiometryInputError` at the first.
    """
    path = Path(path)
    if path.is_dir() and is_hc18_folder(path):
        records, skipped, rows = read_hc18(path, skip_bad=skip_bad)
    elif path.is_dir() and (path / LANDMARK_CSV_IN_FOLDER).is_file():
        records, skipped, rows = read_landmark_csv(path / LANDMARK_CSV_IN_FOLDER, skip_bad=skip_bad)
    elif path.is_file():
        records, skipped, rows = read_landmark_csv(path, skip_bad=skip_bad)
    elif path.is_dir():
        raise BiometryInputError(f"{path}: neither an HC18 folder (no {HC18_CSV}) nor a folder "
                                 f"with {LANDMARK_CSV_IN_FOLDER}")
    else:
        raise BiometryInputError(f"{path}: no such file or folder")
    for item, reason in skipped:
        print(f"warning: skipped {item}: {reason}", file=sys.stderr)
    if skipped:
        print(f"warning: {path}: skipped {len(skipped)} of {len(skipped) + len(records)} items",
              file=sys.stderr)
    if not records:
        raise BiometryInputError(f"{path}: no usable records")
    records, rows, repeated = drop_repeated_images(records, rows, source=str(path))
    records, swap = fix_swapped_semantics(records, str(path), rows=rows)
    return ImportResult(path, records, skipped, swap, repeated)


def drop_repeated_images(records: list[LandmarkRecord], rows: list[str], *, source: str):
    """Keep the first of the rows naming the same image file: ``(records, rows, repeated)``.

    A repeat with the same landmarks (to 1e-3 px), pixel size and HC is dropped, listed in
    ``repeated = [(kept row, dropped row)]`` and named in one warning line; one with a different
    label raises :class:`BiometryInputError` naming both rows, since either may be the right one.
    """
    first: dict[Path, int] = {}
    kept, kept_rows, repeated = [], [], []
    for record, row in zip(records, rows):
        index = first.setdefault(Path(record.image).resolve(), len(kept))
        if index == len(kept):
            kept.append(record)
            kept_rows.append(row)
        elif same_label(kept[index], record):
            repeated.append((kept_rows[index], row))
        else:
            raise BiometryInputError(f"{source}: {kept_rows[index]} and {row} name the same image "
                                     "with different landmarks, pixel size or HC")
    if repeated:
        named = ", ".join(f"{dropped} (= {earlier})" for earlier, dropped in repeated[:10])
        print(f"warning: {source}: {len(repeated)} rows repeat an earlier row exactly and were "
              f"dropped: {named}" + (" ..." if len(repeated) > 10 else ""), file=sys.stderr)
    return kept, kept_rows, repeated


def same_label(a: LandmarkRecord, b: LandmarkRecord) -> bool:
    same_hc = (a.hc_mm is None) == (b.hc_mm is None) and (
        a.hc_mm is None or math.isclose(a.hc_mm, b.hc_mm, rel_tol=1e-6))
    return (bool(np.allclose(a.landmarks, b.landmarks, atol=1e-3))
            and math.isclose(a.pixel_mm, b.pixel_mm, rel_tol=1e-6) and same_hc)
