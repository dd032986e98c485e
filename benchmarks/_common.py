"""Shared helpers for the benchmark scripts: the machine description, load averages, medians and
the JSON writer into ``benchmarks/results/``.

Every figure a benchmark prints is written with the machine it came from (platform, CPU model,
cores, library versions, date) and the load average before and after the measurement, because
the machines these run on are shared and timings move with the load.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
HC18_DIR = REPO_ROOT.parent / "shared" / "data" / "hc18"

if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

NO_GPU_NOTE = ("no GPU: this machine has none and no GPU device was lent to this task, so the GPU "
               "figures were not measured; rerun on a GPU machine (see benchmarks/README.md)")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing or broken package is just "not installed"
        return None
    return getattr(mod, "__version__", "unknown")


def gpu_description() -> dict[str, Any]:
    """What torch sees: CUDA device names, or none."""
    try:
        import torch
    except ImportError:
        return {"available": False, "devices": []}
    if not torch.cuda.is_available():
        return {"available": False, "devices": []}
    return {"available": True,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on; stored beside every figure."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "memory_gib": mem_gib,
        "gpu": gpu_description(),
        "versions": {name: _version(name) for name in ("torch", "ray", "optuna", "mlflow",
                                                       "numpy", "albumentations")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
    }


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


class LoadWindow:
    """Context manager that records the load average before and after a measurement::

        with LoadWindow() as window:
            ...measure...
        record["load"] = window.as_dict()
    """

    def __enter__(self) -> "LoadWindow":
        self.before = load_average()
        self.started = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self.after = load_average()
        self.seconds = time.time() - self.started

    def as_dict(self) -> dict[str, Any]:
        return {"load_before": self.before, "load_after": getattr(self, "after", None),
                "wall_s": round(getattr(self, "seconds", math.nan), 2)}


def write_result(name: str, payload: dict[str, Any], *, out_dir: Path | None = None,
                 smoke: bool = False) -> Path:
    """Write ``payload`` plus the machine description to ``RESULTS_DIR/name.json`` (smoke runs to
    ``name.smoke.json`` so they never overwrite a real figure). Atomic."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}.smoke.json" if smoke else f"{name}.json")
    body = {"benchmark": name, "smoke": smoke, "command": command_line(),
            "machine": machine_info(), **payload}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(body), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def _jsonable(value: Any) -> Any:
    """NaN/inf become None (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Running our search (search/run.py) as a user would, and reading what Ray wrote


def write_search_files(folder: Path, *, trial: dict[str, Any], search: dict[str, Any],
                       space: dict[str, Any]) -> Path:
    """A preset YAML (``trial:`` + ``search:``) and its space YAML in ``folder``; returns the
    preset's path. ``search["space"]`` is set to the space file's absolute path."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    space_path = folder / "space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    preset_path = folder / "preset.yaml"
    preset_path.write_text(yaml.safe_dump({"trial": trial,
                                           "search": {**search, "space": str(space_path)}},
                                          sort_keys=False))
    return preset_path


def fixed_space(values: dict[str, Any]) -> dict[str, Any]:
    """A search space in which every parameter has exactly one choice."""
    return {"params": {key: {"choices": [value]} for key, value in values.items()}}


def run_search_command(*, preset: Path, out: Path, name: str, data: str | None = None,
                       extra: list[str] | None = None, log_path: Path | None = None,
                       timeout: float | None = None, num_cpus: int = 2,
                       in_process: bool = False, reuse_actors: bool = False) -> dict[str, Any]:
    """``search.run.main(["--preset", P, "--out", OUT, "--name", NAME, ...])`` in a fresh process
    with its own local Ray cluster of ``num_cpus`` CPUs and no dashboard (see ``_search_driver``).
    Returns the wall time, exit code and load average around it. ``reuse_actors=True`` is a
    what-if: the driver patches ``TuneConfig(reuse_actors=True)`` into ``search.tune_api`` (the
    product passes False), to measure what a new worker process per trial costs."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "search", "--num-cpus", str(num_cpus),
           *(["--reuse-actors"] if reuse_actors else []), "--", "--preset", str(preset),
           "--out", str(out), "--name", name,
           *(["--data", data] if data else []), *(extra or [])]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    log_path = Path(log_path) if log_path else Path(out) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if in_process:  # smoke tests: the caller's Ray (started here without the dashboard if none)
        if reuse_actors:
            raise ValueError("reuse_actors needs a fresh process (in_process=False)")
        return _run_search_in_process(cmd[cmd.index("--") + 1:], log_path=log_path,
                                      run_dir=Path(out) / name, num_cpus=num_cpus)
    with LoadWindow() as window, log_path.open("w") as fh:
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"search {name} failed (rc {proc.returncode}); log {log_path}:\n{tail}")
    return {"wall_s": wall, "rc": proc.returncode, "command": " ".join(cmd), "log": str(log_path),
            "run_dir": str(Path(out) / name), **window.as_dict()}


def read_trial_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every trial of a finished search: ``{"trial_id", "rows", "start", "end"}``, sorted by
    start, each row ``{"epoch", "value", "best", "epoch_seconds", "time_this_iter_s",
    "time_total_s", "time"}``.

    Values come from Ray's ``trial_*/result.json`` (one JSON line per reported epoch). Times come
    from the trial's TensorBoard event file, which Ray's driver writes with sub-millisecond wall
    times: its first record when the driver starts the trial, one group per reported epoch, and
    its last records when the trial ends. (Ray's ``timestamp`` has whole seconds only, and the
    files' modification times are all reset when Ray syncs the trial folder to storage.)
    """
    trials = []
    for path in sorted(Path(run_dir).glob("trial_*/result.json")):
        rows = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append({"epoch": int(r["training_iteration"]),
                         "value": float(r.get("val_measure_l1_mm", math.nan)),
                         "best": float(r.get("best_val_measure_l1_mm", math.nan)),
                         "epoch_seconds": float(r.get("epoch_seconds", math.nan)),
                         "time_this_iter_s": float(r.get("time_this_iter_s", math.nan)),
                         "time_total_s": float(r.get("time_total_s", math.nan)),
                         "timestamp": float(r["timestamp"]),
                         "trial_id": r.get("trial_id", path.parent.name)})
        if not rows:
            continue
        times = _event_times(path.parent)
        if times is not None:
            start, end, by_step = times
            for row in rows:
                row["time"] = by_step.get(row["epoch"], row["timestamp"])
        else:  # no event file: whole-second timestamps
            start = rows[0]["timestamp"] - rows[0]["time_total_s"]
            end = rows[-1]["timestamp"]
            for row in rows:
                row["time"] = row["timestamp"]
        trials.append({"trial_id": rows[0]["trial_id"], "rows": rows, "start": start, "end": end})
    return sorted(trials, key=lambda t: t["start"])


