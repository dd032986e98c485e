"""MLflow tracking for a search: one parent run per search, exactly one child run per trial.

Ray's ``MLflowLoggerCallback`` makes flat runs and, after ``Tuner.restore``, duplicates; this
callback looks each trial's run up by its ``ray_trial_id`` tag before creating one, so a resumed
search continues the same runs. MLflow failures never stop the search: they are counted and
reported at the end (the run folder on disk stays complete).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from biometry.errors import BiometryInputError
from search.results import apply_swept_postprocess, best_checkpoint_folder, checkpoint_value
from search.tune_api import Callback

logger = logging.getLogger(__name__)

MODEL_FILES = ("model.pt", "model.yaml")


def local_tracking_uri(run_dir: Path) -> str:
    """An absolute SQLite store in the run folder (Ray moves workers into trial folders, so a
    relative URI would scatter stores)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str) -> None:
    """Fail before any trial starts when the tracking server cannot be reached."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise BiometryInputError(f"--mlflow-uri {uri}: MLflow is unreachable ({reason})") from None


class MlflowSearchLogger(Callback):
    """Ray Tune callback: params, per-epoch metrics, final metrics and the model folder per trial."""

    def __init__(self, *, tracking_uri: str, experiment_name: str, search_name: str,
                 objective: str, search_params: dict[str, Any] | None = None,
                 artifact_location: str | None = None, trial_role: str = "trial"):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_name = search_name
        self.objective = objective
        self.search_params = search_params or {}
        self.artifact_location = artifact_location
        self.trial_role = trial_role  # "final": the retrain of the best config, kept apart
        self.parent_run_id: str | None = None
        self.run_ids: dict[str, str] = {}
        self.best: dict[str, float] = {}
        self.gaps: list[str] = []
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    # -- MLflow plumbing -----------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _safe(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # the search must outlive its tracking server
            self.gaps.append(f"{time.strftime('%H:%M:%S')} {what}: {type(err).__name__}")
            if len(self.gaps) == 1:
                logger.warning("MLflow unreachable (%s); the search goes on and results stay "
                               "on disk", err)
            return None

    def _ensure_experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            self._experiment_id = (found.experiment_id if found else self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location))
        return self._experiment_id

    def _find_run(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self._ensure_experiment()], filter_string=filter_string,
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def ensure_parent(self) -> str | None:
        def get_or_create():
            run_id = self._find_run(f"tags.search_name = '{self.search_name}' and "
                                    f"tags.role = 'search'")
            if run_id is None:
                run = self.client.create_run(self._ensure_experiment(), run_name=self.search_name,
                                             tags={"search_name": self.search_name,
                                                   "role": "search"})
                run_id = run.info.run_id
                self._log_params(run_id, self.search_params)
            else:
                self.client.update_run(run_id, status="RUNNING")
            return run_id

        if self.parent_run_id is None:
            self.parent_run_id = self._safe("parent run", get_or_create)
        return self.parent_run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _trial_run(self, trial) -> str | None:
        trial_id = trial.trial_id
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        parent = self.ensure_parent()

        def get_or_create():
            run_id = self._find_run(f"tags.ray_trial_id = '{trial_id}' and "
                                    f"tags.search_name = '{self.search_name}'")
            if run_id is None:
                tags = {"ray_trial_id": trial_id, "search_name": self.search_name,
                        "role": self.trial_role}
                if parent:
                    tags["mlflow.parentRunId"] = parent
                run_id = self.client.create_run(self._ensure_experiment(),
                                                run_name=str(trial), tags=tags).info.run_id
                self._log_params(run_id, {k: v for k, v in trial.config.items() if "@" not in k})
            else:
                self.client.update_run(run_id, status="RUNNING")
            return run_id

        run_id = self._safe(f"run of {trial_id}", get_or_create)
        if run_id:
            self.run_ids[trial_id] = run_id
        return run_id

    # -- Ray Tune hooks --------------------------------------------------------------------
    def setup(self, **info):
        self.ensure_parent()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._trial_run(trial)
        step = int(result.get("training_iteration", 0))
        value = float(result.get(self.objective, math.nan))
        if math.isfinite(value) and value < self.best.get(trial.trial_id, math.inf):
            self.best[trial.trial_id] = value
        if run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if _is_metric(k, v)]
        self._safe(f"metrics of {trial.trial_id}", self.client.log_batch, run_id, metrics=metrics)
        swept = {k: v for k, v in result.items() if k.startswith("postprocess.")}
        if swept:  # the post-training sweep's choice, beside the trial's params
            self._safe("swept params", self._log_params, run_id, swept)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "FAILED")

    def _finish(self, trial, status: str) -> None:
        run_id = self._trial_run(trial)
        if run_id is None:
            return
        best = self.best.get(trial.trial_id)
        if best is not None:
            self._safe("final metric", self.client.log_metric, run_id,
                       f"best_{self.objective}", best)
        with tempfile.TemporaryDirectory(prefix="biometry-model-") as staging:
            folder = self._safe(f"checkpoint of {trial.trial_id}", best_model_folder, trial,
                                self.objective, Path(staging))
            if folder is not None:
                self._safe("swept post-processing", apply_swept_postprocess,
                           trial.last_result or {}, folder)
                for name in MODEL_FILES:
                    if (folder / name).is_file():
                        self._safe("model artifact", self.client.log_artifact, run_id,
                                   str(folder / name), "model")
        self._safe(f"status of {trial.trial_id}", self.client.set_terminated, run_id, status)

    def on_experiment_end(self, trials, **info):
        self.finish_search(trials)

    def log_extra_run(self, *, role: str, run_name: str, params: dict[str, Any],
                      metrics: dict[str, float], model_folder: Path,
                      tags: dict[str, str] | None = None) -> str | None:
        """A child run of the search that no Ray trial made (the final retrain's ensemble):
        its params, metrics and model folder; found again by ``role`` and ``tags`` on a resume
        (another tag value, another run)."""
        parent = self.ensure_parent()
        extra = dict(tags or {})

        def log():
            run_id = self._find_run(f"tags.search_name = '{self.search_name}' and "
                                    f"tags.role = '{role}'"
                                    + "".join(f" and tags.{k} = '{v}'" for k, v in extra.items()))
            if run_id is None:
                tags = {"search_name": self.search_name, "role": role, **extra}
                if parent:
                    tags["mlflow.parentRunId"] = parent
                run_id = self.client.create_run(self._ensure_experiment(), run_name=run_name,
                                                tags=tags).info.run_id
                self._log_params(run_id, params)
            for key, value in metrics.items():
                if _is_metric(key, value):
                    self.client.log_metric(run_id, key, float(value))
            for name in MODEL_FILES:
                if (Path(model_folder) / name).is_file():
                    self.client.log_artifact(run_id, str(Path(model_folder) / name), "model")
            self.client.set_terminated(run_id, "FINISHED")
            return run_id

        return self._safe(f"{role} run", log)

    def finish_search(self, trials, *, summary: dict[str, Any] | None = None) -> None:
        parent = self.ensure_parent()
        if parent is None:
            return
        if summary:
            metrics = {f"best_{k}": float(v) for k, v in summary.get("metrics", {}).items()
                       if _is_metric(k, v)}
            self._safe("search metrics", lambda: [self.client.log_metric(parent, k, v)
                                                  for k, v in metrics.items()])
        self._safe("search status", self.client.set_terminated, parent, "FINISHED")


def best_model_folder(trial, objective: str, staging: Path) -> Path | None:
    """A folder on this machine with the model files of the trial's best kept checkpoint.

    On a local (or mounted) storage path that is the checkpoint itself. On s3:// or gs:// storage
    Ray gives ``trial.path`` inside that filesystem, without its scheme, so the checkpoints are
    listed and the best one's model files copied into ``staging`` through the same filesystem.
    """
    if not trial.path:
        return None
    from pyarrow.fs import LocalFileSystem

    storage = getattr(trial, "storage", None)
    filesystem = getattr(storage, "storage_filesystem", None)
    if filesystem is None or isinstance(filesystem, LocalFileSystem):
        return best_checkpoint_folder(trial.path, objective)
    return _copy_best_remote_checkpoint(filesystem, trial.path, objective, staging)


def _copy_best_remote_checkpoint(filesystem, trial_path: str, objective: str,
                                 staging: Path) -> Path | None:
    from pyarrow.fs import FileSelector, FileType

    entries = filesystem.get_file_info(FileSelector(trial_path, allow_not_found=True))
    checkpoints = [e.path for e in entries
                   if e.type == FileType.Directory and e.base_name.startswith("checkpoint_")]
    best, best_value = None, math.inf
    for checkpoint in checkpoints:
        folder = staging / Path(checkpoint).name
        folder.mkdir()
        if not _copy_remote_file(filesystem, f"{checkpoint}/model.yaml", folder / "model.yaml"):
            continue
        value = checkpoint_value(folder, objective)
        if value < best_value:
            best, best_value = checkpoint, value
    if best is None or not _copy_remote_file(filesystem, f"{best}/model.pt",
                                             staging / Path(best).name / "model.pt"):
        return None
    return staging / Path(best).name


def _copy_remote_file(filesystem, source: str, destination: Path) -> bool:
    from pyarrow.fs import FileType

    if filesystem.get_file_info(source).type != FileType.File:
        return False
    with filesystem.open_input_stream(source) as stream, open(destination, "wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    return True


def _is_metric(key: str, value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)) and key not in ("trial_id", "pid", "timestamp"))
