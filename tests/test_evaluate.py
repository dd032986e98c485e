"""evaluate and predict with a briefly trained real model on real HC18 images."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from biometry.commands import evaluate, predict
from biometry.errors import BiometryInputError
from biometry.evaluation import PREDICTION_COLUMNS, SPLITS, select_split
from biometry.geometry import ellipse_perimeter
from biometry.inference import LandmarkPredictor, load_model_spec
from biometry.io import load_records, read_grayscale, write_landmark_csv
from biometry.io.hc18 import HC18_CSV
from biometry.metrics import landmark_errors, measurements_mm

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 20
LIMIT = 40  # bundled-sample records the test model is trained on


def command(module, *argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """One epoch of the smoke trial config on 40 images of the bundled HC18 sample (~5 s)."""
    from trainables.config import load_config
    from trainables.train import run_trial

    out = tmp_path_factory.mktemp("model")
    cfg = load_config(REPO / "configs/trial/smoke.yaml",
                      overrides={"train.epochs": 1, "data.limit": LIMIT})
    run_trial(cfg, out_dir=out, log=lambda _: None)
    return out / "best"


@pytest.fixture(scope="session")
def hc18_small(hc18_dir, tmp_path_factory) -> Path:
    """A 20-row landmark CSV of real HC18 images (imported from a 20-image HC18 folder)."""
    folder = tmp_path_factory.mktemp("hc18_small")
    source = folder / "hc18"
    (source / "training_set").mkdir(parents=True)
    lines = (hc18_dir / HC18_CSV).read_text().splitlines()
    (source / HC18_CSV).write_text("\n".join(lines[:N_IMAGES + 1]) + "\n")
    for line in lines[1:N_IMAGES + 1]:
        stem = line.split(",")[0].removesuffix(".png")
        for path in (hc18_dir / "training_set").glob(f"{stem}_*.png"):
            shutil.copy(path, source / "training_set" / path.name)
        shutil.copy(hc18_dir / "training_set" / f"{stem}.png", source / "training_set")
    records = load_records(source)
    assert len(records) == N_IMAGES
    return write_landmark_csv(records, folder / "data" / "landmarks.csv", link_images=True)


@pytest.fixture(scope="session")
def evaluated(trained_model, hc18_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate")
    assert command(evaluate, "--model", trained_model, "--data", hc18_small, "--out", out,
                   "--batch-size", 8) == 0
    return out


def test_evaluate_writes_every_file(evaluated):
    for name in ("predictions.csv", "per_image.csv", "summary.json", "bland_altman_bpd.png",
                 "bland_altman_ofd.png", "bland_altman_hc.png", "risk_coverage.png",
                 "failure_atlas.png"):
        assert (evaluated / name).is_file() and (evaluated / name).stat().st_size > 0, name
    atlas = sorted((evaluated / "atlas").glob("*.png"))
    assert len(atlas) == 10 and atlas[0].name.startswith("01_")
    assert cv2.imread(str(evaluated / "failure_atlas.png")) is not None
    frame = pd.read_csv(evaluated / "predictions.csv")
    assert tuple(frame.columns) == PREDICTION_COLUMNS
    assert len(frame) == N_IMAGES


def test_measurements_agree_with_coordinates_and_spacing(evaluated, hc18_small):
    frame = pd.read_csv(evaluated / "predictions.csv")
    spacing = pd.read_csv(hc18_small).set_index("image").loc[frame["image"], "pixel_mm"].to_numpy()
    coords = frame[list(PREDICTION_COLUMNS[1:9])].to_numpy().reshape(-1, 4, 2)
    bpd = np.hypot(*(coords[:, 1] - coords[:, 0]).T) * spacing
    ofd = np.hypot(*(coords[:, 3] - coords[:, 2]).T) * spacing
    np.testing.assert_allclose(frame["bpd_mm"], bpd, atol=2e-3)
    np.testing.assert_allclose(frame["ofd_mm"], ofd, atol=2e-3)
    np.testing.assert_allclose(frame["hc_mm"], ellipse_perimeter(bpd, ofd), atol=5e-3)
    # coordinates are original pixels: inside the 800x540 HC18 frame
    assert (coords[..., 0] > -1).all() and (coords[..., 0] < 800).all()
    assert (coords[..., 1] > -1).all() and (coords[..., 1] < 540).all()


def test_summary_agrees_with_predictions_csv(evaluated, hc18_small, trained_model):
    summary = json.loads((evaluated / "summary.json").read_text())
    frame = pd.read_csv(evaluated / "predictions.csv")
    truth = pd.read_csv(hc18_small).set_index("image").loc[frame["image"]]
    true = truth[list(PREDICTION_COLUMNS[1:9])].to_numpy().reshape(-1, 4, 2)
    reference = measurements_mm(true, truth["pixel_mm"].to_numpy())
    for m in ("bpd", "ofd", "hc"):
        diff = frame[f"{m}_mm"].to_numpy() - reference[m]
        assert summary[f"{m}_l1_mm"] == pytest.approx(np.abs(diff).mean(), abs=5e-3)
        assert summary[f"{m}_bias_mm"] == pytest.approx(diff.mean(), abs=5e-3)
        sd = diff.std(ddof=1)
        assert summary[f"{m}_loa_high_mm"] == pytest.approx(diff.mean() + 1.96 * sd, abs=1e-2)
    assert summary["val_measure_l1_mm"] == pytest.approx(
        0.5 * (summary["bpd_l1_mm"] + summary["ofd_l1_mm"]))
    coords = frame[list(PREDICTION_COLUMNS[1:9])].to_numpy().reshape(-1, 4, 2)
    per_landmark = landmark_errors(coords, true)
    assert summary["bpd1_error_px"] == pytest.approx(per_landmark[:, 0].mean(), abs=1e-3)
    assert summary["ofd2_error_mm"] == pytest.approx(
        (per_landmark[:, 3] * truth["pixel_mm"].to_numpy()).mean(), abs=1e-3)
    # triage: the stored threshold, the flag column and the coverage errors
    spec = load_model_spec(trained_model)
    assert summary["uncertainty_threshold"] == pytest.approx(spec.uncertainty_threshold)
    assert summary["n_flagged"] == int(frame["flagged"].sum())
    assert ((frame["uncertainty"] > spec.uncertainty_threshold).astype(int)
            == frame["flagged"]).all()
    errors = 0.5 * (np.abs(frame["bpd_mm"] - reference["bpd"])
                    + np.abs(frame["ofd_mm"] - reference["ofd"]))
    kept = errors.to_numpy()[np.argsort(frame["uncertainty"].to_numpy(), kind="stable")]
    assert summary["error_at_80_coverage_mm"] == pytest.approx(kept[:16].mean(), abs=5e-3)
    assert summary["error_at_90_coverage_mm"] == pytest.approx(kept[:18].mean(), abs=5e-3)
    for key in ("unc_spearman", "aurc", "nme", "n_images", "model", "split"):
        assert key in summary
    assert summary["n_images"] == N_IMAGES and summary["split"] == "all"


def test_split_reproduces_the_models_own_subject_split(trained_model):
    """The model trained on the first LIMIT bundled-sample records: --split repeats
    prepare_splits (limit included)."""
    from trainables.data import load_split_records

    spec = load_model_spec(trained_model)
    source = spec.data["source"]
    expected = load_split_records(None, split_seed=0, val_fraction=0.15, test_fraction=0.15,
                                  limit=LIMIT)
    records = load_records(source)
    for split in ("train", "val", "test"):
        chosen = select_split(records, spec, split, data=source)
        assert [r.name for r in chosen] == [r.name for r in expected[split]]
    assert len(select_split(records, spec, "all", data=source)) == len(records)
    assert evaluate.SPLITS == SPLITS


def test_evaluate_on_the_val_split_gives_the_numbers_training_logged(trained_model, tmp_path):
    """One prediction path: evaluate --split val reproduces model.yaml's validation metrics."""
    spec = load_model_spec(trained_model)
    assert command(evaluate, "--model", trained_model, "--data", spec.data["source"], "--out",
                   tmp_path, "--split", "val", "--atlas", "0") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_measure_l1_mm", "bpd_l1_mm", "hc_loa_high_mm", "nme", "aurc"):
        assert summary[key] == pytest.approx(spec.metrics[key], rel=1e-4, abs=1e-6), key
    n = summary["n_images"]  # the threshold is np.quantile(val uncertainty, coverage_target)
    assert summary["n_flagged"] == n - 1 - math.floor(spec.coverage_target * (n - 1) + 1e-9)


