"""Static checks of everything under cluster/: fast, no network, no cloud account.

Every YAML parses; Ray's version is the same in pyproject.toml, every image tag and every
rayVersion; ray-aws.yaml passes Ray's own cluster-launcher schema and config preparation; GPU
worker groups ask for GPUs; the RayJob runs search/run.py against the in-cluster MLflow
Service; MLflow is bound to loopback or behind auth; dependency pins match pyproject.toml.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)(?P<suffix>(-[a-z0-9]+)*)$")
# cluster/Dockerfile's image, built FROM rayproject/ray:<version>-py311-gpu and tagged alike
PROJECT_IMAGE = re.compile(r"^[A-Za-z0-9.\-]+/biometry-search-ray:(?P<version>\d+\.\d+\.\d+)-py311-gpu$")


# --- helpers --------------------------------------------------------------------------------
def _pyproject_pins() -> dict[str, str]:
    """{lowercase name: version} of pyproject.toml's [project] dependencies pinned with ==."""
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*(\S+)\s*$", req)
        assert m, f"requirement {req!r} is not pinned with =="
        out[m.group(1).lower()] = m.group(3)
    return out


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk_strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_strings(v)
    elif isinstance(node, str):
        yield node


def _walk_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dicts(v)


YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})
RAY_VERSION = _pyproject_pins()["ray"]


def _kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p) if d.get("kind") == kind]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:RayCluster", d["spec"]) for p, d in _kind("RayCluster")]
    specs += [(f"{p.name}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in _kind("RayJob")]
    return specs


# --- every file -----------------------------------------------------------------------------
def test_cluster_folder_has_the_expected_files():
    for rel in [
        "ray-aws.yaml",
        "README.md",
        "Dockerfile",
        "instance-types.yaml",
        "aws/ec2-trust.json",
        "aws/head-policy.json",
        "aws/worker-policy.json",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/storage.yaml",
        "kuberay/runtime-env.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/docker-compose.auth.yaml",
        "mlflow/Dockerfile",
        "mlflow/k8s.yaml",
        "mlflow/basic_auth.ini",
        "mlflow/local_server.sh",
    ]:
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_loads_and_every_document_is_a_mapping(path):
    docs = _docs(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"


def test_ray_version_is_the_same_everywhere():
    images, versions = [], []
    for path in YAML_FILES:
        for doc in _docs(path):
            images += [(path.name, s) for s in _walk_strings(doc) if s.startswith("rayproject/ray")]
            versions += [(path.name, d["rayVersion"]) for d in _walk_dicts(doc) if "rayVersion" in d]
    assert images and versions
    for name, image in images:
        m = RAY_IMAGE.match(image)
        assert m, f"{name}: Ray image {image!r} is not rayproject/ray:X.Y.Z[-pyNNN][-gpu]"
        assert m.group("version") == RAY_VERSION, f"{name}: {image} but pyproject pins ray=={RAY_VERSION}"
        assert "-py311" in m.group("suffix"), f"{name}: {image} is not the Python 3.11 image"
    for name, version in versions:
        assert isinstance(version, str), f"{name}: quote rayVersion ({version!r}) so YAML keeps it a string"
        assert version == RAY_VERSION, f"{name}: rayVersion {version} but pyproject pins ray=={RAY_VERSION}"


def test_no_image_floats_on_latest():
    for path in YAML_FILES:
        for doc in _docs(path):
            for d in _walk_dicts(doc):
                image = d.get("image")
                if isinstance(image, str) and not image.startswith("${"):
                    assert ":" in image and not image.endswith(":latest"), f"{path.name}: unpinned image {image}"


def test_local_server_script_is_valid_bash():
    script = CLUSTER / "mlflow" / "local_server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & 0o111, "local_server.sh should be executable"


# --- Ray cluster launcher (AWS) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "ray-aws.yaml").read_text())


def test_ray_aws_passes_rays_own_schema_and_preparation(aws):
    # Ray's launcher validates with this schema before touching AWS; no import of ray needed.
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    import jsonschema

    jsonschema.validate(aws, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws)  # merges Ray's AWS defaults, checks docker settings
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] <= prepared["max_workers"]


def test_ray_aws_node_types(aws):
    assert aws["cluster_name"] and aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials must not be scheduled on the head"
    head_type = head["node_config"]["InstanceType"]
    assert not re.match(r"^(g|p)\d", head_type), f"head {head_type} should be a CPU instance"
    assert "InstanceMarketOptions" not in head["node_config"], "a spot head would end the whole search"

    gpu = [t for name, t in types.items() if name != aws["head_node_type"]]
    assert gpu, "no worker node type"
    for t in gpu:
        assert re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]), "worker types should be GPU instances"
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 1
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "IamInstanceProfile" in t["node_config"], "workers need S3 access for the shared storage"
    assert sum(t["max_workers"] for t in gpu) <= aws["max_workers"]


