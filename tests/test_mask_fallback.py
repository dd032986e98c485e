"""The head-region mask as a second measurement: the ellipse fitted to a mask channel, and the
predictor's fallback to it where the landmarks disagree (step ``mask_fallback``), and its
measurement of small heads by it (step ``small_heads_by_mask``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biometry.codec import HeatmapCodec
from biometry.geometry import diameter_lengths
from biometry.errors import BiometryInputError
from biometry.inference import LandmarkPredictor, ModelSpec, mask_ellipse_landmarks
from biometry.postprocess import SecondLook, create_steps, with_settings
from biometry.transforms import Orientation

INPUT_HW = (64, 96)
STRIDE = 2


def ellipse_points(centre, ofd, bpd, degrees):
    """BPD1, BPD2, OFD1, OFD2 of an ellipse with full axes ``ofd`` > ``bpd`` (input pixels)."""
    t = np.deg2rad(degrees)
    along, across = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
    c = np.asarray(centre, dtype=float)
    return np.stack([c - bpd / 2 * across, c + bpd / 2 * across,
                     c - ofd / 2 * along, c + ofd / 2 * along])


def logits_of(codec, points, *, gain=8.0):
    mask, _ = codec.encode_head_region(torch.tensor(points[None]))
    return (gain * (2 * mask[0] - 1)).numpy()


def test_fitted_ellipse_recovers_the_axes_and_their_direction():
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=STRIDE, sigma=2.0)
    true = ellipse_points((48, 32), ofd=60, bpd=40, degrees=20)
    fitted = mask_ellipse_landmarks(logits_of(codec, true), STRIDE)
    bpd, ofd = diameter_lengths(fitted)
    assert ofd == pytest.approx(60, abs=1.5) and bpd == pytest.approx(40, abs=1.5)
    direction = fitted[3] - fitted[2]
    angle = np.rad2deg(np.arctan2(direction[1], direction[0])) % 180
    assert angle == pytest.approx(20, abs=3)
    assert fitted.mean(axis=0) == pytest.approx([48, 32], abs=1.0)
    assert mask_ellipse_landmarks(np.full((32, 48), -5.0), STRIDE) is None  # nothing above 0


class FixedOutput(torch.nn.Module):
    """A model whose output is given: four heatmaps of ``landmarks`` and the mask of ``region``."""

    def __init__(self, codec, landmarks, region):
        super().__init__()
        maps = torch.from_numpy(codec.encode(landmarks))
        self.register_buffer("output", torch.cat([maps, torch.from_numpy(
            logits_of(codec, region))[None]])[None])

    def forward(self, x):
        return self.output.expand(len(x), -1, -1, -1)


def model_steps(fallback=None, small=None) -> list[dict]:
    steps = [] if fallback is None else [{"step": "mask_fallback", "threshold": fallback}]
    return steps + ([] if small is None else [{"step": "small_heads_by_mask", "below_mm": small}])


def predictor_for(landmarks, region, *, spec_fallback=None, spec_small=None, settings=(),
                  extra_steps=()):
    """The fixed model with the steps its spec lists, changed by ``settings`` (as ``--set``)."""
    codec = HeatmapCodec(input_hw=INPUT_HW, stride=STRIDE, sigma=2.0)
    spec = ModelSpec(architecture="fixed", model_kwargs={"mask_head": True}, input_hw=INPUT_HW,
                     stride=STRIDE, sigma=2.0, softargmax_beta=20.0, decode="window",
                     orientation=Orientation.fit(landmarks[None]).to_dict(),
                     postprocess=model_steps(spec_fallback, spec_small))
    steps = [*extra_steps, *with_settings(spec.steps(), list(settings))]
    return LandmarkPredictor(FixedOutput(codec, landmarks, region), spec, postprocess=steps)


def test_landmarks_that_disagree_with_the_mask_are_replaced_by_its_ellipse():
    image = np.full(INPUT_HW, 100, dtype=np.uint8)  # letterboxed 1:1, so input px = original px
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    shortened = ellipse_points((48, 32), ofd=40, bpd=30, degrees=10)  # endpoints inside the skull

    kept, _ = predictor_for(shortened, head).predict([image])  # no fallback: the landmarks
    assert diameter_lengths(kept[0])[1] == pytest.approx(40, abs=1.0)
    replaced, _ = predictor_for(shortened, head, spec_fallback=0.05).predict([image])
    bpd, ofd = diameter_lengths(replaced[0])
    assert ofd == pytest.approx(60, abs=1.5) and bpd == pytest.approx(44, abs=1.5)

    close = ellipse_points((48, 32), ofd=59, bpd=43, degrees=10)  # within 5%: landmarks stay
    agreed, _ = predictor_for(close, head, spec_fallback=0.05).predict([image])
    assert diameter_lengths(agreed[0])[1] == pytest.approx(59, abs=1.0)


def test_off_switches_off_the_fallback_of_a_model_that_has_one():
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    shortened = ellipse_points((48, 32), ofd=40, bpd=30, degrees=10)

    by_default, _ = predictor_for(shortened, head, spec_fallback=0.05).predict([image])
    assert diameter_lengths(by_default[0])[1] == pytest.approx(60, abs=1.5)  # the model's 5%
    switched_off = predictor_for(shortened, head, spec_fallback=0.05,
                                 settings=["mask_fallback=off"])
    assert switched_off.steps == []
    assert diameter_lengths(switched_off.predict([image])[0][0])[1] == pytest.approx(40, abs=1.0)


def test_a_changed_threshold_applies_and_a_bad_one_is_named():
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    close = ellipse_points((48, 32), ofd=57, bpd=42, degrees=10)  # 5% short of the mask
    kept = predictor_for(close, head, spec_fallback=0.1).predict([image])[0]
    assert diameter_lengths(kept[0])[1] == pytest.approx(57, abs=1.0)
    strict = predictor_for(close, head, spec_fallback=0.1,
                           settings=["mask_fallback.threshold=0.02"]).predict([image])[0]
    assert diameter_lengths(strict[0])[1] == pytest.approx(60, abs=1.5)
    for bad, message in ((-0.1, "mask_fallback: 'threshold' must be a number >= 0"),
                         ("often", "'mask_fallback.threshold' must be float but got str")):
        with pytest.raises(BiometryInputError, match=message):
            with_settings(create_steps(model_steps(0.05)), [f"mask_fallback.threshold={bad}"])


def test_after_a_second_look_the_first_mask_is_trusted_only_where_the_second_agrees():
    """The fixed model gives the same maps at every look, so a second look rendered 1.4x larger
    sees a mask 1.4x smaller in original pixels: the two masks disagree, and the landmarks of
    the kept (second) look stay although they disagree with the first look's mask."""
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    shortened = ellipse_points((48, 32), ofd=40, bpd=30, degrees=10)
    # OFD 40 input px is below "low": a second look at 56 / 40 = 1.4x, kept (within tolerance)
    look = SecondLook(quantile=None, low=50.0, target=56.0, high=70.0, tolerance=0.5)
    predictor = predictor_for(shortened, head, spec_fallback=0.05, extra_steps=[look])
    coords, _ = predictor.predict([image])
    assert diameter_lengths(coords[0])[1] == pytest.approx(40 / 1.4, abs=1.0)
    predictor = predictor_for(shortened, head, spec_fallback=0.05)  # one look: its mask trusted
    coords, _ = predictor.predict([image])
    assert diameter_lengths(coords[0])[1] == pytest.approx(60, abs=1.5)