def test_flip_tta_maps_x_back_exactly(trained_model, hc18_small):
    """With no letterbox padding (an image exactly 2x the input) flip TTA is exactly
    mirror-equivariant, which holds only if x maps back with W - 1 - x."""
    predictor = LandmarkPredictor.from_folder(trained_model, postprocess=[{"step": "flip_tta"}])
    h, w = predictor.spec.input_hw
    record = load_records(hc18_small)[0]
    image = cv2.resize(read_grayscale(record.image), (2 * w, 2 * h), interpolation=cv2.INTER_AREA)
    direct, _ = predictor.predict([image])
    mirrored, _ = predictor.predict([np.ascontiguousarray(image[:, ::-1])])
    mirrored[..., 0] = 2 * w - 1 - mirrored[..., 0]
    assert landmark_errors(mirrored, direct).max() < 1e-3


def test_any_image_size_and_spacing(trained_model, hc18_small, tmp_path):
    """An HC18 image resized to 600x405 with its spacing scaled gives the same measurements in
    mm and the same landmarks once scaled back to 800x540."""
    record = load_records(hc18_small)[0]
    image = read_grayscale(record.image)
    assert image.shape == (540, 800)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a_original.png"), image)
    cv2.imwrite(str(images / "b_small.jpg"), cv2.resize(image, (600, 405),
                                                       interpolation=cv2.INTER_AREA))
    factor = 800 / 600
    (tmp_path / "spacing.csv").write_text(
        f"image,pixel_mm\na_original.png,{record.pixel_mm}\n"
        f"b_small.jpg,{record.pixel_mm * factor}\n")
    assert command(predict, "--model", trained_model, "--images", images, "--pixel-mm",
                   tmp_path / "spacing.csv", "--out", tmp_path / "out") == 0
    frame = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("image")
    big, small = frame.loc["a_original.png"], frame.loc["b_small.jpg"]
    for m in ("bpd_mm", "ofd_mm", "hc_mm"):
        assert small[m] == pytest.approx(big[m], rel=0.05), m
    xy = list(PREDICTION_COLUMNS[1:9])
    scaled = (small[xy].to_numpy(float) + 0.5) * factor - 0.5  # pixel centres at integers
    assert landmark_errors(scaled.reshape(1, 4, 2), big[xy].to_numpy(float).reshape(1, 4, 2)
                           ).max() < 8  # px of 800; the model input differs only by resampling
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == [
        "a_original.png", "b_small.png"]


