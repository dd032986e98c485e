"""Every Ray call the search driver makes, in one place (Ray's API moves; this file moves with it)."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune import (
    Callback, CheckpointConfig, FailureConfig, ProgressReporter, RunConfig, TuneConfig, Tuner,
)
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from biometry.errors import BiometryInputError
from search.trial_table import TrialRow, table_lines

logger = logging.getLogger(__name__)

__all__ = ["Callback", "connect", "cluster_resources", "check_resources", "PruneAwareOptunaSearch",
           "make_scheduler", "make_tuner", "restore_tuner", "can_restore", "dashboard_url"]


def connect(*, dashboard_port: int | None = None, num_cpus: int | None = None,
            include_dashboard: bool = True) -> dict[str, Any]:
    """Join ``RAY_ADDRESS`` or a running cluster, else start a local one (with the dashboard)."""
    if ray.is_initialized():
        return {}
    # Ray's INFO lines and its token-auth notice would go to stderr, where a bad input must be
    # one line; the dashboard URL and how to get the token are printed by run.py instead.
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                              "logging_level": logging.ERROR}
    if os.environ.get("RAY_ADDRESS", "") in ("", "local"):  # we start the cluster
        kwargs.update(include_dashboard=include_dashboard, dashboard_host="127.0.0.1")
        if dashboard_port is not None:  # None: 8265, or the next free one (Ray retries 50)
            kwargs["dashboard_port"] = dashboard_port
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    context = ray.init(**kwargs)
    logging.getLogger("ray").setLevel(logging.WARNING)  # Tune's warnings during the search
    quiet_snapshot_races()
    return {"dashboard_url": getattr(context, "dashboard_url", None) or ""}


# Ray writes the searcher's state to a temporary file and renames it while a background copy of
# the same folder to storage_path may still be listing it; that copy then fails on the vanished
# file and Ray logs a traceback. Nothing is lost: the next snapshot copies the renamed file, and
# Tune's last snapshot is forced and waited for. These loggers report such a failure.
SNAPSHOT_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer")


class SnapshotRaceFilter(logging.Filter):
    """Turns Ray's traceback for a snapshot copy that lost one of Ray's own temporary files into
    one line; every other record passes untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if self.is_temp_file_race(record):
            record.msg = ("Ray's experiment-state snapshot missed a temporary file Ray renamed "
                          "mid-copy; the next snapshot copies it (nothing lost)")
            record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True

    @staticmethod
    def is_temp_file_race(record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            return isinstance(error, FileNotFoundError) and "-tmp-" in str(error)
        # the syncer puts the traceback in the message: its last line names the exception
        lines = record.getMessage().strip().splitlines()
        return bool(lines) and lines[-1].startswith("FileNotFoundError") and "-tmp-" in lines[-1]


def quiet_snapshot_races() -> None:
    for name in SNAPSHOT_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, SnapshotRaceFilter) for f in target.filters):
            target.addFilter(SnapshotRaceFilter())


def dashboard_url(info: dict[str, Any]) -> str:
    url = info.get("dashboard_url") or ""
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return url


def cluster_resources() -> dict[str, float]:
    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0)),
            "nodes": float(len([n for n in ray.nodes() if n.get("Alive")]))}