def hc_mm(points, pixel_mm):
    from biometry.metrics import measurements_mm
    return float(measurements_mm(np.asarray(points)[None], pixel_mm)["hc"][0])


def test_a_head_whose_mask_measures_under_the_limit_is_measured_by_the_mask():
    """Landmarks and mask agree within 5% (no fallback), yet a small head is measured by the
    mask's ellipse; the same image at a pixel size that makes the head large keeps its landmarks,
    and without pixel sizes (HC unknown in mm) the prediction is an error, not the rule off."""
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    near = ellipse_points((48, 32), ofd=58, bpd=43, degrees=10)  # within 5% of the mask's HC
    predictor = predictor_for(near, head, spec_fallback=0.05, spec_small=100.0)
    mask_hc = hc_mm(head, 0.5)
    assert mask_hc < 100 < hc_mm(head, 1.0)

    small, _ = predictor.predict([image], pixel_mm=[0.5])
    bpd, ofd = diameter_lengths(small[0])
    assert ofd == pytest.approx(60, abs=1.5) and bpd == pytest.approx(44, abs=1.5)
    assert hc_mm(small[0], 0.5) == pytest.approx(mask_hc, rel=0.03)
    large, _ = predictor.predict([image], pixel_mm=[1.0])
    assert diameter_lengths(large[0])[1] == pytest.approx(58, abs=1.0)
    with pytest.raises(ValueError, match="'small_heads_by_mask' needs each image's pixel size"):
        predictor.predict([image])
    # one value per image, or a clear error
    with pytest.raises(ValueError, match="pixel_mm holds 2 values for 1 images"):
        predictor.predict([image], pixel_mm=[0.5, 0.5])