def _event_times(trial_dir: Path) -> tuple[float, float, dict[int, float]] | None:
    """(first wall time, last wall time, {step: first wall time}) of a TensorBoard event file.

    The TFRecord framing is ``uint64 length, uint32 crc, payload, uint32 crc``; an ``Event``
    payload starts with field 1 (``double wall_time``, tag 0x09) and then field 2 (``int64
    step``, tag 0x10, varint). Only those two fields are read.
    """
    import struct

    files = sorted(trial_dir.glob("events.out.tfevents.*"))
    if not files:
        return None
    walls: list[float] = []
    by_step: dict[int, float] = {}
    for file in files:
        data = file.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            record = data[i + 12:i + 12 + n]
            i += 12 + n + 4
            if record[:1] != b"\x09" or len(record) < 9:
                continue
            wall = struct.unpack("<d", record[1:9])[0]
            walls.append(wall)
            if record[9:10] == b"\x10":
                step, shift, j = 0, 0, 10
                while j < len(record):
                    byte = record[j]
                    step |= (byte & 0x7F) << shift
                    shift += 7
                    j += 1
                    if not byte & 0x80:
                        break
                by_step[step] = min(by_step.get(step, wall), wall)
    if not walls:
        return None
    return min(walls), max(walls), by_step


def _run_search_in_process(run_args: list[str], *, log_path: Path, run_dir: Path,
                           num_cpus: int) -> dict[str, Any]:
    import contextlib

    import ray

    from search import run as search_run

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False,
                 log_to_driver=False)
    with LoadWindow() as window, log_path.open("w") as fh, contextlib.redirect_stdout(fh):
        started = time.perf_counter()
        rc = search_run.main(run_args)
        wall = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"search failed (rc {rc}); log {log_path}")
    return {"wall_s": wall, "rc": rc, "command": "in process: search.run.main(" +
            " ".join(run_args) + ")", "log": str(log_path), "run_dir": str(run_dir),
            **window.as_dict()}


def _search_driver(argv: list[str]) -> int:
    """``python benchmarks/_common.py search --num-cpus N -- RUN_ARGS``: start a private local Ray
    cluster without the dashboard, then run ``search.run.main(RUN_ARGS)`` in it.

    A private cluster never joins another engineer's, has exactly ``num_cpus`` CPUs, and starts
    no dashboard (``search/run.py`` used to start it on the fixed port 8265, so two searches on
    one machine collided with "Failed to bind to 127.0.0.1:8265"). ``tune_api.connect`` keeps a
    cluster that is already initialised, so everything else is the product's own code path. The
    dashboard's start-up is therefore not part of the fixed overhead measured here (per-trial
    figures are unaffected).
    """
    import argparse

    p = argparse.ArgumentParser(prog="python benchmarks/_common.py search")
    p.add_argument("--num-cpus", type=int, default=2, help="0: all the machine has")
    p.add_argument("--reuse-actors", action="store_true",
                   help="what-if: TuneConfig(reuse_actors=True) instead of the product's False")
    p.add_argument("run_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    import ray

    from search import run as search_run

    if args.reuse_actors:
        from search import tune_api

        tune_config = tune_api.TuneConfig

        def reusing(*a, **kw):
            kw["reuse_actors"] = True
            return tune_config(*a, **kw)

        tune_api.TuneConfig = reusing
    ray.init(address="local", num_cpus=args.num_cpus or None, include_dashboard=False,
             log_to_driver=False)
    try:
        return search_run.main(run_args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["search"]:
        sys.exit(_search_driver(sys.argv[2:]))
    print(json.dumps(machine_info(), indent=2))
