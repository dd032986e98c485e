"""Separate hosts, emulated: each Ray node in its own network namespace, with its own IP on a
bridge and its own /tmp, Ray Tune storage on an S3 API (moto's server), MLflow on PostgreSQL
with proxied artifacts (cluster/mlflow/local_server.sh), and fake GPUs (`ray start --num-gpus
1` on a CPU machine) so that `--gpus-per-trial 0.5` packs two trials per node, as on a GPU
cluster. The head gives Ray no CPU (as in the cluster files): every trial runs on a worker.

Faults a cluster has, each on a real search:
- a worker node lost mid-trial (every process of its namespace killed, as a reclaimed spot node
  is), while a node joining mid-search takes the trials that waited: the lost trials restart on
  the other node from their last checkpoint (a first iteration there > 1);
- the head lost mid-search (the whole cluster with it), a new cluster started, and `--resume`
  finishing the search from S3 and the run folder, with no trial or MLflow run twice.

Needs root (network namespaces, bind mounts) and iproute2 (installed with apt-get when missing).
Everything this module starts carries a marker in its environment and is ended by it; the
namespaces and the bridge are deleted afterwards.
"""
from __future__ import annotations

import contextlib

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_s3 import BUCKET, bucket_keys, s3_environment, start_moto

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_SCRIPT = REPO / "cluster" / "mlflow" / "local_server.sh"
MARKER = "BIOMETRY_HOSTS_TEST"
EPOCHS = 5



def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"


def _ensure_iproute2() -> None:
    if shutil.which("ip"):
        return
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-q", "iproute2"], capture_output=True,
                   timeout=300, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert shutil.which("ip"), "iproute2 is missing and apt-get could not install it"


# --- processes ----------------------------------------------------------------------------------
def _processes_with(tag: bytes) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            if tag in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


def kill_tagged(tag: str, sig: int = signal.SIGKILL, wait_s: float = 10) -> None:
    """Send ``sig`` to every process whose environment holds ``tag``; wait until none is left."""
    deadline = time.monotonic() + wait_s
    while pids := _processes_with(tag.encode()):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


