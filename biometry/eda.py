"""Exploratory data analysis: normalised landmark features, robust outlier scores with reasons,
the core subset for training, and the ``eda`` report.

Every label is reduced to a few numbers that do not depend on where the head lies in the image,
how large it is in pixels, how it is rotated, or which endpoint of a pair comes first
(:func:`landmark_features`). A label is an outlier when its feature vector is far from the bulk of
the data set in the robust Mahalanobis sense (Minimum Covariance Determinant), so a tail of wrong
annotations does not mask itself (:func:`outlier_scores`). Per-feature robust z-scores
(median / MAD) give the human reasons (:func:`outlier_table`).

>>> from biometry.io import bundled_sample_path, load_records
>>> records = load_records(bundled_sample_path())
>>> scores = outlier_scores(records)
>>> len(scores) == len(records), min(scores.values()) >= 0
(True, True)
>>> kept, excluded = core_subset(records, exclude_fraction=0.05)
>>> len(kept) + len(excluded) == len(records), len(excluded)
(True, 6)
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from biometry.checks import SwapReport, cut_off_heads, detect_swapped_semantics
from biometry.geometry import diameter_lengths
from biometry.records import LANDMARK_NAMES, LandmarkRecord

# (name, what it is, floor of its robust scale in its own unit). Shape features are fractions of
# the OFD length; the floors say which deviation is meaningful when a data set has none at all
# (HC18's landmarks are the axes of fitted ellipses: exactly perpendicular and concentric).
FEATURES = (
    ("ratio", "bpd/ofd ratio", 0.01),
    ("tilt_deg", "tilt of the bpd from perpendicular (deg)", 1.0),
    ("centre_along", "bpd midpoint along the ofd / ofd", 0.01),
    ("centre_across", "bpd midpoint across the ofd / ofd", 0.01),
    ("ofd_mm", "ofd length (mm)", 1.0),
    ("bpd_mm", "bpd length (mm)", 1.0),
)
FEATURE_NAMES = tuple(name for name, _, _ in FEATURES)
# The score uses the shape only. Head size follows gestational age (HC18: OFD 21 to 124 mm, a long
# third-trimester tail), so with the sizes in the distance the highest HC18 scores are the largest
# and smallest heads: valid labels that a core subset must keep. Sizes stay in the features and
# the report.
SCORED = FEATURE_NAMES[:4]
REASON_Z = 3.5  # |robust z| from which a feature is named as a reason (Iglewicz and Hoaglin)
JITTER = 0.1  # std of the fixed noise added to the robust-z features before the MCD fit
RANDOM_STATE = 0
MIN_ROWS_PER_FEATURE = 5  # fewer rows than this per feature: diagonal distance instead of MCD
CUTOFF_QUANTILE = 0.975  # chi-square quantile of the squared distance that counts as flagged

MAD_TO_SD = 1.4826


# ----------------------------------------------------------------------------- features


def normalised_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks ``(N, 4, 2)`` in the OFD frame: ``(N, 4, 2)``.

    The OFD midpoint is the origin, the OFD length is 1 and the OFD lies along x, so the OFD
    endpoints are (-0.5, 0) and (0.5, 0). The frame's direction (OFD pointing left or right) is
    chosen so that the BPD midpoint has x >= 0, and the BPD endpoint with the smaller y comes first,
    so neither the endpoint order within a pair nor the position, size or rotation of the head
    changes the result. Rows with a zero-length OFD are NaN.
    """
    lm = np.asarray(landmarks, dtype=float).reshape(-1, 4, 2)
    o1, o2, b1, b2 = lm[:, 2], lm[:, 3], lm[:, 0], lm[:, 1]
    length = np.linalg.norm(o2 - o1, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = (o2 - o1) / np.where(length > 0, length, np.nan)[:, None]
    centre = (o1 + o2) / 2
    mid = (b1 + b2) / 2 - centre
    e = np.where(np.sum(mid * e, axis=-1, keepdims=True) < 0, -e, e)
    n = np.stack([-e[:, 1], e[:, 0]], axis=-1)

    def frame(p):
        d = p - centre
        return np.stack([np.sum(d * e, -1), np.sum(d * n, -1)], axis=-1) / length[:, None]

    bpd = np.stack([frame(b1), frame(b2)], axis=1)
    flip = bpd[:, 0, 1] > bpd[:, 1, 1]
    bpd[flip] = bpd[flip][:, ::-1]
    ofd = np.broadcast_to(np.array([[-0.5, 0.0], [0.5, 0.0]]), bpd.shape).copy()
    ofd[~np.isfinite(length) | (length == 0)] = np.nan
    return np.concatenate([bpd, ofd], axis=1)


def landmark_features(records: Sequence[LandmarkRecord]) -> tuple[tuple[str, ...], np.ndarray]:
    """The normalised landmark vector of each record: ``(feature_names, X (N, 6))``.

    Columns (:data:`FEATURE_NAMES`):

    - ``ratio``: BPD / OFD length;
    - ``tilt_deg``: signed angle of the BPD from the perpendicular to the OFD (0 for the axes of an
      ellipse; the angle between the diameters is ``90 - |tilt_deg|``);
    - ``centre_along``, ``centre_across``: distance of the BPD midpoint from the OFD midpoint along
      and across the OFD, as fractions of the OFD length;
    - ``ofd_mm``, ``bpd_mm``: the absolute lengths.

    The first four are the BPD endpoints in the OFD frame of :func:`normalised_landmarks` (4
    numbers: 8 coordinates less position, rotation and scale) written as quantities with a
    meaning. All six are invariant to the position, rotation and endpoint order of each pair, the
    first four also to scale. Rows with a zero-length diameter are NaN.
    """
    lm = np.array([r.landmarks for r in records], dtype=float).reshape(-1, 4, 2)
    pixel_mm = np.array([r.pixel_mm for r in records], dtype=float)
    bpd_px, ofd_px = diameter_lengths(lm)
    frame = normalised_landmarks(lm)
    mid = frame[:, :2].mean(axis=1)
    half = (frame[:, 1] - frame[:, 0]) / 2  # points to +y (the endpoints are ordered by y)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(ofd_px > 0, bpd_px / ofd_px, np.nan)
        tilt = np.degrees(np.arctan2(half[:, 0], half[:, 1]))
    tilt = np.where(bpd_px > 0, tilt, np.nan)
    features = np.stack([ratio, tilt, np.abs(mid[:, 0]), np.abs(mid[:, 1]),
                         ofd_px * pixel_mm, bpd_px * pixel_mm], axis=1)
    return FEATURE_NAMES, features


def order_pairs(landmarks: np.ndarray) -> np.ndarray:
    """``(N, 4, 2)`` with each pair ordered along the pair's dominant direction over the data set,
    the rule of :class:`biometry.transforms.Orientation` (BiometryNet) that the trainer applies:
    the direction is the leading eigenvector of ``sum(d d^T)`` over the pair's difference vectors,
    signed so that its larger component is positive, and endpoint 1 has the smaller projection.
    Written out here because importing ``biometry.transforms`` costs seconds (albumentations)."""
    lm = np.array(landmarks, dtype=float).reshape(-1, 4, 2)
    for first, second in ((0, 1), (2, 3)):
        d = lm[:, second] - lm[:, first]
        if not len(d):
            continue
        direction = np.linalg.eigh(d.T @ d)[1][:, -1]
        direction = direction * np.sign(direction[np.argmax(np.abs(direction))])
        swap = (lm[:, second] @ direction < lm[:, first] @ direction)[:, None]
        lm[:, first], lm[:, second] = (np.where(swap, lm[:, second], lm[:, first]),
                                       np.where(swap, lm[:, first], lm[:, second]))
    return lm


# ----------------------------------------------------------------------------- scores


class OutlierRow(NamedTuple):
    """One line of ``outliers.csv``: the image, its robust Mahalanobis distance, the reasons."""

    image: str
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class OutlierFit:
    """Everything :func:`fit_outliers` computed, rows in record order.

    Attributes:
        names: record names.
        features: ``(N, 6)`` raw features (:data:`FEATURE_NAMES`).
        median, scale: ``(6,)`` robust centre and scale (1.4826 MAD, at least the feature's floor).
        z: ``(N, 6)`` robust z-scores ``(features - median) / scale``.
        scores: ``(N,)`` robust Mahalanobis distances (``inf`` for a zero-length diameter).
        cutoff: the distance above which a row counts as flagged (chi-square 97.5% quantile).
        method: ``"mcd"`` or ``"diagonal"`` (too few rows for a covariance).
    """

    names: list[str]
    features: np.ndarray
    median: np.ndarray
    scale: np.ndarray
    z: np.ndarray
    scores: np.ndarray
    cutoff: float
    method: str


def fit_outliers(records: Sequence[LandmarkRecord]) -> OutlierFit:
    """Robust Mahalanobis distance of every record's shape features (:data:`SCORED`).

    Each feature is standardised by its median and MAD (floored, see :data:`FEATURES`). The
    Minimum Covariance Determinant (``MinCovDet(random_state=0)``) is fitted on the standardised
    shape features plus Gaussian noise of std :data:`JITTER` from a fixed seed, rows in name order:
    the noise bounds the precision in directions where the labels do not vary at all, where the
    MCD would otherwise be singular, and the order makes the result independent of the row order.
    The distances are those of the features without noise. With fewer than 5 rows per feature the
    distance is the norm of the robust z-scores instead.
    """
    from scipy.stats import chi2

    names = [r.name for r in records]
    _, x = landmark_features(records)
    n = len(x)
    floors = np.array([floor for _, _, floor in FEATURES])
    finite = np.all(np.isfinite(x), axis=1)
    if finite.any():
        median = np.median(x[finite], axis=0)
        mad = np.median(np.abs(x[finite] - median), axis=0)
    else:
        median, mad = np.zeros(len(floors)), np.zeros(len(floors))
    scale = np.maximum(MAD_TO_SD * mad, floors)
    z = (x - median) / scale
    shape = z[:, [FEATURE_NAMES.index(name) for name in SCORED]]
    p = shape.shape[1]
    scores = np.full(n, np.inf)
    method = "mcd" if finite.sum() >= MIN_ROWS_PER_FEATURE * p else "diagonal"
    if method == "mcd":
        from sklearn.covariance import MinCovDet

        rows = np.flatnonzero(finite)
        rows = rows[np.argsort([names[i] for i in rows], kind="stable")]
        noise = np.random.default_rng(RANDOM_STATE).normal(0.0, JITTER, (len(rows), p))
        mcd = MinCovDet(random_state=RANDOM_STATE).fit(shape[rows] + noise)
        scores[finite] = np.sqrt(mcd.mahalanobis(shape[finite]))
    else:
        scores[finite] = np.linalg.norm(shape[finite], axis=1)
    cutoff = float(np.sqrt(chi2.ppf(CUTOFF_QUANTILE, p)))
    return OutlierFit(names, x, median, scale, z, scores, cutoff, method)


def outlier_scores(records: Sequence[LandmarkRecord]) -> dict[str, float]:
    """``{record.name: robust Mahalanobis distance}`` (see :func:`fit_outliers`); higher is
    stranger. A name given twice keeps its highest score."""
    fit = fit_outliers(records)
    scores: dict[str, float] = {}
    for name, score in zip(fit.names, fit.scores):
        scores[name] = max(float(score), scores.get(name, -math.inf))
    return scores


def outlier_table(records: Sequence[LandmarkRecord]) -> list[OutlierRow]:
    """Every record as ``(image, score, reasons)``, highest score first (ties by name).

    Reasons name what is unusual, e.g. ``"bpd longer than ofd (ratio 1.27)"``,
    ``"angle between diameters 63 deg, 27 from 90"``, ``"bpd/ofd ratio 0.52 unusual (z=-4.1)"``,
    ``"centres 12% of ofd apart"``; a row whose score is above the cutoff with no single unusual
    feature gets ``"unusual combination (largest: ...)"``.
    """
    return _table(fit_outliers(records))


def _table(fit: OutlierFit) -> list[OutlierRow]:
    rows = [OutlierRow(name, float(fit.scores[i]), tuple(_reasons(fit, i)))
            for i, name in enumerate(fit.names)]
    return sorted(rows, key=lambda row: (-row.score, row.image))


def _reasons(fit: OutlierFit, i: int) -> list[str]:
    ratio, tilt, along, across = fit.features[i, :4]
    z = dict(zip(FEATURE_NAMES, fit.z[i]))
    if not np.isfinite(ratio):
        return ["ofd has zero length"]
    if not np.isfinite(tilt):
        return ["bpd has zero length"]
    reasons = []
    if ratio > 1:
        reasons.append(f"bpd longer than ofd (ratio {ratio:.2f})")
    elif abs(z["ratio"]) >= REASON_Z:
        reasons.append(f"bpd/ofd ratio {ratio:.2f} unusual (z={z['ratio']:+.1f})")
    if abs(z["tilt_deg"]) >= REASON_Z:
        angle = 90 - abs(tilt)
        reasons.append(f"angle between diameters {angle:.0f} deg, {90 - angle:.0f} from 90")
    if max(abs(z["centre_along"]), abs(z["centre_across"])) >= REASON_Z:
        reasons.append(f"centres {100 * math.hypot(along, across):.0f}% of ofd apart")
    if not reasons and fit.scores[i] > fit.cutoff:
        j = max(range(len(SCORED)), key=lambda k: abs(z[SCORED[k]]))
        reasons.append(f"unusual combination (largest: {FEATURES[j][1]} z={z[SCORED[j]]:+.1f})")
    return reasons


def core_subset(records: Sequence[LandmarkRecord], *, exclude_fraction: float
                ) -> tuple[list[LandmarkRecord], list[str]]:
    """Drop the top ``exclude_fraction`` of records by outlier score: ``(kept, excluded_names)``.

    ``round(exclude_fraction * len(records))`` records are excluded, as the search's
    ``--exclude-outliers`` does; ``kept`` keeps the input order, ``excluded_names`` runs from the
    highest score down.

    Args:
        records: the training records (never filter validation or test labels with this).
        exclude_fraction: in [0, 1).
    """
    if not 0 <= exclude_fraction < 1:
        raise ValueError(f"exclude_fraction must be in [0, 1) but got {exclude_fraction!r}.")
    k = int(round(exclude_fraction * len(records)))
    if k == 0:
        return list(records), []
    ranked = sorted(outlier_scores(records).items(), key=lambda kv: (-kv[1], kv[0]))
    excluded = [name for name, _ in ranked[:k]]
    dropped = set(excluded)
    return [r for r in records if r.name not in dropped], excluded


# ----------------------------------------------------------------------------- images


def image_statistics(records: Sequence[LandmarkRecord], *,
                     threads: int = 2) -> dict[str, np.ndarray]:
    """Mean and std of the grey levels of each image (:func:`read_for_stats`):
    ``{"mean": (N,), "std": (N,), "height": (N,), "width": (N,)}`` (NaN where unreadable; the sizes
    are the original ones, 0 where unknown and unreadable)."""

    def one(record: LandmarkRecord):
        image, factor = read_for_stats(record.image)
        if image is None:
            return (np.nan, np.nan, *record.image_size)
        mean, std = cv2.meanStdDev(image)
        height, width = record.image_size if record.image_size[0] else (
            image.shape[0] * factor, image.shape[1] * factor)
        return float(mean[0, 0]), float(std[0, 0]), height, width

    with ThreadPoolExecutor(max(1, threads)) as pool:
        values = np.array(list(pool.map(one, records)), dtype=float).reshape(-1, 4)
    return dict(zip(("mean", "std", "height", "width"), values.T))


def read_for_stats(path: str | Path) -> tuple[np.ndarray | None, int]:
    """``(grey image, downscale factor)``: JPEGs at 1/4 size (libjpeg decodes them reduced, about
    4x faster), other formats at full size (a reduced PNG read decodes everything, then resizes:
    20 ms against 11 ms for 800x540 here). ``(None, 1)`` when unreadable."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None, 1
    if not data.size:
        return None, 1
    reduced = Path(path).suffix.lower() in (".jpg", ".jpeg")
    flag = cv2.IMREAD_REDUCED_GRAYSCALE_4 if reduced else cv2.IMREAD_GRAYSCALE
    return cv2.imdecode(data, flag), 4 if reduced else 1


# ----------------------------------------------------------------------------- report

PLOTS = ("counts", "spacing", "intensity", "density", "measurements", "geometry", "scores",
         "top_outliers")
BPD_COLOUR = "#00c800"
OFD_COLOUR = "#ff8c00"


def run_eda(records: Sequence[LandmarkRecord], out_dir: str | Path, *, source: str,
            swap_report: SwapReport | None = None, skipped: Sequence[tuple[str, str]] = (),
            repeated: Sequence[tuple[str, str]] = (), top: int = 12) -> dict:
    """Write the data report into ``out_dir`` and return the content of ``eda.json``.

    Files: ``report.md`` (Markdown with the PNGs of :data:`PLOTS`), ``outliers.csv``
    (``image,score,reasons``: every record, highest score first, reasons joined by ``"; "``) and
    ``eda.json``. ``out_dir`` is created if needed; nothing else in it is touched.

    Args:
        records: the imported records (BPD/OFD already fixed when the columns were swapped).
        out_dir: output folder.
        source: the data set as the user named it (for the report).
        swap_report: the swap check of the data as given (``ImportResult.swap``); when None it is
            computed on ``records``.
        skipped: ``[(item, reason)]`` left out by the importer.
        repeated: ``[(kept row, dropped row)]`` exact repeats the importer dropped.
        top: number of flagged images listed and drawn.
    """
    started = time.perf_counter()
    records = list(records)
    if top < 0:
        raise ValueError(f"top cannot be negative but got {top}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fit = fit_outliers(records)
    table = _table(fit)
    write_outliers_csv(table, out / "outliers.csv")
    images = image_statistics(records)
    lm = np.array([r.landmarks for r in records], dtype=float).reshape(-1, 4, 2)
    pixel_mm = np.array([r.pixel_mm for r in records], dtype=float)
    bpd_px, ofd_px = diameter_lengths(lm)
    ratio, tilt, along, across = fit.features[:, :4].T
    angle = 90 - np.abs(tilt)
    offset = np.hypot(along, across)
    subjects = Counter(r.subject for r in records)
    swap = swap_report if swap_report is not None else detect_swapped_semantics(lm)
    index = {name: i for i, name in enumerate(fit.names)}
    flagged = [row for row in table if row.score > fit.cutoff]

    report = {
        "source": source,
        "n_images": len(records),
        "n_subjects": len(subjects),
        "images_per_subject": {str(k): v for k, v in sorted(Counter(subjects.values()).items())},
        "image_sizes": {f"{int(w)}x{int(h)}": n for (h, w), n in
                        Counter(zip(images["height"], images["width"])).most_common()},
        "pixel_mm": _stats(pixel_mm),
        "intensity": _intensity_section(fit.names, images),
        "measurements": {"bpd_mm": _stats(bpd_px * pixel_mm), "ofd_mm": _stats(ofd_px * pixel_mm),
                         "ratio": _stats(ratio), "angle_deg": _stats(angle),
                         "centre_offset_frac": _stats(offset)},
        "swap": {**_swap_section(swap), "fixed": swap_report is not None and swap.n_swapped > 0,
                 "bpd_longer_than_ofd": [fit.names[i] for i in np.flatnonzero(bpd_px > ofd_px)]},
        "outliers": _outliers_section(fit, table, n_flagged=len(flagged), top=top),
        "outside_image": cut_off_heads(records),
        "skipped": [{"item": item, "reason": reason} for item, reason in skipped],
        "repeated_rows": [{"kept": kept, "dropped": dropped} for kept, dropped in repeated],
        "files": {"report": str(out / "report.md"), "outliers": str(out / "outliers.csv"),
                  "plots": [str(out / f"{name}.png") for name in PLOTS]},
    }

    # plots: matplotlib's object API, no pyplot (no global backend, nothing left open)
    plots = _Plots(out)
    plots.counts(subjects, report["image_sizes"])
    plots.spacing(pixel_mm)
    plots.intensity(images["mean"], images["std"])
    plots.density(lm, images["height"], images["width"])
    plots.measurements(bpd_px * pixel_mm, ofd_px * pixel_mm, ratio, fit.scores, fit.cutoff)
    plots.geometry(angle, offset, normalised_landmarks(lm), fit.scores, fit.cutoff)
    plots.scores(fit.scores, fit.cutoff)
    plots.top_outliers([records[index[row.image]] for row in table[:top]], table[:top])

    report["seconds"] = round(time.perf_counter() - started, 2)
    (out / "report.md").write_text(_markdown(report, table, top), encoding="utf-8")
    (out / "eda.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _intensity_section(names: Sequence[str], images: dict) -> dict:
    return {
        "mean": _stats(images["mean"]),
        "std": _stats(images["std"]),
        "unreadable": [names[i] for i in np.flatnonzero(~np.isfinite(images["mean"]))],
        "lowest_contrast": _extremes(names, images["std"], 5, lowest=True),
        "darkest": _extremes(names, images["mean"], 5, lowest=True),
        "brightest": _extremes(names, images["mean"], 5, lowest=False),
    }


def _swap_section(swap: SwapReport) -> dict:
    return {"n_rows": swap.n_rows, "n_swapped": swap.n_swapped,
            "majority_swapped": swap.majority_swapped,
            "fixed_rows": [] if swap.majority_swapped else list(swap.swapped_rows)}


def _outliers_section(fit, table: Sequence[OutlierRow], *, n_flagged: int, top: int) -> dict:
    return {
        "method": fit.method,
        "features": list(FEATURE_NAMES),
        "feature_median": _named(fit.median),
        "feature_scale": _named(fit.scale),
        "cutoff": round(fit.cutoff, 4),
        "n_flagged": n_flagged,
        "score": _stats(fit.scores[np.isfinite(fit.scores)]),
        "top": [{"image": r.image, "score": _round(r.score), "reasons": list(r.reasons)}
                for r in table[:top]],
    }


def write_outliers_csv(table: Sequence[OutlierRow], path: str | Path) -> Path:
    """``image,score,reasons`` in the order given (reasons joined by ``"; "``)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image", "score", "reasons"))
        for row in table:
            writer.writerow((row.image, f"{row.score:.4f}", "; ".join(row.reasons)))
    return path


class _Plots:
    """One PNG per method, written into ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _figure(self, ncols: int, *, nrows: int = 1, size=(4.0, 3.2)):
        from matplotlib.figure import Figure

        width, height = size[0] * ncols, size[1] * nrows
        fig = Figure(figsize=(width, height))
        # margins in inches (tick labels, axis labels, two-line titles); no layout engine: it
        # cost about half of the report's time
        fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                            top=1 - 0.45 / height, wspace=0.45, hspace=0.55)
        return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()

    def _save(self, fig, name: str) -> None:
        fig.savefig(self.folder / f"{name}.png", dpi=80)

    def counts(self, subjects: Counter, sizes: dict[str, int]) -> None:
        fig, (a, b) = self._figure(2)
        per_subject = Counter(subjects.values())
        keys = sorted(per_subject)
        a.bar([str(k) for k in keys], [per_subject[k] for k in keys], color="grey")
        a.set(xlabel="images per subject", ylabel="subjects",
              title=f"{sum(subjects.values())} images, {len(subjects)} subjects")
        shown = list(sizes.items())[:10]
        b.barh([k for k, _ in shown][::-1], [v for _, v in shown][::-1], color="grey")
        b.set(xlabel="images", title="image sizes (w x h)")
        self._save(fig, "counts")

    def spacing(self, pixel_mm: np.ndarray) -> None:
        fig, (a,) = self._figure(1, size=(5.0, 3.2))
        a.hist(pixel_mm, bins=40, color="grey")
        a.set(xlabel="pixel spacing (mm)", ylabel="images", title="pixel spacing")
        self._save(fig, "spacing")

    def intensity(self, mean: np.ndarray, std: np.ndarray) -> None:
        fig, (a, b, c) = self._figure(3)
        ok = np.isfinite(mean)
        a.hist(mean[ok], bins=40, color="grey")
        a.set(xlabel="mean grey level", ylabel="images", title="brightness")
        b.hist(std[ok], bins=40, color="grey")
        b.set(xlabel="std of grey levels", title="contrast")
        c.scatter(mean[ok], std[ok], s=6, color="k", alpha=0.5)
        c.set(xlabel="mean", ylabel="std", title="per image")
        self._save(fig, "intensity")

    def density(self, lm: np.ndarray, height: np.ndarray, width: np.ndarray) -> None:
        """Row 1: each landmark as labelled; row 2: each pair ordered as the trainer orders it
        (:func:`order_pairs`)."""
        fig, axes = self._figure(4, nrows=2, size=(3.2, 2.6))
        ok = (height > 0) & (width > 0)
        rows = [("as labelled", lm[ok]), ("ordered", order_pairs(lm[ok]))]
        for r, (label, points) in enumerate(rows):
            x = points[:, :, 0] / width[ok, None]
            y = points[:, :, 1] / height[ok, None]
            for k in range(4):
                ax = axes[4 * r + k]
                ax.hist2d(x[:, k], y[:, k], bins=(40, 27), range=((0, 1), (0, 1)), cmap="magma")
                ax.set(title=f"{LANDMARK_NAMES[k]} {label}", xlim=(0, 1), ylim=(1, 0))
            axes[4 * r].set_ylabel("y / height")
        for ax in axes[4:]:
            ax.set_xlabel("x / width")
        self._save(fig, "density")

    def measurements(self, bpd_mm, ofd_mm, ratio, scores, cutoff) -> None:
        fig, axes = self._figure(4, size=(3.4, 3.0))
        axes[0].hist(bpd_mm, bins=40, color=BPD_COLOUR)
        axes[0].set(xlabel="BPD (mm)", ylabel="images")
        axes[1].hist(ofd_mm, bins=40, color=OFD_COLOUR)
        axes[1].set(xlabel="OFD (mm)")
        axes[2].hist(ratio[np.isfinite(ratio)], bins=40, color="grey")
        axes[2].set(xlabel="BPD / OFD")
        flagged = scores > cutoff
        axes[3].scatter(ofd_mm[~flagged], bpd_mm[~flagged], s=5, color="k", alpha=0.5)
        axes[3].scatter(ofd_mm[flagged], bpd_mm[flagged], s=12, color="r", label="flagged")
        top = np.nanmax(np.r_[ofd_mm, bpd_mm, 1.0])
        axes[3].plot([0, top], [0, top], ":", color="grey", lw=1)
        axes[3].set(xlabel="OFD (mm)", ylabel="BPD (mm)", title="red: flagged")
        self._save(fig, "measurements")

    def geometry(self, angle, offset, frame, scores, cutoff) -> None:
        fig, (a, b, c) = self._figure(3)
        a.hist(angle[np.isfinite(angle)], bins=45, range=(0, 90), color="grey")
        finite = offset[np.isfinite(offset)]
        a.set(xlabel="angle between diameters (deg)", ylabel="images", yscale="log")
        b.hist(finite, bins=40, range=(0, max(0.1, float(finite.max(initial=0)))), color="grey")
        b.set(xlabel="centre offset / OFD", yscale="log")
        flagged = scores > cutoff
        for mask, colour, size in ((~flagged, "k", 4), (flagged, "r", 10)):
            c.scatter(frame[mask, :2, 0].ravel(), frame[mask, :2, 1].ravel(), s=size, color=colour,
                      alpha=0.5)
        c.plot([-0.5, 0.5], [0, 0], color=OFD_COLOUR, lw=2)
        c.set(aspect="equal", title="BPD endpoints in the OFD frame", xlabel="along OFD / OFD")
        self._save(fig, "geometry")

    def scores(self, scores, cutoff) -> None:
        fig, (a,) = self._figure(1, size=(5.0, 3.2))
        finite = scores[np.isfinite(scores)]
        a.hist(np.log10(np.maximum(finite, 1e-3)), bins=50, color="grey")
        a.axvline(np.log10(cutoff), color="r", ls="--", label=f"cutoff {cutoff:.1f}")
        a.set(xlabel="log10 robust Mahalanobis distance", ylabel="images",
              title=f"outlier scores ({int((scores > cutoff).sum())} above the cutoff)")
        a.legend()
        self._save(fig, "scores")

    def top_outliers(self, records: list[LandmarkRecord], rows: list[OutlierRow]) -> None:
        ncols = min(4, max(1, len(rows)))
        nrows = max(1, math.ceil(len(rows) / ncols))
        fig, axes = self._figure(ncols, nrows=nrows, size=(3.6, 3.0))
        for ax in axes:
            ax.set_axis_off()
        for ax, record, row in zip(axes, records, rows):
            image, factor = read_for_stats(record.image)
            if image is not None:
                h, w = record.image_size if record.image_size[0] else (image.shape[0] * factor,
                                                                       image.shape[1] * factor)
                size = min(400, image.shape[1])
                shown = cv2.resize(image, (size, max(1, round(size * h / w))),
                                   interpolation=cv2.INTER_AREA)
                ax.imshow(shown, cmap="gray", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
            p = np.asarray(record.landmarks)
            ax.plot(p[:2, 0], p[:2, 1], "o-", color=BPD_COLOUR, ms=3, lw=1.2)
            ax.plot(p[2:, 0], p[2:, 1], "o-", color=OFD_COLOUR, ms=3, lw=1.2)
            reason = row.reasons[0] if row.reasons else ""
            ax.set_title(f"{row.image}  score {row.score:.1f}\n{reason}", fontsize=7)
        if not rows:
            axes[0].text(0.5, 0.5, "no images", ha="center")
        self._save(fig, "top_outliers")


def _swap_text(s: dict) -> str:
    if s["fixed"] and s["majority_swapped"]:
        text = (f"{s['n_swapped']} of {s['n_rows']} rows had BPD longer than OFD: the columns "
                "looked exchanged and were swapped back on import.")
    elif s["fixed"]:
        text = (f"{s['n_swapped']} of {s['n_rows']} rows had BPD longer than OFD; each was fixed "
                "on import by exchanging its BPD and OFD (BPD is the shorter by definition): "
                + ", ".join(f"`{r}`" for r in s["fixed_rows"][:20])
                + (" ..." if len(s["fixed_rows"]) > 20 else "") + ".")
    else:
        text = f"{s['n_swapped']} of {s['n_rows']} rows have BPD longer than OFD."
    if s["bpd_longer_than_ofd"]:
        text += (" Rows with BPD longer than OFD after import: "
                 + ", ".join(f"`{n}`" for n in s["bpd_longer_than_ofd"][:20])
                 + (" ..." if len(s["bpd_longer_than_ofd"]) > 20 else "") + ".")
    return text


def _outside_text(section: dict, *, listed: int = 20) -> str:
    images = section["images"]
    text = (f"{section['n']} images with a landmark outside the image, kept (up to "
            f"{section['margin_frac']:.0%} of its size)")
    if images:
        text += ": " + ", ".join(f"`{e['image']}` ({', '.join(e['landmarks'])}, "
                                 f"{e['max_outside_px']:g} px)" for e in images[:listed])
        text += " ..." if len(images) > listed else ""
    return text + "."


def _markdown(report: dict, table: list[OutlierRow], top: int) -> str:
    m, o, s, i = report["measurements"], report["outliers"], report["swap"], report["intensity"]

    def stat(d, fmt="{:.1f}"):
        return (f"median {fmt.format(d['median'])} (min {fmt.format(d['min'])}, "
                f"max {fmt.format(d['max'])})") if d else "n/a"

    swap_text = _swap_text(s)
    lines = [
        f"# Data report: {report['source']}",
        "",
        f"- {report['n_images']} images of {report['n_subjects']} subjects; images per subject: "
        + ", ".join(f"{k}: {v}" for k, v in report["images_per_subject"].items()),
        "- image sizes: " + ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items()),
        f"- pixel spacing: {stat(report['pixel_mm'], '{:.4f}')} mm",
        f"- swap check: {swap_text}",
        f"- outliers: {o['n_flagged']} of {report['n_images']} above the cutoff {o['cutoff']:.2f}",
        f"- heads cut by the frame: {_outside_text(report['outside_image'])}",
        f"- skipped on import: {len(report['skipped'])}",
        f"- rows repeating an earlier row exactly, dropped on import: {len(report['repeated_rows'])}"
        + "".join(f"; `{r['dropped']}` (= `{r['kept']}`)" for r in report["repeated_rows"][:20]),
        "",
        "## Counts and sizes",
        "![counts](counts.png)",
        "",
        "## Pixel spacing",
        "![spacing](spacing.png)",
        "",
        "## Intensity and contrast",
        "Mean and standard deviation of the grey levels of each image (JPEGs read at 1/4 size).",
        f"Mean: {stat(i['mean'])}; std: {stat(i['std'])}.",
        "Lowest contrast: " + ", ".join(f"`{n}`" for n in i["lowest_contrast"]) + ".",
        "",
        "![intensity](intensity.png)",
        "",
        "## Landmark density",
        "Each landmark in image coordinates divided by the image size: as labelled (top) and with "
        "each pair ordered along its dominant direction, as the trainer orders it (bottom).",
        "",
        "![density](density.png)",
        "",
        "## Measurements",
        "| | median | min | max |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {d['median']:.3g} | {d['min']:.3g} | {d['max']:.3g} |"
          for k, d in m.items() if d),
        "",
        "![measurements](measurements.png)",
        "",
        "## Geometry",
        "Angle between the diameters (90 for the axes of an ellipse), distance between their "
        "midpoints as a fraction of the OFD, and the BPD endpoints in the OFD frame (OFD midpoint "
        "at 0, OFD length 1, OFD along x).",
        "",
        "![geometry](geometry.png)",
        "",
        "## Outlier scores",
        "Robust Mahalanobis distance (Minimum Covariance Determinant) of the normalised landmark "
        f"features {', '.join(f'`{f}`' for f in o['features'])}; invariant to position, "
        "rotation and endpoint order, the shape features also to scale. Reasons name the features "
        f"with a robust z-score (median / MAD) of at least {REASON_Z}. All images with their "
        "scores: `outliers.csv`.",
        "",
        "![scores](scores.png)",
        "",
        "| image | score | reasons |",
        "| --- | --- | --- |",
        *(f"| `{r.image}` | {r.score:.1f} | {'; '.join(r.reasons)} |" for r in table[:top]),
        "",
        f"## Top {min(top, len(table))} images by score",
        "BPD green, OFD orange.",
        "",
        "![top outliers](top_outliers.png)",
        "",
    ]
    return "\n".join(lines)


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return {}
    return {k: _round(f(values)) for k, f in
            (("min", np.min), ("p05", lambda v: np.quantile(v, 0.05)), ("median", np.median),
             ("p95", lambda v: np.quantile(v, 0.95)), ("max", np.max))}


def _named(values: np.ndarray) -> dict:
    return {name: _round(v) for name, v in zip(FEATURE_NAMES, values)}


def _extremes(names: list[str], values: np.ndarray, k: int, *, lowest: bool) -> list[str]:
    ok = np.flatnonzero(np.isfinite(values))
    order = ok[np.argsort(values[ok], kind="stable")]
    order = order if lowest else order[::-1]
    return [names[i] for i in order[:k]]


def _round(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None