def test_ray_aws_images_and_install(aws):
    docker = aws["docker"]
    assert docker["head_image"] == f"rayproject/ray:{RAY_VERSION}-py311"
    assert docker["worker_image"] == docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    mounts = aws["file_mounts"]
    assert mounts.get("/home/ray/biometry-search") == ".", "the project (repo root) must be synced"
    setup = aws["head_setup_commands"] + aws["worker_setup_commands"]
    assert all(any("pip install" in c and "/home/ray/biometry-search" in c for c in cmds)
               for cmds in (aws["head_setup_commands"], aws["worker_setup_commands"])), setup
    assert ".gitignore" in aws.get("rsync_filter", []), "never rsync .venv/runs: filter with .gitignore"


def test_ray_aws_token_auth_is_on(aws):
    assert any(remote.endswith(".ray/auth_token") for remote in aws["file_mounts"])
    for cmds in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), start
    assert any("RAY_AUTH_MODE=token" in c and "bashrc" in c for c in aws["setup_commands"])
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--port=6379" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


AMI = re.compile(r"^(ami-[0-9a-f]{8,17}|GPU_AMI_ID)$")  # a pinned id, or the placeholder to pin


def test_ray_aws_pins_one_ami_for_every_node_type(aws):
    amis = {name: t["node_config"].get("ImageId") for name, t in aws["available_node_types"].items()}
    assert all(a and AMI.match(a) for a in amis.values()), f"ray-aws.yaml: ImageId not pinned: {amis}"
    assert len(set(amis.values())) == 1, f"ray-aws.yaml: node types use different AMIs: {amis}"


def _policy(name: str) -> dict:
    return json.loads((CLUSTER / "aws" / f"{name}-policy.json").read_text())


def _allowed(policy: dict) -> list[tuple[str, str]]:
    pairs = []
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st, st
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        pairs += [(a, r) for a in actions for r in resources]
    return pairs


def test_worker_role_reaches_only_its_bucket_prefix():
    bucket = "arn:aws:s3:::YOUR-BUCKET"
    for action, resource in _allowed(_policy("worker")):
        assert action.startswith("s3:") and "*" not in action, f"worker-policy.json allows {action}"
        assert resource in (bucket, f"{bucket}/biometry-runs/*"), f"worker-policy.json: {resource}"
    listing = [st for st in _policy("worker")["Statement"] if st["Action"] == "s3:ListBucket"]
    assert listing and all("s3:prefix" in st["Condition"]["StringLike"] for st in listing)


def test_head_role_may_pass_only_the_worker_role(aws):
    pairs = _allowed(_policy("head"))
    passes = [r for a, r in pairs if a == "iam:PassRole"]
    assert passes == ["arn:aws:iam::ACCOUNT_ID:role/biometry-ray-worker"], passes
    assert not [a for a, _ in pairs if a.startswith("iam:") and a != "iam:PassRole"]
    assert not [a for a, _ in pairs if a in ("*", "s3:*", "ec2:*")], "no wildcard services"
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"]
                for name, t in aws["available_node_types"].items()}
    head = profiles.pop(aws["head_node_type"])
    assert head.endswith("instance-profile/biometry-ray-head"), head
    assert all(p.endswith("instance-profile/biometry-ray-worker") for p in profiles.values()), profiles


def test_ray_aws_mounts_efs_for_the_run_folders(aws):
    init = " ".join(aws["initialization_commands"])
    assert "mount -t nfs4" in init and ".efs." in init and "/mnt/shared" in init, init
    assert "-v /mnt/shared:/mnt/shared" in aws["docker"]["run_options"]


# --- KubeRay --------------------------------------------------------------------------------
def _is_project_image(image: str) -> bool:
    m = PROJECT_IMAGE.match(image)
    return bool(m) and m.group("version") == RAY_VERSION


