"""Shared fixtures: the real HC18 folder beside the repo, and small synthetic data sets."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HC18_DIR = REPO_ROOT.parent / "shared" / "data" / "hc18"


@pytest.fixture(scope="session")
def hc18_dir() -> Path:
    assert HC18_DIR.is_dir(), f"{HC18_DIR} is missing: CI provides ../shared beside the repo"
    return HC18_DIR


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory) -> Path:
    """A 24-image synthetic landmark data set (landmark CSV + PNGs), made once per session."""
    from biometry.io import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=24, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs, no dashboard) for the in-process search tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
