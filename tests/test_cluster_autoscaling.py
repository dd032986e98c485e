"""Autoscaling with the launcher's node types: Ray's fake multi-node provider (the one behind
`ray.cluster_utils.AutoscalingCluster`) adds and removes real raylets the way the AWS launcher
adds and removes instances. The GPU worker type comes from cluster/ray-aws.yaml with the
resources its instance type gives (tests/test_cluster_fit.py) and its `min_workers: 0`: the
cluster starts with no GPU, the search asks the autoscaler for a GPU node and waits for it
instead of refusing, both trials pack onto the one node it adds, and the idle node goes after
the search. AutoscalingCluster.start() itself runs `ray stop --force` (every Ray on the
machine), so the head is started here, alone in a network namespace of its own (its own IP,
ports and /tmp), with the same settings.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_fit import launcher_node_shapes
from tests.test_cluster_hosts import BIN, REPO, Network, open_network

IDLE_TIMEOUT_MIN = 0.5  # long enough for the driver to start its trials on the new node

NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
"""


def autoscaling_config() -> dict:
    """The fake provider's cluster config with the launcher's GPU node type, from zero."""
    aws = yaml.safe_load((REPO / "cluster" / "ray-aws.yaml").read_text())
    _, workers = launcher_node_shapes()
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for worker in workers:
        types[worker.name] = {"resources": {"CPU": int(worker.cpu), "GPU": int(worker.gpu)},
                              "node_config": {}, "max_workers": worker.max_nodes,
                              "min_workers": aws["available_node_types"][worker.name]["min_workers"]}
    empty = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                 "worker_setup_commands", "head_start_ray_commands",
                                 "worker_start_ray_commands", "cluster_synced_files",
                                 "rsync_exclude", "rsync_filter")}
    return {"cluster_name": "fake-biometry", "max_workers": aws["max_workers"],
            "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
            # the fake provider's nodes are raylets on this host: no SSH updaters, node ids as IPs
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "docker": {},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "file_mounts_sync_continuously": False, **empty}


def gpu_like_preset(path: Path) -> Path:
    """The smoke trial with the gpu preset's per-trial resources."""
    preset = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    gpu = yaml.safe_load((REPO / "configs/presets/gpu.yaml").read_text())["search"]
    preset["search"].update(num_samples=2, max_concurrent_trials=2,
                            cpus_per_trial=gpu["cpus_per_trial"], gpus_per_trial=gpu["gpus_per_trial"],
                            max_failures=gpu["max_failures"])
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture
def network():
    root = Path(tempfile.mkdtemp(prefix="bma-", dir="/var/tmp"))
    try:
        with open_network(root) as net:
            yield net
    finally:
        shutil.rmtree(root, ignore_errors=True)


def alive_nodes(net: Network, head, env: dict) -> list[dict]:
    proc = subprocess.run(head.command([sys.executable, "-c", NODES_SCRIPT, f"{head.ip}:6379"]),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_search_waits_for_an_autoscaled_gpu_node_and_the_idle_node_goes(network):
    started = time.monotonic()
    root = network.root
    config = root / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config()))
    head = network.host("head")
    env = {**network.environment(head), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    network.start_ray(head, "--head", "--port", "6379", "--num-cpus", "0", "--num-gpus", "0",
                      "--include-dashboard", "false", f"--autoscaling-config={config}", env=env)
    assert [n.get("GPU", 0) for n in alive_nodes(network, head, env)] == [0]

    out = root / "out"
    proc = subprocess.run(
        head.command([sys.executable, "search/run.py", "--preset", str(gpu_like_preset(root / "p.yaml")),
                      "--storage", str(root / "storage"), "--out", str(out), "--name", "scaled"]),
        cwd=REPO, env={**env, "RAY_ADDRESS": f"{head.ip}:6379", "BIOMETRY_GPU_WAIT_MIN": "3"},
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "asking its autoscaler for a GPU node" in proc.stdout

    trial_dirs = sorted((root / "storage" / "scaled").glob("trial_*"))
    assert len(trial_dirs) == 2
    node_ids = {json.loads(line)["node_id"] for d in trial_dirs
                for line in (d / "result.json").read_text().splitlines() if line}
    assert len(node_ids) == 1, node_ids  # 3 CPU + 0.5 GPU each: both on the one added node

    # idle_timeout_minutes later the autoscaler removes the GPU node again
    deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 90
    while (alive := alive_nodes(network, head, env)) and len(alive) > 1:
        assert time.monotonic() < deadline, f"the idle GPU node stayed: {alive}"
        time.sleep(3)
    print(f"\nautoscaled search: {time.monotonic() - started:.0f}s")


@pytest.mark.slow
def test_without_an_autoscaler_a_gpu_search_is_still_refused_at_once(network):
    head = network.host("head")
    env = network.environment(head)
    network.start_ray(head, "--head", "--port", "6379", "--num-cpus", "1", "--num-gpus", "0",
                      "--include-dashboard", "false", env=env)
    started = time.monotonic()
    proc = subprocess.run(
        head.command([sys.executable, "search/run.py", "--preset", "smoke", "--gpus-per-trial", "0.5",
                      "--out", str(network.root / "out"), "--name", "refused"]),
        cwd=REPO, env={**env, "RAY_ADDRESS": f"{head.ip}:6379"}, capture_output=True, text=True,
        timeout=180)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --gpus-per-trial 0.5 asks for a GPU")
    assert time.monotonic() - started < 90
