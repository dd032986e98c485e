"""Recorded learning curves: configurations drawn from the search space, each trained to the full
trial length at a cheap fidelity, every epoch's validation figures and wall time in one CSV.

    python benchmarks/curves/record.py --configs 200 --seed 0                # 64x96 -> curves.csv
    python benchmarks/curves/record.py --configs 12 --seed 0 --fidelity real  # 128x192 -> curves_real.csv

Configurations: scrambled Sobol points (``scipy.stats.qmc.Sobol``, seeded) in the unit cube, one
coordinate per Optuna parameter name of the space, turned into a trial config by the driver's own
define-by-run function (``search.space.SearchSpace.__call__``) through an Optuna study whose
sampler reads the point (``PointSampler``), so conditional parameters (width and depth per
``model.name``), zero switches and virtual keys come out exactly as in a search. Config ``-1`` is
the preset's own trial (the one the search enqueues first), sampled the way the driver enqueues
it (``SearchSpace.point_from_config``). Config ``k`` of seed ``s`` is the same at every fidelity,
so the real-size CSV pairs up with the cheap one.

Each configuration is the preset's base trial with the sampled keys set, at the fidelity's input
size, trained by ``trainables.train.run_trial`` without Ray on the project's subject split
(``trainables.data.prepare_splits``, decoded once per process), one torch thread, on the CPU.
Its rows are appended (one write, fsynced) when it finishes, so a killed run loses at most the
configuration in progress; a rerun of the same command skips every configuration already in the
CSV and continues. ``meta.json`` (``meta_real.json``) beside the CSV holds the command, seed,
fidelity, space, base trial, machine, git commit of every run and the count done.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/curves/record.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

HC18_DIR = REPO_ROOT.parent / "shared" / "data" / "hc18"
DEFAULT_PRESET = REPO_ROOT / "configs" / "presets" / "cpu.yaml"
FIDELITIES = {"cheap": (64, 96), "real": (128, 192)}
DEFAULT_FILES = {"cheap": ("curves.csv", "meta.json"), "real": ("curves_real.csv", "meta_real.json")}
BASE_ID = -1  # the preset's own trial

METRIC_COLUMNS = ["val_measure_l1_mm", "bpd_l1_mm", "ofd_l1_mm", "hc_l1_mm", "train_loss_total",
                  "lr", "epoch_seconds", "train_images_per_s"]
ID_COLUMNS = ["seed", "config_id", "source", "fidelity", "input_h", "input_w", "epoch", "status"]
TAIL_COLUMNS = ["load1", "host", "unix_time"]


# -- the trial config: the one place that knows how a recorded config becomes a TrialConfig ------

def trial_config(base_trial: dict, sampled: dict, *, data_path: str | None, input_hw: tuple[int, int],
                 epochs: int, num_workers: int, threads: int = 1, limit: int = 0):
    """The preset's base trial (its ``trial:`` section, as the driver hands it to every trial)
    with the sampled dotted keys set, then the recording's fixed settings: data, input size,
    trial length, one CPU thread."""
    from trainables.config import config_from_dict, with_overrides

    fixed = {"data.path": data_path, "data.input_h": input_hw[0], "data.input_w": input_hw[1],
             "train.epochs": epochs, "train.num_workers": num_workers, "train.threads": threads,
             "train.device": "cpu"}
    if limit:
        fixed["data.limit"] = limit
    # as the search's trainable applies a sample: a config without the mask channel drops the
    # mask steps and their sweep variants
    raw, _ = with_overrides(base_trial, {**sampled, **fixed})
    return config_from_dict(raw, source="recorded config")


# -- sampling through the driver's define-by-run space ---------------------------------------------

def sampler_names(space) -> list[str]:
    """Every Optuna parameter name ``space(trial)`` can ask for, in a fixed order: one Sobol
    coordinate each. Mirrors the names ``SearchSpace.__call__`` and ``Distribution.sample`` use
    (``search.space`` has no such list); ``PointSampler`` refuses a name missing here."""
    from search.space import sampler_name

    names: list[str] = []

    def add(dist, name: str) -> None:
        if dist.zero:
            names.append(f"{name}@enabled")
        names.append(name)

    for dist in space.params:
        add(dist, sampler_name(dist.key))
        for choice, deps in space.conditional.get(dist.key, {}).items():
            for dep in deps:
                add(dep, f"{dep.key}@{choice}")
    return names


def unit_to_value(u: float, dist) -> Any:
    """One coordinate in [0, 1) -> a value of an Optuna distribution (uniform in its own scale:
    log-uniform for ``log``, equal shares for choices and integer steps)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    u = min(max(float(u), 0.0), math.nextafter(1.0, 0.0))
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(u * len(dist.choices))]
    if isinstance(dist, IntDistribution):
        if dist.log:
            return min(dist.high, int(math.floor(math.exp(
                math.log(dist.low) + u * (math.log(dist.high + 1) - math.log(dist.low))))))
        n = (dist.high - dist.low) // dist.step + 1
        return dist.low + dist.step * int(u * n)
    if isinstance(dist, FloatDistribution):
        if dist.log:
            return float(math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low))))
        if dist.step:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            return float(dist.low + dist.step * int(u * n))
        return float(dist.low + u * (dist.high - dist.low))
    raise TypeError(f"unsupported distribution {dist!r}")


