"""Metrics against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from biometry.metrics import (
    Agreement,
    aurc,
    error_at_coverage,
    landmark_errors,
    measurements_mm,
    per_image_errors,
    risk_coverage,
    spearman,
    summarize,
)

EXPECTED_KEYS = {
    "val_measure_l1_mm", "nme",
    *(f"{m}_{s}_mm" for m in ("bpd", "ofd", "hc") for s in ("l1", "median", "bias", "sd", "loa_low", "loa_high")),
}


def head(bpd: float, ofd: float, centre=(100.0, 80.0)) -> np.ndarray:
    """(4, 2) landmarks of an axis-aligned head: vertical BPD, horizontal OFD."""
    cx, cy = centre
    return np.array([[cx, cy - bpd / 2], [cx, cy + bpd / 2], [cx - ofd / 2, cy], [cx + ofd / 2, cy]])


def test_circle_measurements():
    m = measurements_mm(head(40.0, 40.0)[None], np.array([0.25]))
    assert m["bpd"][0] == pytest.approx(10.0)
    assert m["ofd"][0] == pytest.approx(10.0)
    assert m["hc"][0] == pytest.approx(math.pi * 10.0)


def test_pixel_spacing_is_per_image():
    m = measurements_mm(np.stack([head(40, 60), head(40, 60)]), np.array([0.1, 0.2]))
    np.testing.assert_allclose(m["bpd"], [4.0, 8.0])
    np.testing.assert_allclose(m["ofd"], [6.0, 12.0])


def test_three_four_five():
    true = head(40, 60)
    pred = true.copy()
    pred[0] += [3.0, 4.0]
    np.testing.assert_allclose(landmark_errors(pred, true), [5.0, 0.0, 0.0, 0.0])
    errors = per_image_errors(pred[None], true[None], [1.0])
    assert errors["landmark_error_px"][0] == pytest.approx(5.0 / 4)
    assert errors["nme"][0] == pytest.approx(5.0 / 4 / 60)
    # BPD1 moved from (100, 60) to (103, 64): the BPD becomes sqrt(3^2 + 36^2) long
    assert errors["bpd_error_mm"][0] == pytest.approx(math.hypot(3, 36) - 40)


def test_landmark_errors_are_order_invariant_within_each_pair():
    true = head(40, 60)
    swapped = true[[1, 0, 3, 2]]
    np.testing.assert_allclose(landmark_errors(swapped, true), 0.0)
    shifted = swapped + [1.0, 0.0]
    np.testing.assert_allclose(landmark_errors(shifted, true), 1.0)


def test_landmark_errors_never_cross_pairs():
    true = head(40, 60)
    pred = true[[2, 3, 0, 1]]
    assert landmark_errors(pred, true).min() > 10


def test_nme_by_hand():
    true = head(40, 100)
    pred = true + [0.0, 2.0]
    summary = summarize(pred[None], true[None], [0.5])
    assert summary.nme == pytest.approx(2.0 / 100)


def test_bias_sd_and_limits_of_agreement_by_hand():
    true = np.stack([head(50, 80)] * 4)
    pred = np.stack([head(b, 80) for b in (51, 52, 53, 56)])
    summary = summarize(pred, true, np.ones(4))
    d = np.array([1.0, 2.0, 3.0, 6.0])
    sd = math.sqrt(((d - 3) ** 2).sum() / 3)
    assert summary.bpd == Agreement(l1=3.0, median=2.5, bias=3.0, sd=pytest.approx(sd),
                                    loa_low=pytest.approx(3 - 1.96 * sd), loa_high=pytest.approx(3 + 1.96 * sd))
    assert summary.ofd.l1 == 0 and summary.ofd.sd == 0
    assert summary.val_measure_l1_mm == pytest.approx(1.5)
    assert sd == pytest.approx(2.160246899)


def test_signed_bias_and_absolute_l1():
    true = np.stack([head(50, 80)] * 2)
    pred = np.stack([head(52, 80), head(48, 80)])
    agreement = summarize(pred, true, [1.0, 1.0]).bpd
    assert agreement.bias == pytest.approx(0.0)
    assert agreement.l1 == pytest.approx(2.0)
    assert agreement.median == pytest.approx(2.0)
    assert agreement.sd == pytest.approx(math.sqrt(8))
    assert (agreement.loa_low, agreement.loa_high) == pytest.approx((-1.96 * math.sqrt(8), 1.96 * math.sqrt(8)))


def test_hc_uses_the_ellipse_of_each_side():
    true = head(40, 40)[None]
    pred = head(40, 40)[None] * 1.0
    pred[0, 2:] = head(40, 60)[2:]
    s = summarize(pred, true, [1.0])
    a, b = 30.0, 20.0  # semi-axes of the predicted ellipse
    h = ((a - b) / (a + b)) ** 2
    expected = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))
    assert s.hc.bias == pytest.approx(expected - math.pi * 40)


def test_summary_keys_are_exactly_the_interface_names():
    true = np.stack([head(50, 80), head(45, 70), head(40, 60)])
    pred = true + np.random.default_rng(0).normal(0, 1, true.shape)
    plain = summarize(pred, true, [0.1, 0.2, 0.3]).as_dict()
    assert set(plain) == EXPECTED_KEYS
    assert all(isinstance(v, float) for v in plain.values())
    with_unc = summarize(pred, true, [0.1, 0.2, 0.3], uncertainty=[1.0, 2.0, 3.0]).as_dict()
    assert set(with_unc) == EXPECTED_KEYS | {"unc_spearman", "aurc"}
    assert plain["val_measure_l1_mm"] == pytest.approx((plain["bpd_l1_mm"] + plain["ofd_l1_mm"]) / 2)


def test_one_image_has_no_spread():
    summary = summarize(head(50, 80)[None] + 1, head(50, 80)[None], [1.0])
    assert math.isnan(summary.bpd.sd) and math.isnan(summary.bpd.loa_low)
    assert summary.n == 1


def test_risk_coverage_by_hand():
    coverage, risk = risk_coverage([0.3, 0.1, 0.2, 0.4], [3.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [1.0, 1.5, 2.0, 2.5])


def test_aurc_perfect_versus_reversed_ranking():
    errors = np.array([1.0, 2.0, 3.0, 4.0])
    assert aurc(errors, errors) == pytest.approx((1 + 1.5 + 2 + 2.5) / 4)
    assert aurc(-errors, errors) == pytest.approx((4 + 3.5 + 3 + 2.5) / 4)
    assert spearman(errors, errors) == pytest.approx(1.0)
    assert spearman(-errors, errors) == pytest.approx(-1.0)


def test_aurc_of_a_random_ranking_sits_between():
    rng = np.random.default_rng(0)
    errors = rng.exponential(1.0, 200)
    best, worst = aurc(errors, errors), aurc(-errors, errors)
    assert best < aurc(rng.random(200), errors) < worst


def test_summarize_uses_the_mean_of_bpd_and_ofd_errors_for_uncertainty():
    true = np.stack([head(50, 80)] * 3)
    pred = np.stack([head(50, 80), head(52, 80), head(50, 86)])
    errors = per_image_errors(pred, true, np.ones(3))["measure_error_mm"]
    np.testing.assert_allclose(errors, [0.0, 1.0, 3.0])
    s = summarize(pred, true, np.ones(3), uncertainty=[0.0, 1.0, 2.0])
    assert s.unc_spearman == pytest.approx(1.0)
    assert s.aurc == pytest.approx((0 + 0.5 + 4 / 3) / 3)


def test_error_at_coverage():
    u = [0.1, 0.2, 0.3, 0.4]
    e = [1.0, 2.0, 3.0, 10.0]
    assert error_at_coverage(u, e, 0.5) == pytest.approx(1.5)
    assert error_at_coverage(u, e, 0.6) == pytest.approx(2.0)
    assert error_at_coverage(u, e, 1.0) == pytest.approx(4.0)
    assert error_at_coverage(u, e, 0.01) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"^coverage must be in \(0, 1\] but got 0\.$"):
        error_at_coverage(u, e, 0)


def test_spearman_of_constant_uncertainty_is_nan():
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    "pred, true, spacing, message",
    [
        (np.zeros((2, 4, 2)), np.zeros((3, 4, 2)), [1.0, 1.0],
         "pred and true must both have shape (N, 4, 2) but got (2, 4, 2) and (3, 4, 2)."),
        (np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), [1.0], "pixel_mm must have shape (2,) but got (1,)."),
        (np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), [1.0, 0.0], "pixel_mm must be positive but got 0.0."),
    ],
)
def test_validation_messages(pred, true, spacing, message):
    with pytest.raises(ValueError) as info:
        summarize(pred, true, spacing)
    assert str(info.value) == message


def test_uncertainty_length_is_checked():
    true = np.stack([head(50, 80)] * 2)
    with pytest.raises(ValueError, match=r"^uncertainty must have shape \(2,\) but got \(3,\)\.$"):
        summarize(true, true, [1.0, 1.0], uncertainty=[1.0, 2.0, 3.0])
