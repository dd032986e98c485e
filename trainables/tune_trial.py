"""The trial as a Ray Tune function trainable. Every Ray call made inside a trial is here."""
from __future__ import annotations

from pathlib import Path

import ray
from ray import tune

from trainables.config import config_from_dict, with_overrides
from trainables.data import PreparedSplits
from trainables.faults import faults_from_env
from trainables.train import run_trial


def tune_trainable(config: dict, *, data: PreparedSplits, base_config: dict) -> None:
    """Ray Tune entry point: ``config`` holds the sampled dotted keys (``"loss.angle_weight"``),
    ``base_config`` the preset's trial config. Resumes from ``tune.get_checkpoint()``."""
    raw, dropped = with_overrides(base_config, config)
    cfg = config_from_dict(raw, source="search space")
    if dropped:
        _quiet(f"loss.mask_weight 0: this trial runs without the mask steps {', '.join(dropped)}")

    node_id = ray.get_runtime_context().get_node_id()  # where the trial ran (multi-node checks)

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report({**metrics, "node_id": node_id},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    hooks = faults_from_env()  # None unless the reliability tests set BIOMETRY_FAULT
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(cfg, data=data, out_dir=Path.cwd(), reporter=report, log=_quiet, hooks=hooks)
        return
    with checkpoint.as_directory() as folder:
        run_trial(cfg, data=data, out_dir=Path.cwd(), reporter=report, resume_from=folder,
                  log=_quiet, hooks=hooks)


def _quiet(message: str) -> None:
    """Per-epoch lines go to the trial's log file; the terminal shows Tune's table."""
    print(message, flush=True)
