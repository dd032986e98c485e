"""The search with real Ray (2 CPUs), Optuna and MLflow on synthetic data."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from biometry.errors import BiometryInputError
from biometry.inference import load_model_folder
from search import cli as search_cli
from search import driver as search_driver
from search.space import load_space, space_from_dict

REPO = Path(__file__).resolve().parents[1]


def write_preset(path: Path, *, num_samples: int, epochs: int, concurrent: int = 1,
                 space: str = "configs/search/smoke.yaml", **search) -> Path:
    preset = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    preset["trial"]["train"]["epochs"] = epochs
    preset["search"].update(num_samples=num_samples, max_concurrent_trials=concurrent,
                            grace_period=1, reduction_factor=2, space=space, **search)
    path.write_text(yaml.safe_dump(preset))
    return path


def mlflow_runs(run_dir: Path, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def load_study(run_dir: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_space_validation_names_the_key(tmp_path):
    with pytest.raises(BiometryInputError, match="'params.train.lr' has low 0.1 > high 0.01"):
        space_from_dict({"params": {"train.lr": {"low": 0.1, "high": 0.01}}})
    with pytest.raises(BiometryInputError, match="'params.train.lrr' is not a trial config key"):
        space_from_dict({"params": {"train.lrr": {"low": 0.1, "high": 0.2}}})
    with pytest.raises(BiometryInputError, match="unknown key 'params.model.name.choice'"):
        space_from_dict({"params": {"model.name": {"choice": ["unet"]}}})
    bad = tmp_path / "s.yaml"
    bad.write_text("params: [\n")
    with pytest.raises(BiometryInputError, match="s.yaml: invalid YAML"):
        load_space(bad)


def test_default_space_samples_valid_configs():
    space = load_space(REPO / "configs/search/default.yaml")
    preset = search_cli.load_preset("cpu")
    search_driver.validate_space_against_config(space, preset.trial, samples=30)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    values = [space(study.ask()) for _ in range(40)]
    assert {v["model.name"] for v in values} == {"unet", "unet_multihead", "hrnet_compact"}
    assert any(v["loss.angle_weight"] == 0.0 for v in values)
    assert any(v["loss.angle_weight"] > 0.0 for v in values)
    assert all(len(v["loss.channel_weights"]) == 4 for v in values)


def trial_tables(stdout: str) -> list[list[str]]:
    """The trial tables a search printed: each from its header (``trial  status ...``) to the
    line before its legend, the lines around them (status, Ray's notes) included."""
    from search.trial_table import LEGEND

    tables, current = [], None
    for line in stdout.splitlines():
        if line.startswith("== search "):
            current = []
        elif current is not None and line == LEGEND:
            tables.append(current)
            current = None
        elif current is not None and (current or line.startswith("trial ")):
            current.append(line)
    return tables


def test_the_trial_table_ranks_by_best_value_and_fits_its_width():
    from search.trial_table import TrialRow, table_lines

    long_name = "a_model_name_much_longer_than_any_registered_architecture"
    rows = [TrialRow("a1", "RUNNING", {"model.name": "unet", "train.lr": 0.00123456}, {}),
            TrialRow("b2", "TERMINATED", {"model.name": long_name, "train.lr": 0.002},
                     {"training_iteration": 4, "best_val_measure_l1_mm": 1.5}),
            TrialRow("c3", "TERMINATED", {"model.name": "hrnet_compact", "train.lr": 0.003},
                     {"training_iteration": 8, "best_val_measure_l1_mm": 1.2,
                      "val_measure_l1_mm": 1.25, "hc_l1_mm": 3.456}),
            TrialRow("d4", "ERROR", {"train.lr": 0.01},
                     {"training_iteration": 1, "best_val_measure_l1_mm": float("nan")})]
    lines = table_lines(rows, total=10, elapsed_s=3725, width=72, max_rows=3)
    assert lines[0] == "== search 01:02:05: 4 of 10 trials (1 ERROR, 1 RUNNING, 2 TERMINATED) =="
    assert all(len(line) <= 72 for line in lines)
    header = lines[1].split()
    assert header[:2] == ["trial", "status"] and "lr" not in header  # dropped to fit 72
    assert [line.split()[0] for line in lines[2:5]] == ["c3", "b2", "a1"]  # best first
    assert lines[-1] == "... 1 more trials, below these: 1 ERROR"
    assert "lr" in table_lines(rows)[1].split()  # 120 columns hold it


def test_search_with_asha_mlflow_and_optuna(tmp_path, ray_session, capsys):
    preset = write_preset(tmp_path / "p.yaml", num_samples=4, epochs=4,
                          space=str(tmp_path / "space.yaml"))
    # one learning rate that cannot learn, so ASHA has something to stop
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {
        "train.lr": {"choices": [1.0e-7, 3.0e-3]}, "augment.rotate_deg": {"low": 0.0, "high": 5.0}}}))
    rc = search_cli.main(["--preset", str(preset), "--out", str(tmp_path / "runs"),
                          "--name", "t4", "--seed", "3"])
    assert rc == 0
    run_dir = tmp_path / "runs" / "t4"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_trials"] == 4
    assert (run_dir / "best" / "model.pt").is_file() and (run_dir / "best" / "model.yaml").is_file()
    # the live trial table: 120 columns at most, and the last one lists the best trial first
    tables = trial_tables(capsys.readouterr().out)
    assert tables and all(len(line) <= 120 for table in tables for line in table)
    assert tables[-1][1].split()[0] == summary["best_trial_id"], "\n".join(tables[-1])

    client, runs = mlflow_runs(run_dir, "t4")
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["ray_trial_id"] for r in children}) == 4
    epochs = [len(client.get_metric_history(r.info.run_id, "val_measure_l1_mm")) for r in children]
    assert max(epochs) == 4 and min(epochs) < 4, epochs  # ASHA stopped at least one early
    assert all(r.info.status == "FINISHED" for r in children)

    study = load_study(run_dir, "t4")
    states = sorted(t.state.name for t in study.trials)
    n_stopped = sum(e < 4 for e in epochs)
    assert states.count("PRUNED") == n_stopped and states.count("COMPLETE") == 4 - n_stopped
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best_mlflow = min(r.data.metrics["best_val_measure_l1_mm"] for r in children)
    assert min(t.value for t in complete) == pytest.approx(best_mlflow)


