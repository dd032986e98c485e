"""``python -m biometry inspect DATA --out DIR``: import a data set, check it, write
``DIR/landmarks.csv``, ``DIR/inspect.json`` and overlay PNGs in ``DIR/overlays/``.

``landmarks.csv`` is a landmark CSV with ``subject`` and ``hc_mm``; images outside ``DIR`` are
hard-linked (or copied) to ``DIR/images/`` so that ``inspect DIR/landmarks.csv`` gives the same
landmarks. Everything is imported and checked before anything is written; no existing file is
deleted.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from biometry.checks import cut_off_heads, implausible_rows
from biometry.commands._arguments import add_data_out_skip
from biometry.geometry import diameter_lengths, ellipse_perimeter
from biometry.io import ImportResult, import_dataset, read_grayscale, write_landmark_csv
from biometry.records import LandmarkRecord

BPD_COLOUR = (0, 200, 0)  # BGR green
OFD_COLOUR = (0, 140, 255)  # BGR orange


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_out_skip(parser, positional=True)
    parser.add_argument("--overlays", type=int, default=8, metavar="N",
                        help="number of overlay PNGs (flagged images first; default 8)")


def run(args: argparse.Namespace) -> int:
    result = import_dataset(args.data, skip_bad=args.skip_bad)
    flagged = implausible_rows(result.records)
    report = build_report(result, flagged)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_landmark_csv(result.records, out / "landmarks.csv", link_images=True)
    report["overlays"] = write_overlays(result.records, flagged, out / "overlays", n=args.overlays)
    (out / "inspect.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(summary_text(report, out))
    return 0


def build_report(result: ImportResult, flagged: list[tuple[str, list[str]]]) -> dict:
    """The content of ``inspect.json`` (overlays added by the caller)."""
    records = result.records
    lm = np.array([r.landmarks for r in records])
    pixel_mm = np.array([r.pixel_mm for r in records])
    bpd, ofd = diameter_lengths(lm)
    subjects = Counter(r.subject for r in records)
    swap = result.swap
    return {
        "data": str(result.source),
        "n_images": len(records),
        "n_subjects": len(subjects),
        "images_per_subject": dict(sorted(Counter(subjects.values()).items())),
        "subjects": dict(sorted(subjects.items())),
        "image_sizes": {f"{w}x{h}": n for (h, w), n in Counter(r.image_size for r in records).most_common()},
        "pixel_mm": _stats(pixel_mm),
        "bpd_mm": _stats(bpd * pixel_mm),
        "ofd_mm": _stats(ofd * pixel_mm),
        "hc_agreement": hc_agreement(records),
        "swap": {
            "n_rows": swap.n_rows,
            "n_swapped": swap.n_swapped,
            "majority_swapped": swap.majority_swapped,
            "fixed": swap.n_swapped > 0,
            "fixed_rows": [] if swap.majority_swapped else list(swap.swapped_rows),
        },
        "outside_image": cut_off_heads(records),
        "flagged": [{"image": name, "reasons": reasons} for name, reasons in flagged],
        "skipped": [{"item": item, "reason": reason} for item, reason in result.skipped],
        "repeated_rows": [{"kept": kept, "dropped": dropped} for kept, dropped in result.repeated],
    }


def hc_agreement(records: list[LandmarkRecord]) -> dict | None:
    """Landmark HC (Ramanujan perimeter of the BPD x OFD ellipse) against the source's ``hc_mm``:
    ``{n, mean_abs_diff_mm, max_abs_diff_mm, bias_mm, worst}``, or None without ``hc_mm``."""
    with_hc = [r for r in records if r.hc_mm is not None]
    if not with_hc:
        return None
    bpd, ofd = diameter_lengths(np.array([r.landmarks for r in with_hc]))
    pixel_mm = np.array([r.pixel_mm for r in with_hc])
    diff = ellipse_perimeter(bpd, ofd) * pixel_mm - np.array([r.hc_mm for r in with_hc])
    worst = int(np.argmax(np.abs(diff)))
    return {
        "n": len(with_hc),
        "mean_abs_diff_mm": round(float(np.abs(diff).mean()), 4),
        "max_abs_diff_mm": round(float(np.abs(diff).max()), 4),
        "bias_mm": round(float(diff.mean()), 4),
        "worst": with_hc[worst].name,
    }


def write_overlays(
    records: list[LandmarkRecord], flagged: list[tuple[str, list[str]]], folder: Path, *, n: int
) -> list[str]:
    """Draw the BPD (green) and OFD (orange) of ``n`` records, flagged ones first then evenly
    spread; return the written paths."""
    chosen = choose_overlays(records, [name for name, _ in flagged], n=n)
    if chosen:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in chosen:
        path = folder / (Path(r.name).with_suffix("").as_posix().replace("/", "_") + ".png")
        cv2.imwrite(str(path), draw_landmarks(read_grayscale(r.image), r.landmarks))
        written.append(str(path))
    return written


def choose_overlays(records: list[LandmarkRecord], flagged: list[str], *, n: int) -> list[LandmarkRecord]:
    flagged_set = set(flagged)
    first = [r for r in records if r.name in flagged_set][:n]
    rest = [r for r in records if r.name not in flagged_set]
    k = min(n - len(first), len(rest))
    picks = np.linspace(0, len(rest) - 1, k).round().astype(int) if k > 0 else []
    return first + [rest[i] for i in picks]


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """BGR copy of a grey ``image (H, W)`` with the BPD and OFD lines and endpoints drawn."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(image.shape) / 400))
    points = np.round(np.asarray(landmarks) * 16).astype(np.int32)  # 4 fractional bits
    for (i, j), colour in (((0, 1), BPD_COLOUR), ((2, 3), OFD_COLOUR)):
        cv2.line(canvas, points[i], points[j], colour, thickness, cv2.LINE_AA, shift=4)
        for k in (i, j):
            cv2.circle(canvas, points[k], 3 * thickness * 16, colour, thickness, cv2.LINE_AA, shift=4)
    return canvas