def test_project_image_is_built_from_the_pinned_ray_gpu_image_with_the_project():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert froms == [f"rayproject/ray:{RAY_VERSION}-py311-gpu"], froms
    assert re.search(r"^RUN pip install --no-cache-dir \.", dockerfile, re.M), "the project is not installed"
    copied = set(re.findall(r"^COPY \S+ (\S+) ", dockerfile, re.M)) | {
        w for line in re.findall(r"^COPY \S+ (.+)$", dockerfile, re.M) for w in line.split()[:-1]}
    for needed in ("pyproject.toml", "biometry", "trainables", "search", "configs"):
        assert needed in copied, f"cluster/Dockerfile does not COPY {needed}"


def test_kuberay_resources_use_ray_io_v1():
    kinds = [(p.name, d) for p in YAML_FILES for d in _docs(p) if d.get("kind") in {"RayCluster", "RayJob"}]
    assert {d["kind"] for _, d in kinds} == {"RayCluster", "RayJob"}
    for name, d in kinds:
        assert d["apiVersion"] == "ray.io/v1", f"{name}: {d['kind']} apiVersion {d['apiVersion']}"


@pytest.mark.parametrize("label,spec", _ray_cluster_specs(), ids=[label for label, _ in _ray_cluster_specs()])
def test_kuberay_cluster_spec(label, spec):
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("enableInTreeAutoscaling") is True, f"{label}: autoscaling off"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{label}: token auth must stay on"

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: head Service exposed beyond the cluster"
    head_container = head["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports, f"{label}: head ports {ports}"
    assert _is_project_image(head_container["image"]), f"{label}: head image {head_container['image']}"
    assert str(head.get("rayStartParams", {}).get("num-cpus")) == "0", f"{label}: trials would run on the head"

    gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu_groups, f"{label}: no GPU worker group"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] > 0
        for c in g["template"]["spec"]["containers"]:
            assert str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1", f"{label}: {g['groupName']} asks no GPU"
            assert _is_project_image(c["image"]), f"{label}: worker image {c['image']}"


def test_kuberay_pods_mount_the_shared_claim():
    claims = {d["metadata"]["name"] for _, d in _kind("PersistentVolumeClaim")}
    for label, spec in _ray_cluster_specs():
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            used = {v["persistentVolumeClaim"]["claimName"] for v in t["spec"].get("volumes", [])
                    if "persistentVolumeClaim" in v}
            assert "biometry-shared" in used and "biometry-shared" in claims, label
            mounts = {m["mountPath"] for c in t["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "/mnt/shared" in mounts, label


@pytest.fixture(scope="module")
def rayjob():
    (path, doc), = _kind("RayJob")
    return doc


def _entrypoint_args(rayjob) -> dict[str, str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "search/run.py"], argv
    opts = {}
    it = iter(argv[2:])
    for a in it:
        assert a.startswith("--"), argv
        opts[a] = next(it)
    return opts


def test_rayjob_runs_the_search(rayjob):
    spec = rayjob["spec"]
    opts = _entrypoint_args(rayjob)
    assert opts["--num-samples"] == "200" and opts["--preset"] == "gpu"
    assert opts["--storage"].startswith(("/mnt/shared/", "s3://")), "storage must be shared by all pods"
    assert opts["--out"].startswith("/mnt/shared/"), "the run folder must outlive the head pod"
    assert opts["--mlflow-uri"] == "http://mlflow:5000"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir")


def test_rayjob_mlflow_uri_matches_the_mlflow_service(rayjob):
    uri = _entrypoint_args(rayjob)["--mlflow-uri"]
    host, port = re.match(r"^http://([^:/]+):(\d+)$", uri).groups()
    services = {d["metadata"]["name"]: d for p, d in _kind("Service") if p.parent.name == "mlflow"}
    assert host in services, f"no Service {host!r} in cluster/mlflow/k8s.yaml"
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    # MLflow's host-header check must accept the name in-cluster clients use.
    (_, deploy), = [(p, d) for p, d in _kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert f"{host}:{port}" in allowed


@pytest.mark.parametrize("source", ["rayjob.yaml", "runtime-env.yaml"])
def test_runtime_env_pins_match_pyproject(source):
    path = CLUSTER / "kuberay" / source
    doc = _docs(path)[0]
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) if doc.get("kind") == "RayJob" else doc
    if "pip" not in env:  # the project image has the dependencies; runtime-env.yaml is the fallback
        images = {d["image"] for d in _walk_dicts(doc) if "image" in d}
        assert images and all(_is_project_image(i) for i in images), f"{source}: no pip and {images}"
        return
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    pinned = _pins(pip)
    project = {k: v for k, v in _pyproject_pins().items() if k != "ray"}
    assert "ray" not in pinned, f"{source}: the Ray image already has ray; do not reinstall it"
    assert pinned == project, f"{source}: pins differ from pyproject.toml: {set(pinned.items()) ^ set(project.items())}"


# --- MLflow server --------------------------------------------------------------------------
def test_mlflow_image_pins_the_project_mlflow():
    dockerfile = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow=={_pyproject_pins()['mlflow']}" in dockerfile
    assert re.search(r"psycopg2-binary==\d", dockerfile)
    assert re.search(r"^FROM \S+:\S+", dockerfile, re.M)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())


def test_compose_runs_mlflow_on_postgres(compose):
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    mlflow = services["mlflow"]
    assert mlflow["build"] in (".", {"context": "."}) and mlflow["image"].endswith(":" + _pyproject_pins()["mlflow"])
    cmd = mlflow["command"]
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql+psycopg2://") and "@postgres:" in backend
    assert ":" not in backend.split("://", 1)[1].split("@", 1)[0], "no password in the backend URI"
    assert "--artifacts-destination" in cmd
    assert "PGPASSWORD" in mlflow["environment"]


def _host_side(port_mapping: str) -> str:
    """Host address of a compose 'HOST:HOSTPORT:CONTAINERPORT' mapping, env defaults resolved."""
    resolved = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(port_mapping))
    parts = resolved.split(":")
    return parts[0] if len(parts) == 3 else "0.0.0.0"