def test_final_retrain_trains_the_best_config_longer_and_selects_the_better(tmp_path, ray_session):
    """A finished search resumed with --final-epochs gets its final retrain (with the preset's
    final_overrides: a larger input, its images decoded again) and no new trials; resuming again
    retrains nothing."""
    preset = write_preset(tmp_path / "p.yaml", num_samples=2, epochs=1, concurrent=2,
                          final_overrides={"data.input_h": 80, "data.input_w": 120})
    argv = ["--preset", str(preset), "--out", str(tmp_path / "runs"), "--name", "fin"]
    assert search_cli.main(argv) == 0
    run_dir = tmp_path / "runs" / "fin"
    assert "final" not in json.loads((run_dir / "summary.json").read_text())
    assert search_cli.main([*argv, "--resume", "--final-epochs", "3"]) == 0

    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    assert summary["num_trials"] == 2
    assert final["epochs"] == 3 and 1 <= final["best_epoch"] <= 3
    objective = "val_measure_l1_mm"
    assert final["selected"] == (final["metrics"][objective] < summary["metrics"][objective])
    assert summary["selected_model"] == str(run_dir / ("final" if final["selected"] else "best"))
    # best/ stays the best trial's model (interfaces.md); the retrain is final/
    best = yaml.safe_load((run_dir / "best" / "model.yaml").read_text())
    retrained = yaml.safe_load((run_dir / "final" / "model.yaml").read_text())
    assert best["trial_config"]["train"]["epochs"] == 1
    assert best["metrics"][objective] == pytest.approx(summary["metrics"][objective])
    assert retrained["trial_config"]["train"]["epochs"] == 3
    assert retrained["trial_config"]["train"]["threads"] == 2  # both slots of the search
    assert best["input_hw"] == [64, 96] and retrained["input_hw"] == [80, 120]
    assert final["overrides"] == {"data.input_h": 80, "data.input_w": 120}
    assert retrained["metrics"][objective] == pytest.approx(final["metrics"][objective])

    client, runs = mlflow_runs(run_dir, "fin")
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    finals = [r for r in runs if r.data.tags.get("role") == "final"]
    assert len(finals) == 1 and finals[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(client.get_metric_history(finals[0].info.run_id, objective)) == 3
    assert finals[0].data.params["train.epochs"] == "3"
    assert sum(r.data.tags.get("role") == "trial" for r in runs) == 2

    assert search_cli.main([*argv, "--resume", "--final-epochs", "3"]) == 0
    _, runs = mlflow_runs(run_dir, "fin")
    assert sum(r.data.tags.get("role") == "final" for r in runs) == 1
    assert json.loads((run_dir / "summary.json").read_text())["final"] == final
    with pytest.raises(BiometryInputError, match="its final retrain ran 3 epochs"):
        search_driver.run_search(search_cli.parse_args([*argv, "--resume", "--final-epochs", "5"]))
    write_preset(preset, num_samples=2, epochs=1, concurrent=2, final_overrides={})
    with pytest.raises(BiometryInputError, match="its final retrain ran with search.final_overr"):
        search_driver.run_search(search_cli.parse_args([*argv, "--resume", "--final-epochs", "3"]))


def test_final_seeds_train_at_once_and_final_is_their_ensemble(tmp_path, ray_session):
    """search.final_seeds 2: the best config is retrained with seeds 0 and 1 at once on the
    search's two slots (one thread each); final/ is their ensemble, measured on validation,
    loadable like any model, combined by the median of the seeds' landmarks (the default);
    MLflow holds one run per seed and one for the ensemble; a resume retrains nothing, another
    seed count is refused, and another combine rebuilds final/ from the seeds without
    retraining them."""
    preset = write_preset(tmp_path / "p.yaml", num_samples=1, epochs=1, concurrent=2,
                          final_epochs=2, final_seeds=2)
    argv = ["--preset", str(preset), "--out", str(tmp_path / "runs"), "--name", "ens"]
    assert search_cli.main(argv) == 0
    run_dir = tmp_path / "runs" / "ens"
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    objective = "val_measure_l1_mm"
    assert final["seeds"] == [0, 1] and final["ensemble"] is True
    assert [m["seed"] for m in final["members"]] == [0, 1]
    assert final["selected"] == (final["metrics"][objective] < summary["metrics"][objective])
    members = []
    for member in final["members"]:
        spec = yaml.safe_load((Path(member["model"]) / "model.yaml").read_text())
        assert spec["trial_config"]["train"]["seed"] == member["seed"]
        assert spec["trial_config"]["train"]["threads"] == 1  # two seeds share two slots
        assert spec["trial_config"]["train"]["epochs"] == 2
        members.append(load_model_folder(member["model"])[0])
    model, spec = load_model_folder(run_dir / "final")
    assert spec.architecture == "ensemble" and spec.combine == "median"
    assert final["combine"] == "median"
    assert [m["seed"] for m in spec.model_kwargs["members"]] == [0, 1]
    assert spec.metrics[objective] == pytest.approx(final["metrics"][objective])
    assert spec.uncertainty_threshold is not None
    x = torch.randn(2, 1, *spec.input_hw)
    with torch.no_grad():
        expected = (members[0](x) + members[1](x)) / 2
        assert torch.allclose(model(x), expected, atol=1e-6)

    client, runs = mlflow_runs(run_dir, "ens")
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    finals = [r for r in runs if r.data.tags.get("role") == "final"]
    assert sorted(r.data.params["train.seed"] for r in finals) == ["0", "1"]
    ensemble = [r for r in runs if r.data.tags.get("role") == "final_ensemble"]
    assert len(ensemble) == 1 and ensemble[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ensemble[0].data.metrics[objective] == pytest.approx(final["metrics"][objective])
    artifacts = {a.path for a in client.list_artifacts(ensemble[0].info.run_id, "model")}
    assert artifacts == {"model/model.pt", "model/model.yaml"}

    assert search_cli.main([*argv, "--resume"]) == 0
    _, again = mlflow_runs(run_dir, "ens")
    assert len(again) == len(runs)
    assert json.loads((run_dir / "summary.json").read_text())["final"] == final
    with pytest.raises(BiometryInputError, match="trained 2 seed.s., the preset asks for "
                                                 "search.final_seeds 3"):
        search_driver.run_search(search_cli.parse_args([*argv, "--resume", "--final-seeds", "3"]))

    seeds_written = {m["model"]: (Path(m["model"]) / "model.pt").stat().st_mtime_ns
                     for m in final["members"]}
    assert search_cli.main([*argv, "--resume", "--final-combine", "maps"]) == 0
    rebuilt = json.loads((run_dir / "summary.json").read_text())["final"]
    assert rebuilt["combine"] == "maps" and rebuilt["members"] == final["members"]
    assert {m: (Path(m) / "model.pt").stat().st_mtime_ns for m in seeds_written} == seeds_written
    model, spec = load_model_folder(run_dir / "final")
    assert spec.combine == "maps"
    assert spec.metrics[objective] == pytest.approx(rebuilt["metrics"][objective])
    _, after = mlflow_runs(run_dir, "ens")
    assert len([r for r in after if r.data.tags.get("role") == "final"]) == 2  # none retrained
    by_combine = {r.data.tags.get("combine"): r for r in after
                  if r.data.tags.get("role") == "final_ensemble"}
    assert set(by_combine) == {"median", "maps"}
    assert by_combine["maps"].info.run_id == rebuilt["ensemble_run_id"]
    assert by_combine["maps"].data.metrics[objective] == pytest.approx(rebuilt["metrics"][objective])


@pytest.mark.parametrize("overrides, message", [
    ({"data.input_hh": 80}, "unknown key 'data.input_hh'"),
    ({"data.input_h": "big"}, "data.input_h"),
    ({"data.split_seed": 3}, "'search.final_overrides.data.split_seed' cannot be changed: the "
                             "retrain validates on the search's split"),
    ({"train.epochs": 90}, "set search.final_epochs instead"),
    ({"epochs": 90}, "must be a dotted trial-config key"),
])
def test_bad_final_overrides_are_refused_before_the_search(tmp_path, overrides, message):
    preset = write_preset(tmp_path / "p.yaml", num_samples=1, epochs=1, final_epochs=2,
                          final_overrides=overrides)
    args = search_cli.parse_args(["--preset", str(preset), "--out", str(tmp_path / "runs")])
    with pytest.raises(BiometryInputError, match=re.escape(message)):
        search_driver.run_search(args)
    assert not (tmp_path / "runs").exists()


def test_final_retrain_takes_the_search_slots_that_fit_on_one_node(ray_session):
    from search.tune_api import final_trial_resources

    # the test cluster: one node, 2 CPUs, no GPU
    assert final_trial_resources(cpus_per_trial=1, gpus_per_trial=0, slots=2) == (2, 0.0)
    assert final_trial_resources(cpus_per_trial=1, gpus_per_trial=0, slots=8) == (2, 0.0)
    assert final_trial_resources(cpus_per_trial=2, gpus_per_trial=0, slots=1) == (2, 0.0)


def test_seeds_sharing_the_slots_fit_on_them_all_at_once():
    """Ray rounds a request to its 1e-4 unit: 2/3 CPU would round up to 0.6667, and three of
    them would not fit on 2 CPUs."""
    from search.tune_api import share_resources

    cpus, gpus = share_resources(2.0, 1.0, parts=3)
    assert (cpus, gpus) == (0.6666, 0.3333)
    assert round(cpus * 1e4) * 3 <= 2 * 1e4 and round(gpus * 1e4) * 3 <= 1e4
    assert share_resources(2.0, 0.0, parts=2) == (1.0, 0.0)
    assert share_resources(4.0, 1.0, parts=1) == (4.0, 1.0)


def test_smoke_preset_command(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "search/run.py", "--preset", "smoke", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": "local"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list(tmp_path.glob("search-*"))
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "summary.json").is_file() and (run_dirs[0] / "best" / "model.pt").is_file()
    assert "top 2 trials" in proc.stdout
    print(f"smoke search took {time.perf_counter() - started:.1f}s")


def test_impossible_gpu_request_is_refused(tmp_path, ray_session):
    args = search_cli.parse_args(["--preset", "smoke", "--gpus-per-trial", "1", "--out",
                                  str(tmp_path)])
    with pytest.raises(BiometryInputError, match="asks for a GPU but the Ray cluster has none"):
        search_driver.run_search(args)


def test_existing_run_is_not_overwritten(tmp_path, ray_session):
    run_dir = tmp_path / "same"
    run_dir.mkdir()
    (run_dir / "search.json").write_text("{}")
    args = search_cli.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "same"])
    with pytest.raises(BiometryInputError, match="pass --resume"):
        search_driver.run_search(args)
    assert (run_dir / "search.json").read_text() == "{}"

