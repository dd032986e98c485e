"""The search: Ray Tune + Optuna TPE + ASHA over biometry heatmap models, tracked in MLflow.

    python search/run.py --num-samples 200                 # bundled HC18 sample, cpu or gpu preset
    python search/run.py --preset smoke --out /tmp/s       # 2 trials x 1 epoch, synthetic data
    python search/run.py --resume --name NAME              # continue an interrupted search

The command line and presets are :mod:`search.cli`, the driver (plan, run, summarize)
:mod:`search.driver`, the final retrain :mod:`search.final`.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python search/run.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

from search.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
