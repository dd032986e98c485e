"""The landmark CSV: ``image,pixel_mm,bpd_x1,...,ofd_y2`` and optionally ``subject,hc_mm``.

``image`` is relative to the CSV's folder and must stay inside it; coordinates are original image
pixels (x right, y down, pixel centres at integers), so the image spans ``[-0.5, W - 0.5]`` x
``[-0.5, H - 0.5]``. A landmark may lie outside it by up to
:data:`biometry.checks.OUTSIDE_MARGIN_FRAC` of the image's size (a head cut by the frame); further
out, the row is refused.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from biometry.checks import OUTSIDE_MARGIN_FRAC
from biometry.errors import BiometryInputError
from biometry.io.images import link_or_copy, read_grayscale
from biometry.records import LandmarkRecord

COORD_COLUMNS = ("bpd_x1", "bpd_y1", "bpd_x2", "bpd_y2", "ofd_x1", "ofd_y1", "ofd_x2", "ofd_y2")
REQUIRED_COLUMNS = ("image", "pixel_mm", *COORD_COLUMNS)
COLUMNS = (*REQUIRED_COLUMNS, "subject", "hc_mm")
IMAGES_DIR = "images"


def default_subject(name: str) -> str:
    """The HC18 rule: the number before the first underscore (``017_2HC.png`` -> ``017``), else
    the file stem."""
    stem = Path(name).stem
    match = re.match(r"^(\d+)_", stem)
    return match.group(1) if match else stem


def read_landmark_csv(path: Path, *, skip_bad: bool = False):
    """Read a landmark CSV: ``(records, skipped, rows)`` with ``skipped = [(item, reason)]`` and
    ``rows`` a label per record (``"row 3 (a.png)"``).

    Every image is decoded once, in a small thread pool (unreadable files are found here). A bad
    row raises :class:`BiometryInputError` naming the file, row (1-based, header excluded) and
    column, or is skipped when ``skip_bad``; a missing file or column always raises.
    """
    rows = _read_rows(path)
    folder = path.resolve().parent

    def parse(numbered: tuple[int, dict[str, str]]) -> LandmarkRecord | BiometryInputError:
        try:
            return _parse_row(numbered[1], row_no=numbered[0], csv_path=path, folder=folder)
        except BiometryInputError as err:
            return err

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(parse, enumerate(rows, start=1)))
    labels = [f"row {n} ({row['image']})" for n, row in enumerate(rows, start=1)]
    return collect(results, [f"{path} row {n}" for n in range(1, len(rows) + 1)], labels,
                   skip_bad=skip_bad)


def collect(results: list, items: list[str], labels: list[str], *, skip_bad: bool):
    """Split per-item results (a record or the BiometryInputError it raised) into
    ``(records, skipped, rows)``: ``rows`` labels each record (``"row 3 (a.png)"``) for messages.
    Without ``skip_bad`` the first error is raised."""
    records, skipped, rows = [], [], []
    for item, label, result in zip(items, labels, results):
        if isinstance(result, BiometryInputError):
            if not skip_bad:
                raise result
            skipped.append((item, str(result)))
        else:
            records.append(result)
            rows.append(label)
    return records, skipped, rows


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise BiometryInputError(f"{path}: landmark CSV not found")
    header, rows = read_csv_rows(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise BiometryInputError(
            f"{path}: missing column '{missing[0]}' (the header has: {','.join(header) or 'nothing'})"
        )
    if not rows:
        raise BiometryInputError(f"{path}: no data rows")
    return rows


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV file, names and cells stripped; one-line error if it is not
    readable text CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise BiometryInputError(f"{path}: not a readable CSV file ({err})") from None
    return header, rows


def outside_image(landmarks: np.ndarray, image_size: tuple[int, int], *,
                  margin_frac: float = 0.0) -> int | None:
    """Index into ``landmarks.ravel()`` of the first coordinate outside the image (pixel centres at
    integers, so the image spans [-0.5, W - 0.5] x [-0.5, H - 0.5]) widened on every side by
    ``margin_frac`` of its width (x) and height (y), or None."""
    height, width = image_size
    flat = np.asarray(landmarks, dtype=float).ravel()
    margins = np.tile([margin_frac * width, margin_frac * height], len(flat) // 2)
    limits = np.tile([width - 0.5, height - 0.5], len(flat) // 2) + margins
    bad = np.flatnonzero(~((flat >= -0.5 - margins) & (flat <= limits)))
    return int(bad[0]) if bad.size else None


def beyond_margin_text(index: int, image_size: tuple[int, int]) -> str:
    """``"outside the WxH image by more than M px (10% of its width)"`` for coordinate ``index`` of
    ``landmarks.ravel()`` (even: x, odd: y)."""
    height, width = image_size
    side, size = ("width", width) if index % 2 == 0 else ("height", height)
    return (f"outside the {width}x{height} image by more than {OUTSIDE_MARGIN_FRAC * size:g} px "
            f"({OUTSIDE_MARGIN_FRAC:.0%} of its {side})")


def _parse_row(row: dict[str, str], *, row_no: int, csv_path: Path, folder: Path) -> LandmarkRecord:
    name = row["image"]
    where = f"{csv_path}: row {row_no} ({name or 'no image'})"
    if not name:
        raise BiometryInputError(f"{csv_path}: row {row_no}: column 'image' is empty")
    image_path = (folder / name).resolve()
    if not image_path.is_relative_to(folder):
        raise BiometryInputError(f"{where}: column 'image' leaves the data folder {folder}")
    pixel_mm = _number(row, "pixel_mm", where)
    if not pixel_mm > 0:
        raise BiometryInputError(f"{where}: column 'pixel_mm' must be > 0, got {row['pixel_mm']}")
    coords = np.array([_number(row, c, where) for c in COORD_COLUMNS]).reshape(4, 2)
    hc_mm = _number(row, "hc_mm", where) if row.get("hc_mm") else None
    if hc_mm is not None and not hc_mm > 0:
        raise BiometryInputError(f"{where}: column 'hc_mm' must be > 0, got {row['hc_mm']}")
    try:
        height, width = read_grayscale(image_path).shape
    except BiometryInputError as err:
        raise BiometryInputError(f"{where}: {err}") from None
    bad = outside_image(coords, (height, width), margin_frac=OUTSIDE_MARGIN_FRAC)
    if bad is not None:
        raise BiometryInputError(f"{where}: column '{COORD_COLUMNS[bad]}' = "
                                 f"{coords.ravel()[bad]:g} is {beyond_margin_text(bad, (height, width))}")
    return LandmarkRecord(
        image=image_path,
        landmarks=coords,
        pixel_mm=pixel_mm,
        subject=row.get("subject") or default_subject(name),
        name=name,
        hc_mm=hc_mm,
        image_size=(height, width),
    )


def _number(row: dict[str, str], column: str, where: str) -> float:
    text = row.get(column, "")
    try:
        value = float(text)
    except ValueError:
        raise BiometryInputError(f"{where}: column '{column}' is not a number: '{text}'") from None
    if not math.isfinite(value):
        raise BiometryInputError(f"{where}: column '{column}' is {text or 'empty'}")
    return value


def write_landmark_csv(
    records: Iterable[LandmarkRecord], path: str | Path, *, link_images: bool = False
) -> Path:
    """Write ``records`` as a landmark CSV (with ``subject`` and ``hc_mm``) that loads back to the
    same landmarks (coordinates to 1e-4 px).

    ``image`` is written relative to the CSV's folder. An image outside that folder raises
    ``ValueError``, unless ``link_images``: then it is hard-linked (or copied) to
    ``images/<record.name>`` beside the CSV, so the CSV stays self-contained. Returns ``path``.
    """
    path = Path(path)
    folder = path.resolve().parent
    lines = []
    for r in records:
        image = Path(r.image).resolve()
        if not image.is_relative_to(folder):
            if not link_images:
                raise ValueError(f"{image} is not inside {folder}: pass link_images=True")
            target = folder / IMAGES_DIR / _link_name(r.name, image)
            link_or_copy(image, target)
            image = target
        lm = np.asarray(r.landmarks, dtype=float).ravel()
        lines.append([
            Path(os.path.relpath(image, folder)).as_posix(),
            f"{r.pixel_mm:.12g}",
            *(f"{v:.4f}" for v in lm),
            r.subject,
            "" if r.hc_mm is None else f"{r.hc_mm:.4f}",
        ])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(lines)
    return path


def _link_name(name: str, image: Path) -> Path:
    rel = Path(name)
    return Path(image.name) if rel.is_absolute() or ".." in rel.parts else rel