# The killed-driver + --resume test lives in tests/reliability/test_faults.py.


def test_the_presets_base_config_is_the_first_point_and_the_space_can_produce_it():
    space = load_space(REPO / "configs/search/default.yaml")
    base = search_cli.load_preset("cpu")
    from trainables.config import config_from_dict

    point = space.point_from_config(config_from_dict(base.trial).flat())
    study = optuna.create_study()
    study.enqueue_trial(point)
    values = space(study.ask())
    flat = config_from_dict(base.trial).flat()
    assert values.pop("inference.sweep") == space.postprocess  # the variants, not a sample
    for key, value in values.items():
        assert (list(flat[key]) if isinstance(flat[key], tuple) else flat[key]) == value, key
    # a value outside the space is left to the sampler, not forced
    assert "train.lr" not in space.point_from_config({**flat, "train.lr": 1.0})
    assert space.point_from_config({**flat, "loss.angle_weight": 0.0})["loss.angle_weight@enabled"] is False


def test_a_trial_the_study_file_already_ended_is_left_as_it_is_after_a_resume(tmp_path):
    """A driver killed after the journal recorded a trial's end but before Ray saved the
    searcher resumes that trial: its reports and its end must not crash the search (Optuna
    refuses to update a finished trial) and the study keeps the end it recorded."""
    from search.tune_api import make_searcher

    def searcher():
        return make_searcher(space=load_space(REPO / "configs/search/smoke.yaml"),
                             metric="val_measure_l1_mm", best_metric="best_val_measure_l1_mm",
                             max_epochs=3, storage_path=tmp_path / "optuna.journal",
                             study_name="s", seed=0, n_startup_trials=1)

    first = searcher()
    assert first.suggest("t1")
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save before the kill
    first.on_trial_result("t1", {"val_measure_l1_mm": 5.0, "training_iteration": 1})
    first.on_trial_complete("t1", {"val_measure_l1_mm": 5.0, "training_iteration": 1})  # PRUNED

    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("t1", {"val_measure_l1_mm": 4.0, "training_iteration": 2})
    resumed.on_trial_complete("t1", {"val_measure_l1_mm": 3.0, "best_val_measure_l1_mm": 3.0,
                                     "training_iteration": 3})
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED]


