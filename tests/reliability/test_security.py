"""Security: no code runs from a checkpoint or a YAML file, image paths stay in the data folder,
Ray's token auth stays on and local servers listen on loopback.

The cluster files themselves (KubeRay authOptions, the launcher's RAY_AUTH_MODE=token, compose
ports, k8s Services) are checked in detail by tests/test_cluster_config.py; here the whole
repository is searched for anything that turns the protections off.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import REPO, copy_dataset, edit_csv_cell, one_error_line, run_command  # noqa: E402

from biometry.errors import BiometryInputError  # noqa: E402
from biometry.inference import load_model_folder, load_model_spec  # noqa: E402
from biometry.io import load_records  # noqa: E402

SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "mlruns", "runs",
             ".pytest_cache", ".hypothesis", "biometry_search.egg-info", "sample_data"}


def repo_files(*suffixes: str) -> list[Path]:
    """Files of the working tree (tracked or not, the virtualenv and run outputs left out)."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(root) / f for f in files if f.endswith(suffixes)]
    return sorted(found)


def python_calls(path: Path):
    """``(dotted function name, call node)`` of every call in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


class Exploit:
    """Unpickling this runs a shell command (what a poisoned checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- checkpoints -------------------------------------------------------------------------------
def test_every_torch_load_in_the_repo_is_weights_only():
    calls = [(path, node) for path in repo_files(".py") for name, node in python_calls(path)
             if name == "torch.load"]
    assert calls, "no torch.load found: the search is broken"
    unsafe = [f"{path.relative_to(REPO)}:{node.lineno}" for path, node in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                         and k.value.value is True for k in node.keywords)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    alias = re.compile(r"^\s*from torch(\.serialization)? import .*\bload\b"
                       r"|= *torch\.load\b(?!\s*\()", re.M)
    aliased = [str(path.relative_to(REPO)) for path in repo_files(".py")
               if alias.search(path.read_text(encoding="utf-8"))]
    assert not aliased, f"torch.load imported or aliased (the search above would miss it): {aliased}"


def test_a_checkpoint_holding_an_object_is_refused(model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    marker = tmp_path / "pwned"
    state = torch.load(folder / "model.pt", weights_only=True)
    state["payload"] = Exploit(marker)
    torch.save(state, folder / "model.pt")
    with pytest.raises(BiometryInputError) as err:
        load_model_folder(folder)
    assert str(err.value).startswith(f"{folder / 'model.pt'}: cannot load weights")
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the checkpoint ran code"

    proc = run_command(["-m", "biometry", "evaluate", "--model", str(folder), "--data",
                        str(tmp_path / "unused.csv"), "--out", str(tmp_path / "out")])
    assert "model.pt: cannot load weights" in one_error_line(proc)
    assert not marker.exists()


def test_a_poisoned_trainer_state_is_refused_on_resume(model_folder, tmp_path, dataset_csv):
    """``trainables.train --resume`` loads trainer.pt (optimizer state) as well as model.pt."""
    from trainables.train import TRAINER_STATE

    out = tmp_path / "run"
    shutil.copytree(model_folder, out / "checkpoint")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Exploit(marker)}, out / "checkpoint" / TRAINER_STATE)
    config = REPO / "configs/trial/smoke.yaml"
    # the checkpoint's model must be the config's for the trainer state to be read
    import yaml

    spec = yaml.safe_load((out / "checkpoint" / "model.yaml").read_text())
    spec["trial_config"] = {}
    (out / "checkpoint" / "model.yaml").write_text(yaml.safe_dump(spec))
    proc = run_command(["-m", "trainables.train", "--config", str(config), "--data",
                        str(dataset_csv), "--out", str(out), "--resume"])
    line = one_error_line(proc)
    assert f"{TRAINER_STATE}: cannot load the checkpoint (UnpicklingError)" in line, line
    assert not marker.exists(), "the trainer state ran code"


# -- YAML --------------------------------------------------------------------------------------
UNSAFE_YAML = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all",
               "yaml.full_load", "yaml.full_load_all"}


def test_yaml_is_only_read_with_safe_load():
    bad = []
    for path in repo_files(".py"):
        for name, node in python_calls(path):
            loader = [k for k in node.keywords if k.arg == "Loader"]
            if name in UNSAFE_YAML or (name.startswith("yaml.") and loader):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not bad, f"YAML read without safe_load: {bad}"
    aliased = [str(path.relative_to(REPO)) for path in repo_files(".py")
               if re.search(r"^\s*from yaml import .*\b(load|load_all|unsafe_load|full_load|"
                            r"Loader|UnsafeLoader|FullLoader)\b", path.read_text(encoding="utf-8"),
                            re.M)]
    assert not aliased, f"unsafe YAML loader imported by name: {aliased}"


def _python_object_yaml(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]\n'


