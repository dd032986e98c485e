"""Log single trainings (``python -m trainables.train``) into MLflow, for docs/experiments.md.

    python benchmarks/log_experiment.py --store runs/exp/mlflow.db --experiment accuracy-recipe \\
        e21=runs/exp/e21 e22=runs/exp/e22

Each ``NAME=FOLDER`` is a training's output folder (``metrics.json``, ``best/model.yaml``) with its
console log beside it as ``FOLDER.log``. One run per training: the trial config as params, every
epoch's validation figures from the log as metric steps, the best epoch's metrics, and any
``benchmarks/results/zoom_stress_NAME*.json`` as ``zoom_*`` metrics. Prints the run ids.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ .*val_measure_l1_mm ([\d.]+)\s+bpd ([\d.]+)\s+"
                        r"ofd ([\d.]+)\s+hc ([\d.]+) mm")


def epoch_curve(log: Path) -> list[tuple[int, dict[str, float]]]:
    """(epoch, {metric: value}) for every epoch line of a training log."""
    curve = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        match = EPOCH_LINE.search(line)
        if match:
            epoch, value, bpd, ofd, hc = match.groups()
            curve.append((int(epoch), {"val_measure_l1_mm": float(value), "bpd_l1_mm": float(bpd),
                                       "ofd_l1_mm": float(ofd), "hc_l1_mm": float(hc)}))
    return curve


def zoom_metrics(name: str) -> dict[str, float]:
    out = {}
    for path in sorted((REPO / "benchmarks/results").glob(f"zoom_stress_{name}*.json")):
        tag = path.stem.removeprefix(f"zoom_stress_{name}").strip("-_") or "model"
        for row in json.loads(path.read_text())["results"]:
            for key in ("bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm"):
                out[f"zoom_{tag}_{row['zoom']}_{key}".replace("=", "")] = row[key]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "runs/exp/mlflow.db"))
    p.add_argument("--experiment", default="accuracy-recipe")
    p.add_argument("runs", nargs="+", metavar="NAME=FOLDER")
    args = p.parse_args()

    import mlflow
    from trainables.config import config_from_dict

    mlflow.set_tracking_uri(f"sqlite:///{Path(args.store).resolve()}")
    mlflow.set_experiment(args.experiment)
    for item in args.runs:
        name, _, folder = item.partition("=")
        folder = Path(folder)
        spec = yaml.safe_load((folder / "best/model.yaml").read_text())
        best = json.loads((folder / "metrics.json").read_text())
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params(config_from_dict(spec["trial_config"]).flat())
            for epoch, values in epoch_curve(folder.with_suffix(".log")):
                mlflow.log_metrics(values, step=epoch)
            mlflow.log_metrics({f"best_{k}": v for k, v in best.items()
                                if isinstance(v, (int, float)) and k != "epochs"})
            mlflow.log_metrics(zoom_metrics(name))
            mlflow.set_tags({"output": str(folder.resolve()), "head_scale": json.dumps(
                spec.get("head_scale") or {})})
        print(f"{name}: {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