def test_predict_on_a_folder_with_one_spacing(trained_model, hc18_small, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for record in load_records(hc18_small)[:3]:
        shutil.copy(record.image, images / Path(record.name).name)
    shutil.copy(images / "000_HC.png", images / "000_HC_Mask.png")  # an HC18 label file: left out
    assert command(predict, "--model", trained_model, "--images", images, "--pixel-mm", "0.15",
                   "--out", tmp_path / "out", "--set", "flip_tta=on") == 0
    frame = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert tuple(frame.columns) == PREDICTION_COLUMNS
    assert list(frame["image"]) == sorted(p.name for p in images.iterdir()
                                          if "_Mask" not in p.name)
    coords = frame[list(PREDICTION_COLUMNS[1:9])].to_numpy().reshape(-1, 4, 2)
    np.testing.assert_allclose(frame["bpd_mm"], np.hypot(*(coords[:, 1] - coords[:, 0]).T) * 0.15,
                               atol=2e-3)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3


@pytest.fixture
def spacing_case(hc18_small, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for record in load_records(hc18_small)[:2]:
        shutil.copy(record.image, images / Path(record.name).name)
    return images


@pytest.mark.parametrize("case, message", [
    ("missing folder", r"nope: image folder not found"),
    ("no images", r"empty: no \.png/\.jpg/\.jpeg images"),
    ("bad float", r"--pixel-mm 0\.1x: neither a number nor an existing CSV file"),
    ("non-positive", r"--pixel-mm 0: must be a positive number"),
    ("missing spacing", r"spacing.csv: no pixel spacing for image 001_HC.png"),
    ("bad csv value", r"spacing.csv: row 2 \(001_HC.png\): column 'pixel size\(mm\)' is not a "
                      r"number: 'abc'"),
    ("negative csv value", r"spacing.csv: row 1 \(000_HC.png\): column 'pixel_mm' must be > 0"),
    ("corrupt image", r"001_HC.png: cannot decode the image"),
])
def test_predict_bad_input_names_the_file_and_writes_nothing(case, message, spacing_case,
                                                             trained_model, tmp_path):
    images, pixel_mm = spacing_case, "0.1"
    csv = tmp_path / "spacing.csv"
    if case == "missing folder":
        images = tmp_path / "nope"
    elif case == "no images":
        images = tmp_path / "empty"
        images.mkdir()
        (images / "notes.txt").write_text("x")
    elif case == "bad float":
        pixel_mm = "0.1x"
    elif case == "non-positive":
        pixel_mm = "0"
    elif case == "missing spacing":
        csv.write_text("image,pixel_mm\n000_HC.png,0.1\n")
    elif case == "bad csv value":
        csv.write_text("filename,pixel size(mm)\n000_HC.png,0.1\n001_HC.png,abc\n")
    elif case == "negative csv value":
        csv.write_text("image,pixel_mm\n000_HC.png,-0.1\n001_HC.png,0.1\n")
    elif case == "corrupt image":
        (images / "001_HC.png").write_bytes((images / "001_HC.png").read_bytes()[:200])
    if case.startswith(("missing spacing", "bad csv", "negative csv")):
        pixel_mm = str(csv)
    out = tmp_path / "out"
    with pytest.raises(BiometryInputError, match=message) as err:
        command(predict, "--model", trained_model, "--images", images, "--pixel-mm", pixel_mm,
                "--out", out)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_cli_missing_model_exits_nonzero_with_one_line(hc18_small, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "biometry", "evaluate", "--model",
                           str(tmp_path / "no_model"), "--data", str(hc18_small), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_model: model folder not found" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
