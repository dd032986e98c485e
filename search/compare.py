"""Compare the trials of a search: the best trials from MLflow, Optuna importances and plots.

    python search/compare.py runs/NAME                      # a run folder
    python search/compare.py NAME --mlflow-uri http://...   # an MLflow experiment
    python search/compare.py runs/NAME --top 20 --out /tmp/cmp

A run folder is read through its ``search.json`` (tracking URI, name) and ``optuna.journal`` (the
study, named NAME); an experiment name is looked up on ``--mlflow-uri`` (default: MLflow's tracking
URI) and its Optuna study is rebuilt from the trial runs' params and ``best_val_measure_l1_mm``.
Writes to ``--out`` (default ``RUN_DIR/compare``, or ``./compare-NAME``):

- ``top_trials.csv`` / ``top_trials.md``: the top K trial runs (tag ``role=trial``) by
  ``best_val_measure_l1_mm``, their params and every mm metric (plus ``nme``, ``unc_spearman``,
  ``aurc``) at each trial's best epoch;
- ``param_importances.csv`` and ``.png`` (fANOVA; skipped with a note below two completed trials),
  ``optimization_history.png``, ``parallel_coordinate.png``; the same plots as ``.html`` when
  plotly is installed; ``index.html`` with the table and the PNGs;

and logs them all as artifacts (``compare/``) of the search's parent run (tag ``role=search``).
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python search/compare.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402

from biometry.constants import BEST_OBJECTIVE, OBJECTIVE  # noqa: E402
from biometry.errors import BiometryInputError, run_cli  # noqa: E402

EXTRA_METRICS = ("nme", "unc_spearman", "aurc")
PRINTED_METRICS = (("BPD", "bpd_l1_mm"), ("OFD", "ofd_l1_mm"), ("HC", "hc_l1_mm"),
                   ("mean", OBJECTIVE))
ARTIFACT_PATH = "compare"


@dataclass
class Source:
    """Where a search's results live."""

    name: str
    tracking_uri: str
    run_dir: Path | None = None
    journal: Path | None = None
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python search/compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="RUN_DIR_OR_EXPERIMENT",
                   help="a run folder (runs/NAME) or an MLflow experiment name")
    p.add_argument("--top", type=int, default=10, metavar="K", help="trials in the table "
                                                                    "(default 10)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: the run folder's, else "
                                        "MLflow's default)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/compare or "
                                            "./compare-NAME)")
    p.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: compare(args), debug=args.debug)


