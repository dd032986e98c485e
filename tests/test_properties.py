"""Properties (hypothesis): order invariance, scale invariance, HC bounds, codec and letterbox maps."""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from biometry.codec import HeatmapCodec
from biometry.geometry import ellipse_perimeter
from biometry.metrics import landmark_errors, measurements_mm, per_image_errors, summarize
from biometry.transforms import Letterbox, Orientation

coordinate = st.floats(min_value=-500, max_value=1500, allow_nan=False, allow_infinity=False)
spacing = st.floats(min_value=0.01, max_value=1.0)
N = 3


def landmark_sets(n: int = N):
    return arrays(np.float64, (n, 4, 2), elements=coordinate)


def heads(n: int = N):
    """Landmark sets whose OFD is at least 10 px long (NME divides by it)."""
    return landmark_sets(n).filter(lambda t: np.all(np.linalg.norm(t[:, 3] - t[:, 2], axis=-1) > 10))


def swap_pairs(points: np.ndarray, swap_bpd: np.ndarray, swap_ofd: np.ndarray) -> np.ndarray:
    out = points.copy()
    out[swap_bpd, 0], out[swap_bpd, 1] = points[swap_bpd, 1], points[swap_bpd, 0]
    out[swap_ofd, 2], out[swap_ofd, 3] = points[swap_ofd, 3], points[swap_ofd, 2]
    return out


swaps = arrays(np.bool_, (N,))


@settings(max_examples=60, deadline=None)
@given(pred=landmark_sets(), true=heads(), pixel_mm=arrays(np.float64, (N,), elements=spacing),
       sp_b=swaps, sp_o=swaps, st_b=swaps, st_o=swaps)
def test_errors_and_measurements_ignore_endpoint_order_within_pairs(pred, true, pixel_mm, sp_b, sp_o, st_b, st_o):
    pred2, true2 = swap_pairs(pred, sp_b, sp_o), swap_pairs(true, st_b, st_o)
    np.testing.assert_allclose(landmark_errors(pred2, true2).sum(-1), landmark_errors(pred, true).sum(-1),
                               rtol=1e-9, atol=1e-9)
    a, b = per_image_errors(pred, true, pixel_mm), per_image_errors(pred2, true2, pixel_mm)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-9, err_msg=key)
    s1, s2 = summarize(pred, true, pixel_mm).as_dict(), summarize(pred2, true2, pixel_mm).as_dict()
    for key in s1:
        np.testing.assert_allclose(s1[key], s2[key], rtol=1e-9, atol=1e-9, err_msg=key)


@settings(max_examples=60, deadline=None)
@given(pred=landmark_sets(), true=heads(), pixel_mm=arrays(np.float64, (N,), elements=spacing),
       factor=st.floats(min_value=0.1, max_value=10.0))
def test_nme_and_mm_do_not_depend_on_image_scale(pred, true, pixel_mm, factor):
    a = per_image_errors(pred, true, pixel_mm)
    b = per_image_errors(pred * factor, true * factor, pixel_mm / factor)
    for key in ("nme", "landmark_error_mm", "bpd_error_mm", "ofd_error_mm", "hc_error_mm", "measure_error_mm"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-7, atol=1e-9, err_msg=key)


@settings(max_examples=60, deadline=None)
@given(pred=landmark_sets(), true=heads(), shift=arrays(np.float64, (2,), elements=coordinate))
def test_errors_do_not_depend_on_translation(pred, true, shift):
    # per image: at a tie between a pair's two assignments rounding may pick either one
    np.testing.assert_allclose(landmark_errors(pred + shift, true + shift).sum(-1),
                               landmark_errors(pred, true).sum(-1), rtol=1e-7, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(min_value=1e-3, max_value=1e3), ratio=st.floats(min_value=0.0, max_value=1.0))
def test_hc_lies_between_the_perimeters_its_axes_bound(a, ratio):
    b = a * ratio  # full axes, a >= b
    hc = float(ellipse_perimeter(a, b))
    tol = 1e-9 * a
    assert math.pi * b - tol <= hc <= math.pi * a + tol
    # perimeter of an ellipse with semi-axes A, B: pi (A + B) <= P <= pi sqrt(2 (A^2 + B^2)),
    # and no more than its bounding rectangle's 2 (a + b)
    assert math.pi * (a + b) / 2 - tol <= hc <= math.pi * math.sqrt((a * a + b * b) / 2) + tol
    assert hc <= 2 * (a + b) + tol


@settings(max_examples=60, deadline=None)
@given(bpd=st.floats(min_value=1, max_value=200), ofd=st.floats(min_value=1, max_value=200),
       mm=st.floats(min_value=0.01, max_value=1.0))
def test_hc_of_measurements_is_monotone_in_each_axis(bpd, ofd, mm):
    lm = np.array([[[0, 0], [0, bpd], [0, 0], [ofd, 0]]], dtype=float)
    wider = lm.copy()
    wider[0, 3, 0] += 1.0
    assert measurements_mm(wider, [mm])["hc"][0] > measurements_mm(lm, [mm])["hc"][0]


@settings(max_examples=60, deadline=None)
@given(points=landmark_sets(5), sp_b=arrays(np.bool_, (5,)), sp_o=arrays(np.bool_, (5,)),
       theta=st.floats(min_value=0, max_value=2 * math.pi))
def test_orientation_makes_the_order_independent_of_the_input_order(points, sp_b, sp_o, theta):
    orientation = Orientation(bpd_direction=(math.cos(theta), math.sin(theta)),
                              ofd_direction=(-math.sin(theta), math.cos(theta)))
    ordered = orientation.apply(points)
    shuffled = swap_pairs(points, sp_b, sp_o)
    proj_b = (points[:, 1] - points[:, 0]) @ np.array(orientation.bpd_direction)
    proj_o = (points[:, 3] - points[:, 2]) @ np.array(orientation.ofd_direction)
    distinct = (np.abs(proj_b) > 1e-9) & (np.abs(proj_o) > 1e-9)
    np.testing.assert_array_equal(orientation.apply(shuffled)[distinct], ordered[distinct])
    np.testing.assert_array_equal(orientation.apply(ordered), ordered)


@settings(max_examples=40, deadline=None)
@given(stride=st.sampled_from([1, 2, 4, 8]), sigma=st.floats(min_value=1.0, max_value=3.0),
       fx=st.floats(min_value=0.0, max_value=1.0), fy=st.floats(min_value=0.0, max_value=1.0))
def test_codec_round_trip_for_any_interior_keypoint(stride, sigma, fx, fy):
    codec = HeatmapCodec(input_hw=(256, 384), stride=stride, sigma=sigma)
    margin = (4 * sigma + 1) * stride
    point = np.array([[margin + fx * (383 - 2 * margin), margin + fy * (255 - 2 * margin)]])
    maps = torch.from_numpy(codec.encode(np.repeat(point, 4, axis=0)))[None]
    decoded, _ = codec.decode(maps, beta=20.0, decode="window")  # the presets' decoder
    # softmax(20 * map) leans towards the peak pixel: within a third of a heatmap pixel
    assert np.abs(decoded[0].numpy() - point).max() < 0.34 * stride


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(min_value=0.05, max_value=20), pad=arrays(np.float64, (2,), elements=coordinate),
       points=arrays(np.float64, (4, 2), elements=coordinate))
def test_letterbox_maps_are_inverse(scale, pad, points):
    box = Letterbox(scale=scale, pad_x=float(pad[0]), pad_y=float(pad[1]))
    np.testing.assert_allclose(box.to_original(box.to_input(points)), points, rtol=1e-9, atol=1e-6)
