"""Do the presets fit the clusters the cluster files make, and pack the way cluster/README.md says?

Each node type's Ray resources are derived from the files an operator applies: the launcher's
`available_node_types` (an explicit `resources`, else what the instance type has, from
cluster/instance-types.yaml) and the KubeRay pod templates (`rayStartParams` num-cpus/num-gpus,
else the container's CPU limit and `nvidia.com/gpu`, on the instance its nodeSelector names).
Then every preset must fit a worker, the gpu preset must pack two trials per GPU worker and
eight on a full cluster, every pod must fit its instance, and the README's cost table and
per-trial-hour prices must be the instance table's. A drift such as a 4-CPU trial on a 3-CPU
pod fails here, not on the cluster. No network, no Ray.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
# what cluster/README.md promises for --preset gpu
GPU_TRIALS_PER_WORKER = 2
GPU_TRIALS_ON_A_FULL_CLUSTER = 8


@dataclass(frozen=True)
class NodeShape:
    """What Ray sees on one node of a type, and how many such nodes the cluster may have."""

    name: str
    cpu: float
    gpu: float
    instance: str
    max_nodes: int


def _instance_table() -> dict:
    return yaml.safe_load((CLUSTER / "instance-types.yaml").read_text())


INSTANCES = _instance_table()["instances"]
POD_RESERVE = _instance_table()["pod_reserve"]


def _search_settings(path: Path) -> dict:
    settings = (yaml.safe_load(path.read_text()) or {}).get("search") or {}
    return {"cpus_per_trial": float(settings.get("cpus_per_trial", 1.0)),
            "gpus_per_trial": float(settings.get("gpus_per_trial", 0.0)),
            "max_concurrent_trials": int(settings.get("max_concurrent_trials", 2))}


def trials_per_node(node: NodeShape, *, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials Ray can place on one node of this shape at once."""
    fits = [math.floor(node.cpu / cpus_per_trial + 1e-9)]
    if gpus_per_trial > 0:
        fits.append(math.floor(node.gpu / gpus_per_trial + 1e-9))
    return max(0, min(fits))


def _instance(name: str, where: str) -> dict:
    assert name in INSTANCES, f"{where}: instance type {name!r} is not in cluster/instance-types.yaml"
    return INSTANCES[name]