# --- the emulated network -------------------------------------------------------------------------
@dataclass
class Host:
    name: str
    ns: str
    ip: str
    tmp: Path
    tag: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host: its namespace, its own /tmp."""
        return ["ip", "netns", "exec", self.ns, "sh", "-c", 'mount --bind "$0" /tmp && exec "$@"',
                str(self.tmp), *argv]


@dataclass
class Network:
    root: Path
    marker: str
    prefix: str = field(default_factory=lambda: f"10.{random.randint(100, 250)}.{random.randint(0, 250)}")
    suffix: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def bridge(self) -> str:
        return f"bmh{self.suffix}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.254"

    def create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def host(self, name: str) -> Host:
        """A new host on the bridge (a fresh namespace, IP and /tmp each time)."""
        index = len(self.hosts) + 1
        ns, veth = f"bmh{self.suffix}-{index}", f"bmh{self.suffix}v{index}"
        tmp = self.root / f"tmp-{name}-{index}"
        tmp.mkdir()
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _run("ip", "link", "set", f"{veth}p", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        ip = f"{self.prefix}.{index}"
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", f"{veth}p", "name", "eth0"],
                     ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", self.gateway]):
            _run("ip", "netns", "exec", ns, *argv)
        host = Host(name, ns, ip, tmp, f"{MARKER}={self.marker}-{index}")
        self.hosts[ns] = host
        return host

    def environment(self, host: Host) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI") and not k.startswith("RAY_AUTH")}
        tag_key, tag_value = host.tag.split("=", 1)
        env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    tag_key: tag_value, "TMPDIR": "/tmp",
                    # token auth on, as on the clusters (a token made for this test)
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})
        return env

    def start_ray(self, host: Host, *args: str, env: dict[str, str]) -> None:
        log = self.root / f"ray-{host.name}-{host.ns}.log"
        with open(log, "w") as out:
            proc = subprocess.run(host.command([str(BIN / "ray"), "start", "--node-ip-address", host.ip,
                                                "--disable-usage-stats", "--object-store-memory",
                                                str(150 * 1024 * 1024), *args]),
                                  env={**self.environment(host), **env}, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=180)
        assert proc.returncode == 0, log.read_text()[-3000:]

    def lose(self, host: Host) -> None:
        """The host is gone: every process it ran is killed at once."""
        kill_tagged(host.tag)

    def destroy(self) -> None:
        for host in self.hosts.values():
            kill_tagged(host.tag)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, timeout=60)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def root():
    # outside /tmp: every host mounts its own /tmp over it, and the run folder must outlive hosts
    path = Path(tempfile.mkdtemp(prefix="bmh-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def open_network(root: Path):
    """A bridge with one namespace per host under ``root``, torn down afterwards. Network
    namespaces need root, as CI runs; each host mounts its own /tmp, so neither the repository nor
    Python may live there."""
    assert os.geteuid() == 0, "network namespaces need root (CI runs the tests as root)"
    assert not any(str(p).startswith("/tmp/") for p in (REPO, Path(sys.executable).resolve())), \
        "the repository or Python is under /tmp, which each emulated host replaces"
    _ensure_iproute2()
    net = Network(root=root, marker=secrets.token_hex(6))
    try:
        net.create()
        yield net
    finally:
        net.destroy()


@pytest.fixture(scope="module")
def network(root):
    with open_network(root) as net:
        yield net


@pytest.fixture(scope="module")
def s3(network, root):
    import boto3

    proc, endpoint = start_moto(root / "moto.log", host=network.gateway)
    boto3.client("s3", **_boto_args(endpoint)).create_bucket(Bucket=BUCKET)
    try:
        yield {"env": s3_environment(endpoint), "client": boto3.client("s3", **_boto_args(endpoint))}
    finally:
        proc.kill()
        proc.wait()


def _boto_args(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def mlflow_uri(network, root):
    """MLflow on PostgreSQL, artifacts proxied by the server, bound to the bridge address."""
    state = root / "mlflow"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_PYTHON=sys.executable, MLFLOW_HOST=network.gateway)
    started = subprocess.run(["bash", str(MLFLOW_SCRIPT), "start", str(state)], env=env,
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(MLFLOW_SCRIPT), "purge", str(state)], env=env,
                       capture_output=True, timeout=180, stdin=subprocess.DEVNULL)


# --- a cluster on the network -------------------------------------------------------------------
def start_head(network: Network, s3_env: dict) -> Host:
    head = network.host("head")
    network.start_ray(head, "--head", "--port", "6379", "--num-cpus", "0", "--num-gpus", "0",
                      "--include-dashboard", "false", env=s3_env)
    return head


def start_gpu_worker(network: Network, head: Host, s3_env: dict) -> Host:
    """A worker like a g5 node, scaled down: 2 CPUs and one (fake) GPU, two trials at once."""
    worker = network.host("gpu")
    network.start_ray(worker, "--address", f"{head.ip}:6379", "--num-cpus", "2", "--num-gpus", "1",
                      env=s3_env)
    return worker


def write_preset(path: Path) -> Path:
    """The smoke preset made cluster-like: half a (fake) GPU per trial, restarts on node loss,
    no early stopping (every trial runs all epochs, so a lost one must restart)."""
    preset = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    preset["trial"]["train"]["epochs"] = EPOCHS
    preset["search"].update(num_samples=4, max_concurrent_trials=4, cpus_per_trial=1,
                            gpus_per_trial=0.5, grace_period=EPOCHS, reduction_factor=2,
                            max_failures=3, synthetic_images=48)
    path.write_text(yaml.safe_dump(preset))
    return path


def start_search(network: Network, head: Host, argv: list[str], *, env: dict, log: Path):
    """The driver on the head host, as `ray job submit` would run it there."""
    # a loaded 2-core machine: give the MLflow server more than the driver's default 10 s
    full_env = {**network.environment(head), **env, "RAY_ADDRESS": f"{head.ip}:6379",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
    with open(log, "w") as out:
        return subprocess.Popen(head.command([sys.executable, "search/run.py", *argv]), cwd=REPO,
                                env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def mlflow_answers(network: Network, host: Host, uri: str) -> bool:
    """Whether MLflow's /health answers from inside ``host`` (its network is up)."""
    probe = f"import urllib.request; urllib.request.urlopen('{uri}/health', timeout=10).read()"
    proc = subprocess.run(host.command([sys.executable, "-c", probe]), env=network.environment(host),
                          capture_output=True, timeout=60)
    return proc.returncode == 0


def results(client, name: str) -> dict[str, list[dict]]:
    """trial folder -> its result.json rows, read from the bucket."""
    rows: dict[str, list[dict]] = {}
    for key in bucket_keys(client, f"hosts/{name}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[2].startswith("trial_") and parts[3] == "result.json":
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            rows[parts[2]] = [json.loads(line) for line in body.splitlines() if line.strip()]
    return rows


def checkpointed_trials(client, name: str) -> set[str]:
    return {k.split("/")[2] for k in bucket_keys(client, f"hosts/{name}/")
            if "/checkpoint_" in k and k.endswith("/model.pt")}


def experiment_state_saved_after(client, name: str, moment: float) -> bool:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"hosts/{name}/experiment_state")
    return any(item["LastModified"].timestamp() > moment for item in listing.get("Contents", []))


def wait_for(predicate, *, timeout: float, what: str, driver=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the search ended ({driver.returncode}) before {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:] if log else ''}")


