"""biometry.geometry: diameters, Ramanujan perimeter, angle and centre offset of landmarks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import ellipe

from biometry.geometry import (
    centre_offset,
    diameter_angle_deg,
    diameter_lengths,
    ellipse_landmarks,
    ellipse_perimeter,
)

CROSS = np.array([[50, 20], [50, 80], [10, 50], [90, 50]], float)  # BPD 60 vertical, OFD 80


def exact_perimeter(axis_a, axis_b):
    a, b = max(axis_a, axis_b) / 2, min(axis_a, axis_b) / 2
    return 4 * a * ellipe(1 - (b / a) ** 2)


def test_values_of_a_cross():
    bpd, ofd = diameter_lengths(CROSS)
    assert (bpd, ofd) == (60, 80)
    assert diameter_angle_deg(CROSS) == pytest.approx(90)
    assert centre_offset(CROSS) == 0


def test_ellipse_perimeter_takes_full_axes():
    assert ellipse_perimeter(10, 10) == pytest.approx(np.pi * 10)
    assert ellipse_perimeter(0, 0) == 0
    assert ellipse_perimeter(80, 0) == pytest.approx(160, rel=1e-3)  # flat ellipse: twice the axis


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.8, 0.9, 1.0])
def test_ellipse_perimeter_matches_the_exact_integral(ratio):
    assert ellipse_perimeter(200, 200 * ratio) == pytest.approx(exact_perimeter(200, 200 * ratio), rel=1e-8)


def test_vectorised_over_leading_axes():
    lm = np.broadcast_to(CROSS, (5, 3, 4, 2))
    for value in (*diameter_lengths(lm), diameter_angle_deg(lm), centre_offset(lm)):
        assert value.shape == (5, 3)
    assert ellipse_perimeter(np.full((5, 3), 60.0), 80.0).shape == (5, 3)


def test_angle_and_offset_of_skewed_diameters():
    lm = CROSS.copy()
    lm[[0, 1]] = [[20, 20], [80, 80]]  # BPD along the diagonal through (50, 50)
    assert diameter_angle_deg(lm) == pytest.approx(45)
    lm[[0, 1]] += [0, 10]
    assert centre_offset(lm) == pytest.approx(10)
    lm[1] = lm[0]
    assert np.isnan(diameter_angle_deg(lm))


@settings(max_examples=50, deadline=None)
@given(
    angle=st.floats(-180, 180),
    shift=st.tuples(st.floats(-500, 500), st.floats(-500, 500)),
    axes=st.tuples(st.floats(5, 400), st.floats(5, 400)),
    flip=st.booleans(),
)
def test_ellipse_landmarks_give_the_axes_back(angle, shift, axes, flip):
    lm = ellipse_landmarks(shift, axes, angle)
    if flip:
        lm = lm[[1, 0, 3, 2]]
    bpd, ofd = diameter_lengths(lm)
    assert bpd == pytest.approx(min(axes), abs=1e-6)
    assert ofd == pytest.approx(max(axes), abs=1e-6)
    assert diameter_angle_deg(lm) == pytest.approx(90, abs=1e-4)
    assert centre_offset(lm) == pytest.approx(0, abs=1e-6)
    assert lm[2:].mean(axis=0) == pytest.approx(np.array(shift), abs=1e-6)


def test_ellipse_landmarks_follow_opencv_angles():
    # width 200 along 30 degrees (x towards y), height 100 across
    lm = ellipse_landmarks((300, 300), (200, 100), 30)
    direction = (lm[3] - lm[2]) / 200
    assert np.abs(direction) == pytest.approx([np.cos(np.radians(30)), np.sin(np.radians(30))])
