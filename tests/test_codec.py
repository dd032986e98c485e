"""HeatmapCodec: validation, the stride convention, the round trip, torch soft-argmax; heatmap uncertainty."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biometry.codec import (
    DECODES,
    PAIRINGS,
    HeatmapCodec,
    argmax_peaks,
    pair_soft_argmax,
    soft_argmax,
    window_soft_argmax,
)
from biometry.uncertainty import heatmap_distribution, heatmap_entropy, heatmap_spread, image_uncertainty

INPUT_HW = (96, 128)


def interior_keypoints(codec: HeatmapCodec, n: int, seed: int) -> np.ndarray:
    """(n, 2) keypoints at least 5 sigma (in input px) away from every border."""
    margin = 5 * codec.sigma * codec.stride + codec.stride
    h, w = codec.input_hw
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(margin, w - 1 - margin, n), rng.uniform(margin, h - 1 - margin, n)], axis=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_hw=(96, 128), stride=0, sigma=2.0), "stride must be a positive integer but got 0."),
        (dict(input_hw=(96, 128), stride=2.0, sigma=2.0), "stride must be a positive integer but got 2.0."),
        (dict(input_hw=(96, 128), stride=4, sigma=0), "sigma must be a positive number but got 0."),
        (dict(input_hw=(96,), stride=4, sigma=2.0),
         "input_hw must be two positive integers (height, width) but got (96,)."),
        (dict(input_hw=(90, 128), stride=4, sigma=2.0),
         "input_hw must be divisible by stride but got (90, 128) and stride 4."),
        (dict(input_hw=(96, 128), stride=4, sigma=2.0, window_sigmas=0),
         "window_sigmas must be a positive number but got 0."),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        HeatmapCodec(**kwargs)
    assert str(info.value) == message


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        HeatmapCodec((96, 128), 4, 2.0)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_heatmap_pixel_centre_convention(stride):
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=stride, sigma=1.5)
    assert codec.heatmap_hw == (INPUT_HW[0] // stride, INPUT_HW[1] // stride)
    j, i = 5, 3
    point = np.array([[j * stride + (stride - 1) / 2, i * stride + (stride - 1) / 2]])
    maps = codec.encode(point)
    assert maps.shape == (1, *codec.heatmap_hw) and maps.dtype == np.float32
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (i, j)
    assert maps[0, i, j] == pytest.approx(1.0)
    assert maps[0, i, j + 1] == pytest.approx(np.exp(-1 / (2 * 1.5**2)))
    np.testing.assert_allclose(codec.to_heatmap_coords(point), [[j, i]])
    np.testing.assert_allclose(codec.to_input_coords(codec.to_heatmap_coords(point)), point)


def encoded_batch(codec: HeatmapCodec, images: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(images, 4, 2) interior keypoints, far enough apart for the unordered decoding, and their
    (images, 4, h, w) maps."""
    points = []
    rng = np.random.default_rng(seed)
    for _ in range(1000 * images):
        candidate = interior_keypoints(codec, 4, seed=int(rng.integers(1 << 30)))
        gaps = [np.abs(candidate[a] - candidate[b]).max() for a, b in ((0, 1), (2, 3))]
        if min(gaps) > 2 * codec.window_radius * codec.stride:
            points.append(candidate)
        if len(points) == images:
            break
    assert len(points) == images, "the input is too small for pairs this far apart"
    points = np.stack(points)
    return points, torch.from_numpy(np.stack([codec.encode(p) for p in points]))


# every decoder production runs (HeatmapCodec.decode), with the error bound of its round trip in
# heatmap pixels: softmax(beta * map) at the production beta leans towards the peak pixel
PRODUCTION_DECODERS = [("global", "ordered", 0.3), ("window", "ordered", 0.3),
                       ("argmax", "ordered", 0.5), ("global", "unordered", 0.3)]


def test_the_round_trip_covers_every_production_decoder():
    assert {(d, p) for d, p, _ in PRODUCTION_DECODERS} >= {(d, "ordered") for d in DECODES}
    assert {p for _, p, _ in PRODUCTION_DECODERS} == set(PAIRINGS)


@pytest.mark.parametrize("decode, pairing, bound", PRODUCTION_DECODERS)
@pytest.mark.parametrize("stride", [1, 4])
def test_round_trip(stride, decode, pairing, bound):
    codec = HeatmapCodec(input_hw=(256, 384), stride=stride, sigma=2.0)
    points, maps = encoded_batch(codec, 12, seed=stride)
    decoded, _ = codec.decode(maps, beta=20.0, decode=decode, pairing=pairing)
    decoded = decoded.numpy()
    if pairing == "unordered":  # endpoints of a pair come back in either order
        from biometry.inference import match_pairs
        decoded = match_pairs(decoded, points)
    assert decoded.shape == (12, 4, 2)
    assert np.abs(decoded - points).max() <= bound * stride + 1e-4