def _log_through(logger_name: str, emit) -> str:
    import io
    import logging

    from search.tune_api import quiet_snapshot_races
    quiet_snapshot_races()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    target = logging.getLogger(logger_name)
    target.addHandler(handler)
    try:
        emit(target)
    finally:
        target.removeHandler(handler)
    return stream.getvalue()


def _copy_error(tmp_path: Path, name: str) -> FileNotFoundError:
    """The error pyarrow raises when a file it was told to copy is gone (Ray's snapshot race)."""
    import pyarrow.fs
    try:
        pyarrow.fs.copy_files(str(tmp_path / name), str(tmp_path / "out.pkl"))
    except FileNotFoundError as error:
        return error
    raise AssertionError("pyarrow copied a file that does not exist")


def test_rays_snapshot_race_on_its_temporary_file_is_one_line(tmp_path):
    import traceback
    race = _copy_error(tmp_path, ".5c5d-tmp-searcher-state-2026.pkl")

    def experiment_state_error(target):  # how ray.tune.execution.experiment_state logs it
        try:
            raise race
        except FileNotFoundError:
            target.error("Saving experiment state to storage at 'x' failed with exception: ",
                         exc_info=True)

    def syncer_warning(target):  # how ray.train._internal.syncer logs it
        try:
            raise race
        except FileNotFoundError:
            target.warning(f"Last sync command failed with the following error:\n"
                           f"{traceback.format_exc()}")

    for name, emit in (("ray.tune.execution.experiment_state", experiment_state_error),
                       ("ray.train._internal.syncer", syncer_warning)):
        text = _log_through(name, emit)
        assert "Traceback" not in text and text.count("\n") == 1, text
        assert "nothing lost" in text, text


