"""Each loss term against hand-computed values; config validation messages."""
from __future__ import annotations

import math

import pytest
import torch

from biometry.losses import LossConfig, biometry_loss

ALL_ON = LossConfig(heatmap_weight=1.0, coord_weight=1.0, angle_weight=1.0, centre_weight=1.0,
                    order_weight=1.0)


def coords(*rows) -> torch.Tensor:
    """(B, 4, 2) from per-image lists of 4 (x, y) points."""
    return torch.tensor(rows, dtype=torch.float32)


# BPD horizontal, length 10, midpoint (5, 0); OFD vertical, length 16, midpoint (5, 0).
CROSS = [[0, 0], [10, 0], [5, -8], [5, 8]]
ZERO_HM = torch.zeros(1, 4, 4, 6)


def terms_of(pred_xy, true_xy=None, *, cfg=ALL_ON, scale=1.0, hm=ZERO_HM, target=ZERO_HM):
    true_xy = pred_xy if true_xy is None else true_xy
    hm, target = hm.expand(len(pred_xy), -1, -1, -1), target.expand(len(pred_xy), -1, -1, -1)
    return biometry_loss(hm, target, pred_xy, true_xy, cfg, coord_scale=scale)


def test_terms_are_all_reported_and_zero_on_a_perfect_cross():
    total, terms = terms_of(coords(CROSS))
    assert set(terms) == {"heatmap", "coord", "angle", "centre", "order", "mask", "total"}
    for key, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-7), key
    assert total.item() == pytest.approx(0.0, abs=1e-7)


def test_heatmap_mse_with_channel_weights():
    target = torch.zeros(1, 4, 4, 6)
    target[:, 0] = 1.0  # channel 0 wrong everywhere: per-channel MSE (1, 0, 0, 0)
    _, terms = terms_of(coords(CROSS), target=target)
    assert terms["heatmap"].item() == pytest.approx(0.25)
    cfg = LossConfig(channel_weights=(2, 0, 1, 1))
    _, terms = terms_of(coords(CROSS), cfg=cfg, target=target)
    assert terms["heatmap"].item() == pytest.approx(2 / 4)


def test_coord_l1_hand_computed():
    # prediction at the origin; per-landmark L1 (mean of |dx|, |dy|) after scaling by 10:
    # BPD1 0, BPD2 0.5, OFD1 0.65, OFD2 0.65 -> mean 0.45
    pred = torch.zeros(1, 4, 2)
    _, terms = terms_of(pred, coords(CROSS), scale=10.0)
    assert terms["coord"].item() == pytest.approx(0.45)
    cfg = LossConfig(coord_weight=1.0, channel_weights=(1, 1, 0, 0))  # BPD only: (0 + 0.5) / 2
    _, terms = terms_of(pred, coords(CROSS), cfg=cfg, scale=10.0)
    assert terms["coord"].item() == pytest.approx(0.25)


def test_coord_l1_is_invariant_to_the_endpoint_order_within_each_pair():
    true = coords(CROSS, CROSS)
    pred = true + torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 1.5], [-1.0, 1.0]])
    _, reference = terms_of(pred, true)
    swapped = pred.clone()
    swapped[0] = swapped[0, [1, 0, 2, 3]]  # image 0: BPD endpoints swapped
    swapped[1] = swapped[1, [1, 0, 3, 2]]  # image 1: both pairs swapped
    _, terms = terms_of(swapped, true)
    assert terms["coord"].item() == pytest.approx(reference["coord"].item())
    assert reference["coord"].item() == pytest.approx((0.75 + 1.0 + 0.75 + 1.0) / 4)
    across = pred[:, [2, 3, 0, 1]]  # BPD and OFD exchanged is an error, not a symmetry
    _, terms = terms_of(across, true)
    assert terms["coord"].item() > reference["coord"].item() + 1.0


@pytest.mark.parametrize(
    ("ofd", "expected"),
    [
        ([[5, -8], [5, 8]], 0.0),  # perpendicular
        ([[5, 8], [5, -8]], 0.0),  # same, endpoints swapped
        ([[0, 0], [3, 3]], 0.5),  # 45 degrees
        ([[3, 3], [0, 0]], 0.5),
        ([[0, 0], [math.sqrt(3), 1]], 0.75),  # 30 degrees: cos^2 = 3/4
        ([[0, 5], [20, 5]], 1.0),  # parallel
    ],
)
def test_angle_penalty_is_cos_squared(ofd, expected):
    pred = coords([[0, 0], [10, 0], *ofd])
    for scale in (1.0, 7.0):  # no unit
        _, terms = terms_of(pred, scale=scale)
        assert terms["angle"].item() == pytest.approx(expected, abs=1e-6)


