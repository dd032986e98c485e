"""Ray Tune storage on an S3 API: a real smoke search with `--storage s3://...` against moto's S3
server on this machine, the way a cluster runs with `--storage s3://YOUR-BUCKET/biometry-runs`.

Checks what only S3 storage exercises: the trial checkpoints land in the bucket (not on the
driver's disk), `best/` is exported from them, and every MLflow trial run gets its model files
(Ray gives S3 trial paths without their scheme; the tracking callback used to skip them).
The search runs in its own process with its own local Ray (RAY_ADDRESS=local), so the S3
endpoint in its environment reaches every Ray worker.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOTO = Path(sys.executable).parent / "moto_server"
BUCKET = "biometry-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_environment(endpoint: str) -> dict[str, str]:
    """What boto3, pyarrow and MLflow need to talk to the local S3 API (fake credentials)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto(log_path: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port; returns the process and its endpoint URL."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(MOTO), "-H", host, "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return proc, f"http://{host}:{port}"
        except OSError:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"moto did not answer on {host}:{port}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3

    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    env = s3_environment(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint": endpoint, "env": env, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bucket_keys(client, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@pytest.mark.slow
def test_search_on_s3_storage_keeps_checkpoints_in_the_bucket_and_logs_models(tmp_path, s3):
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(s3["env"], RAY_ADDRESS="local", RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "runs"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "search/run.py", "--preset", "smoke", "--out", str(out),
                           "--name", "s3run", "--storage", f"s3://{BUCKET}/biometry-runs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    keys = bucket_keys(s3["client"], "biometry-runs/s3run/")
    trials = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("trial_")}
    assert len(trials) == 2, sorted(keys)[:20]
    for trial in trials:
        assert any(k.startswith(f"biometry-runs/s3run/{trial}/checkpoint_") and k.endswith("/model.pt")
                   for k in keys), f"{trial}: no checkpoint in the bucket"
    assert not list(out.rglob("checkpoint_*")), "checkpoints were written on the driver's disk"

    run_dir = out / "s3run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "best" / "model.pt").is_file() and summary["num_trials"] == 2
    assert summary["mlflow_gaps"] == []

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiment = client.get_experiment_by_name("s3run")
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    assert len(children) == 2
    for run in children:
        logged = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
        assert logged == {"model/model.pt", "model/model.yaml"}, (run.data.tags["ray_trial_id"], logged)
    print(f"\nsmoke search on S3 storage: {elapsed:.1f}s, {len(keys)} objects in the bucket")