def test_other_snapshot_errors_keep_their_traceback(tmp_path):
    lost = _copy_error(tmp_path, "experiment_state-2026.json")  # not one of Ray's temporary files

    def emit(target):
        try:
            raise lost
        except FileNotFoundError:
            target.error("Saving experiment state to storage failed with exception: ",
                         exc_info=True)

    text = _log_through("ray.tune.execution.experiment_state", emit)
    assert "Traceback" in text and "experiment_state-2026.json" in text, text


def test_each_trial_sweeps_the_spaces_post_processing_and_best_keeps_its_choice(tmp_path,
                                                                                  ray_session):
    """The space's postprocess variants reach every trial; each finished trial reports what it
    kept (MLflow params postprocess.*) and best/model.yaml carries the best trial's choice."""
    space = {"params": {"train.lr": {"low": 1.0e-3, "high": 3.0e-3, "log": True}},
             "postprocess": {"flip_tta": ["on"]}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    preset = write_preset(tmp_path / "p.yaml", num_samples=2, epochs=2, concurrent=2,
                          space=str(tmp_path / "space.yaml"))
    assert search_cli.main(["--preset", str(preset), "--out", str(tmp_path / "runs"),
                            "--name", "pp", "--seed", "1", "--final-epochs", "0"]) == 0
    run_dir = tmp_path / "runs" / "pp"
    client, runs = mlflow_runs(run_dir, "pp")
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    # a trial ASHA stopped at epoch 1 never reached its last epoch, so it swept nothing
    finished = [r for r in children
                if len(client.get_metric_history(r.info.run_id, "val_measure_l1_mm")) == 2]
    assert finished and all(r.data.params.get("postprocess.chosen") in ("default", "flip_tta=on")
                            for r in finished)
    assert all("postprocess.chosen" not in r.data.params for r in children if r not in finished)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = next(r for r in children if r.data.tags["ray_trial_id"] == summary["best_trial_id"])
    kept = yaml.safe_load((run_dir / "best" / "model.yaml").read_text())["postprocess"]
    assert kept == ([{"step": "flip_tta"}] if best.data.params.get("postprocess.chosen",
                                                                  "default") != "default" else [])
