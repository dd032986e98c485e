"""The trial without Ray: config validation, a short training run, checkpoint and resume."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from biometry.errors import BiometryInputError
from trainables.config import config_from_dict, load_config
from trainables.data import prepare_splits
from trainables.train import OBJECTIVE, TRAINER_STATE, run_trial

REPO = Path(__file__).resolve().parents[1]
MM_METRICS = ["val_measure_l1_mm", "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "bpd_median_mm",
              "hc_bias_mm", "ofd_loa_low_mm", "ofd_loa_high_mm", "nme", "unc_spearman", "aurc"]


def tiny_config(path, *, pairing="ordered", **train):
    return config_from_dict({
        "data": {"path": str(path), "input_h": 64, "input_w": 96},
        "model": {"name": "unet", "width": 8, "depth": 3, "output_stride": 2},
        "loss": {"heatmap_weight": 1.0, "coord_weight": 1.0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "num_workers": 0, "threads": 2,
                  "device": "cpu", **train},
        "inference": {"pairing": pairing},
    }, source="test")


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, "unknown key 'trian'"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'"),
    ({"train": {"epochs": "ten"}}, "'train.epochs' must be int"),
    ({"train": {"epochs": 0}}, "'train.epochs' must be >= 1"),
    ({"model": {"name": "resnet"}}, "'model.name' must be one of"),
    ({"augment": {"scale_min": 1.2, "scale_max": 1.1}}, "scale_min"),
    ({"loss": {"angle_weight": -1.0}}, "angle_weight"),
    ({"train": {"mask_fallback": 0.05}}, "'train.mask_fallback' moved to inference.postprocess"),
    ({"train": {"decode": "window"}}, "'train.decode' moved to inference.decode"),
    ({"loss": {"mask_weight": 0.1},
      "inference": {"postprocess": [{"step": "mask_fallback", "threshold": -0.5}]}},
     "'inference.postprocess': mask_fallback: 'threshold' must be a number >= 0"),
    ({"inference": {"postprocess": [{"step": "small_heads_by_mask"}]}},
     "step 'small_heads_by_mask' needs the model's mask channel"),
    ({"loss": {"mask_weight": 0.1}, "inference": {"sweep": {"mask_fallback.threshold": [0.1]}}},
     "'inference.sweep.mask_fallback.threshold' changes an option of 'mask_fallback'"),
    ({"inference": {"sweep": {"vote": [True]}}}, "'inference.sweep.vote' must name a step"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(BiometryInputError, match=message.replace("(", r"\(")):
        config_from_dict(raw, source="x.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    with pytest.raises(BiometryInputError, match="bad.yaml"):
        load_config(bad)


def test_two_epochs_lower_the_loss_and_resume_at_epoch_three(synthetic_csv, tmp_path):
    cfg = tiny_config(synthetic_csv)
    data = prepare_splits(cfg.data)
    reports = []

    def keep(metrics, folder):
        reports.append(dict(metrics))

    run_trial(cfg, data=data, out_dir=tmp_path / "a", reporter=keep, log=lambda _: None)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert reports[1]["train_loss_total"] < reports[0]["train_loss_total"]

    run_trial(cfg, data=data, out_dir=tmp_path / "b", log=lambda _: None)  # standalone: folders
    checkpoint = tmp_path / "b" / "checkpoint"
    assert (checkpoint / TRAINER_STATE).is_file() and (tmp_path / "b" / "best" / "model.pt").is_file()

    longer = tiny_config(synthetic_csv, epochs=3)
    resumed = []
    run_trial(longer, data=data, out_dir=tmp_path / "b", resume_from=checkpoint,
              reporter=lambda m, f: resumed.append(dict(m)), log=lambda _: None)
    assert [r["epoch"] for r in resumed] == [3]


def test_resume_refuses_another_model(synthetic_csv, tmp_path):
    cfg = tiny_config(synthetic_csv, epochs=1)
    run_trial(cfg, out_dir=tmp_path, log=lambda _: None)
    other = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "width": 16}})
    with pytest.raises(BiometryInputError, match="checkpoint was trained with model"):
        run_trial(other, out_dir=tmp_path, resume_from=tmp_path / "checkpoint", log=lambda _: None)


def test_repeatable_on_cpu(synthetic_csv, tmp_path):
    cfg = tiny_config(synthetic_csv, epochs=1)
    data = prepare_splits(cfg.data)
    first = run_trial(cfg, data=data, out_dir=tmp_path / "1", log=lambda _: None)
    second = run_trial(cfg, data=data, out_dir=tmp_path / "2", log=lambda _: None)
    assert first[OBJECTIVE] == pytest.approx(second[OBJECTIVE], rel=1e-6)


def test_short_run_on_real_hc18_reports_every_metric_in_mm(hc18_dir, tmp_path):
    cfg = tiny_config(hc18_dir, epochs=1)
    cfg.data.limit = 40
    best = run_trial(cfg, out_dir=tmp_path, log=lambda _: None)
    for name in MM_METRICS:
        assert name in best, name
    assert 0 < best["bpd_l1_mm"] < 200 and 0 < best["hc_l1_mm"] < 600
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics[OBJECTIVE] == pytest.approx(best[OBJECTIVE])


def test_command_line_smoke_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config",
                           str(REPO / "configs/trial/smoke.yaml"), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert OBJECTIVE in json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "best" / "model.yaml").is_file()


def test_command_line_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet}\n")
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config", str(bad),
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "model.name" in proc.stderr


def test_weight_average_is_what_is_saved_and_resume_continues_it(synthetic_csv, tmp_path):
    """With train.ema_decay the model folder holds the average; trainer.pt the raw weights, so a
    resumed run continues both (and an unordered-pairing model decodes through its folder)."""
    import torch

    from biometry.inference import load_model_folder

    cfg = tiny_config(synthetic_csv, ema_decay=0.9, pairing="unordered")
    data = prepare_splits(cfg.data)
    run_trial(cfg, data=data, out_dir=tmp_path / "a", log=lambda _: None)
    checkpoint = tmp_path / "a" / "checkpoint"
    trainer = torch.load(checkpoint / TRAINER_STATE, weights_only=True)
    average = torch.load(checkpoint / "model.pt", weights_only=True)
    assert set(trainer) >= {"model", "ema", "optimizer"}
    name = next(k for k, v in average.items() if v.is_floating_point() and v.ndim == 4)
    assert not torch.equal(average[name], trainer["model"][name])  # the average is not the last step
    torch.testing.assert_close(average[name], trainer["ema"][f"module.{name}"])
    _, spec = load_model_folder(checkpoint)
    assert spec.pairing == "unordered"

    resumed = []
    run_trial(tiny_config(synthetic_csv, ema_decay=0.9, pairing="unordered", epochs=3), data=data,
              out_dir=tmp_path / "a", resume_from=checkpoint,
              reporter=lambda m, f: resumed.append(dict(m)), log=lambda _: None)
    assert [r["epoch"] for r in resumed] == [3] and math.isfinite(resumed[0][OBJECTIVE])


def test_mask_weight_trains_a_mask_head_that_the_model_folder_rebuilds(synthetic_csv, tmp_path):
    """loss.mask_weight switches the model's head-region channel on; model.yaml records it, so
    the folder rebuilds a 5-channel model and predicts landmarks from its first 4 maps."""
    import numpy as np

    from biometry.inference import LandmarkPredictor

    raw = tiny_config(synthetic_csv).to_dict()
    raw["loss"]["mask_weight"] = 0.2
    raw["inference"]["postprocess"] = [{"step": "mask_fallback", "threshold": 0.05},
                                       {"step": "small_heads_by_mask", "below_mm": 100.0}]
    cfg = config_from_dict(raw, source="test")
    reports = []
    run_trial(cfg, out_dir=tmp_path, reporter=None, log=lambda _: None)
    run_trial(cfg, out_dir=tmp_path / "r", reporter=lambda m, f: reports.append(dict(m)),
              log=lambda _: None)
    assert all(0 < r["train_loss_mask"] < 1 for r in reports)
    assert reports[1]["train_loss_mask"] < reports[0]["train_loss_mask"]
    predictor = LandmarkPredictor.from_folder(tmp_path / "best")
    assert predictor.spec.model_kwargs["mask_head"] is True
    assert [s.to_dict() for s in predictor.steps] == cfg.inference.postprocess
    coords, uncertainty = predictor.predict([np.zeros((60, 90), dtype=np.uint8)], pixel_mm=[0.2])
    assert coords.shape == (1, 4, 2) and np.isfinite(coords).all() and uncertainty.shape == (1,)


def test_the_last_epoch_sweeps_the_post_processing_variants_on_validation(synthetic_csv,
                                                                           tmp_path):
    """After the last epoch the best weights are measured under each listed variant; the kept
    steps land in best/model.yaml and in the last report beside the metric."""
    import json

    from biometry.inference import load_model_spec

    raw = tiny_config(synthetic_csv).to_dict()
    raw["loss"]["mask_weight"] = 0.2
    raw["inference"].update(postprocess=[{"step": "mask_fallback", "threshold": 0.05}],
                            sweep={"mask_fallback.threshold": [0.5, False], "flip_tta": [True]})
    cfg = config_from_dict(raw, source="test")
    reports, lines = [], []
    run_trial(cfg, out_dir=tmp_path, reporter=lambda m, f: reports.append(dict(m)),
              log=lines.append)
    last = reports[-1]
    assert "postprocess.chosen" not in reports[0]
    assert last["postprocess.chosen"] in ("default", "mask_fallback.threshold=0.5",
                                          "mask_fallback.threshold=off", "flip_tta=on")
    steps = json.loads(last["postprocess_steps"])
    assert any("post-processing sweep: kept" in line for line in lines)
    run_trial(cfg, out_dir=tmp_path / "alone", log=lambda _: None)
    assert load_model_spec(tmp_path / "alone" / "best").postprocess == steps