# --- the launcher (cluster/ray-aws.yaml) ------------------------------------------------------
def launcher_node_shapes() -> tuple[NodeShape, list[NodeShape]]:
    config = yaml.safe_load((CLUSTER / "ray-aws.yaml").read_text())
    shapes = {}
    for name, node_type in config["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        spec = _instance(instance, f"ray-aws.yaml {name}")
        resources = node_type.get("resources") or {}
        max_nodes = 1 if name == config["head_node_type"] else int(node_type.get("max_workers", 0))
        shapes[name] = NodeShape(name, float(resources.get("CPU", spec["vcpu"])),
                                 float(resources.get("GPU", spec["gpus"])), instance, max_nodes)
    head = shapes.pop(config["head_node_type"])
    return head, list(shapes.values())


# --- KubeRay (cluster/kuberay/*.yaml) -----------------------------------------------------------
def _cpu_quantity(value, where: str) -> float:
    text = str(value)
    m = re.fullmatch(r"(\d+)(m?)", text)
    assert m, f"{where}: CPU quantity {text!r} (use whole CPUs or millicores)"
    return int(m.group(1)) / (1000 if m.group(2) else 1)


def _memory_gib(value, where: str) -> float:
    m = re.fullmatch(r"(\d+)(Gi|Mi)", str(value))
    assert m, f"{where}: memory quantity {value!r} (use Gi or Mi)"
    return int(m.group(1)) / (1 if m.group(2) == "Gi" else 1024)


def _pod_shape(group: dict, *, name: str, max_nodes: int, where: str) -> tuple[NodeShape, dict]:
    pod = group["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
    limits = container["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    cpu = float(params["num-cpus"]) if "num-cpus" in params else _cpu_quantity(limits["cpu"], where)
    gpu = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    instance = (pod.get("nodeSelector") or {}).get(INSTANCE_LABEL)
    assert instance, f"{where}: no nodeSelector {INSTANCE_LABEL}: which instance does it run on?"
    return NodeShape(name, cpu, gpu, instance, max_nodes), {
        "cpu": _cpu_quantity(limits["cpu"], where), "memory_gib": _memory_gib(limits["memory"], where),
        "gpus": float(limits.get("nvidia.com/gpu", 0))}


def _kuberay_cluster_specs() -> dict[str, dict]:
    specs = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayCluster":
                specs[f"{path.name}:RayCluster"] = doc["spec"]
            elif doc and doc.get("kind") == "RayJob":
                specs[f"{path.name}:RayJob"] = doc["spec"]["rayClusterSpec"]
    return specs


def kuberay_node_shapes(spec: dict, label: str) -> tuple[NodeShape, list[NodeShape], list[tuple]]:
    """(head, worker groups, [(where, instance, pod limits)]) of one RayCluster spec."""
    head, head_pod = _pod_shape(spec["headGroupSpec"], name="head", max_nodes=1,
                                where=f"{label} head")
    workers, pods = [], [(f"{label} head", head.instance, head_pod)]
    for group in spec["workerGroupSpecs"]:
        where = f"{label} {group['groupName']}"
        shape, pod = _pod_shape(group, name=group["groupName"],
                                max_nodes=int(group["maxReplicas"]), where=where)
        workers.append(shape)
        pods.append((where, shape.instance, pod))
    return head, workers, pods


def _clusters() -> dict[str, tuple[NodeShape, list[NodeShape]]]:
    clusters = {"ray-aws.yaml": launcher_node_shapes()}
    for label, spec in _kuberay_cluster_specs().items():
        head, workers, _ = kuberay_node_shapes(spec, label)
        clusters[label] = (head, workers)
    return clusters


CLUSTERS = _clusters()


# --- the tests ----------------------------------------------------------------------------------
def test_the_fit_rule_catches_the_drift_it_was_written_for():
    # a 4-CPU trial on a KubeRay pod that gives Ray 3 CPUs: the search would exit at once
    pod = NodeShape("gpu-workers", cpu=3, gpu=1, instance="g5.xlarge", max_nodes=4)
    assert trials_per_node(pod, cpus_per_trial=4, gpus_per_trial=0.5) == 0
    assert trials_per_node(pod, cpus_per_trial=1, gpus_per_trial=0.5) == 2


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_no_trial_runs_on_the_head(cluster):
    head, _ = CLUSTERS[cluster]
    assert head.cpu == 0 and head.gpu == 0, f"{cluster}: the head offers Ray {head}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_every_preset_fits_a_worker_of_every_cluster(cluster, preset):
    settings = _search_settings(preset)
    _, workers = CLUSTERS[cluster]
    fits = {w.name: trials_per_node(w, cpus_per_trial=settings["cpus_per_trial"],
                                    gpus_per_trial=settings["gpus_per_trial"]) for w in workers}
    assert max(fits.values()) >= 1, (
        f"{cluster}: preset {preset.stem} asks {settings['cpus_per_trial']:g} CPU + "
        f"{settings['gpus_per_trial']:g} GPU per trial; workers give {workers}")


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_gpu_preset_packs_two_trials_per_gpu_worker_and_eight_on_a_full_cluster(cluster):
    settings = _search_settings(REPO / "configs" / "presets" / "gpu.yaml")
    _, workers = CLUSTERS[cluster]
    gpu_workers = [w for w in workers if w.gpu > 0]
    assert gpu_workers, f"{cluster}: no GPU worker type"
    for worker in gpu_workers:
        packed = trials_per_node(worker, cpus_per_trial=settings["cpus_per_trial"],
                                 gpus_per_trial=settings["gpus_per_trial"])
        assert packed == GPU_TRIALS_PER_WORKER, (
            f"{cluster}: {worker.name} ({worker.cpu:g} CPU, {worker.gpu:g} GPU) holds {packed} "
            f"gpu-preset trials, cluster/README.md says {GPU_TRIALS_PER_WORKER}")
    full = sum(w.max_nodes * GPU_TRIALS_PER_WORKER for w in gpu_workers)
    assert full == GPU_TRIALS_ON_A_FULL_CLUSTER, f"{cluster}: {full} trials at once"
    assert settings["max_concurrent_trials"] == full, (
        f"configs/presets/gpu.yaml: search.max_concurrent_trials "
        f"{settings['max_concurrent_trials']} but a full {cluster} runs {full} trials")


def test_launcher_and_kuberay_workers_are_the_same_instance_type():
    instances = {w.instance for _, workers in CLUSTERS.values() for w in workers if w.gpu > 0}
    assert len(instances) == 1, f"GPU workers differ between the cluster files: {instances}"


@pytest.mark.parametrize("label", sorted(_kuberay_cluster_specs()))
def test_every_kuberay_pod_fits_its_instance(label):
    _, _, pods = kuberay_node_shapes(_kuberay_cluster_specs()[label], label)
    for where, instance, pod in pods:
        spec = _instance(instance, where)
        assert pod["cpu"] <= spec["vcpu"] - POD_RESERVE["cpu"], f"{where}: {pod['cpu']:g} CPU on {instance}"
        assert pod["memory_gib"] <= spec["memory_gib"] - POD_RESERVE["memory_gib"], \
            f"{where}: {pod['memory_gib']:g} GiB on {instance}"
        assert pod["gpus"] <= spec["gpus"], f"{where}: {pod['gpus']:g} GPU on {instance}"


def test_kuberay_ray_resources_are_the_pod_limits():
    # an explicit num-cpus other than 0 (the head) would tell Ray more or less than the pod has
    for label, spec in _kuberay_cluster_specs().items():
        for group in spec["workerGroupSpecs"]:
            params = group.get("rayStartParams") or {}
            assert "num-cpus" not in params and "num-gpus" not in params, f"{label}: {params}"


# --- the README's cost table ----------------------------------------------------------------------
README = (CLUSTER / "README.md").read_text()


def _cost_rows() -> dict[str, str]:
    rows = re.findall(r"^\| (\S+) \((.*?)\) \| (.*?) \| (.*?) \| (.*?) \|$", README, re.M)
    return {name: (shape, role, on_demand, spot) for name, shape, role, on_demand, spot in rows}


@pytest.mark.parametrize("instance", sorted(INSTANCES))
def test_readme_cost_table_is_the_instance_table(instance):
    spec = INSTANCES[instance]
    row = _cost_rows().get(instance)
    assert row, f"cluster/README.md's cost table has no row for {instance}"
    shape, _, on_demand, spot = row
    assert f"{spec['vcpu']} vCPU" in shape and f"{spec['memory_gib']} GiB" in shape, (instance, shape)
    assert f"~${spec['on_demand_usd_h']:.2f}/h" == on_demand, (instance, on_demand)
    if "spot_usd_h" in spec:
        assert f"~${spec['spot_usd_h']:.2f}/h" == spot, (instance, spot)


def test_readme_price_per_trial_hour_follows_from_the_packing():
    (worker,) = {w.instance for _, workers in CLUSTERS.values() for w in workers if w.gpu > 0}
    spec = INSTANCES[worker]
    m = re.search(r"\*\*per trial-hour\*\*: ~\$(\d+\.\d\d) on-demand, ~\$(\d+\.\d\d) on spot", README)
    assert m, "cluster/README.md: no '**per trial-hour**: ~$X on-demand, ~$Y on spot' line"
    assert float(m.group(1)) == round(spec["on_demand_usd_h"] / GPU_TRIALS_PER_WORKER, 2)
    assert float(m.group(2)) == round(spec["spot_usd_h"] / GPU_TRIALS_PER_WORKER, 2)
    assert f"two trials share one {worker}" in README
    assert f"{GPU_TRIALS_ON_A_FULL_CLUSTER} with 4 workers" in README
