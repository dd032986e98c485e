"""Properties tests/test_properties.py does not cover yet (it has pair-order and scale invariance,
translation, HC bounds and monotonicity, orientation, codec and letterbox round trips)."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from biometry.geometry import ellipse_perimeter
from biometry.metrics import summarize

N = 5
coordinate = st.floats(min_value=-500, max_value=1500, allow_nan=False, allow_infinity=False)
heads = arrays(np.float64, (N, 4, 2), elements=coordinate).filter(
    lambda t: np.all(np.linalg.norm(t[:, 3] - t[:, 2], axis=-1) > 10))


@settings(max_examples=60, deadline=None)
@given(pred=arrays(np.float64, (N, 4, 2), elements=coordinate), true=heads,
       pixel_mm=arrays(np.float64, (N,), elements=st.floats(min_value=0.01, max_value=1.0)),
       uncertainty=arrays(np.float64, (N,), elements=st.floats(min_value=0, max_value=10),
                          unique=True),
       permutation=st.permutations(range(N)))
def test_summary_does_not_depend_on_the_order_of_the_images(pred, true, pixel_mm, uncertainty,
                                                            permutation):
    """Every metric (uncertainty ranking included, when uncertainties are distinct) is a function
    of the set of images, not of their order in the batch."""
    p = list(permutation)
    a = summarize(pred, true, pixel_mm, uncertainty=uncertainty).as_dict()
    b = summarize(pred[p], true[p], pixel_mm[p], uncertainty=uncertainty[p]).as_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-9, err_msg=key)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(min_value=1e-3, max_value=1e3), b=st.floats(min_value=1e-3, max_value=1e3),
       k=st.floats(min_value=1e-2, max_value=1e2))
def test_hc_is_symmetric_in_its_axes_and_scales_with_them(a, b, k):
    """HC does not care which axis is called BPD, and a k times larger head has a k times
    longer HC (so mm and pixel HCs agree through the spacing alone)."""
    hc = float(ellipse_perimeter(a, b))
    assert math.isclose(hc, float(ellipse_perimeter(b, a)), rel_tol=1e-12)
    assert math.isclose(float(ellipse_perimeter(k * a, k * b)), k * hc, rel_tol=1e-9)
