"""search/compare.py on a real smoke search (Ray, Optuna journal, MLflow), and its best model
evaluated on the search's own held-out test split."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search import compare
from search import cli as search_cli

REPO = Path(__file__).resolve().parents[1]
NAME = "cmp"


@pytest.fixture(scope="session")
def smoke_search(ray_session, tmp_path_factory) -> Path:
    """The smoke preset (2 trials x 1 epoch on 24 synthetic images), run once. The working
    folder is a temporary one so MLflow's default artifact root (./mlruns) lands there."""
    base = tmp_path_factory.mktemp("search")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert search_cli.main(["--preset", "smoke", "--out", str(base / "runs"),
                                "--name", NAME]) == 0
    finally:
        os.chdir(cwd)
    return base / "runs" / NAME


@dataclass
class Compared:
    rc: int
    stdout: str


@pytest.fixture(scope="session")
def compared(smoke_search) -> Compared:
    """``search/compare.py RUN_DIR --top 5`` (in-process: the imports are already paid for)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = compare.main([str(smoke_search), "--top", "5"])
    assert rc == 0, printed.getvalue()
    return Compared(rc, printed.getvalue())


def test_compare_runs_as_a_script_from_any_folder(tmp_path):
    """The sys.path line at the top of search/compare.py (as in search/run.py)."""
    proc = subprocess.run([sys.executable, str(REPO / "search" / "compare.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RUN_DIR_OR_EXPERIMENT" in proc.stdout


def mlflow_client(run_dir: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client, client.get_experiment_by_name(NAME).experiment_id


def test_compare_lists_the_trials_with_params_and_mm_metrics(smoke_search, compared):
    client, experiment_id = mlflow_client(smoke_search)
    trials = client.search_runs([experiment_id], filter_string="tags.role = 'trial'")
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["ray_trial_id"] in compared.stdout
    out = smoke_search / "compare"
    table = pd.read_csv(out / "top_trials.csv", dtype={"trial_id": str})
    assert len(table) == 2
    assert list(table["rank"]) == [1, 2]
    assert table["best_val_measure_l1_mm"].is_monotonic_increasing
    for param in ("train.lr", "model.name", "augment.rotate_deg", "loss.angle_weight"):
        assert param in table.columns
    for metric in ("val_measure_l1_mm", "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "hc_loa_low_mm",
                   "bpd_median_mm", "ofd_bias_mm"):
        assert metric in table.columns
    # metrics are those of each trial's best epoch, as MLflow logged them
    for _, row in table.iterrows():
        run = client.get_run(row["run_id"])
        assert row["best_val_measure_l1_mm"] == pytest.approx(
            run.data.metrics["best_val_measure_l1_mm"])
        assert row["val_measure_l1_mm"] == pytest.approx(row["best_val_measure_l1_mm"])
        assert float(row["train.lr"]) == pytest.approx(float(run.data.params["train.lr"]))
    markdown = (out / "top_trials.md").read_text()
    assert markdown.count("\n| ") >= 3 and "bpd_l1_mm" in markdown
    for png in ("optimization_history.png", "parallel_coordinate.png"):
        assert (out / png).stat().st_size > 1000
    assert ("param importances" in compared.stdout
            or "note: parameter importances" in compared.stdout)
    assert (out / "index.html").is_file()


def test_compare_logs_its_outputs_to_the_parent_run(smoke_search, compared):
    client, experiment_id = mlflow_client(smoke_search)
    parent, = client.search_runs([experiment_id], filter_string="tags.role = 'search'")
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "compare")}
    written = {p.name for p in (smoke_search / "compare").iterdir()}
    assert {"top_trials.csv", "top_trials.md", "optimization_history.png"} <= logged
    assert logged == written
    assert parent.info.run_id in compared.stdout


def test_compare_by_experiment_name_rebuilds_the_study(smoke_search, tmp_path, capsys):
    uri = f"sqlite:///{smoke_search / 'mlflow.db'}"
    rc = compare.main([NAME, "--mlflow-uri", uri, "--top", "1", "--out", str(tmp_path / "c"),
                       "--no-log"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "study was rebuilt from the MLflow trial runs" in printed
    assert len(pd.read_csv(tmp_path / "c" / "top_trials.csv")) == 1
    assert (tmp_path / "c" / "optimization_history.png").is_file()


def test_rebuilt_study_matches_the_journal(smoke_search):
    client, experiment_id = mlflow_client(smoke_search)
    runs = compare.trial_runs(client, experiment_id)
    rebuilt = compare.study_from_runs(NAME, runs)
    journal = compare.load_study(compare.resolve_source(str(smoke_search), mlflow_uri=None), runs)
    assert sorted(t.value for t in rebuilt.trials) == pytest.approx(
        sorted(t.value for t in journal.trials if t.value is not None))


def test_too_few_trials_for_importances_is_one_note():
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=1)
    notes: list[str] = []
    assert compare.param_importances(study, notes) is None
    assert notes == ["parameter importances need at least 2 completed trials (have 1)"]


def test_bad_target_is_one_line(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    assert compare.main([str(tmp_path / "not_a_run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'not_a_run'}: not a run folder (search.json missing)"]
    assert compare.main(["nosuch", "--mlflow-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_best_model_evaluates_on_the_searchs_test_split(smoke_search, tmp_path):
    """evaluate --split test repeats the search's subject split (splits.json) from model.yaml."""
    from biometry.commands import evaluate

    search = json.loads((smoke_search / "search.json").read_text())
    splits = json.loads((smoke_search / "splits.json").read_text())
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--model", str(smoke_search / "best"), "--data",
                              search["trial"]["data"]["path"], "--out", str(tmp_path),
                              "--split", "test", "--atlas", "0"])
    assert evaluate.run(args) == 0
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert list(frame["image"]) == splits["test"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "test" and summary["n_images"] == len(splits["test"])