def make_point_sampler(point, names: list[str]):
    import optuna

    class PointSampler(optuna.samplers.BaseSampler):
        """Answers every parameter from one fixed point of the unit cube."""

        def __init__(self) -> None:
            self.dims = {name: i for i, name in enumerate(names)}

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            if param_name not in self.dims:
                raise KeyError(f"the space asked for '{param_name}', which sampler_names() does "
                               f"not list")
            return unit_to_value(point[self.dims[param_name]], param_distribution)

    return PointSampler()


def sobol_point(dim: int, seed: int, index: int):
    from scipy.stats import qmc

    engine = qmc.Sobol(d=dim, scramble=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the balance warning for n not a power of 2
        if index:
            engine.fast_forward(index)
        return engine.random(1)[0]


def sample_config(space, base_cfg, *, seed: int, config_id: int) -> tuple[dict, dict]:
    """``(overrides, params)``: the dotted keys a trial of the driver would receive (sampler
    names with ``@`` dropped, virtual keys expanded), and the sampled parameters as flat dotted
    keys of the space (``space.keys()``: a virtual key as its own number, a conditional key
    absent from another branch as None)."""
    import optuna

    from search.space import VIRTUAL_KEYS, sampler_name, trial_overrides

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if config_id == BASE_ID:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        study.enqueue_trial(space.point_from_config(base_cfg.flat()))
    else:
        names = sampler_names(space)
        study = optuna.create_study(sampler=make_point_sampler(
            sobol_point(len(names), seed, config_id), names))
    trial = study.ask()
    returned = space(trial)
    overrides = trial_overrides({**trial.params, **returned})  # what a Ray trial receives
    params = {}
    for key in space.keys():
        if key in VIRTUAL_KEYS:
            params[key] = trial.params.get(sampler_name(key))
        else:
            value = returned.get(key)
            params[key] = list(value) if isinstance(value, tuple) else value
    return overrides, params


# -- the CSV ----------------------------------------------------------------------------------------

def columns(space) -> list[str]:
    return ID_COLUMNS + METRIC_COLUMNS + TAIL_COLUMNS + list(space.keys())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    return str(value)


def read_done(path: Path, *, epochs: int) -> tuple[dict[tuple[int, int], list[dict]], int]:
    """Complete configs in the CSV, ``{(seed, config_id): rows}``, and the number of lines that
    belong to none (an incomplete config or a torn last line), which ``repair`` removes. A config
    is complete when its epochs 1..last are all there and the last is ``epochs`` or failed."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}, 0
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    reader = csv.DictReader(io.StringIO("".join(lines)))
    groups: dict[tuple[int, int], list[dict]] = {}
    total = 0
    for row in reader:
        total += 1
        try:
            key = (int(row["seed"]), int(row["config_id"]))
            int(row["epoch"])
        except (TypeError, ValueError, KeyError):
            continue
        if None in row.values() or None in row:  # too few or too many fields: torn
            continue
        groups.setdefault(key, []).append(row)
    done = {}
    for key, rows in groups.items():
        got = [int(r["epoch"]) for r in rows]
        last = rows[-1]
        if (got == list(range(1, len(rows) + 1))
                and (got[-1] == epochs or not last["status"].startswith("ok"))):
            done[key] = rows
    torn = len(text.splitlines()) - 1 - sum(len(r) for r in done.values())
    return done, torn


def repair(path: Path, header: list[str], done: dict) -> None:
    """Rewrite the CSV with only its complete configs (atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        for rows in done.values():
            writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerows({k: _cell(r.get(k)) for k in header} for r in rows)
    with path.open("a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


# -- the sidecar --------------------------------------------------------------------------------------

def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = git("status", "--porcelain", "--", "biometry", "trainables", "search", "configs",
                "benchmarks/curves/record.py")
    # the working tree's source as imported: uncommitted changes are named, not hidden
    return {"commit": git("rev-parse", "HEAD") or None, "dirty_source": bool(dirty),
            "dirty_files": [line[3:] for line in dirty.splitlines()]}


def command_line(argv: list[str]) -> str:
    script = Path(sys.argv[0] if sys.argv and sys.argv[0] else __file__).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        script = Path("benchmarks/curves/record.py")
    if script.name != "record.py":
        script = Path("benchmarks/curves/record.py")
    return " ".join(["python", str(script), *argv])


def canonical_command(args) -> str:
    """The command that regenerates the table from a checkout (default data, files and preset)."""
    parts = ["python benchmarks/curves/record.py", f"--configs {args.start + args.configs}",
             f"--seed {args.seed}"]
    if args.fidelity != "cheap":
        parts.append(f"--fidelity {args.fidelity}")
    return " ".join(parts)


def write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def _sampled(space_raw: Any) -> dict:
    """The part of a space file that decides what is sampled."""
    space_raw = space_raw or {}
    return {"params": space_raw.get("params"), "conditional": space_raw.get("conditional")}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the recording -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python benchmarks/curves/record.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=int, required=True,
                   help="Sobol configs to have recorded: ids START .. START+N-1")
    p.add_argument("--seed", type=int, default=0, help="Sobol scramble seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="first Sobol index (default 0)")
    p.add_argument("--fidelity", choices=sorted(FIDELITIES), default="cheap",
                   help="cheap: 64x96 into curves.csv; real: 128x192 into curves_real.csv")
    p.add_argument("--no-base", action="store_true",
                   help="do not record the preset's own trial (config -1)")
    p.add_argument("--preset", default=str(DEFAULT_PRESET), help="preset YAML (default: cpu)")
    p.add_argument("--space", help="search space YAML (default: the preset's search.space)")
    p.add_argument("--data", default=str(HC18_DIR), help="HC18 folder (default ../shared/data/hc18)")
    p.add_argument("--epochs", type=int, help="trial length (default: the preset's train.epochs)")
    p.add_argument("--input-hw", help="HxW instead of the fidelity's (tests)")
    p.add_argument("--limit", type=int, default=0, help="data.limit (tests)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--out", help="CSV (default benchmarks/curves/curves.csv or curves_real.csv)")
    p.add_argument("--meta", help="sidecar JSON (default meta.json or meta_real.json beside it)")
    p.add_argument("--resume", action="store_true",
                   help="accepted for clarity: configs already in the CSV are always skipped")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from biometry.errors import BiometryInputError

    try:
        return record(args, argv)
    except BiometryInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def record(args, argv: list[str]) -> int:
    import torch

    from benchmarks._common import machine_info
    from search.space import load_space
    from trainables.data import prepare_splits
    from trainables.train import run_trial
    from biometry.errors import BiometryInputError

    torch.set_num_threads(1)
    preset_path = Path(args.preset)
    preset = yaml.safe_load(preset_path.read_text()) or {}
    base_trial = preset.get("trial") or {}
    space_path = Path(args.space or (preset.get("search") or {}).get(
        "space", "configs/search/default.yaml"))
    if not space_path.is_absolute():
        space_path = REPO_ROOT / space_path
    space_raw = yaml.safe_load(space_path.read_text())
    space = load_space(space_path)
    epochs = args.epochs or int((base_trial.get("train") or {}).get("epochs", 30))
    if args.input_hw:
        h, _, w = args.input_hw.lower().partition("x")
        input_hw = (int(h), int(w))
    else:
        input_hw = FIDELITIES[args.fidelity]
    csv_name, meta_name = DEFAULT_FILES[args.fidelity]
    out = Path(args.out) if args.out else HERE / csv_name
    meta_path = Path(args.meta) if args.meta else (
        out.parent / meta_name if not args.out else out.with_suffix(".json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    data_path = str(Path(args.data).resolve()) if args.data else None

    def build(sampled: dict):
        return trial_config(base_trial, sampled, data_path=data_path, input_hw=input_hw,
                            epochs=epochs, num_workers=args.num_workers, limit=args.limit)

    base_cfg = build({})
    settings = {"fidelity": args.fidelity, "input_hw": list(input_hw), "epochs": epochs,
                "data": _data_name(data_path), "limit": args.limit, "num_workers": args.num_workers,
                "threads": 1, "device": "cpu", "split_seed": base_cfg.data.split_seed,
                "val_fraction": base_cfg.data.val_fraction,
                "test_fraction": base_cfg.data.test_fraction}

    lock = open(out.with_name(out.name + ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BiometryInputError(f"{out}: another record.py is writing it") from None

    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta:
            # what is sampled must be the same; other sections of the space file may change
            if _sampled(meta.get("space_raw")) != _sampled(space_raw):
                raise BiometryInputError(f"{space_path}: its params/conditional differ from the "
                                         f"space {out} was recorded with (meta space_raw); "
                                         f"record into another --out")
            for key, value in settings.items():
                if meta.get("settings", {}).get(key) != value:
                    raise BiometryInputError(f"{out}: recorded with {key}={meta['settings'].get(key)!r}"
                                             f", this run asks for {value!r}; use another --out")
        header = columns(space)
        done, torn = read_done(out, epochs=epochs)
        if out.is_file():
            with out.open() as f:
                existing = next(csv.reader(f), None)
            if existing and existing != header:
                raise BiometryInputError(f"{out}: its columns differ from this space's; use another --out")
        if torn:
            print(f"{out}: dropping {torn} line(s) of an unfinished config", flush=True)
            repair(out, header, done)

        # the configs recorded so far must still sample to the same params (same space, same code)
        for (seed, cid), rows in list(done.items())[:3]:
            _, params = sample_config(space, base_cfg, seed=seed, config_id=cid)
            for key, value in params.items():
                if _cell(value) != rows[0][key]:
                    raise BiometryInputError(f"{out}: config {cid} (seed {seed}) now samples {key}="
                                             f"{_cell(value)!r}, recorded {rows[0][key]!r}; the "
                                             f"sampling changed, use another --out")

        wanted = ([] if args.no_base else [BASE_ID]) + list(range(args.start, args.start + args.configs))
        todo = [cid for cid in wanted if (args.seed, cid) not in done]
        host = socket.gethostname()
        run_info = {"started_utc": _now(), "host": host, **git_state(), "argv": argv,
                    "base_trial_sha256": _sha(base_trial), "configs_recorded": 0}
        meta.setdefault("runs", []).append(run_info)
        meta.update({
            "benchmark": "learning curves (issue 24)", "csv": _rel(out), "fidelity": args.fidelity,
            "seed": args.seed, "settings": settings, "preset": _rel(preset_path),
            "space": _rel(space_path), "space_sha256": _sha(_sampled(space_raw)),
                "space_raw": space_raw,
            "base_trial": base_trial, "base_trial_sha256": _sha(base_trial),
            "sampler": "scrambled Sobol (scipy.stats.qmc.Sobol, seed = --seed), one coordinate per "
                       "Optuna parameter name, through search.space.SearchSpace.__call__; config -1 "
                       "is the preset's trial (SearchSpace.point_from_config)",
            "columns": header, "command": command_line(argv),
            "regenerate": canonical_command(args), "machine": machine_info(),
        })

        def refresh_meta() -> None:
            now_done, _ = read_done(out, epochs=epochs)
            per_config = [sum(float(r["epoch_seconds"] or 0) for r in rows)
                          for rows in now_done.values() if rows[-1]["status"] == "ok"]
            meta.update({
                "configs_done": len(now_done),
                "configs_failed": sum(1 for rows in now_done.values() if rows[-1]["status"] != "ok"),
                "sobol_configs_done": sum(1 for (_, cid) in now_done if cid != BASE_ID),
                "rows": sum(len(rows) for rows in now_done.values()),
                "median_train_seconds_per_config": (round(statistics.median(per_config), 1)
                                                    if per_config else None),
                "updated_utc": _now(),
            })
            run_info["updated_utc"] = meta["updated_utc"]
            write_meta(meta_path, meta)

        refresh_meta()
        print(f"{len(done)} config(s) already in {out}; {len(todo)} to record "
              f"({args.fidelity}, {input_hw[0]}x{input_hw[1]}, {epochs} epochs, seed {args.seed})",
              flush=True)
        if not todo:
            return 0

        data = None
        failures_in_a_row = 0
        for cid in todo:
            overrides, params = sample_config(space, base_cfg, seed=args.seed, config_id=cid)
            cfg = build(overrides)
            if data is None:
                started = time.perf_counter()
                data = prepare_splits(cfg.data)
                print(f"data: {len(data.train.landmarks)} train / {len(data.val.landmarks)} val images "
                      f"at {input_hw[0]}x{input_hw[1]} in {time.perf_counter() - started:.1f}s",
                      flush=True)
            common = {"seed": args.seed, "config_id": cid, "source": "base" if cid == BASE_ID else "sobol",
                      "fidelity": args.fidelity, "input_h": input_hw[0], "input_w": input_hw[1],
                      "host": host, **params}
            rows: list[dict] = []

            def reporter(metrics: dict, _checkpoint_dir) -> None:
                rows.append({**common, "epoch": int(metrics["epoch"]), "status": "ok",
                             **{k: metrics.get(k) for k in METRIC_COLUMNS},
                             "load1": round(os.getloadavg()[0], 2), "unix_time": int(time.time())})

            label = ", ".join(f"{k}={_cell(v)}" for k, v in params.items() if v is not None)
            print(f"config {cid}: {label}", flush=True)
            started = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory(prefix="curve-") as tmp:
                    run_trial(cfg, data=data, out_dir=tmp, reporter=reporter, log=_quiet)
                failures_in_a_row = 0
            except Exception as err:  # noqa: BLE001 - a failed config is a recorded outcome
                traceback.print_exc()
                rows.append({**common, "epoch": len(rows) + 1,
                             "status": f"failed:{type(err).__name__}",
                             "load1": round(os.getloadavg()[0], 2), "unix_time": int(time.time())})
                failures_in_a_row = 0 if isinstance(err, FloatingPointError) else failures_in_a_row + 1
            append_rows(out, header, rows)
            run_info["configs_recorded"] += 1
            refresh_meta()
            last = rows[-1]
            print(f"config {cid} done in {time.perf_counter() - started:.0f}s: {last['status']}, "
                  f"final {_cell(last.get('val_measure_l1_mm'))} mm, "
                  f"best {_cell(min((r['val_measure_l1_mm'] for r in rows if r.get('val_measure_l1_mm') is not None), default=None))} mm, "
                  f"load {last['load1']}; {meta['configs_done']} in {out.name}", flush=True)
            if failures_in_a_row >= 3:
                print("three configs in a row failed with an error other than a diverging loss: "
                      "stopping (see the tracebacks above)", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        lock.close()  # releases the lock (in-process callers: tests)


def _quiet(message: str) -> None:
    print(f"  {message}", flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _data_name(path: str | None) -> str | None:
    """The data folder as recorded: relative to the repository, or from its ``shared`` folder on
    (``shared/data/hc18``), so a resume from another checkout or clone of the same layout
    matches."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO_ROOT):
        return str(resolved.relative_to(REPO_ROOT))
    parts = resolved.parts
    if "shared" in parts:
        return str(Path(*parts[parts.index("shared"):]))
    return str(resolved)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
