"""Faults: failing and diverging trials, killed workers and drivers, a lost MLflow server, an
unwritable or full output folder.

Searches run as subprocesses on their own local Ray cluster (RAY_ADDRESS=local), as a user runs
them. Faults are real where that is honest and robust: a learning rate of 1e6 really diverges
(NaN loss), processes are really SIGKILLed, the MLflow server is really stopped, the disk is
really full (a tiny tmpfs). Only "raise once" and "slow down" use the documented test hook
``BIOMETRY_FAULT`` (trainables/faults.py, passed to the trial as ``run_trial(hooks=...)``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import (  # noqa: E402
    REPO,
    closed_port,
    kill_group,
    load_study,
    local_uri,
    mlflow_client,
    mlflow_runs,
    one_error_line,
    result_rows,
    run_command,
    start_command,
    trial_dirs,
    tree_digest,
    wait_for,
    write_preset,
)

from biometry.constants import OBJECTIVE  # noqa: E402
from biometry.inference import LandmarkPredictor, load_model_folder  # noqa: E402

SEARCH_TIMEOUT = 420


def trial_id(trial_dir: Path) -> str:
    return trial_dir.name.removeprefix("trial_")


def trial_params(trial_dir: Path) -> dict:
    return json.loads((trial_dir / "params.json").read_text())


def children_by_trial(uri: str, name: str) -> dict[str, object]:
    runs = mlflow_runs(uri, name)
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    ids = [r.data.tags["ray_trial_id"] for r in children]
    assert len(ids) == len(set(ids)), f"duplicate MLflow runs: {sorted(ids)}"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    return {r.data.tags["ray_trial_id"]: r for r in children}


def optuna_states(run_dir: Path, name: str, key: str, trials: dict[str, dict]) -> dict[str, str]:
    """Optuna state of each Ray trial, matched on the (continuous, so unique) parameter ``key``."""
    study = load_study(run_dir, name)
    states = {}
    for tid, params in trials.items():
        matches = [t for t in study.trials if t.params.get(key) == pytest.approx(params[key])]
        assert len(matches) == 1, f"trial {tid}: {len(matches)} Optuna trials with {key}={params[key]}"
        states[tid] = matches[0].state.name
    return states


def metric_steps(uri: str, run, metric: str = OBJECTIVE) -> list[int]:
    return sorted(m.step for m in mlflow_client(uri).get_metric_history(run.info.run_id, metric))


def search_argv(preset: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["search/run.py", "--preset", str(preset), "--out", str(out), "--name", name, *extra]


# -- failing trials ----------------------------------------------------------------------------
@pytest.mark.slow
def test_failing_trials_are_marked_failed_and_the_search_goes_on(tmp_path):
    """Trials with lr=1e9 really diverge (NaN loss in epoch 1, FloatingPointError); one more
    trial raises at epoch 2 (test hook, once). Each is ERROR in Ray, FAIL in the Optuna journal
    and FAILED in MLflow; every other trial finishes, and best/ loads."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {
        "train.lr": {"choices": [1.0e9, 3.0e-3, 2.0e-3]},
        "augment.rotate_deg": {"low": 0.0, "high": 5.0}}}))
    # start_from_base off: the sampler alone picks every trial (seed 1 includes lr=1e9)
    preset = write_preset(tmp_path / "p.yaml", num_samples=5, epochs=3, concurrent=2,
                          space=space, grace_period=3, n_startup_trials=5, start_from_base=False)
    out, fired = tmp_path / "runs", tmp_path / "fired"
    proc = run_command(search_argv(preset, out, "f", "--seed", "1"), timeout=SEARCH_TIMEOUT,
                       BIOMETRY_FAULT=f"raise_at_epoch=2,once_file={fired}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "f"

    trials = {trial_id(d): trial_params(d) for d in trial_dirs(run_dir)}
    assert len(trials) == 5
    diverging = {t for t, p in trials.items() if p["train.lr"] == 1.0e9}
    raised = Path(fired.read_text().split()[1]).name.removeprefix("trial_")
    assert raised in trials and raised not in diverging
    failed = diverging | {raised}
    assert diverging and len(trials) - len(failed) >= 1, f"the sampler gave {trials}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_trials"] == 5
    assert summary["trial_states"].get("TERMINATED") == 5 - len(failed), summary["trial_states"]
    errored = {t for t in trials if (run_dir / f"trial_{t}" / "error.txt").is_file()}
    assert errored == failed
    for t in diverging:
        assert "non-finite training loss" in (run_dir / f"trial_{t}" / "error.txt").read_text()
    assert "injected fault" in (run_dir / f"trial_{raised}" / "error.txt").read_text()

    uri = local_uri(run_dir)
    runs = children_by_trial(uri, "f")
    assert set(runs) == set(trials)
    assert {t: r.info.status for t, r in runs.items()} == {
        t: ("FAILED" if t in failed else "FINISHED") for t in trials}
    assert optuna_states(run_dir, "f", "augment.rotate_deg", trials) == {
        t: ("FAIL" if t in failed else "COMPLETE") for t in trials}
    for t in set(trials) - failed:  # the others ran to the end, each in one process
        rows = result_rows(run_dir / f"trial_{t}")
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert len({r["pid"] for r in rows}) == 1
    LandmarkPredictor.from_folder(run_dir / "best")


