"""The model folders of ``tests/data/legacy_model``, made loadable.

Their weights are committed as ``weights.npz`` (plain arrays; no ``model.pt`` in git, which
ignores generated checkpoints). :func:`legacy_root` copies the folders once per test process into
a temporary folder and writes each ``model.pt`` from those arrays, so the folders load exactly as
the code of commit 8df38f3 saved them.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).resolve().parent / "data" / "legacy_model"


@functools.cache
def legacy_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="legacy-model-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / "legacy_model"
    shutil.copytree(SOURCE, target)
    for arrays in target.glob("*/weights.npz"):
        with np.load(arrays) as saved:
            state = {key: torch.from_numpy(saved[key].copy()) for key in saved.files}
        torch.save(state, arrays.with_name("model.pt"))
        arrays.unlink()
    return target