def test_off_and_on_change_the_models_small_head_rule():
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    near = ellipse_points((48, 32), ofd=58, bpd=43, degrees=10)
    off = predictor_for(near, head, spec_small=100.0, settings=["small_heads_by_mask=off"])
    assert off.steps == []
    assert diameter_lengths(off.predict([image], pixel_mm=[0.5])[0][0])[1] == pytest.approx(58, abs=1.0)
    on = predictor_for(near, head, settings=["small_heads_by_mask=on",
                                             "small_heads_by_mask.below_mm=200"])
    assert diameter_lengths(on.predict([image], pixel_mm=[1.0])[0][0])[1] == pytest.approx(60, abs=1.5)


def test_a_median_ensemble_passes_pixel_sizes_to_its_members():
    """Each member of a median ensemble applies the small-head rule with the images' spacing."""
    from biometry.models.ensemble import MeanOfModels

    codec = HeatmapCodec(input_hw=INPUT_HW, stride=STRIDE, sigma=2.0)
    image = np.full(INPUT_HW, 100, dtype=np.uint8)
    head = ellipse_points((48, 32), ofd=60, bpd=44, degrees=10)
    members = [ellipse_points((48, 32), ofd=ofd, bpd=43, degrees=10) for ofd in (57, 58, 59)]
    model = MeanOfModels([FixedOutput(codec, m, head) for m in members])
    fixed = {"architecture": "fixed", "model_kwargs": {"mask_head": True}}
    spec = ModelSpec(architecture="ensemble", input_hw=INPUT_HW, stride=STRIDE, sigma=2.0,
                     model_kwargs={"members": [fixed] * 3}, combine="median",
                     softargmax_beta=20.0, decode="window", postprocess=model_steps(small=100.0),
                     orientation=Orientation.fit(members[1][None]).to_dict())
    predictor = LandmarkPredictor(model, spec)
    assert [[s.to_dict() for s in m.steps] for m in predictor.members] == [
        [{"step": "small_heads_by_mask", "below_mm": 100.0}]] * 3
    small, _ = predictor.predict([image], pixel_mm=[0.5])
    assert diameter_lengths(small[0])[1] == pytest.approx(60, abs=1.5)
    large, _ = predictor.predict([image], pixel_mm=[1.0])
    assert diameter_lengths(large[0])[1] == pytest.approx(58, abs=1.0)  # the members' median
