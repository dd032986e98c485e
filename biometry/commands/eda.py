"""``python -m biometry eda DATA --out DIR``: a data-quality report before any search.

Writes ``DIR/report.md`` (Markdown with PNG plots: counts, sizes, spacing, intensity and contrast,
landmark density maps, measurements, geometry, the swap check, outlier scores and the top flagged
images), ``DIR/outliers.csv`` (``image,score,reasons``, every image, highest score first) and
``DIR/eda.json``. ``DIR`` is created if needed; no existing file is deleted.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from biometry.commands._arguments import add_data_out_skip
from biometry.commands.inspect import swap_fix_text
from biometry.eda import run_eda
from biometry.io import import_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_out_skip(parser, positional=True)
    parser.add_argument("--top", type=_non_negative_int, default=12, metavar="N",
                        help="flagged images listed in the report and drawn (default 12)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    result = import_dataset(args.data, skip_bad=args.skip_bad)
    imported = time.perf_counter() - started
    report = run_eda(result.records, args.out, source=str(args.data), swap_report=result.swap,
                     skipped=result.skipped, repeated=result.repeated, top=args.top)
    print(summary_text(report, Path(args.out), seconds=(imported, time.perf_counter() - started)))
    return 0


def summary_text(report: dict, out: Path, *, seconds: tuple[float, float]) -> str:
    swap, outliers = report["swap"], report["outliers"]
    with open(out / "outliers.csv", newline="", encoding="utf-8") as f:
        top5 = [row for _, row in zip(range(5), csv.DictReader(f))]
    lines = [
        f"{report['source']}: {report['n_images']} images, {report['n_subjects']} subjects, "
        f"{len(report['skipped'])} skipped",
        f"BPD longer than OFD in {swap['n_swapped']} of {swap['n_rows']} rows"
        + swap_fix_text(swap)
        + (f"; after import: {len(swap['bpd_longer_than_ofd'])}" if swap["bpd_longer_than_ofd"]
           else ""),
        f"landmarks outside the image (kept): {report['outside_image']['n']} images",
        f"outliers: {outliers['n_flagged']} above the cutoff {outliers['cutoff']:.2f}; "
        f"top {len(top5)}:",
        *(f"  {float(row['score']):8.2f}  {row['image']}  {row['reasons']}".rstrip()
          for row in top5),
        f"wrote {out / 'report.md'}, {out / 'outliers.csv'}, {out / 'eda.json'} "
        f"({seconds[1]:.1f} s, import {seconds[0]:.1f} s)",
    ]
    return "\n".join(lines)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative but got {value}")
    return value