def test_argmax_refinement_moves_towards_the_true_point():
    codec = HeatmapCodec(input_hw=(256, 384), stride=4, sigma=2.0)
    points, maps = encoded_batch(codec, 10, seed=1)
    plain = codec.to_input_coords(argmax_peaks(maps, refine=False)).numpy()
    refined = codec.to_input_coords(argmax_peaks(maps)).numpy()
    assert np.abs(plain - points).max() <= codec.stride / 2 + 1e-6
    assert np.abs(refined - points).mean() < np.abs(plain - points).mean()


def test_one_window_radius_serves_the_window_and_the_pairs():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0)
    assert codec.window_radius == 8  # ceil(4 * 2.0)
    assert HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0, window_sigmas=3).window_radius == 6
    assert HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=0.1).window_radius == 2


def test_decode_checks_its_options():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0)
    maps = torch.zeros(1, 4, *codec.heatmap_hw)
    with pytest.raises(ValueError, match="decode must be one of"):
        codec.decode(maps, beta=1.0, decode="local")
    with pytest.raises(ValueError, match="pairing must be one of"):
        codec.decode(maps, beta=1.0, pairing="sorted")


def test_non_finite_keypoint_gives_an_empty_map_and_zero_weight():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0)
    points = np.array([[10.0, 20.0], [np.nan, 3.0], [-5.0, 3.0], [127.4, 95.4]])
    maps = codec.encode(points)
    assert maps[1].max() == 0.0
    np.testing.assert_array_equal(codec.keypoint_weights(points), [1, 0, 0, 1])


def test_global_soft_argmax_has_gradients_and_small_beta_is_pulled_to_the_centre():
    codec = HeatmapCodec(input_hw=(256, 384), stride=2, sigma=2.0)
    points, maps = encoded_batch(codec, 1, seed=3)
    tensor = maps.double().requires_grad_(True)
    coords = soft_argmax(tensor, beta=20.0)
    coords.sum().backward()
    assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    centre = np.array([(codec.heatmap_hw[1] - 1) / 2, (codec.heatmap_hw[0] - 1) / 2])
    biased = soft_argmax(maps, beta=1.0)[0].numpy()
    truth = codec.to_heatmap_coords(points[0])
    assert np.all(np.linalg.norm(biased - centre, axis=1) < 0.5 * np.linalg.norm(truth - centre, axis=1))


# -------------------------------------------------------------------------------------------------
# uncertainty of decoded heatmaps
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride, sigma", [(1, 1.5), (4, 2.0)])
def test_spread_of_a_codec_gaussian_is_sigma_sqrt2_in_input_pixels(stride, sigma):
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=stride, sigma=sigma)
    maps = codec.encode(interior_keypoints(codec, 4, seed=7))
    spread = heatmap_spread(maps, stride=stride)
    assert spread.shape == (4,)
    np.testing.assert_allclose(spread, sigma * np.sqrt(2) * stride, rtol=1e-3)


def test_sharper_maps_are_more_certain():
    points = np.array([[60.0, 40.0]])
    sharp = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=1.0).encode(points)
    broad = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=3.0).encode(points)
    assert heatmap_entropy(sharp)[0] < heatmap_entropy(broad)[0]
    assert heatmap_spread(sharp)[0] < heatmap_spread(broad)[0]


def test_empty_and_flat_maps_are_uniform():
    h, w = 12, 16
    for maps in (np.zeros((1, h, w)), np.ones((1, h, w)), -np.ones((1, h, w))):
        assert heatmap_entropy(maps)[0] == pytest.approx(1.0)
        assert heatmap_spread(maps)[0] == pytest.approx(np.sqrt((w**2 - 1) / 12 + (h**2 - 1) / 12))
    np.testing.assert_allclose(heatmap_distribution(np.zeros((2, h, w))).sum(axis=(-2, -1)), 1.0)


def test_two_peaks_spread_more_than_one():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=2.0)
    one = codec.encode(np.array([[40.0, 40.0]]))
    two = one + codec.encode(np.array([[90.0, 50.0]]))
    assert heatmap_spread(two)[0] > 4 * heatmap_spread(one)[0]


def test_image_uncertainty_numpy_and_torch_agree_and_keep_gradients():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0)
    maps = np.stack([codec.encode(p) for p in interior_keypoints(codec, 8, seed=8).reshape(2, 4, 2)])
    maps[1] += np.random.default_rng(0).uniform(0, 0.05, maps[1].shape)
    from_numpy = image_uncertainty(maps, stride=4)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (2,)
    np.testing.assert_allclose(from_numpy, heatmap_spread(maps, stride=4).mean(axis=1))
    assert from_numpy[1] > from_numpy[0]
    tensor = torch.tensor(maps, requires_grad=True)
    from_torch = image_uncertainty(tensor, stride=4)
    assert isinstance(from_torch, torch.Tensor)
    np.testing.assert_allclose(from_torch.detach().numpy(), from_numpy)
    from_torch.sum().backward()
    assert torch.isfinite(tensor.grad).all()
    soft = image_uncertainty(maps, stride=4, beta=20.0)
    assert soft.shape == (2,) and np.all(np.isfinite(soft))
    with pytest.raises(ValueError, match=r"^heatmaps must be \(B, K, h, w\) but got shape \(4, 24, 32\)\.$"):
        image_uncertainty(maps[0], stride=4)