def check_resources(*, cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Refuse, in one line, a per-trial request the cluster can never give (Ray would leave such
    trials PENDING forever)."""
    have = cluster_resources()
    if cpus_per_trial <= 0:
        raise BiometryInputError(f"--cpus-per-trial must be positive but got {cpus_per_trial}")
    if gpus_per_trial < 0:
        raise BiometryInputError(f"--gpus-per-trial cannot be negative but got {gpus_per_trial}")
    if gpus_per_trial > 0 and have["GPU"] == 0 and autoscaler_running():
        have = wait_for_a_gpu_node(cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    if gpus_per_trial > 0 and have["GPU"] == 0:
        raise BiometryInputError(f"--gpus-per-trial {gpus_per_trial} asks for a GPU but the Ray "
                                 f"cluster has none (CPU {have['CPU']:g}); use --preset cpu or "
                                 f"--gpus-per-trial 0")
    largest_gpu_node, largest_cpu_node = _largest_node()
    if gpus_per_trial > largest_gpu_node:
        raise BiometryInputError(f"--gpus-per-trial {gpus_per_trial} is more than any node has "
                                 f"({largest_gpu_node:g} GPU)")
    if cpus_per_trial > largest_cpu_node:
        raise BiometryInputError(f"--cpus-per-trial {cpus_per_trial} is more than any node has "
                                 f"({largest_cpu_node:g} CPU)")
    return have


# how long a search waits for an autoscaler to add a GPU node before it refuses (a GPU instance
# or pod takes minutes to start: a spot launch, an image pull)
GPU_WAIT_MIN_ENV = "BIOMETRY_GPU_WAIT_MIN"
GPU_WAIT_MIN_DEFAULT = 20.0


def autoscaler_running() -> bool:
    """Whether a Ray autoscaler watches this cluster (the launcher's or KubeRay's, v1 or v2),
    so that a request for a GPU it does not have yet can make it add a node."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    # Every head's monitor writes its status there. A cluster of `ray start` nodes gets a
    # read-only one, whose node types are the nodes themselves ("node_<node id>"); a launcher
    # or KubeRay cluster reports the types it can launch (head_cpu, gpu_worker, gpu-workers).
    status = _internal_kv_get("__autoscaling_status")
    try:
        report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
    except ValueError:
        report = {}
    types = {*report.get("active_nodes", {}), *(report.get("idle_nodes") or {}),
             *(report.get("node_type_mapping") or {}).values()}
    if any(not re.fullmatch(r"node_[0-9a-f]{56}", node_type) for node_type in types):
        return True
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # an older or unreachable GCS: no autoscaler we can talk to
        return False


def wait_for_a_gpu_node(*, cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Ask the autoscaler for one trial's bundle and wait until a GPU node has joined (at most
    ``BIOMETRY_GPU_WAIT_MIN`` minutes); then withdraw the request, so the trials keep the node
    busy and an idle one can go again. Returns the cluster's resources at the end."""
    from ray.autoscaler.sdk import request_resources

    value = os.environ.get(GPU_WAIT_MIN_ENV, str(GPU_WAIT_MIN_DEFAULT))
    try:
        wait_s = float(value) * 60
    except ValueError:
        raise BiometryInputError(f"{GPU_WAIT_MIN_ENV}={value!r}: a number of minutes is "
                                 f"required") from None
    print(f"the Ray cluster has no GPU yet: asking its autoscaler for a GPU node (waiting up to "
          f"{wait_s / 60:g} min, {GPU_WAIT_MIN_ENV})", flush=True)
    request_resources(bundles=[{"CPU": cpus_per_trial, "GPU": gpus_per_trial}])
    deadline = time.monotonic() + wait_s
    try:
        while (have := cluster_resources())["GPU"] == 0 and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        request_resources(bundles=[])
    return have


def final_trial_resources(*, cpus_per_trial: float, gpus_per_trial: float,
                          slots: int) -> tuple[float, float]:
    """(CPUs, GPUs) for the final retrain: the ``slots`` the search ran trials on, as far as one
    node holds them, and at most one GPU (a trial trains on one device)."""
    largest_gpu_node, largest_cpu_node = _largest_node()
    cpus = max(cpus_per_trial, min(cpus_per_trial * slots, largest_cpu_node))
    if gpus_per_trial <= 0:
        return cpus, 0.0
    return cpus, max(gpus_per_trial, min(gpus_per_trial * slots, 1.0, largest_gpu_node))


def share_resources(cpus: float, gpus: float, *, parts: int) -> tuple[float, float]:
    """(CPUs, GPUs) of one of ``parts`` trials sharing ``cpus`` and ``gpus``, all at once.

    Ray counts resources in units of 1e-4 and rounds a request to the nearest unit, so 2/3 CPU
    would round up and the third of three trials on 2 CPUs would wait; the share is rounded down.
    """
    return tuple(math.floor(total / parts * 1e4) / 1e4 for total in (cpus, gpus))


def _largest_node() -> tuple[float, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    return gpus, cpus


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about each trial.

    Ray's OptunaSearch reports a trial stopped early by ASHA as COMPLETE with its last
    (early-epoch) value, which misleads TPE: early epochs here are far from final values. This
    subclass tells Optuna PRUNED for any trial that did not reach ``max_epochs``, FAIL for errors
    and non-finite values, and COMPLETE with the trial's best validation value otherwise.
    """

    def __init__(self, *, max_epochs: int, best_metric: str, **kwargs):
        super().__init__(**kwargs)
        self._max_epochs = max_epochs
        self._best_metric = best_metric

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials and math.isfinite(float(result.get(self.metric, math.nan))):
            try:
                super().on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                # a driver killed after the study file recorded this trial's end but before Ray
                # saved the searcher resumes the trial: the study keeps the end it holds
                self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        finished = bool(result) and result.get("training_iteration", 0) >= self._max_epochs
        value = float((result or {}).get(self._best_metric, math.nan))
        # skip_if_finished: see on_trial_result (a trial the study file already ended)
        if error or (finished and not math.isfinite(value)):
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL,
                                skip_if_finished=True)
        elif finished:
            self._ot_study.tell(ot_trial, value, state=optuna.trial.TrialState.COMPLETE,
                                skip_if_finished=True)
        else:
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED,
                                skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """After a driver crash, trials the study still holds as RUNNING but no Ray trial will
        resume (asked after the last searcher save) are closed as FAIL, so none stays open."""
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False,
                                                states=(optuna.trial.TrialState.RUNNING,)):
            if frozen.number not in known:
                self._ot_study.tell(frozen.number, None, state=optuna.trial.TrialState.FAIL)


def make_searcher(*, space: Callable, metric: str, best_metric: str, max_epochs: int,
                  storage_path: Path, study_name: str, seed: int,
                  n_startup_trials: int,
                  points_to_evaluate: list[dict] | None = None) -> PruneAwareOptunaSearch:
    """Seeded TPE on a journal-file study in the run folder (``optuna-dashboard`` can open it);
    ``points_to_evaluate`` (sampler names -> values) are enqueued as the first trials."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(storage_path)))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials,
                                         multivariate=True, constant_liar=True)
    return PruneAwareOptunaSearch(space=space, metric=metric, mode="min", sampler=sampler,
                                  storage=storage, study_name=study_name, max_epochs=max_epochs,
                                  best_metric=best_metric,
                                  points_to_evaluate=[p for p in points_to_evaluate or [] if p])


def make_scheduler(*, metric: str, max_t: int, grace_period: int,
                   reduction_factor: float) -> ASHAScheduler:
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode="min", max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)