def summary_text(report: dict, out: Path) -> str:
    lines = [f"{report['data']}: {report['n_images']} images, {report['n_subjects']} subjects"]
    hc = report["hc_agreement"]
    if hc:
        lines.append(f"HC from landmarks vs source: mean |diff| {hc['mean_abs_diff_mm']:.3f} mm, "
                     f"max {hc['max_abs_diff_mm']:.3f} mm ({hc['worst']}) over {hc['n']} images")
    swap = report["swap"]
    lines.append(f"BPD longer than OFD in {swap['n_swapped']} of {swap['n_rows']} rows"
                 + swap_fix_text(swap))
    lines.append(outside_image_text(report["outside_image"]))
    lines.append(f"flagged: {len(report['flagged'])}, skipped: {len(report['skipped'])}, "
                 f"repeated rows dropped: {len(report['repeated_rows'])}")
    lines.append(f"wrote {out / 'landmarks.csv'}, {out / 'inspect.json'}, {len(report['overlays'])} overlays")
    return "\n".join(lines)


def swap_fix_text(swap: dict) -> str:
    """What the import did to the swapped rows, for the summary line."""
    if swap["majority_swapped"]:
        return " (columns swapped back)"
    return " (each fixed: BPD and OFD exchanged)" if swap["fixed"] else ""


def outside_image_text(section: dict, *, listed: int = 5) -> str:
    """One line: how many heads cross the frame, and the first ``listed`` of them."""
    images = [entry["image"] for entry in section["images"]]
    text = (f"landmarks outside the image (kept, up to {section['margin_frac']:.0%} of its size): "
            f"{section['n']} images")
    if images:
        text += ": " + ", ".join(images[:listed]) + (" ..." if len(images) > listed else "")
    return text


def _stats(values: np.ndarray) -> dict:
    return {k: round(float(f(values)), 6) for k, f in
            (("min", np.min), ("median", np.median), ("max", np.max))}