def test_centre_offset_hand_computed():
    pred = coords([[0, 0], [10, 0], [5, -5], [5, 11]])  # midpoints (5, 0) and (5, 3)
    _, terms = terms_of(pred, scale=2.0)
    assert terms["centre"].item() == pytest.approx(1.5)
    pred = coords([[0, 0], [10, 0], [9, -5], [9, 11]], CROSS)  # batch mean of 5 and 0
    _, terms = terms_of(pred)
    assert terms["centre"].item() == pytest.approx(2.5)


def test_order_penalty_hand_computed():
    pred = coords([[0, 0], [10, 0], [5, -3], [5, 3]])  # |BPD| 10 > |OFD| 6
    _, terms = terms_of(pred, scale=2.0)
    assert terms["order"].item() == pytest.approx(2.0)
    _, terms = terms_of(coords(CROSS))  # |BPD| 10 < |OFD| 16
    assert terms["order"].item() == 0.0


def test_total_is_the_weighted_sum_and_zero_weights_cost_nothing():
    pred = coords([[0, 2], [14, 1], [2, -1], [7, 6]])  # |BPD| > |OFD|, midpoints apart
    pred.requires_grad_(True)
    target = torch.rand(1, 4, 4, 6)
    hm = torch.zeros(1, 4, 4, 6, requires_grad=True)
    cfg = LossConfig(heatmap_weight=2.0, coord_weight=0.5, angle_weight=3.0, centre_weight=0.0,
                     order_weight=0.0)
    total, terms = biometry_loss(hm, target, pred, coords(CROSS), cfg, coord_scale=4.0)
    expected = 2.0 * terms["heatmap"] + 0.5 * terms["coord"] + 3.0 * terms["angle"]
    assert terms["centre"] > 0 and terms["order"] > 0  # reported although off
    assert total.item() == pytest.approx(expected.item())
    assert terms["total"].item() == pytest.approx(expected.item())
    assert all(not v.requires_grad for v in terms.values())

    heatmap_only = LossConfig()  # coordinate terms off: no gradient reaches the coordinates
    total, _ = biometry_loss(hm, target, pred, coords(CROSS), heatmap_only)
    total.backward()
    assert pred.grad is None and hm.grad is not None


def test_gradients_stay_finite_when_the_prediction_collapses():
    pred = torch.full((2, 4, 2), 3.0, requires_grad=True)  # every point at one place
    hm = torch.zeros(2, 4, 4, 6, requires_grad=True)
    total, terms = biometry_loss(hm, torch.rand(2, 4, 4, 6), pred, coords(CROSS, CROSS), ALL_ON)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(pred.grad).all()
    assert terms["angle"].item() == 0.0


def test_low_precision_heatmaps_give_a_float32_loss():
    hm = torch.zeros(1, 4, 4, 6, dtype=torch.bfloat16)
    total, _ = biometry_loss(hm, ZERO_HM, coords(CROSS), coords(CROSS), ALL_ON)
    assert total.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"angle_weight": -1.0}, "angle_weight cannot be negative but got -1.0."),
        ({"heatmap_weight": -0.5}, "heatmap_weight cannot be negative but got -0.5."),
        ({"coord_weight": float("nan")}, "coord_weight must be finite but got nan."),
        ({"order_weight": "1"}, "order_weight must be a number but got '1'."),
        ({"channel_weights": (1, 1, 1)},
         "channel_weights must have 4 values (BPD1, BPD2, OFD1, OFD2) but got (1, 1, 1)."),
        ({"channel_weights": (1, -2, 1, 1)}, "channel_weights cannot be negative but got -2."),
        ({"channel_weights": (0, 0, 0, 0)},
         "channel_weights cannot all be 0 but got (0, 0, 0, 0)."),
        ({"heatmap_weight": 0.0},
         "heatmap_weight and coord_weight cannot both be 0; the other terms do not locate the "
         "landmarks."),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        LossConfig(**kwargs)
    assert str(err.value) == message