def test_pair_soft_argmax_recovers_endpoints_in_any_channel_split():
    codec = HeatmapCodec(input_hw=(128, 192), stride=2, sigma=2.0)
    points = np.array([[50.3, 20.2], [60.7, 100.1], [20.5, 60.4], [150.2, 70.9]])
    maps = torch.from_numpy(codec.encode(points))[None]
    split = maps.clone()
    split[:, 0] = split[:, 1] = 0.5 * (maps[:, 0] + maps[:, 1])  # BPD ends shared by both channels
    swapped = maps[:, [1, 0, 3, 2]]
    for heatmaps in (maps, split, swapped):
        xy, spread = pair_soft_argmax(heatmaps.clone().requires_grad_(True), beta=20.0, radius=6)
        got = codec.to_input_coords(xy.detach()).numpy()[0]
        for a, b in ((0, 1), (2, 3)):  # the order within a pair is free
            straight = np.abs(got[[a, b]] - points[[a, b]]).max()
            crossed = np.abs(got[[b, a]] - points[[a, b]]).max()
            assert min(straight, crossed) < 0.2
        assert torch.all(spread < 1.0)  # each endpoint's half holds one compact peak


def test_pair_soft_argmax_is_differentiable_and_checks_its_input():
    maps = torch.rand(2, 4, 16, 24, requires_grad=True)
    xy, _ = pair_soft_argmax(maps, beta=5.0, radius=3)
    xy.sum().backward()
    assert maps.grad is not None and torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"heatmaps must be \(B, 4, h, w\)"):
        pair_soft_argmax(torch.zeros(1, 3, 8, 8), beta=1.0, radius=2)
    with pytest.raises(ValueError, match="radius must be a positive integer but got 0."):
        pair_soft_argmax(torch.zeros(1, 4, 8, 8), beta=1.0, radius=0)


def test_window_soft_argmax_ignores_stray_mass_that_pulls_the_global_estimate():
    codec = HeatmapCodec(input_hw=(128, 192), stride=2, sigma=2.0)
    maps = torch.from_numpy(codec.encode(np.array([[40.0, 30.0]] * 4)))[None]
    maps[..., 50:60, 70:90] += 0.9  # a faint ridge far from the peak
    exact = codec.to_heatmap_coords(torch.tensor([40.0, 30.0]))
    window = window_soft_argmax(maps, beta=20.0, radius=codec.window_radius)
    whole = soft_argmax(maps, beta=20.0)
    assert torch.allclose(window, exact.expand_as(window), atol=0.05)
    assert (whole - exact).norm(dim=-1).min() > 5  # pulled towards the ridge
    with pytest.raises(ValueError, match="radius must be a positive integer but got -1."):
        window_soft_argmax(maps, beta=1.0, radius=-1)


def test_head_region_is_the_ellipse_of_the_two_diameters_in_any_endpoint_order():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=2, sigma=2.0)
    # OFD 60 px along 30 degrees, BPD 40 px perpendicular, both centred on (64, 48)
    centre, along = np.array([64.0, 48.0]), np.array([np.cos(np.pi / 6), np.sin(np.pi / 6)])
    across = np.array([-along[1], along[0]])
    points = np.stack([centre - 20 * across, centre + 20 * across,
                       centre - 30 * along, centre + 30 * along])
    swapped = points[[1, 0, 3, 2]]
    mask, valid = codec.encode_head_region(torch.tensor(np.stack([points, swapped])))
    assert valid.tolist() == [1.0, 1.0]
    torch.testing.assert_close(mask[0], mask[1])
    area_in_heatmap_px = np.pi * 30 * 20 / codec.stride**2
    assert mask[0].sum().item() == pytest.approx(area_in_heatmap_px, rel=0.03)
    centre_px = codec.to_heatmap_coords(centre).round().astype(int)
    assert mask[0, centre_px[1], centre_px[0]] == 1
    tip = codec.to_heatmap_coords(centre + 28 * along).round().astype(int)  # inside, on the OFD
    side = codec.to_heatmap_coords(centre + 28 * across).round().astype(int)  # outside the BPD
    assert mask[0, tip[1], tip[0]] == 1 and mask[0, side[1], side[0]] == 0


def test_head_region_of_a_missing_or_degenerate_diameter_is_empty_with_zero_weight():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=4, sigma=2.0)
    nan = [[np.nan, 1.0], [10.0, 10.0], [5.0, 5.0], [30.0, 5.0]]
    collapsed = [[10.0, 10.0], [10.0, 10.0], [5.0, 5.0], [30.0, 5.0]]
    mask, valid = codec.encode_head_region(torch.tensor([nan, collapsed]))
    assert valid.tolist() == [0.0, 0.0] and mask.sum().item() == 0
