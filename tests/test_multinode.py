"""A real two-node Ray cluster on this machine, a real MLflow server on PostgreSQL, and a search
submitted to the cluster with `ray job submit`, the way cluster/README.md runs it.

The two Ray nodes are two `ray start` processes (head: 1 CPU and the job server; node2: 1 CPU and a
`node2` resource), each with its own --temp-dir (two nodes sharing one would delete each other's
files) and its own ports, with token auth on (a token made for this test, passed in the
environment: ~/.ray/auth_token is neither read nor written). Teardown ends only the processes this
module started (found by a marker in their environment, and their descendants), never `ray stop`,
which would stop every Ray process on the machine, other people's searches included.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
MLFLOW_SCRIPT = REPO / "cluster" / "mlflow" / "local_server.sh"
MARKER = "BIOMETRY_MULTINODE_TEST"

NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 60
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= 2 or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"node2" if "node2" in n["Resources"] else "head": n["NodeID"] for n in nodes}))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _live_processes() -> dict[int, tuple[int, int, list[bytes]]]:
    """pid -> (parent pid, process group, environment) of every live process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
            if state in ("Z", "X"):  # exited; waits for a parent that may never reap it
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        table[int(entry)] = (int(ppid), int(pgid), environ)
    return table


def _own_processes(marker: str, pgids: set[int]) -> set[int]:
    """What this module started: processes in the process group of a `ray start` we ran or
    with our marker in their environment, and all their descendants (Ray workers and the job's
    driver get process groups of their own)."""
    table = _live_processes()
    tag = f"{MARKER}={marker}".encode()
    own = {pid for pid, (_, pgid, environ) in table.items()
           if pid != os.getpid() and (pgid in pgids or tag in environ)}
    while True:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in own} - own
        if not more:
            return own
        own |= more


