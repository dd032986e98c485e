"""benchmarks/curves/record.py: recorded learning curves (issue 24). Real torch on the bundled HC18
sample at 32x48, 3 configs (the preset's trial and 2 Sobol points) x 2 epochs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks.curves import record

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "biometry" / "sample_data" / "hc18_sample"
EPOCHS = 2


def _args(out: Path, configs: int) -> list[str]:
    return ["--configs", str(configs), "--seed", "3", "--epochs", str(EPOCHS), "--input-hw", "32x48",
            "--data", str(SAMPLE), "--out", str(out)]


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves") / "curves.csv"
    assert record.main(_args(out, 2)) == 0
    return out


def test_every_epoch_of_every_config_is_a_row(recorded):
    rows = _rows(recorded)
    by_config = {}
    for row in rows:
        by_config.setdefault(int(row["config_id"]), []).append(row)
    assert sorted(by_config) == [record.BASE_ID, 0, 1]
    for cid, group in by_config.items():
        assert [int(r["epoch"]) for r in group] == list(range(1, EPOCHS + 1))
        for row in group:
            assert row["status"] == "ok" and row["fidelity"] == "cheap"
            assert (row["input_h"], row["input_w"], row["seed"]) == ("32", "48", "3")
            for key in ("val_measure_l1_mm", "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "epoch_seconds",
                        "train_images_per_s", "load1"):
                assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (cid, key)
            assert row["host"]
    meta = json.loads(recorded.with_suffix(".json").read_text())
    assert meta["configs_done"] == 3 and meta["rows"] == 3 * EPOCHS and meta["seed"] == 3
    assert meta["settings"]["input_hw"] == [32, 48] and meta["runs"][0]["commit"]
    assert meta["command"].startswith("python benchmarks/curves/record.py --configs 2")


def test_params_come_from_the_space(recorded):
    from search.space import load_space

    space = load_space(REPO_ROOT / "configs" / "search" / "default.yaml")
    rows = {int(r["config_id"]): r for r in _rows(recorded) if r["epoch"] == "1"}
    assert set(space.keys()) <= set(rows[0])
    by_key = {d.key: d for d in space.params}
    for cid in (0, 1):
        row = rows[cid]
        name = row["model.name"]
        assert name in by_key["model.name"].choices
        branch = {d.key: d for d in space.conditional["model.name"][name]}
        for key, dist in {**by_key, **branch}.items():
            if dist.choices is not None:
                assert type(dist.choices[0])(row[key]) in dist.choices, key
                continue
            value = float(row[key])
            assert (dist.zero and value == 0) or dist.low <= value <= dist.high * (1 + 1e-5), key
    assert rows[0]["train.lr"] != rows[1]["train.lr"]  # two different Sobol points
    # the preset's own trial, as the search enqueues it
    assert (rows[-1]["model.name"], rows[-1]["model.width"], rows[-1]["train.lr"]) == (
        "hrnet_compact", "16", "0.00179")
    # what was trained is the driver's trial config for that point
    base_cfg = record.trial_config({}, {}, data_path=str(SAMPLE), input_hw=(32, 48), epochs=EPOCHS,
                                   num_workers=0)
    overrides, params = record.sample_config(space, base_cfg, seed=3, config_id=1)
    assert record._cell(params["train.lr"]) == rows[1]["train.lr"]
    assert "@" not in "".join(overrides) and len(overrides["loss.channel_weights"]) == 4


def test_resume_skips_recorded_configs_and_drops_a_torn_one(recorded, monkeypatch):
    import trainables.train

    calls = []
    real = trainables.train.run_trial

    def counting(cfg, **kwargs):
        calls.append(cfg.model.name)
        return real(cfg, **kwargs)

    monkeypatch.setattr(trainables.train, "run_trial", counting)
    assert record.main(_args(recorded, 3)) == 0
    assert len(calls) == 1  # only config 2
    rows = _rows(recorded)
    assert len(rows) == 4 * EPOCHS

    # a run killed while writing: config 3's first epoch and half a line
    text = recorded.read_text()
    line = text.splitlines()[-1].split(",")
    line[1], line[6] = "3", "1"
    recorded.write_text(text + ",".join(line) + "\n" + ",".join(line)[:20])
    assert record.main(_args(recorded, 3)) == 0
    assert len(calls) == 1
    assert recorded.read_text() == text
    meta = json.loads(recorded.with_suffix(".json").read_text())
    assert meta["configs_done"] == 4 and len(meta["runs"]) == 3