def test_compose_mlflow_is_loopback_only_or_behind_auth(compose):
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        behind_auth = "--app-name" in cmd and cmd[cmd.index("--app-name") + 1] == "basic-auth"
        for mapping in svc.get("ports", []):
            assert behind_auth or _host_side(mapping) == "127.0.0.1", f"{name} publishes {mapping} without auth"
    assert "ports" not in compose["services"]["postgres"], "PostgreSQL must not be published"


def test_compose_auth_overlay_turns_on_basic_auth():
    overlay = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.auth.yaml").read_text())
    mlflow = overlay["services"]["mlflow"]
    cmd = mlflow["command"]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    env = mlflow["environment"]
    for key in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert key in env
    assert ":?" in env["MLFLOW_AUTH_ADMIN_PASSWORD"], "the admin password must be required, never defaulted"


def test_k8s_mlflow_stays_inside_the_cluster_and_keeps_secrets_out():
    path = CLUSTER / "mlflow" / "k8s.yaml"
    docs = _docs(path)
    assert not [d for d in docs if d.get("kind") == "Secret"], "create secrets with kubectl, not in git"
    for d in docs:
        if d.get("kind") == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {d['metadata']['name']} exposed"
        for env in _walk_dicts(d):
            if env.get("name") in {"PGPASSWORD", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"}:
                assert "valueFrom" in env and "value" not in env, f"{env['name']} must come from a Secret"
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service"} <= kinds
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    backend = args[args.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql+psycopg2://") and ":" not in backend.split("://", 1)[1].split("@", 1)[0]


def test_no_cluster_service_is_exposed_outside():
    for path in YAML_FILES:
        for doc in _docs(path):
            for d in _walk_dicts(doc):
                for key in ("type", "serviceType"):
                    assert d.get(key) not in {"LoadBalancer", "NodePort"}, f"{path.name}: {key}={d.get(key)}"


def test_readme_covers_start_submit_watch_teardown_and_cost():
    text = (CLUSTER / "README.md").read_text()
    for needle in [
        "ray up cluster/ray-aws.yaml",
        "kubectl apply -f cluster/kuberay/",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "ray get-auth-token",
        "ray dashboard cluster/ray-aws.yaml",
        "ray down cluster/ray-aws.yaml",
        "kubectl delete",
        "RAY_ADDRESS",
        "trial-hour",
        "local_server.sh",
    ]:
        assert needle in text, f"cluster/README.md does not mention {needle!r}"


def test_every_cluster_search_command_keeps_its_run_folder_on_shared_storage():
    # each `search/run.py ... --preset gpu` command in cluster/, joined over line continuations
    found = 0
    for path in [CLUSTER / "README.md", *YAML_FILES]:
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())
        text = re.sub(r"\n\s*--", " --", text)  # YAML folded scalars
        for command in re.findall(r"python search/run\.py[^\n`]*--preset gpu[^\n`]*", text):
            assert "--out /mnt/shared/" in command, f"{path.name}: {command}"
            found += 1
    assert found >= 5, f"only {found} gpu search commands found in cluster/"