def compare(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise BiometryInputError(f"--top must be >= 1 but got {args.top}")
    source = resolve_source(args.target, mlflow_uri=args.mlflow_uri)
    client, experiment_id = open_experiment(source)
    out = args.out or (source.run_dir / "compare" if source.run_dir
                       else Path(f"compare-{_safe_name(source.name)}"))

    runs = trial_runs(client, experiment_id)
    if not runs:
        raise BiometryInputError(f"experiment {source.name!r} on {source.tracking_uri}: no trial "
                                 f"runs (tags.role = 'trial')")
    table = top_table(client, runs, top=args.top)
    study = load_study(source, runs)

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "top_trials.csv", index=False)
    importances = param_importances(study, source.notes)
    if importances is not None:
        pd.DataFrame({"param": list(importances), "importance": list(importances.values())}
                     ).to_csv(out / "param_importances.csv", index=False)
    plots = write_plots(study, out, source.notes, with_importances=importances is not None)
    (out / "top_trials.md").write_text(markdown(table, source, importances), encoding="utf-8")
    (out / "index.html").write_text(index_html(table, source, plots), encoding="utf-8")

    print(text_table(table, source, total=len(runs)))
    if importances:
        print("param importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    for note in source.notes:
        print(f"note: {note}")
    print(f"wrote {out}")
    if args.no_log:
        return 0
    return log_to_parent(client, experiment_id, source, out)


# ---------------------------------------------------------------------------------------------
# Where the search is
# ---------------------------------------------------------------------------------------------


def resolve_source(target: str, *, mlflow_uri: str | None) -> Source:
    path = Path(target)
    if path.is_dir():
        info_path = path / "search.json"
        if not info_path.is_file():
            raise BiometryInputError(f"{path}: not a run folder (search.json missing)")
        try:
            info = json.loads(info_path.read_text())
            name = info["name"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BiometryInputError(f"{info_path}: unreadable ({type(err).__name__}: "
                                     f"{err})") from None
        uri = (mlflow_uri or info.get("tracking_uri")
               or f"sqlite:///{(path / 'mlflow.db').resolve()}")
        journal = path / "optuna.journal"
        return Source(name=name, tracking_uri=uri, run_dir=path.resolve(),
                      journal=journal if journal.is_file() else None)
    import mlflow

    uri = mlflow_uri or mlflow.get_tracking_uri()
    store = _sqlite_file(uri)
    if store is not None and not store.is_file():
        raise BiometryInputError(f"{target}: not a run folder, and no MLflow store at {store} to "
                                 f"look the experiment up in (pass --mlflow-uri)")
    return Source(name=target, tracking_uri=uri)


def open_experiment(source: Source):
    from mlflow.tracking import MlflowClient

    from search.tracking import check_tracking_uri

    store = _sqlite_file(source.tracking_uri)
    if store is not None and not store.is_file():  # MLflow would create an empty store
        raise BiometryInputError(f"{source.tracking_uri}: no MLflow store at {store}")
    check_tracking_uri(source.tracking_uri)
    client = MlflowClient(tracking_uri=source.tracking_uri)
    experiment = client.get_experiment_by_name(source.name)
    if experiment is None:
        raise BiometryInputError(f"{source.name}: no MLflow experiment of that name on "
                                 f"{source.tracking_uri} (and not a run folder)")
    return client, experiment.experiment_id


def trial_runs(client, experiment_id: str) -> list:
    """Every trial run, best first (runs without the metric last)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="tags.role = 'trial'",
                                  order_by=[f"metrics.{BEST_OBJECTIVE} ASC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def top_table(client, runs: list, *, top: int) -> pd.DataFrame:
    """One row per trial (the best ``top``): ids, params, metrics at the trial's best epoch."""
    params = sorted({k for r in runs for k in r.data.params})
    rows = []
    for rank, run in enumerate(runs[:top], start=1):
        metrics, step = best_epoch_metrics(client, run)
        row = {"rank": rank, "trial_id": run.data.tags.get("ray_trial_id", ""),
               "run_id": run.info.run_id, "status": run.info.status,
               BEST_OBJECTIVE: run.data.metrics.get(BEST_OBJECTIVE, math.nan),
               "best_epoch": step,
               "epochs": _int_or_none(run.data.metrics.get("training_iteration"))}
        row.update({k: _number_or_text(run.data.params.get(k)) for k in params})
        row.update(metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    metric_columns = sorted({k for r in rows for k in r if _is_reported_metric(k)},
                            key=_metric_order)
    front = ["rank", "trial_id", "run_id", "status", BEST_OBJECTIVE, "best_epoch", "epochs"]
    return frame[front + params + metric_columns]


def best_epoch_metrics(client, run) -> tuple[dict[str, float], int | None]:
    """The mm metrics (and nme, unc_spearman, aurc) at the epoch with the lowest objective; the
    latest values when the objective has no history."""
    latest = {k: v for k, v in run.data.metrics.items() if _is_reported_metric(k)}
    history = client.get_metric_history(run.info.run_id, OBJECTIVE)
    finite = [m for m in history if math.isfinite(m.value)]
    if not finite:
        return latest, None
    step = min(finite, key=lambda m: (m.value, m.step)).step
    out = {}
    for key in latest:
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)
                  if m.step == step]
        out[key] = values[-1] if values else math.nan
    return out, step


def _is_reported_metric(key: str) -> bool:
    return (key.endswith("_mm") and not key.startswith("best_")) or key in EXTRA_METRICS


MEASURE_ORDER = ("val", "bpd", "ofd", "hc")
STAT_ORDER = ("l1_mm", "median_mm", "bias_mm", "sd_mm", "loa_low_mm", "loa_high_mm")


def _metric_order(key: str) -> tuple:
    """val_measure_l1_mm, then BPD/OFD/HC with l1, median, bias, sd, loa_low, loa_high, then
    anything else by name."""
    head, _, stat = key.partition("_")
    if head in MEASURE_ORDER:
        rank = STAT_ORDER.index(stat) if stat in STAT_ORDER else len(STAT_ORDER)
        return (MEASURE_ORDER.index(head), rank, key)
    return (len(MEASURE_ORDER), 0, key)


def text_table(table: pd.DataFrame, source: Source, *, total: int) -> str:
    params = [c for c in table.columns if "." in c]
    lines = [f"search {source.name}: top {len(table)} of {total} trials by {BEST_OBJECTIVE} "
             f"(mm, at each trial's best epoch; all metrics in top_trials.csv)"]
    header = f"{'#':>3} {'trial':<14}{'epoch':>6}" + "".join(f"{t:>8}" for t, _ in PRINTED_METRICS)
    lines.append(header + "  params")
    for _, row in table.iterrows():
        cells = "".join(f"{_fmt(row.get(k)):>8}" for _, k in PRINTED_METRICS)
        epoch = "-" if pd.isna(row["best_epoch"]) else str(int(row["best_epoch"]))
        described = ", ".join(f"{p}={_fmt(row[p])}" for p in params)
        lines.append(f"{int(row['rank']):>3} {str(row['trial_id'])[:13]:<14}{epoch:>6}{cells}  "
                     f"{described}")
    return "\n".join(lines)


def markdown(table: pd.DataFrame, source: Source, importances: dict | None) -> str:
    lines = [f"# Search {source.name}: top {len(table)} trials",
             "", f"Tracking URI: `{source.tracking_uri}`. Metrics in mm at each trial's best "
             f"epoch, sorted by `{BEST_OBJECTIVE}`.", ""]
    columns = [c for c in table.columns if c != "run_id"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    if importances:
        lines += ["", "## Parameter importances (fANOVA)", "", "| param | importance |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    if source.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in source.notes]
    return "\n".join(lines) + "\n"


def index_html(table: pd.DataFrame, source: Source, plots: list[Path]) -> str:
    body = [f"<h1>Search {html.escape(source.name)}</h1>",
            f"<p>Top {len(table)} trials by {BEST_OBJECTIVE} (mm, at each trial's best epoch). "
            f"Tracking URI: <code>{html.escape(source.tracking_uri)}</code></p>",
            table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")]
    body += [f"<p>{html.escape(n)}</p>" for n in source.notes]
    for plot in plots:
        if plot.suffix == ".png":
            body.append(f'<h2>{html.escape(plot.stem.replace("_", " "))}</h2>'
                        f'<img src="{html.escape(plot.name)}" style="max-width:100%">')
        else:
            body.append(f'<p><a href="{html.escape(plot.name)}">{html.escape(plot.name)} '
                        f'(interactive)</a></p>')
    head = f"<meta charset='utf-8'><title>{html.escape(source.name)}</title>"
    return (f"<!doctype html><html><head>{head}</head><body>" + "\n".join(body)
            + "</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Optuna: the study, importances and plots
# ---------------------------------------------------------------------------------------------


def load_study(source: Source, runs: list):
    """The search's Optuna study from its journal, else rebuilt from the MLflow trial runs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if source.journal is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(source.journal)))
        try:
            return optuna.load_study(study_name=source.name, storage=storage)
        except KeyError:
            source.notes.append(f"{source.journal} holds no study named {source.name}; the study "
                                f"was rebuilt from the MLflow trial runs")
    else:
        source.notes.append("no Optuna journal: the study was rebuilt from the MLflow trial runs "
                            "(params and best_val_measure_l1_mm; ranges from the values seen)")
    return study_from_runs(source.name, runs)


def study_from_runs(name: str, runs: list):
    """An in-memory study with one COMPLETE trial per run that has the objective, in start
    order; numeric params get a float range over the values seen (log when all are positive and
    span more than a factor 10), others a categorical one."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = sorted((r for r in runs if math.isfinite(r.data.metrics.get(BEST_OBJECTIVE, math.nan))),
                  key=lambda r: r.info.start_time or 0)
    values: dict[str, list] = {}
    for r in done:
        for k, v in r.data.params.items():
            values.setdefault(k, []).append(_number_or_text(v))
    distributions = {}
    for k, vs in values.items():
        if all(isinstance(v, float) for v in vs):
            low, high = min(vs), max(vs)
            distributions[k] = FloatDistribution(low, high, log=low > 0 and high / low > 10)
        else:
            distributions[k] = CategoricalDistribution(sorted({str(v) for v in vs}))
    study = optuna.create_study(study_name=name, direction="minimize")
    for r in done:
        params = {k: (_number_or_text(v) if isinstance(distributions[k], FloatDistribution)
                      else str(v)) for k, v in r.data.params.items()}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=r.data.metrics[BEST_OBJECTIVE]))
    return study


def param_importances(study, notes: list[str]) -> dict[str, float] | None:
    """fANOVA importances, or None with a one-line note when they cannot be computed."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        notes.append(f"parameter importances need at least 2 completed trials (have "
                     f"{len(complete)})")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as err:
        notes.append(f"parameter importances unavailable: {str(err).splitlines()[0]}")
        return None
    if not importances:
        notes.append("parameter importances unavailable: no parameter varies across the "
                     "completed trials")
        return None
    return {k: float(v) for k, v in importances.items()}


PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")
PLOT_SIZES = {"parallel_coordinate": (11, 5.5)}


def write_plots(study, out: Path, notes: list[str], *, with_importances: bool) -> list[Path]:
    """PNG (matplotlib, Agg) and, with plotly installed, HTML of the Optuna plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    names = [p for p in PLOTS if with_importances or p != "param_importances"]
    has_plotly = importlib.util.find_spec("plotly") is not None
    if not has_plotly:
        notes.append("plotly is not installed: plots written as PNG only (pip install plotly "
                     "for the interactive HTML versions)")
    written = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning, empty-study warnings
            try:
                ax = getattr(vis_mpl, f"plot_{name}")(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(*PLOT_SIZES.get(name, (8, 5)))
                fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
                written.append(out / f"{name}.png")
                if has_plotly:
                    getattr(vis, f"plot_{name}")(study).write_html(
                        out / f"{name}.html", include_plotlyjs="directory")
                    written.append(out / f"{name}.html")
            except (ValueError, RuntimeError) as err:
                notes.append(f"{name} plot skipped: {str(err).splitlines()[0]}")
    return written


# ---------------------------------------------------------------------------------------------
# MLflow: log back to the parent run
# ---------------------------------------------------------------------------------------------


def log_to_parent(client, experiment_id: str, source: Source, out: Path) -> int:
    parents = client.search_runs([experiment_id], filter_string="tags.role = 'search'",
                                 max_results=100)
    named = [r for r in parents if r.data.tags.get("search_name") == source.name]
    parent = (named or parents or [None])[0]
    if parent is None:
        print(f"warning: no parent run (tags.role = 'search') in experiment {source.name}; "
              f"outputs not logged to MLflow", file=sys.stderr)
        return 0
    try:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path=ARTIFACT_PATH)
    except Exception as err:  # a store or server failure must not hide the written files
        print(f"error: logging {out} to MLflow run {parent.info.run_id} failed "
              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the "
              f"files are in {out}", file=sys.stderr)
        return 1
    print(f"logged to MLflow run {parent.info.run_id} (artifacts {ARTIFACT_PATH}/)")
    return 0


# ---------------------------------------------------------------------------------------------


def _number_or_text(value):
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else value


def _int_or_none(value):
    return None if value is None or not math.isfinite(value) else int(value)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}".rstrip(
            "0").rstrip(".")
    return str(value)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "experiment"


if __name__ == "__main__":
    sys.exit(main())