def _end_processes(marker: str, pgids: set[int]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        pids = _own_processes(marker, pgids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _own_processes(marker, pgids)
        if not pids:
            return


@pytest.fixture(scope="module")
def root():
    # Short: Ray's Unix sockets live under the temp dirs (108-byte path limit).
    path = Path(tempfile.mkdtemp(prefix="bmn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(root):
    """Head (job server on the dashboard port) + node2 on this machine, 1 CPU each; yields their
    addresses, the environment that holds the token, and the node ids by role."""
    marker = secrets.token_hex(8)
    gcs, dash, client, agent1, agent2 = _free_ports(5)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job: this venv's
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0", MARKER: marker,
    })
    # worker ports 0 (any free one): the default range 10002-19999 is shared with other clusters
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 1024 * 1024),
              "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
    nodes = {
        "head": ["--head", "--port", str(gcs), "--temp-dir", str(root / "head"),
                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
                 "--dashboard-agent-listen-port", str(agent1)],
        "node2": ["--address", f"127.0.0.1:{gcs}", "--temp-dir", str(root / "node2"),
                  "--resources", json.dumps({"node2": 1}),
                  "--dashboard-agent-listen-port", str(agent2)],
    }
    pgids: set[int] = set()
    try:
        for name, args in nodes.items():
            with open(root / f"{name}.log", "w") as log:
                # its own session: every daemon it leaves behind is in this process group
                proc = subprocess.Popen([str(RAY), "start", *args, *common], env=env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            pgids.add(proc.pid)
            assert proc.wait(timeout=120) == 0, _tail((root / f"{name}.log").read_text())
        listed = subprocess.run([sys.executable, "-c", NODES_SCRIPT, f"127.0.0.1:{gcs}"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, _tail(listed.stderr)
        node_ids = json.loads(listed.stdout.strip().splitlines()[-1])
        assert set(node_ids) == {"head", "node2"}, node_ids
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "node_ids": node_ids, "root": root}
    finally:
        _end_processes(marker, pgids)


@pytest.fixture(scope="module")
def mlflow_launch(root):
    """Starts cluster/mlflow/local_server.sh (MLflow on PostgreSQL, free loopback ports) in the
    background, so it comes up while the Ray nodes start; `mlflow_server` waits for it."""
    state = root / "mlflow-server"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_PYTHON"] = sys.executable
    script = ["bash", str(MLFLOW_SCRIPT)]
    logs = (root / "mlflow-start.out", root / "mlflow-start.err")
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:  # apt-get may talk a lot
        proc = subprocess.Popen([*script, "start", str(state)], env=env, stdout=stdout,
                                stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        yield proc, state, logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # stops both servers and deletes the data (PostgreSQL's is outside root when root)
        subprocess.run([*script, "purge", str(state)], env=env, capture_output=True,
                       timeout=180, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_launch) -> str:
    proc, state, logs = mlflow_launch
    proc.wait(timeout=600)  # installs postgresql with apt-get first where it is missing
    assert proc.returncode == 0, _tail(logs[1].read_text())
    server_env = dict(line.split("=", 1) for line in
                      (state / "server.env").read_text().splitlines() if "=" in line)
    assert server_env["BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    return logs[0].read_text().strip().splitlines()[-1]


def _results(trial_dir: Path) -> list[dict]:
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_search_job_on_two_nodes_with_shared_storage_and_postgres_mlflow(mlflow_launch, cluster,
                                                                        mlflow_server):
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    root, env = cluster["root"], cluster["env"]
    preset = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    preset["trial"]["train"]["epochs"] = 2
    preset["search"].update(num_samples=4, max_concurrent_trials=2, cpus_per_trial=1,
                            grace_period=1, reduction_factor=2)
    (root / "mn.yaml").write_text(yaml.safe_dump(preset))
    shared, out = root / "shared", root / "out"

    # Token auth is really on: the job API refuses a client without the token.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    no_token["HOME"] = str(root)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run([str(RAY), "job", "list", "--address", cluster["dashboard"]],
                             env=no_token, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Authentication required" in refused.stderr, \
        _tail(refused.stdout + refused.stderr)

    submission_id = f"mn-{secrets.token_hex(4)}"
    cmd = [str(RAY), "job", "submit", "--address", cluster["dashboard"], "--submission-id",
           submission_id, "--working-dir", str(REPO), "--",
           "python", "search/run.py", "--preset", str(root / "mn.yaml"), "--num-samples", "4",
           "--storage", str(shared), "--mlflow-uri", mlflow_server, "--out", str(out),
           "--name", "mn"]
    try:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    except subprocess.TimeoutExpired:
        subprocess.run([str(RAY), "job", "stop", "--address", cluster["dashboard"],
                        submission_id], env=env, capture_output=True, timeout=60)
        raise
    job_s = time.monotonic() - started
    assert job.returncode == 0, _tail(job.stdout) + _tail(job.stderr)
    assert "succeeded" in job.stdout + job.stderr

    # Ray Tune's experiment is on the shared storage, one folder per trial.
    trial_dirs = sorted((shared / "mn").glob("trial_*"))
    assert len(trial_dirs) == 4, list((shared / "mn").iterdir())
    node_of_trial = {}
    for trial_dir in trial_dirs:
        results = _results(trial_dir)
        assert results, f"{trial_dir} reported nothing"
        assert len({r["node_id"] for r in results}) == 1
        node_of_trial[trial_dir.name] = results[0]["node_id"]
        assert list(trial_dir.glob("checkpoint_*")), f"{trial_dir}: no checkpoint on storage"
    # 1 CPU per node, 1 CPU per trial, 2 at once: the trials ran on both nodes
    assert set(node_of_trial.values()) == set(cluster["node_ids"].values()), node_of_trial

    # The driver (on the head) wrote the run folder under --out.
    run_dir = out / "mn"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["tracking_uri"] == mlflow_server
    assert (run_dir / "best" / "model.pt").is_file()
    assert json.loads((run_dir / "search.json").read_text())["storage"] == str(shared)

    # MLflow on PostgreSQL: one parent run, one child per trial.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("mn")
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], "tags.role = 'search'")
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'",
                                  max_results=100)
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {f"trial_{r.data.tags['ray_trial_id']}" for r in children} == set(node_of_trial)
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:  # the driver read every trial's checkpoint from the shared storage
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
        assert "model/model.pt" in {f.path for f in client.list_artifacts(run.info.run_id,
                                                                          "model")}
    print(f"\nmulti-node search job: {job_s:.1f}s; trials per node: "
          f"{ {n: list(node_of_trial.values()).count(i) for n, i in cluster['node_ids'].items()} }")


@pytest.mark.slow
def test_multinode_search_without_storage_is_refused_in_one_line(cluster):
    out = cluster["root"] / "refused"
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    proc = subprocess.run([sys.executable, "search/run.py", "--preset", "smoke", "--out",
                           str(out), "--name", "nostorage"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, _tail(proc.stdout) + _tail(proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: the Ray cluster has 2 nodes: pass a shared --storage")
    assert not out.exists() or not any(out.iterdir())  # before any trial, or a run folder