def test_config_accepts_a_list_of_channel_weights():
    cfg = LossConfig(heatmap_weight=0.0, coord_weight=1.0, channel_weights=[2, 2, 1, 1])
    assert cfg.channel_weights == (2.0, 2.0, 1.0, 1.0)
    assert cfg.weights() == {"heatmap": 0.0, "coord": 1.0, "angle": 0.0, "centre": 0.0,
                             "order": 0.0, "mask": 0.0}


def test_shape_and_scale_checks():
    with pytest.raises(ValueError, match=r"^pred_heatmaps and target_heatmaps must both be "):
        biometry_loss(ZERO_HM, torch.zeros(1, 4, 4, 5), coords(CROSS), coords(CROSS), ALL_ON)
    with pytest.raises(ValueError) as err:
        biometry_loss(ZERO_HM, ZERO_HM, torch.zeros(1, 4, 3), coords(CROSS), ALL_ON)
    assert str(err.value) == ("pred_coords and true_coords must both be (1, 4, 2) but got "
                              "(1, 4, 3) and (1, 4, 2).")
    with pytest.raises(ValueError) as err:
        biometry_loss(ZERO_HM, ZERO_HM, coords(CROSS), coords(CROSS), ALL_ON, coord_scale=0)
    assert str(err.value) == "coord_scale must be positive but got 0."


def _gaussians(points, hw=(12, 16), sigma=1.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")
    return torch.stack([torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
                        for x, y in points])[None].float()


def test_heatmap_pairings_on_swapped_targets():
    """A prediction with both pairs' channels swapped: wrong as labelled, right otherwise."""
    points = [(3, 3), (12, 8), (8, 2), (8, 10)]
    target = _gaussians(points)
    swapped = target[:, [1, 0, 3, 2]]
    xy = coords(points)
    for pairing, expect_zero in (("labelled", False), ("invariant", True), ("summed", True)):
        cfg = LossConfig(heatmap_pairing=pairing)
        _, terms = biometry_loss(swapped, target, xy, xy, cfg)
        assert (float(terms["heatmap"]) < 1e-12) == expect_zero, pairing


def test_summed_pairing_accepts_a_map_split_between_both_channels():
    points = [(3, 3), (12, 8), (8, 2), (8, 10)]
    target = _gaussians(points)
    split = target.clone()
    split[:, 0] = split[:, 1] = 0.5 * (target[:, 0] + target[:, 1])
    xy = coords(points)
    summed = biometry_loss(split, target, xy, xy, LossConfig(heatmap_pairing="summed"))[1]
    invariant = biometry_loss(split, target, xy, xy, LossConfig(heatmap_pairing="invariant"))[1]
    assert float(summed["heatmap"]) < 1e-12 < float(invariant["heatmap"])


def test_unknown_heatmap_pairing_is_refused():
    with pytest.raises(ValueError) as err:
        LossConfig(heatmap_pairing="any")
    assert str(err.value) == ("heatmap_pairing must be one of ('labelled', 'invariant', 'summed') "
                              "but got 'any'.")


def test_mask_term_is_a_per_image_dice_that_needs_a_mask_head():
    from biometry.losses import mask_dice

    target = torch.zeros(2, 8, 8)
    target[0, 2:6, 2:6] = 1  # a large head
    target[1, 4, 4] = 1  # a tiny one
    right = torch.where(target > 0, 20.0, -20.0)
    assert mask_dice(right, target, torch.ones(2)).item() == pytest.approx(0.0, abs=1e-6)
    tiny_missed = right.clone()
    tiny_missed[1, 4, 4] = -20.0
    # the tiny head counts as much as the large one: half the loss, although 1 pixel of 17 is off
    assert mask_dice(tiny_missed, target, torch.ones(2)).item() == pytest.approx(0.25, abs=0.01)
    assert mask_dice(tiny_missed, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)

    cfg = LossConfig(coord_weight=1.0, mask_weight=0.5)
    hm = ZERO_HM.expand(2, -1, -1, -1)
    xy = coords(CROSS, CROSS)
    total, terms = biometry_loss(hm, hm, xy, xy, cfg, mask=(tiny_missed, target, torch.ones(2)))
    assert terms["mask"].item() == pytest.approx(0.25, abs=0.01)
    assert total.item() == pytest.approx(0.5 * terms["mask"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="mask_weight is above 0 but no mask was given"):
        biometry_loss(hm, hm, xy, xy, cfg)
    assert terms_of(coords(CROSS))[1]["mask"].item() == 0.0  # no mask head: reported as 0
