"""ONNX export: an exported model folder predicts the torch model's landmarks through onnxruntime,
with its post-processing steps, for a single model and both kinds of ensemble; every registered
architecture exports; bad exported folders are one line naming the file."""
from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from biometry.cli import main
from biometry.errors import BiometryInputError
from biometry.export import export_onnx
from biometry.inference import LandmarkPredictor, load_model_folder, save_model_folder
from biometry.io.images import read_grayscale
from biometry.models import create_model, list_models
from biometry.onnx_model import OnnxNetwork
from tests.legacy_models import legacy_root

REPO = Path(__file__).resolve().parents[1]
LEGACY = legacy_root()  # tests/data/legacy_model with its model.pt files written
SAMPLE = REPO / "biometry" / "sample_data" / "hc18_sample"
FOLDERS = ("single", "ensemble_median", "ensemble_maps")
MAX_PX = 0.05  # the parity target, in original image pixels
CLI_IMAGES = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Each committed model folder of tests/data/legacy_model exported once."""
    root = tmp_path_factory.mktemp("exported")
    return {name: export_onnx(LEGACY / name, root / f"{name}.onnx").folder for name in FOLDERS}


@pytest.fixture(scope="module")
def reference():
    """The torch model's landmarks on 16 sample images, every step on (tests/test_postprocess.py
    holds today's torch predictor to them within 1e-4 px)."""
    ref = np.load(LEGACY / "reference.npz")
    return ref, [read_grayscale(SAMPLE / name) for name in ref["names"]]


def test_an_exported_folder_holds_the_spec_and_the_graphs_and_no_torch_weights(exported):
    assert sorted(p.name for p in exported["single"].iterdir()) == ["model.onnx", "model.yaml"]
    assert sorted(p.name for p in exported["ensemble_median"].iterdir()) == [
        "member0.onnx", "member1.onnx", "model.yaml"]
    for name in FOLDERS:
        model, spec = load_model_folder(exported[name])
        torch_spec = load_model_folder(LEGACY / name)[1]
        assert spec == torch_spec
        assert sum(p.numel() for p in model.parameters()) == 0  # no torch network inside
        assert all(isinstance(m, OnnxNetwork) for m in model.modules() if not list(m.children()))


@pytest.mark.parametrize("name", FOLDERS)
def test_onnx_gives_the_torch_landmarks_with_flip_tta_second_looks_and_mask_steps(
        name, exported, reference):
    ref, images = reference
    model, spec = load_model_folder(exported[name])
    assert [s["step"] for s in spec.postprocess] == ["flip_tta", "second_look", "mask_fallback",
                                                     "small_heads_by_mask"]
    coords, uncertainty = LandmarkPredictor(model, spec).predict(images, pixel_mm=ref["pixel_mm"])
    difference = np.abs(coords - ref[f"{name}/all/coords"]).max()
    print(f"{name}: max landmark difference onnxruntime vs torch {difference:.2g} px")
    assert difference <= MAX_PX
    np.testing.assert_allclose(uncertainty, ref[f"{name}/all/uncertainty"], rtol=1e-3)