def trial_runs(mlflow_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    parents = client.search_runs([experiment.experiment_id], "tags.role = 'search'")
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'", max_results=100)
    return client, parents, children


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_lost_worker_trials_restart_from_checkpoints_on_the_node_that_joined(network, s3, mlflow_uri, root):
    started = time.monotonic()
    name, out = "lost-worker", root / "out"
    head = start_head(network, s3["env"])
    first = start_gpu_worker(network, head, s3["env"])
    second = None
    argv = ["--preset", str(write_preset(root / "hosts.yaml")), "--storage", f"s3://{BUCKET}/hosts",
            "--out", str(out), "--name", name, "--mlflow-uri", mlflow_uri]
    log = root / f"{name}.log"
    driver = start_search(network, head, argv, env=s3["env"], log=log)
    try:
        # two trials at 0.5 GPU fill the one worker; the other two wait for a node
        on_first = wait_for(lambda: (c := checkpointed_trials(s3["client"], name)) and len(c) >= 2 and c,
                            timeout=240, what="two trials checkpointed on the first worker",
                            driver=driver, log=log)
        network.lose(first)  # mid-trial: EPOCHS epochs each, a checkpoint or two so far
        second = start_gpu_worker(network, head, s3["env"])  # joins the search
        assert driver.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        for host in (head, first, second):
            if host is not None:
                network.lose(host)

    rows = results(s3["client"], name)
    assert len(rows) == 4, sorted(rows)
    assert all(r[-1]["training_iteration"] == EPOCHS for r in rows.values()), rows
    nodes = {trial: {r["node_ip"] for r in trial_rows} for trial, trial_rows in rows.items()}
    # every trial ended on the node that joined; the two begun on the lost node resumed there
    # from their checkpoints, past the first epoch. So both were mid-trial at once on the one
    # fake GPU of the first worker: 0.5 GPU each packs two trials per node.
    assert all(second.ip in ips for ips in nodes.values()), nodes
    assert len(on_first) == 2, on_first
    for trial in on_first:
        resumed = next(r for r in rows[trial] if r["node_ip"] == second.ip)
        assert resumed["training_iteration"] > 1, (trial, rows[trial])
    client, parents, children = trial_runs(mlflow_uri, name)
    assert len(parents) == 1 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:  # read from the S3 checkpoints, uploaded through the server's proxy
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "model/model.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    summary = json.loads((out / name / "summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["trial_states"] == {"TERMINATED": 4}
    print(f"\nlost worker, joined node: {time.monotonic() - started:.0f}s; "
          f"resumed from checkpoints: {sorted(on_first)}")


@pytest.mark.slow
def test_lost_head_resumes_from_s3_with_no_trial_or_run_twice(network, s3, mlflow_uri, root):
    started = time.monotonic()
    name, out = "lost-head", root / "out"
    argv = ["--preset", str(write_preset(root / "hosts.yaml")), "--storage", f"s3://{BUCKET}/hosts",
            "--out", str(out), "--name", name, "--mlflow-uri", mlflow_uri]
    head = start_head(network, s3["env"])
    worker = start_gpu_worker(network, head, s3["env"])
    log = root / f"{name}.log"
    driver = start_search(network, head, argv, env=s3["env"], log=log)
    try:
        wait_for(lambda: len(checkpointed_trials(s3["client"], name)) >= 2, timeout=240,
                 what="two trials checkpointed", driver=driver, log=log)
        seen = time.time()
        # the driver saves its experiment state (trials, searcher, scheduler) to S3 now and then
        wait_for(lambda: experiment_state_saved_after(s3["client"], name, seen), timeout=120,
                 what="the experiment state saved to S3", driver=driver, log=log)
    finally:
        network.lose(head)  # the head with the driver: the cluster is lost
        network.lose(worker)
        driver.wait(timeout=60)
    before = results(s3["client"], name)
    assert len(before) < 4 or any(len(r) < EPOCHS for r in before.values()), "it had finished"

    head = start_head(network, s3["env"])
    worker = start_gpu_worker(network, head, s3["env"])
    wait_for(lambda: mlflow_answers(network, head, mlflow_uri), timeout=120,
             what="MLflow answering the new head")
    log = root / f"{name}-resume.log"
    driver = start_search(network, head, [*argv, "--resume"], env=s3["env"], log=log)
    try:
        assert driver.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        network.lose(head)
        network.lose(worker)

    rows = results(s3["client"], name)
    assert len(rows) == 4, sorted(rows)
    assert all(r[-1]["training_iteration"] == EPOCHS for r in rows.values())
    _, parents, children = trial_runs(mlflow_uri, name)
    trial_ids = [r.data.tags["ray_trial_id"] for r in children]
    assert len(parents) == 1 and len(children) == 4 and len(set(trial_ids)) == 4, trial_ids
    assert {f"trial_{t}" for t in trial_ids} == set(rows)
    assert all(r.info.status == "FINISHED" for r in children)
    summary = json.loads((out / name / "summary.json").read_text())
    assert summary["num_trials"] == 4
    print(f"\nlost head, resumed: {time.monotonic() - started:.0f}s")
