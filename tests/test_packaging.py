"""Presets and search spaces ship inside the package: a wheel built from the repository holds
them, and the code installed from it finds them through importlib.resources, far from any
source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("biometry", "search", "trainables", "configs")
SHIPPED = {"configs/presets/cpu.yaml", "configs/presets/gpu.yaml", "configs/presets/smoke.yaml",
           "configs/search/default.yaml", "configs/search/gpu.yaml", "configs/search/smoke.yaml"}


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the repository (the build writes beside its sources)."""
    src = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, text=True, timeout=300)
    return next((tmp_path / "dist").glob("*.whl"))


def test_presets_and_spaces_are_package_data_found_where_the_package_is_installed(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert SHIPPED <= set(archive.namelist())
        archive.extractall(tmp_path / "site")  # what pip install puts in site-packages

    code = ("from search.cli import load_preset, space_file\n"
            "for name in ('cpu', 'gpu', 'smoke'):\n"
            "    print(space_file(load_preset(name).search.space))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    spaces = [Path(line) for line in proc.stdout.split()]
    assert spaces and all(p.is_file() and p.is_relative_to(tmp_path / "site") for p in spaces)