@pytest.mark.slow
def test_raising_and_killed_trials_restart_from_their_last_checkpoint(tmp_path):
    """With --max-failures 1: one trial raises at epoch 2 (test hook, once); the other's worker
    process is SIGKILLed after its first epoch. Both restart in a new process from their last
    checkpoint, continue the epochs (no restart from epoch 1) and end TERMINATED."""
    preset = write_preset(tmp_path / "p.yaml", num_samples=2, epochs=4, concurrent=2,
                          grace_period=4, n_startup_trials=2)
    out, fired = tmp_path / "runs", tmp_path / "fired"
    run_dir = out / "r"
    proc = start_command(search_argv(preset, out, "r", "--max-failures", "1"),
                         log=tmp_path / "search.log",
                         BIOMETRY_FAULT=f"raise_at_epoch=2,once_file={fired},sleep_s=1.0")
    try:
        wait_for(fired.is_file, timeout=300, what="the injected fault", proc=proc)
        raised = Path(fired.read_text().split()[1]).name

        def victim():
            for d in trial_dirs(run_dir):
                rows = result_rows(d)
                if d.name != raised and rows and rows[-1]["epoch"] < 4:
                    return d, rows[-1]
            return None

        killed_dir, last = wait_for(victim, timeout=120, poll=0.05, what="a second trial",
                                    proc=proc)
        os.kill(last["pid"], signal.SIGKILL)
        proc.wait(timeout=SEARCH_TIMEOUT)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, (tmp_path / "search.err").read_text()[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trial_states"] == {"TERMINATED": 2}, summary
    runs = children_by_trial(local_uri(run_dir), "r")
    trials = {trial_id(d): trial_params(d) for d in trial_dirs(run_dir)}
    for name, first_pid in ((raised, None), (killed_dir.name, last["pid"])):
        rows = result_rows(run_dir / name)
        epochs = [r["epoch"] for r in rows]
        assert continues_from_checkpoint(epochs), f"{name}: epochs {epochs}"
        assert continues_from_checkpoint([r["training_iteration"] for r in rows])
        # one process up to the fault, a second one from the checkpoint on
        pids = [r["pid"] for r in rows]
        before = pids.index(pids[-1])
        assert len(set(pids)) == 2 and 1 <= before < len(pids), pids
        assert len(set(pids[:before])) == 1 and epochs[before] >= 2, (pids, epochs)
        if first_pid is None:
            assert before == 1, f"{name} raised at epoch 2 but {pids}"
        else:
            assert pids[0] == first_pid, f"{name}: pid {first_pid} was killed but rows show {pids}"
        run = runs[trial_id(run_dir / name)]
        assert run.info.status == "FINISHED"
        assert continues_from_checkpoint(metric_steps(local_uri(run_dir), run))
    assert set(optuna_states(run_dir, "r", "augment.rotate_deg", trials).values()) == {"COMPLETE"}


def continues_from_checkpoint(steps: list[int], last: int = 4) -> bool:
    """Epochs 1..last in order, never restarting from 1. At-least-once: a kill that lands between
    an epoch's report and Ray registering its checkpoint re-runs that one epoch (seen: 1 2 2 3 4)."""
    distinct = sorted(set(steps))
    return distinct == list(range(1, last + 1)) and steps == sorted(steps) and \
        len(steps) - len(distinct) <= 1


# -- a killed driver -----------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_driver_resumes_and_leaves_finished_trials_untouched(tmp_path):
    """SIGKILL the whole driver process group mid-search, then --resume: the trials finished
    before the kill keep their files byte for byte and their MLflow runs; no trial, MLflow run or
    open Optuna trial is duplicated or left behind. (Extends the check in tests/test_search.py.)"""
    preset = write_preset(tmp_path / "p.yaml", num_samples=4, epochs=3, concurrent=1)
    out = tmp_path / "runs"
    run_dir = out / "k"
    argv = search_argv(preset, out, "k")
    proc = start_command(argv, log=tmp_path / "first.log", BIOMETRY_FAULT="sleep_s=0.3")
    try:
        # one trial at a time: once the third has reported, the first two have ended
        wait_for(lambda: sum(bool(result_rows(d)) for d in trial_dirs(run_dir)) >= 3,
                 timeout=300, what="three trials to report", proc=proc)
    finally:
        kill_group(proc)
    assert not (run_dir / "summary.json").exists()
    started = sorted(trial_dirs(run_dir), key=lambda d: (d / "params.json").stat().st_mtime)
    finished = [d for d in started[:-1] if result_rows(d)]
    assert len(finished) >= 2
    before = {d.name: tree_digest(d) for d in finished}
    uri = local_uri(run_dir)
    runs_before = children_by_trial(uri, "k")
    history_before = {t: metric_steps(uri, r) for t, r in runs_before.items()}

    resumed = run_command([*argv, "--resume"], timeout=SEARCH_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_trials"] == 4
    assert len(trial_dirs(run_dir)) == 4
    for d in finished:
        after = tree_digest(d)
        kept = {p: h for p, h in after.items() if p in before[d.name]}
        assert kept == before[d.name], f"{d.name}: files changed by the resume"
        assert any(p.startswith("checkpoint_") for p in before[d.name])
        load_model_folder(next(d.glob("checkpoint_*")))
    runs = children_by_trial(uri, "k")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
    for d in finished:
        t = trial_id(d)
        assert runs[t].info.run_id == runs_before[t].info.run_id
        assert metric_steps(uri, runs[t]) == history_before[t]
    for t, run in runs.items():
        steps = metric_steps(uri, run)
        assert steps == sorted(set(steps)), f"trial {t}: MLflow steps {steps} repeat"
    study = load_study(run_dir, "k")
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") + states.count("PRUNED") == 4
    LandmarkPredictor.from_folder(run_dir / "best")


@pytest.mark.slow
def test_driver_killed_in_the_final_retrain_resumes_it_without_new_search_trials(tmp_path):
    """SIGKILL the driver once the final retrain has reported an epoch of its three: the search
    it follows is recorded (``summary.json``); --resume runs no search trial again and continues
    the retrain from its checkpoint (each epoch reported once, one MLflow run)."""
    preset = write_preset(tmp_path / "p.yaml", num_samples=1, epochs=1, concurrent=1,
                          final_epochs=3)
    out = tmp_path / "runs"
    run_dir = out / "f"
    argv = search_argv(preset, out, "f")
    proc = start_command(argv, log=tmp_path / "first.log", BIOMETRY_FAULT="sleep_s=1.0")
    try:
        wait_for(lambda: any(result_rows(d) for d in trial_dirs(out / "f-final")),
                 timeout=300, what="an epoch of the final retrain", proc=proc)
    finally:
        kill_group(proc)
    searched = json.loads((run_dir / "summary.json").read_text())
    assert "final" not in searched and searched["num_trials"] == 1
    search_trials = {d.name: tree_digest(d) for d in trial_dirs(run_dir)}

    resumed = run_command([*argv, "--resume"], timeout=SEARCH_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_trials"] == 1 and summary["final"]["epochs"] == 3
    assert {d.name: tree_digest(d) for d in trial_dirs(run_dir)} == search_trials
    (final_trial,) = trial_dirs(out / "f-final")
    epochs = [r["epoch"] for r in result_rows(final_trial)]
    assert epochs[-1] == 3 and set(epochs) == {1, 2, 3}, epochs  # continued, not restarted
    assert epochs.count(1) == 1, epochs
    runs = mlflow_runs(local_uri(run_dir), "f")
    assert sum(r.data.tags.get("role") == "final" for r in runs) == 1
    assert sum(r.data.tags.get("role") == "trial" for r in runs) == 1
    LandmarkPredictor.from_folder(run_dir / "best")


# -- MLflow unreachable ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_seed_failing_in_the_final_retrain_leaves_the_ensemble_of_the_others(tmp_path):
    """search.final_seeds 2 and one seed raises at its second epoch (max_failures 0): the search
    exits 0, says which seed gave no result, and final/ is the ensemble of the other seed alone,
    measured and loadable; the failed seed's MLflow run is FAILED."""
    preset = write_preset(tmp_path / "p.yaml", num_samples=1, epochs=1, concurrent=2,
                          final_epochs=2, final_seeds=2)
    out, fired = tmp_path / "runs", tmp_path / "fired"
    proc = run_command(search_argv(preset, out, "f"), timeout=SEARCH_TIMEOUT,
                       BIOMETRY_FAULT=f"raise_at_epoch=2,once_file={fired}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed_seed = trial_params(out / "f-final" / Path(fired.read_text().split()[1]).name)[
        "train.seed"]
    kept_seed = 1 - failed_seed
    assert f"the final retrain of seed(s) [{failed_seed}] gave no result" in proc.stderr

    run_dir = out / "f"
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    by_seed = {m["seed"]: m for m in final["members"]}
    assert "injected fault" in by_seed[failed_seed]["error"]
    assert by_seed[kept_seed]["model"] == str(run_dir / "final_members" / f"seed{kept_seed}")
    assert not (run_dir / "final_members" / f"seed{failed_seed}").exists()
    model, spec = load_model_folder(run_dir / "final")
    assert [m["seed"] for m in spec.model_kwargs["members"]] == [kept_seed]
    assert spec.metrics[OBJECTIVE] == final["metrics"][OBJECTIVE]
    runs = mlflow_runs(local_uri(run_dir), "f")
    statuses = sorted(r.info.status for r in runs if r.data.tags.get("role") == "final")
    assert statuses == ["FAILED", "FINISHED"]
    assert sum(r.data.tags.get("role") == "final_ensemble" for r in runs) == 1


def test_unreachable_mlflow_at_start_fails_before_any_trial(tmp_path):
    out = tmp_path / "runs"
    proc = run_command(["search/run.py", "--preset", "smoke", "--out", str(out), "--name", "m",
                        "--mlflow-uri", f"http://127.0.0.1:{closed_port()}"], timeout=120)
    line = one_error_line(proc)
    assert "--mlflow-uri" in line and "unreachable" in line, line
    assert not (out / "m").exists(), "a run folder was created"


@pytest.mark.slow
def test_mlflow_lost_mid_search_is_reported_and_the_search_completes(tmp_path, mlflow_server):
    uri, stop_server = mlflow_server
    preset = write_preset(tmp_path / "p.yaml", num_samples=3, epochs=3, concurrent=1,
                          grace_period=3, n_startup_trials=3)
    out = tmp_path / "runs"
    run_dir = out / "lost"
    proc = start_command(search_argv(preset, out, "lost", "--mlflow-uri", uri),
                         log=tmp_path / "search.log", BIOMETRY_FAULT="sleep_s=0.3")
    try:
        wait_for(lambda: any(result_rows(d) for d in trial_dirs(run_dir)), timeout=300,
                 what="the first trial to report", proc=proc)
        stop_server()
        proc.wait(timeout=SEARCH_TIMEOUT)
    finally:
        kill_group(proc)
    stderr = (tmp_path / "search.err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mlflow_gaps"], summary
    assert any(line.startswith("warning: MLflow missed") for line in stderr.splitlines()), stderr
    assert "Traceback" not in stderr
    # the run folder alone is complete
    assert summary["num_trials"] == 3 and summary["trial_states"] == {"TERMINATED": 3}
    for d in trial_dirs(run_dir):
        assert [r["epoch"] for r in result_rows(d)] == [1, 2, 3]
        assert list(d.glob("checkpoint_*/model.pt"))
    states = [t.state.name for t in load_study(run_dir, "lost").trials]
    assert states == ["COMPLETE"] * 3
    assert math.isfinite(summary["metrics"][OBJECTIVE])
    LandmarkPredictor.from_folder(run_dir / "best")


# -- an unwritable or full output folder ---------------------------------------------------------------
def train(config: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_command(["-m", "trainables.train", "--config", str(config), "--data", str(data),
                        "--out", str(out), *extra], timeout=300)


def trial_config(path: Path, epochs: int) -> Path:
    raw = yaml.safe_load((REPO / "configs/trial/smoke.yaml").read_text())
    raw["train"]["epochs"] = epochs
    raw["data"].pop("limit", None)
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_loadable(out: Path) -> None:
    """The standalone run's model folders and trainer state load."""
    load_model_folder(out / "best")
    load_model_folder(out / "checkpoint")
    state = torch.load(out / "checkpoint" / "trainer.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "schedule", "state"} <= set(state)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, synthetic_csv) -> Path:
    """``trainables.train`` for one epoch: out/checkpoint, out/best, out/metrics.json."""
    folder = tmp_path_factory.mktemp("one-epoch")
    proc = train(trial_config(folder / "e1.yaml", 1), synthetic_csv, folder / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_loadable(folder / "out")
    return folder / "out"


def first_run(one_epoch_run: Path, out: Path) -> dict:
    """A copy of the one-epoch run in ``out`` (which may exist, e.g. a mount point); returns
    the digests of its checkpoint/ and best/."""
    shutil.copytree(one_epoch_run, out, dirs_exist_ok=True)
    return {name: tree_digest(out / name) for name in ("checkpoint", "best")}


def mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, synthetic_csv, one_epoch_run):
    """trainables.train writes checkpoints through staging folders and renames: when the disk
    fills up mid-copy, the previous checkpoint/ and best/ stay complete and loadable, the error
    is one line, and a later --resume (with space again) goes on from that checkpoint."""
    out = tmp_path / "disk"
    mounted = mount_tmpfs(out, "4m")
    if not mounted:  # no CAP_SYS_ADMIN: fill a plain folder's file system is not possible
        pytest.fail("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the disk-full "
                    "test needs one")
    try:
        before = first_run(one_epoch_run, out)
        metrics = (out / "metrics.json").read_bytes()
        with open(out / "filler", "wb", buffering=0) as f:  # leave no room for a checkpoint
            try:
                while f.write(b"\0" * 16384):
                    pass
            except OSError:
                pass
        longer = trial_config(tmp_path / "e2.yaml", 2)
        proc = train(longer, synthetic_csv, out, "--resume")
        line = one_error_line(proc)
        assert "No space left on device" in line, line
        assert {name: tree_digest(out / name) for name in before} == before
        assert (out / "metrics.json").read_bytes() == metrics
        assert_loadable(out)

        (out / "filler").unlink()
        proc = train(longer, synthetic_csv, out, "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout and "after epoch 1" in proc.stdout
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
        assert_loadable(out)
        assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint", "metrics.json"]
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


@pytest.mark.slow
def test_an_unwritable_out_folder_fails_at_once_and_keeps_earlier_results(
        tmp_path, synthetic_csv, one_epoch_run):
    """As root, chmod does not stop writes: the folder is made immutable (chattr +i) instead.
    trainables.train --resume and a search into it both fail before any work, in one line."""
    out = tmp_path / "ro"
    before = first_run(one_epoch_run, out)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.fail("chattr +i failed: the file system or the user cannot make it immutable")
    try:
        proc = train(trial_config(tmp_path / "e2.yaml", 2), synthetic_csv, out, "--resume")
        line = one_error_line(proc)
        assert "Operation not permitted" in line and str(out) in line, line
        assert "epoch" not in proc.stdout, "it trained before failing"
        search = run_command(["search/run.py", "--preset", "smoke", "--out", str(out)])
        assert f"cannot write in {out}" in one_error_line(search)
        assert {name: tree_digest(out / name) for name in before} == before
        assert_loadable(out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


@pytest.mark.slow
def test_a_crash_between_the_two_renames_of_a_checkpoint_swap_is_resumable(
        tmp_path, synthetic_csv, one_epoch_run):
    """swap_dir renames checkpoint -> checkpoint.old, then the staging folder -> checkpoint. If
    the second rename fails (here: the staging folder is immutable, so it cannot be renamed), the
    complete previous checkpoint is checkpoint.old and --resume must find it."""
    from biometry.atomic import swap_dir

    out = tmp_path / "run"
    first_run(one_epoch_run, out)
    staging = out / "checkpoint.tmp"
    shutil.copytree(out / "checkpoint", staging)
    subprocess.run(["chattr", "+i", str(staging)], check=True)
    try:
        with pytest.raises(OSError):
            swap_dir(staging, out / "checkpoint")
    finally:
        subprocess.run(["chattr", "-i", str(staging)], capture_output=True)
    assert not (out / "checkpoint").exists() and (out / "checkpoint.old" / "trainer.pt").is_file()

    proc = train(trial_config(tmp_path / "e2.yaml", 2), synthetic_csv, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after epoch 1" in proc.stdout
    assert_loadable(out)