@pytest.mark.parametrize("batch", [1, 7])
def test_the_graph_takes_any_batch_size(batch, exported):
    onnx_model, spec = load_model_folder(exported["ensemble_maps"])
    torch_model, _ = load_model_folder(LEGACY / "ensemble_maps")
    x = torch.randn(batch, 1, *spec.input_hw, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        np.testing.assert_allclose(onnx_model(x).numpy(), torch_model(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("architecture", list_models())
def test_every_registered_architecture_exports_with_matching_maps(architecture, tmp_path):
    spec = load_model_folder(LEGACY / "single")[1]
    kwargs = {"width": 4, "output_stride": 2, "mask_head": True}
    torch.manual_seed(0)
    folder = save_model_folder(tmp_path / "torch", create_model(architecture, **kwargs).eval(),
                               replace(spec, architecture=architecture, model_kwargs=kwargs))
    result = export_onnx(folder, tmp_path / "exported")
    assert result.max_map_difference < 1e-4
    assert isinstance(load_model_folder(result.folder)[0], OnnxNetwork)


def test_export_then_predict_and_evaluate_from_the_command_line(tmp_path):
    rows = list(csv.DictReader((SAMPLE / "landmarks.csv").open()))[:CLI_IMAGES]
    images = tmp_path / "images"
    images.mkdir()
    for row in rows:
        shutil.copy(SAMPLE / row["image"], images / row["image"])
    data = images / "landmarks.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "single.onnx"
    assert main(["export", "--model", str(LEGACY / "single"), "--format", "onnx",
                 "--out", str(out)]) == 0
    predictions = {}
    for label, model in (("torch", LEGACY / "single"), ("onnx", out)):
        assert main(["predict", "--model", str(model), "--images", str(images), "--pixel-mm",
                     str(data), "--out", str(tmp_path / label), "--overlays", "0"]) == 0
        predictions[label] = read_landmarks(tmp_path / label / "predictions.csv")
    assert np.abs(predictions["onnx"] - predictions["torch"]).max() <= MAX_PX
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--out",
                 str(tmp_path / "evaluate"), "--atlas", "0"]) == 0
    np.testing.assert_allclose(read_landmarks(tmp_path / "evaluate" / "predictions.csv"),
                               predictions["onnx"], atol=1e-6)
    assert (tmp_path / "evaluate" / "summary.json").is_file()


def read_landmarks(path: Path) -> np.ndarray:
    rows = list(csv.DictReader(path.open()))
    keys = [f"{m}_{axis}{k}" for m in ("bpd", "ofd") for k in (1, 2) for axis in ("x", "y")]
    return np.array([[float(row[key]) for key in keys] for row in rows])


def broken_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_a_missing_member_graph_is_an_error_naming_it(exported, tmp_path):
    folder = broken_copy(exported["ensemble_median"], tmp_path)
    (folder / "member1.onnx").unlink()
    with pytest.raises(BiometryInputError, match=r"member1\.onnx: not found"):
        load_model_folder(folder)


def test_a_corrupt_graph_is_one_line_naming_the_file(exported, tmp_path, capsys):
    folder = broken_copy(exported["single"], tmp_path)
    (folder / "model.onnx").write_bytes(b"not a graph")
    assert main(["predict", "--model", str(folder), "--images", str(SAMPLE), "--pixel-mm",
                 "0.15", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder / 'model.onnx'}: cannot load" in err
    assert not (tmp_path / "out").exists()


def test_a_graph_linked_from_outside_the_folder_is_refused(exported, tmp_path):
    folder = broken_copy(exported["single"], tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (folder / "model.onnx").rename(outside)
    (folder / "model.onnx").symlink_to(outside)
    with pytest.raises(BiometryInputError, match="points outside the model folder"):
        load_model_folder(folder)


def test_a_graph_of_another_input_size_than_model_yaml_is_refused(exported, tmp_path):
    folder = broken_copy(exported["single"], tmp_path)
    text = (folder / "model.yaml").read_text()
    (folder / "model.yaml").write_text(text.replace("- 64\n- 96\n", "- 64\n- 128\n", 1))
    with pytest.raises(BiometryInputError, match=r"model\.onnx: the network's input is"):
        load_model_folder(folder)


def test_export_refuses_a_torch_model_folder_as_out_and_an_exported_folder_as_model(exported):
    with pytest.raises(BiometryInputError, match="holds model.pt"):
        export_onnx(LEGACY / "single", LEGACY / "ensemble_maps")
    with pytest.raises(BiometryInputError, match="already an exported model folder"):
        export_onnx(exported["single"], exported["single"].parent / "again")


def test_an_opset_the_exporter_lacks_is_one_line(tmp_path, capsys):
    assert main(["export", "--model", str(LEGACY / "single"), "--out", str(tmp_path / "out"),
                 "--opset", "99"]) == 2
    assert capsys.readouterr().err.strip() == "error: --opset must be between 11 and 20 but got 99"
    assert not (tmp_path / "out").exists()