@pytest.mark.parametrize("target", ["trial config", "preset", "space", "model.yaml"])
def test_a_python_object_tag_in_yaml_is_refused(target, tmp_path, model_folder):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    if target == "trial config":
        evil.write_text(f"train:\n  lr: {_python_object_yaml(marker)}")
        argv = ["-m", "trainables.train", "--config", str(evil), "--out", str(tmp_path / "o")]
    elif target == "preset":
        evil.write_text(f"search:\n  seed: {_python_object_yaml(marker)}")
        argv = ["search/run.py", "--preset", str(evil), "--out", str(tmp_path / "o")]
    elif target == "space":
        evil.write_text(f"params: {_python_object_yaml(marker)}")
        argv = ["search/run.py", "--preset", "smoke", "--space", str(evil), "--out",
                str(tmp_path / "o")]
    else:
        shutil.copytree(model_folder, tmp_path / "model")
        evil = tmp_path / "model" / "model.yaml"
        evil.write_text(_python_object_yaml(marker))
        argv = ["-m", "biometry", "evaluate", "--model", str(tmp_path / "model"), "--data",
                str(tmp_path / "unused.csv"), "--out", str(tmp_path / "o")]
        with pytest.raises(BiometryInputError, match="model.yaml: invalid YAML"):
            load_model_spec(tmp_path / "model")
    proc = run_command(argv)
    line = one_error_line(proc)
    assert evil.name in line and ("YAML" in line or "yaml" in line), line
    assert not marker.exists(), "the YAML ran code"


# -- image paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "nested-dotdot"])
def test_image_paths_stay_inside_the_data_folder(how, tmp_path, dataset_csv):
    csv = copy_dataset(dataset_csv, tmp_path / "data")
    secret = tmp_path / "outside.png"
    shutil.copy(csv.parent / "000_HC.png", secret)
    value = {"dotdot": "../outside.png", "absolute": str(secret), "symlink": "link.png",
             "nested-dotdot": "sub/../../outside.png"}[how]
    if how == "symlink":
        (csv.parent / "link.png").symlink_to(secret)
    edit_csv_cell(csv, 2, "image", value)
    with pytest.raises(BiometryInputError, match=r"row 2 .*column 'image' leaves the data folder"):
        load_records(csv)


def test_hc18_file_names_cannot_leave_the_folder(tmp_path):
    from biometry.io.hc18 import HC18_CSV

    folder = tmp_path / "hc18"
    (folder / "training_set").mkdir(parents=True)
    (folder / HC18_CSV).write_text("filename,pixel size(mm),head circumference (mm)\n"
                                   "../../etc/passwd,0.1,100\n")
    with pytest.raises(BiometryInputError, match="row 1 .*must be a file name"):
        load_records(folder)


# -- servers: auth on, loopback by default -------------------------------------------------------
DISABLING_AUTH = [
    re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?(disabled|none|off)", re.I),
    re.compile(r"auth_?mode[\"']?\s*[=:]\s*[\"']?(disabled|none|off)\b", re.I),
    re.compile(r"mode:\s*[\"']?(disabled|none)[\"']?\s*$", re.M),  # KubeRay authOptions
]


def test_nothing_turns_rays_token_auth_off():
    text_files = repo_files(".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".env",
                            ".example", "Dockerfile", ".md", ".txt")
    hits = []
    for path in text_files:
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{path.relative_to(REPO)}: {m.group(0)}" for p in DISABLING_AUTH
                 for m in p.finditer(text)]
    assert not hits, f"token auth turned off: {hits}"


def test_the_local_dashboard_listens_on_loopback_only():
    source = (REPO / "search" / "tune_api.py").read_text()
    hosts = re.findall(r"dashboard_host\s*=\s*([^,)\n]+)", source)
    assert hosts and all(h.strip() in ('"127.0.0.1"', "'127.0.0.1'") for h in hosts), hosts


def loopback_default(path: Path, host: str) -> str:
    """``host`` itself, or for a shell variable the default the script gives it
    (``ML_HOST=${MLFLOW_HOST:-127.0.0.1}``: loopback unless the caller binds elsewhere)."""
    if not host.startswith("$"):
        return host
    name = host.lstrip("$").strip("{}")
    text = (REPO / path).read_text(encoding="utf-8", errors="replace")
    m = re.search(rf"^{name}=\$\{{\w+:-([\w.:]+)\}}", text, re.M)
    return m.group(1) if m else host


def test_scripts_start_mlflow_servers_on_loopback():
    """Every ``mlflow server`` a script or test starts on this machine listens on 127.0.0.1
    (containers and pods are covered by tests/test_cluster_config.py)."""
    starts = []
    for path in repo_files(".sh", ".py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"mlflow[\"',\s]+server\b(.{0,600})", text, re.S):
            host = re.search(r"--host[\"',\s]+([\w.:\"$]+)", m.group(1))
            if host:
                starts.append((path.relative_to(REPO), host.group(1).strip("\"'")))
    assert starts, "no mlflow server start found: the search is broken"
    exposed = [f"{p}: --host {h}" for p, h in starts if loopback_default(p, h) != "127.0.0.1"]
    assert not exposed, f"mlflow server not on loopback: {exposed}"


def test_compose_publishes_mlflow_on_loopback_unless_told_otherwise():
    import yaml

    compose = yaml.safe_load((REPO / "cluster/mlflow/docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host_side = str(mapping).rsplit(":", 2)[0]
            default = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", host_side)
            assert default == "127.0.0.1", f"{name} publishes {mapping} beyond loopback by default"
