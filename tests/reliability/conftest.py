"""Fixtures of the reliability tests: a small data set, an untrained model folder, a real local
MLflow server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import PYTHON, free_port  # noqa: E402


@pytest.fixture(scope="session")
def dataset_csv(tmp_path_factory) -> Path:
    """An 8-image synthetic landmark data set (CSV + PNGs in one folder); copy it before editing."""
    from biometry.io import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("dataset"), n=8, seed=0)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """An untrained but complete model folder (no training needed to test the model loaders)."""
    from biometry.inference import ModelSpec, save_model_folder
    from biometry.models import create_model
    from biometry.transforms import Orientation

    kwargs = {"width": 8, "depth": 3, "output_stride": 2}
    spec = ModelSpec(architecture="unet", model_kwargs=kwargs, input_hw=(64, 96), stride=2,
                     sigma=2.0, softargmax_beta=20.0,
                     orientation=Orientation(bpd_direction=(0.0, 1.0),
                                             ofd_direction=(1.0, 0.0)).to_dict(),
                     uncertainty_threshold=1.0)
    return save_model_folder(tmp_path_factory.mktemp("model") / "best", create_model("unet", **kwargs),
                             spec)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` (SQLite store) on a free loopback port; yields
    ``(uri, stop)`` where ``stop()`` kills it (the test may do so mid-search)."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow-server.db'}", "--artifacts-destination",
         str(tmp_path / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri, stop
    finally:
        stop()
        log.close()
