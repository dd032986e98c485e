"""Measurement and landmark metrics: mm errors, Bland–Altman agreement, NME, risk–coverage.

Landmark arrays are ``(N, 4, 2)`` in original image pixels (rows BPD1, BPD2, OFD1, OFD2) and
``pixel_mm`` is each image's pixel spacing. Endpoint order within a pair carries no meaning, so
every landmark error takes the better of the pair's two assignments. HC is the perimeter of the
ellipse whose full axes are BPD and OFD, for the prediction and the reference alike.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from biometry.geometry import diameter_lengths, ellipse_perimeter
from biometry.records import BPD, OFD

MEASURES = ("bpd", "ofd", "hc")
LOA_Z = 1.96


def _check_inputs(pred, true, pixel_mm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[1:] != (4, 2):
        raise ValueError(
            f"pred and true must both have shape (N, 4, 2) but got {pred.shape} and {true.shape}."
        )
    spacing = np.asarray(pixel_mm, dtype=np.float64)
    if spacing.ndim == 0:
        spacing = np.full(len(pred), float(spacing))
    if spacing.shape != (len(pred),):
        raise ValueError(f"pixel_mm must have shape ({len(pred)},) but got {spacing.shape}.")
    if not np.all(spacing > 0):
        raise ValueError(f"pixel_mm must be positive but got {spacing[~(spacing > 0)][0]}.")
    return pred, true, spacing


def measurements_mm(landmarks: np.ndarray, pixel_mm) -> dict[str, np.ndarray]:
    """(N, 4, 2) pixels and (N,) spacing -> ``{"bpd": (N,), "ofd": (N,), "hc": (N,)}`` in mm."""
    pts = np.asarray(landmarks, dtype=np.float64)
    bpd_px, ofd_px = diameter_lengths(pts)
    spacing = np.asarray(pixel_mm, dtype=np.float64)
    bpd, ofd = np.asarray(bpd_px) * spacing, np.asarray(ofd_px) * spacing
    return {"bpd": bpd, "ofd": ofd, "hc": np.asarray(ellipse_perimeter(bpd, ofd), dtype=np.float64)}


def landmark_errors(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(..., 4, 2) x2 -> (..., 4) Euclidean errors in pixels, rows as in ``true``.

    Within each pair the predicted endpoints are matched to the reference ones by the assignment
    with the smaller summed error.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    errors = np.empty(true.shape[:-1])
    for a, b in (BPD, OFD):
        straight = np.stack([_dist(pred[..., a, :], true[..., a, :]), _dist(pred[..., b, :], true[..., b, :])], -1)
        crossed = np.stack([_dist(pred[..., b, :], true[..., a, :]), _dist(pred[..., a, :], true[..., b, :])], -1)
        keep = (straight.sum(-1) <= crossed.sum(-1))[..., None]
        errors[..., [a, b]] = np.where(keep, straight, crossed)
    return errors


def _dist(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p - q, axis=-1)


def per_image_errors(pred: np.ndarray, true: np.ndarray, pixel_mm) -> dict[str, np.ndarray]:
    """Per-image values for tables and plots; every entry is (N,).

    Keys: ``{m}_pred_mm``, ``{m}_true_mm``, ``{m}_error_mm`` (signed, pred - true) for m in bpd, ofd,
    hc; ``landmark_error_px`` and ``landmark_error_mm`` (mean of the 4 order-invariant landmark
    errors); ``nme`` (landmark_error_px / reference OFD length in pixels); ``measure_error_mm``
    (mean of |bpd error| and |ofd error|, what uncertainty should rank).
    """
    pred, true, spacing = _check_inputs(pred, true, pixel_mm)
    predicted = measurements_mm(pred, spacing)
    reference = measurements_mm(true, spacing)
    out: dict[str, np.ndarray] = {}
    for m in MEASURES:
        out[f"{m}_pred_mm"] = predicted[m]
        out[f"{m}_true_mm"] = reference[m]
        out[f"{m}_error_mm"] = predicted[m] - reference[m]
    mean_px = landmark_errors(pred, true).mean(axis=-1)
    out["landmark_error_px"] = mean_px
    out["landmark_error_mm"] = mean_px * spacing
    with np.errstate(divide="ignore", invalid="ignore"):
        out["nme"] = mean_px / np.asarray(diameter_lengths(true)[1], dtype=np.float64)
    out["measure_error_mm"] = 0.5 * (np.abs(out["bpd_error_mm"]) + np.abs(out["ofd_error_mm"]))
    return out


@dataclass(frozen=True)
class Agreement:
    """Agreement of one measurement over N images, from the differences pred - true (mm).

    ``sd`` uses N - 1 degrees of freedom (NaN for one image); the Bland–Altman 95% limits of
    agreement are ``bias ± 1.96 sd``.
    """

    l1: float
    median: float
    bias: float
    sd: float
    loa_low: float
    loa_high: float

    @classmethod
    def from_differences(cls, differences: np.ndarray) -> Agreement:
        d = np.asarray(differences, dtype=np.float64).ravel()
        if d.size == 0:
            raise ValueError("differences must hold at least one value but got none.")
        bias = float(d.mean())
        sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
        return cls(
            l1=float(np.abs(d).mean()),
            median=float(np.median(np.abs(d))),
            bias=bias,
            sd=sd,
            loa_low=bias - LOA_Z * sd,
            loa_high=bias + LOA_Z * sd,
        )

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_l1_mm": self.l1,
            f"{prefix}_median_mm": self.median,
            f"{prefix}_bias_mm": self.bias,
            f"{prefix}_sd_mm": self.sd,
            f"{prefix}_loa_low_mm": self.loa_low,
            f"{prefix}_loa_high_mm": self.loa_high,
        }


@dataclass(frozen=True)
class MeasurementSummary:
    """What ``summarize`` returns; ``as_dict()`` gives the metric names of interfaces.md."""

    n: int
    bpd: Agreement
    ofd: Agreement
    hc: Agreement
    nme: float
    unc_spearman: float | None = None
    aurc: float | None = None

    @property
    def val_measure_l1_mm(self) -> float:
        """Mean of the BPD and OFD L1 errors in mm: the search objective."""
        return 0.5 * (self.bpd.l1 + self.ofd.l1)

    def as_dict(self) -> dict[str, float]:
        out = {"val_measure_l1_mm": self.val_measure_l1_mm}
        for m in MEASURES:
            out.update(getattr(self, m).as_dict(m))
        out["nme"] = self.nme
        if self.unc_spearman is not None:
            out["unc_spearman"] = self.unc_spearman
        if self.aurc is not None:
            out["aurc"] = self.aurc
        return out


def _check_ranking(uncertainty, errors) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    e = np.asarray(errors, dtype=np.float64).ravel()
    if u.shape != e.shape or u.size == 0:
        raise ValueError(
            f"uncertainty and errors must have the same non-zero length but got {u.size} and {e.size}."
        )
    return u, e


def risk_coverage(uncertainty, errors) -> tuple[np.ndarray, np.ndarray]:
    """(N,) x2 -> (coverage (N,), risk (N,)).

    Images are kept from the least uncertain up (stable order on ties); at coverage ``k / N`` the
    risk is the mean error of the ``k`` images kept.
    """
    u, e = _check_ranking(uncertainty, errors)
    order = np.argsort(u, kind="stable")
    kept = np.arange(1, u.size + 1)
    return kept / u.size, np.cumsum(e[order]) / kept


def aurc(uncertainty, errors) -> float:
    """AURC: the mean of the risk over the N coverage steps (in the errors' unit)."""
    return float(risk_coverage(uncertainty, errors)[1].mean())


def error_at_coverage(uncertainty, errors, coverage: float) -> float:
    """Mean error of the ``ceil(coverage * N)`` least uncertain images (at least one)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1] but got {coverage}.")
    covered, risk = risk_coverage(uncertainty, errors)
    k = max(1, int(np.ceil(coverage * covered.size - 1e-9)))
    return float(risk[k - 1])


def spearman(uncertainty, errors) -> float:
    """Spearman rank correlation; NaN when either side is constant or N < 2."""
    u, e = _check_ranking(uncertainty, errors)
    if u.size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(u, e).statistic)


def summarize(pred: np.ndarray, true: np.ndarray, pixel_mm, *, uncertainty=None) -> MeasurementSummary:
    """Metrics over N labelled images.

    Args:
        pred: (N, 4, 2) predicted landmarks in original pixels.
        true: (N, 4, 2) reference landmarks in original pixels.
        pixel_mm: (N,) pixel spacing in mm (a scalar is broadcast).
        uncertainty: optional (N,) per-image score (larger = less certain); adds ``unc_spearman``
            and ``aurc``, both against ``per_image_errors(...)["measure_error_mm"]``.

    Example:
        >>> true = np.array([[[0, 10], [0, -10], [-15, 0], [15, 0]]], dtype=float)
        >>> summarize(true + 1.0, true, [0.5]).as_dict()["bpd_l1_mm"]
        0.0
    """
    errors = per_image_errors(pred, true, pixel_mm)
    if len(errors["nme"]) == 0:
        raise ValueError("pred must hold at least one image but got none.")
    unc_rho = area = None
    if uncertainty is not None:
        unc = np.asarray(uncertainty, dtype=np.float64).ravel()
        if unc.shape != errors["nme"].shape:
            raise ValueError(f"uncertainty must have shape ({len(errors['nme'])},) but got {unc.shape}.")
        unc_rho = spearman(unc, errors["measure_error_mm"])
        area = aurc(unc, errors["measure_error_mm"])
    return MeasurementSummary(
        n=len(errors["nme"]),
        bpd=Agreement.from_differences(errors["bpd_error_mm"]),
        ofd=Agreement.from_differences(errors["ofd_error_mm"]),
        hc=Agreement.from_differences(errors["hc_error_mm"]),
        nme=float(errors["nme"].mean()),
        unc_spearman=unc_rho,
        aurc=area,
    )
