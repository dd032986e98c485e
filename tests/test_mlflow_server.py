"""A real MLflow tracking server on PostgreSQL (cluster/mlflow/local_server.sh), used end to end.

Starts PostgreSQL and `mlflow server` on free loopback ports in a temp dir (installing Debian's
postgresql first where it is missing and we are root), logs a run with MlflowClient, reads it
back through the server and straight from PostgreSQL, then stops both servers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "cluster" / "mlflow" / "local_server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_PYTHON=sys.executable)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read_env(state: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (state / "server.env").read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


@pytest.mark.slow
def test_local_mlflow_server_on_postgres_round_trip(tmp_path):
    from mlflow.tracking import MlflowClient

    state = tmp_path / "mlflow-server"
    pg_port, ml_port = _free_port(), _free_port()
    while ml_port == pg_port:
        ml_port = _free_port()

    t0 = time.monotonic()
    started = _script("start", str(state), "--pg-port", str(pg_port), "--port", str(ml_port))
    start_s = time.monotonic() - t0
    try:
        assert started.returncode == 0, started.stderr[-4000:]
        uri = started.stdout.strip().splitlines()[-1]
        assert uri == f"http://127.0.0.1:{ml_port}"
        env = _read_env(state)
        assert env["MLFLOW_TRACKING_URI"] == uri
        assert env["BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
        assert _listening(pg_port) and _listening(ml_port)

        # A second start is a no-op that finds the running servers.
        again = _script("start", str(state), timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.strip().splitlines()[-1] == uri
        assert _script("status", str(state), timeout=60).returncode == 0

        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("biometry-cluster-smoke")
        run = client.create_run(exp_id, tags={"trial_id": "t0001"}, run_name="trial-0001")
        run_id = run.info.run_id
        client.log_param(run_id, "lr", "0.001")
        for step, value in enumerate([3.0, 2.5, 2.25]):
            client.log_metric(run_id, "val_measure_l1_mm", value, step=step)
        artifact = tmp_path / "summary.json"
        artifact.write_text('{"best": "t0001"}')
        client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id)

        got = client.get_run(run_id)
        assert got.info.status == "FINISHED"
        assert got.data.params == {"lr": "0.001"}
        assert got.data.metrics["val_measure_l1_mm"] == 2.25
        assert got.data.tags["trial_id"] == "t0001"
        history = client.get_metric_history(run_id, "val_measure_l1_mm")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [3.0, 2.5, 2.25]
        found = client.search_runs(
            [exp_id], filter_string="metrics.val_measure_l1_mm < 2.5", order_by=["metrics.val_measure_l1_mm ASC"]
        )
        assert [r.info.run_id for r in found] == [run_id]

        # Artifacts travel through the server's proxy into STATE/artifacts.
        assert got.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [f.path for f in client.list_artifacts(run_id)] == ["summary.json"]
        local = client.download_artifacts(run_id, "summary.json", str(tmp_path / "dl"))
        assert Path(local).read_text() == '{"best": "t0001"}'
        assert list((state / "artifacts").rglob("summary.json"))

        # The run really lives in PostgreSQL (password auth over loopback TCP).
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1",
            port=pg_port,
            user="mlflow",
            dbname="mlflow",
            password=(state / "db_password").read_text().strip(),
        )
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run_id,))
                assert cur.fetchone() == ("trial-0001", "FINISHED")
        finally:
            conn.close()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(host="127.0.0.1", port=pg_port, user="mlflow", dbname="mlflow", password="wrong")
    finally:
        stopped = _script("stop", str(state), timeout=180)
    try:
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        assert not _listening(ml_port) and not _listening(pg_port)
        assert _script("status", str(state), timeout=60).returncode != 0
    finally:
        # purge also removes the PostgreSQL data dir kept outside tmp_path when running as root
        purged = _script("purge", str(state), timeout=120)
    assert purged.returncode == 0, purged.stderr[-2000:]
    assert not state.exists()
    print(f"local MLflow+PostgreSQL server up in {start_s:.1f}s")
