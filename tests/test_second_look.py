"""The second look: a head measured outside the training heads' scale range is measured again,
rendered at the median training scale, and validation measures exactly what evaluate does."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from biometry.commands import evaluate
from biometry.inference import LandmarkPredictor, load_model_folder, load_model_spec
from biometry.postprocess import SecondLook
from biometry.io import read_grayscale
from biometry.records import OFD
from biometry.transforms import letterbox, zoom_to

REPO = Path(__file__).resolve().parents[1]


def command(module, *argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def second_look_model(tmp_path_factory) -> Path:
    """One epoch of the smoke config with the outer 30% of head scales given a second look."""
    from trainables.config import load_config
    from trainables.train import run_trial

    out = tmp_path_factory.mktemp("second_look")
    cfg = load_config(REPO / "configs/trial/smoke.yaml",
                      overrides={"train.epochs": 1, "data.limit": 40,
                                 "inference.postprocess": [{"step": "second_look",
                                                            "quantile": 0.3}]})
    run_trial(cfg, out_dir=out, log=lambda _: None)
    return out / "best"


def test_the_head_range_is_the_training_quantiles():
    lengths = np.arange(101.0)  # OFD lengths 0..100 input px
    fitted = SecondLook(quantile=0.1).fit(train_ofd_px=lengths)
    assert (fitted.low, fitted.high, fitted.target) == pytest.approx((10.0, 90.0, 50.0))
    assert fitted.tolerance == 0.25


def test_the_model_folder_records_the_range(second_look_model):
    (step,) = load_model_spec(second_look_model).postprocess
    assert step["step"] == "second_look" and step["quantile"] == 0.3
    assert 0 < step["low"] <= step["target"] <= step["high"]


def test_only_out_of_range_heads_change_and_they_match_a_direct_look(second_look_model, hc18_dir):
    model, spec = load_model_folder(second_look_model)
    images = [read_grayscale(p) for p in sorted((hc18_dir / "training_set").glob("0[0-4]?_HC.png"))]
    plain = LandmarkPredictor(model, spec, postprocess=[])
    first, _ = plain.predict(images)
    boxes = [letterbox(img, None, spec.input_hw)[2] for img in images]
    # a range that half of these first looks fall below (a one-epoch model's heads are arbitrary)
    ofd = np.linalg.norm(first[:, OFD[1]] - first[:, OFD[0]], axis=-1) * boxes[0].scale
    step = SecondLook(quantile=None, low=float(np.median(ofd)), high=1e9,
                      target=float(np.median(ofd) * 1.5), tolerance=1e9)
    redo = (ofd < step.low) | (ofd > step.high)
    assert 0 < redo.sum() < len(images)
    with_look, _ = LandmarkPredictor(model, spec, postprocess=[step]).predict(images)
    np.testing.assert_array_equal(with_look[~redo], first[~redo])
    # with every later look accepted (tolerance 1e9), a triggered image equals a plain look at
    # the image rendered at the target scale
    i = int(np.flatnonzero(redo)[0])
    centre = 0.5 * (first[i, 2:].mean(axis=0) + first[i, :2].mean(axis=0))
    length = np.linalg.norm(first[i, OFD[1]] - first[i, OFD[0]])
    zoom = min(step.target / length, 4.0 * boxes[i].scale)
    rendered, box = zoom_to(images[i], centre, zoom, spec.input_hw)
    direct, _ = plain.predict([images[i]], letterboxed=[(rendered, box)])
    np.testing.assert_allclose(with_look[i], direct[0], atol=1e-3)  # batch-size float noise
    assert np.abs(with_look[i] - first[i]).max() > 1e-3


def test_evaluate_on_val_reproduces_validation_with_second_looks(second_look_model, tmp_path):
    spec = load_model_spec(second_look_model)
    assert command(evaluate, "--model", second_look_model, "--data", spec.data["source"], "--out",
                   tmp_path, "--split", "val", "--atlas", "0") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_measure_l1_mm", "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "aurc"):
        assert summary[key] == pytest.approx(spec.metrics[key], rel=1e-4, abs=1e-6), key


def test_a_look_that_disagrees_with_its_scale_leaves_the_first_look(second_look_model, hc18_dir):
    """Tolerance near 0: no later look can agree with the scale it was rendered for, so every
    head keeps its first look, however many looks were tried."""
    model, spec = load_model_folder(second_look_model)
    images = [read_grayscale(p) for p in sorted((hc18_dir / "training_set").glob("0[0-2]?_HC.png"))]
    first, first_unc = LandmarkPredictor(model, spec, postprocess=[]).predict(images)
    step = SecondLook(quantile=None, low=1e9, high=2e9, target=1.5e9, tolerance=1e-12)
    coords, unc = LandmarkPredictor(model, spec, postprocess=[step]).predict(images)
    np.testing.assert_array_equal(coords, first)
    np.testing.assert_array_equal(unc, first_unc)


@pytest.mark.parametrize("bad, message", [
    ({"low": 10}, "'low', 'high' and 'target' are set together"),
    ({"low": 50, "high": 40, "target": 45}, "'low' <= 'target' <= 'high' must hold"),
    ({"low": 1, "high": "x", "target": 2}, "'second_look.high' must be float but got str 'x'"),
    ({"quantile": 0.7}, "'quantile' must be in"),
    ({"range": 3}, "has no option 'range'"),
])
def test_a_bad_second_look_in_model_yaml_is_named(second_look_model, tmp_path, bad, message):
    import shutil

    import yaml

    from biometry.errors import BiometryInputError

    folder = tmp_path / "model"
    shutil.copytree(second_look_model, folder)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["postprocess"] = [{"step": "second_look", "quantile": None, **bad}]
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BiometryInputError, match=r"model.yaml: postprocess: .*second_look"):
        load_model_spec(folder)
    with pytest.raises(BiometryInputError, match=message.replace("(", r"\(")):
        load_model_spec(folder)
