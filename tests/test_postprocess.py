"""The post-processing pipeline: old model folders predict as before, a new step is one class in one
file, needs fail loudly, and the post-training sweep keeps a variant only beyond the noise."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml

from biometry.errors import BiometryInputError
from biometry.inference import LandmarkPredictor, load_model_folder, load_model_spec
from biometry.io.images import read_grayscale
from biometry.postprocess import Prediction, Step, create_steps, register_step, with_settings
from tests.legacy_models import legacy_root

REPO = Path(__file__).resolve().parents[1]
LEGACY = legacy_root()  # tests/data/legacy_model with its model.pt files written
SAMPLE = REPO / "biometry" / "sample_data" / "hc18_sample"
# the variants tests/data/legacy_model/reference.npz holds, as --set changes of the loaded steps
VARIANTS = {
    "all": [], "no_flip": ["flip_tta=off"], "no_fallback": ["mask_fallback=off"],
    "no_small_heads": ["small_heads_by_mask=off"], "no_second_look": ["second_look=off"],
    "only_small_heads": ["flip_tta=off", "mask_fallback=off", "second_look=off"],
    "only_fallback": ["flip_tta=off", "small_heads_by_mask=off", "second_look=off"],
    "none": ["flip_tta=off", "mask_fallback=off", "small_heads_by_mask=off", "second_look=off"],
}


@pytest.fixture(scope="module")
def reference():
    ref = np.load(LEGACY / "reference.npz")
    return ref, [read_grayscale(SAMPLE / name) for name in ref["names"]]


@pytest.mark.parametrize("folder", ["single", "ensemble_median", "ensemble_maps"])
def test_a_folder_saved_before_the_pipeline_predicts_the_same_with_every_rule_on_and_off(
        folder, reference):
    ref, images = reference
    model, spec = load_model_folder(LEGACY / folder)
    assert [s["step"] for s in spec.postprocess] == ["flip_tta", "second_look", "mask_fallback",
                                                     "small_heads_by_mask"]
    for variant, settings in VARIANTS.items():
        predictor = LandmarkPredictor(model, spec, postprocess=with_settings(spec.steps(), settings))
        coords, uncertainty = predictor.predict(images, pixel_mm=ref["pixel_mm"])
        np.testing.assert_allclose(coords, ref[f"{folder}/{variant}/coords"], atol=1e-4,
                                   err_msg=variant)
        np.testing.assert_allclose(uncertainty, ref[f"{folder}/{variant}/uncertainty"],
                                   atol=1e-6, err_msg=variant)


def test_the_reference_variants_differ_so_the_comparison_means_something(reference):
    ref, _ = reference
    for folder in ("single", "ensemble_median", "ensemble_maps"):
        base = ref[f"{folder}/all/coords"]
        for variant in ("no_flip", "no_fallback", "no_second_look"):
            assert np.abs(ref[f"{folder}/{variant}/coords"] - base).max() > 1e-2, (folder, variant)
        only = ref[f"{folder}/only_small_heads/coords"] - ref[f"{folder}/none/coords"]
        assert np.abs(only).max() > 1e-2


@register_step
@dataclass(frozen=True, kw_only=True)
class ShiftRight(Step):
    """A rule written in this test file alone: every landmark moves ``px`` original pixels."""

    name: ClassVar[str] = "test_shift_right"
    px: float = 1.0

    def __post_init__(self):
        if not self.px > 0:
            raise ValueError(f"'px' must be > 0 but got {self.px!r}.")

    def apply(self, prediction: Prediction) -> None:
        prediction.coords[..., 0] += self.px


def test_a_step_registered_in_a_test_file_runs_from_a_model_folder_that_lists_it(tmp_path,
                                                                                  reference):
    import shutil

    ref, images = reference
    folder = tmp_path / "model"
    shutil.copytree(LEGACY / "single", folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw.update(flip_tta=False, head_scale={}, mask_fallback=None, mask_small_head_mm=None)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    plain, _ = LandmarkPredictor.from_folder(folder).predict(images)
    np.testing.assert_allclose(plain, ref["single/none/coords"], atol=1e-4)

    spec = load_model_spec(folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw.update(format="biometry-model/2", postprocess=[{"step": "test_shift_right", "px": 2.5}])
    for key in ("flip_tta", "head_scale", "mask_fallback", "mask_small_head_mm"):
        raw.pop(key)
    raw["combine"] = None
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    assert load_model_spec(folder).postprocess == [{"step": "test_shift_right", "px": 2.5}]
    shifted, _ = LandmarkPredictor.from_folder(folder).predict(images)
    np.testing.assert_allclose(shifted[..., 0], plain[..., 0] + 2.5, atol=1e-9)
    np.testing.assert_array_equal(shifted[..., 1], plain[..., 1])
    assert spec.architecture == "unet"


def test_a_mask_step_on_a_model_without_a_mask_channel_is_refused_where_it_is_listed(tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(LEGACY / "single", folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw["model_kwargs"].pop("mask_head")
    raw.update(format="biometry-model/2", combine=None,
               postprocess=[{"step": "mask_fallback", "threshold": 0.05}])
    for key in ("flip_tta", "head_scale", "mask_fallback", "mask_small_head_mm"):
        raw.pop(key)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(BiometryInputError, match="step 'mask_fallback' needs the model's mask "
                                                 "channel and this model has none"):
        load_model_spec(folder)


def test_a_step_that_needs_pixel_sizes_is_an_error_without_them(reference):
    _, images = reference
    predictor = LandmarkPredictor.from_folder(LEGACY / "single")
    with pytest.raises(ValueError, match="'small_heads_by_mask' needs each image's pixel size"):
        predictor.predict(images[:2])


@pytest.mark.parametrize("entries, message", [
    ([{"step": "nope"}], "unknown step 'nope'"),
    ([{"threshold": 1}], "each entry must be a mapping with a 'step' name"),
    ([{"step": "mask_fallback", "treshold": 1}], "step 'mask_fallback' has no option 'treshold'"),
    ([{"step": "mask_fallback", "threshold": -1}], "'threshold' must be a number >= 0"),
    ([{"step": "flip_tta"}, {"step": "flip_tta"}], "step 'flip_tta' is listed twice"),
    ({"step": "flip_tta"}, "must be a list of steps"),
])
def test_bad_step_lists_are_one_line_naming_the_step(entries, message):
    with pytest.raises(BiometryInputError, match=message):
        create_steps(entries, where="model.yaml: postprocess")


def test_settings_change_remove_and_add_steps_in_registry_order():
    steps = create_steps([{"step": "mask_fallback", "threshold": 0.05}])
    changed = with_settings(steps, ["mask_fallback.threshold=0.08", "flip_tta=on"])
    assert [s.to_dict() for s in changed] == [{"step": "flip_tta"},
                                              {"step": "mask_fallback", "threshold": 0.08}]
    assert with_settings(changed, ["flip_tta=off", "mask_fallback=off"]) == []
    with pytest.raises(BiometryInputError, match="the model lists no 'small_heads_by_mask' step"):
        with_settings(steps, ["small_heads_by_mask.below_mm=90"])
    with pytest.raises(BiometryInputError, match="must be STEP.KEY=VALUE"):
        with_settings(steps, ["mask_fallback"])


def test_the_sweep_keeps_the_default_unless_a_variant_wins_beyond_the_noise():
    from trainables.sweep import paired_interval, variants

    assert variants({"mask_fallback.threshold": [0.03, False], "flip_tta": [True]}) == [
        ("default", []), ("mask_fallback.threshold=0.03", ["mask_fallback.threshold=0.03"]),
        ("mask_fallback.threshold=off", ["mask_fallback=off"]), ("flip_tta=on", ["flip_tta=on"])]
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, 92)
    low, high = paired_interval(noise - noise.mean() - 0.02, resamples=2000, seed=0)
    assert low < 0 < high  # 0.02 mm on 92 noisy images: not evidence
    low, high = paired_interval(noise * 0.1 - noise.mean() * 0.1 - 0.3, resamples=2000, seed=0)
    assert high < 0  # a consistent 0.3 mm gain is