def make_tuner(trainable: Callable, *, data: Any, base_config: dict, searcher, scheduler,
               num_samples: int, max_concurrent: int, cpus_per_trial: float,
               gpus_per_trial: float, time_budget_s: float | None, storage_path: str, name: str,
               callbacks: list, metric: str, max_failures: int, verbose: int = 1,
               param_space: dict | None = None) -> Tuner:
    """``param_space``: fixed dotted keys for a searcher-less run (the final retrain)."""
    _use_output_engine_with_reporters()
    return Tuner(
        _with_resources(trainable, data=data, base_config=base_config, cpus=cpus_per_trial,
                        gpus=gpus_per_trial),
        param_space=param_space,
        tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                               max_concurrent_trials=max_concurrent, time_budget_s=time_budget_s,
                               reuse_actors=False, trial_name_creator=_trial_name,
                               trial_dirname_creator=_trial_name),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks, verbose=verbose,
            progress_reporter=TrialTableReporter(),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=max_failures)),
    )


def grid(values: list) -> dict:
    """A param_space value that runs one trial per value (the final retrain's seeds)."""
    return tune.grid_search(values)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def can_restore(path: str | Path) -> bool:
    return Tuner.can_restore(str(path))


def restore_tuner(path: str | Path, trainable: Callable, *, data: Any, base_config: dict,
                  cpus_per_trial: float, gpus_per_trial: float) -> Tuner:
    """The tuner saved at ``path`` (its run config, trial table included, comes with it)."""
    _use_output_engine_with_reporters()
    return Tuner.restore(str(path), _with_resources(trainable, data=data, base_config=base_config,
                                                     cpus=cpus_per_trial, gpus=gpus_per_trial),
                         resume_unfinished=True, resume_errored=True)


def _with_resources(trainable: Callable, *, data: Any, base_config: dict, cpus: float,
                    gpus: float):
    wrapped = tune.with_parameters(trainable, data=data, base_config=base_config)
    return tune.with_resources(wrapped, {"cpu": cpus, "gpu": gpus})


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


class TrialTableReporter(ProgressReporter):
    """Tune's terminal table as :mod:`search.trial_table` draws it: the best trials first, 120
    columns; every ``every_s`` seconds while trials run, and once at the end."""

    def __init__(self, *, every_s: float = 30.0):
        self.every_s = every_s
        self.start_time = time.time()
        self.total_samples: int | None = None
        self.last_report = -math.inf

    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              **kwargs) -> None:
        self.start_time = start_time or time.time()
        self.total_samples = total_samples
        self.last_report = -math.inf

    def should_report(self, trials: list, done: bool = False) -> bool:
        if done or time.monotonic() - self.last_report >= self.every_s:
            self.last_report = time.monotonic()
            return True
        return False

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        rows = [TrialRow(trial_id=str(t.trial_id), status=str(t.status), config=dict(t.config),
                         result=dict(t.last_result or {})) for t in trials]
        notes = [line for info in sys_info for line in str(info).splitlines() if line.strip()]
        lines = table_lines(rows, total=self.total_samples, notes=notes,
                            elapsed_s=time.time() - self.start_time)
        if done:  # where each failed trial's traceback is (a path: not clipped)
            lines += [f"trial {t.trial_id} failed: {t.error_file}" for t in trials
                      if getattr(t, "error_file", None)]
        print("\n".join(lines) + "\n", flush=True)


def _use_output_engine_with_reporters() -> None:
    """Ray 2.60's default output engine ignores ``RunConfig(progress_reporter=...)``;
    ``RAY_AIR_NEW_OUTPUT=0`` selects the engine that calls it (unless the user chose one)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
