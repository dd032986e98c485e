"""Plain helpers for the reliability tests (imported by the test modules and conftest.py)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def command_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: a fresh local Ray cluster per search, no
    tracking URI or fault hook inherited from the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "BIOMETRY_FAULT", "RAY_ADDRESS")}
    env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1", **extra)
    return env


def run_command(argv: list[str], *, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run ``python ARGV...`` from the repository root, as a user would."""
    return subprocess.run([PYTHON, *argv], cwd=REPO, env=command_env(**env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_command(argv: list[str], *, log: Path, **env: str) -> subprocess.Popen:
    """Start ``python ARGV...`` in its own process group (so a test can SIGKILL all of it);
    stdout goes to ``log``, stderr to ``log`` with the suffix ``.err``."""
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([PYTHON, *argv], cwd=REPO, env=command_env(**env), stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by :func:`start_command` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The contract of every command on bad input: non-zero exit, exactly one line on stderr,
    no traceback. Returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, f"exit 0 on bad input; stdout: {proc.stdout[-1500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n" + "\n".join(lines[-30:])
    return lines[0]


def write_preset(path: Path, *, num_samples: int, epochs: int, concurrent: int = 1,
                 space: str | Path = "configs/search/smoke.yaml", **search) -> Path:
    """A small search preset: the smoke preset with ``epochs`` per trial and ``search`` keys."""
    preset = yaml.safe_load((REPO / "configs/presets/smoke.yaml").read_text())
    preset["trial"]["train"]["epochs"] = epochs
    preset["search"].update({"num_samples": num_samples, "max_concurrent_trials": concurrent,
                             "grace_period": 1, "reduction_factor": 2, "space": str(space),
                             **search})
    path.write_text(yaml.safe_dump(preset))
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def result_rows(trial_dir: Path) -> list[dict]:
    """The per-epoch results Ray wrote for a trial (``result.json``, one JSON object a line)."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("trial_*") if p.is_dir())


def wait_for(predicate, *, timeout: float, what: str, poll: float = 0.2, proc=None):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released, so very likely still free)."""
    return free_port()


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_runs(uri: str, experiment: str) -> list:
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} on {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def local_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def load_study(run_dir: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def copy_dataset(src_csv: Path, dst: Path) -> Path:
    """Copy a landmark-CSV data set (CSV + images in its folder) to ``dst``; return the CSV."""
    shutil.copytree(src_csv.parent, dst)
    return dst / src_csv.name


def edit_csv_cell(csv_path: Path, row: int, column: str, value: str) -> None:
    """Set one cell (``row`` 1-based, header excluded) of a landmark CSV."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    rows[row][rows[0].index(column)] = value
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def csv_images(csv_path: Path) -> list[str]:
    import csv

    with open(csv_path, newline="") as f:
        return [row["image"] for row in csv.DictReader(f)]


# -- commands in a preloaded interpreter --------------------------------------------------------
# Starting ``python`` costs seconds of third-party imports (torch, albumentations, ray, ...) on a
# small machine, which dominates a table of bad-input commands that each stop at their first
# check. A forkserver imports those libraries once; each command then runs in a process forked
# from it, exactly as ``python ARGV`` would run it (runpy as __main__, the same argv, cwd and
# environment, a clean sys.path, its own stdout/stderr files, the exit code of its SystemExit,
# atexit handlers run). The project's own modules are not preloaded: each command imports them.
PRELOADED_LIBRARIES = ["numpy", "torch", "torch.utils.data", "scipy.stats", "scipy.interpolate",
                       "cv2", "albumentations", "PIL.Image", "yaml", "pandas", "optuna", "mlflow",
                       "ray", "ray.tune", "matplotlib.pyplot"]


def _python_sys_path() -> list[str]:
    """``sys.path`` of a plain ``python`` here, without its first entry (the script's folder)."""
    found = subprocess.run([PYTHON, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                           capture_output=True, text=True, check=True, cwd="/")
    return json.loads(found.stdout)


def _run_like_python(argv: list[str], cwd: str, env: dict, sys_path: list[str],
                     stdout_path: str, stderr_path: str) -> None:
    import atexit
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.stdin = open(os.devnull)
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:] = [cwd, *sys_path]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = [argv[0], *argv[1:]]
            sys.path[:] = [os.path.dirname(script), *sys_path]
            runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()


class PreloadedPython:
    """``run(argv)`` is :func:`run_command` in a process forked from a preloaded interpreter."""

    def __init__(self, work_dir: Path):
        import multiprocessing

        self.work_dir = work_dir
        self.sys_path = _python_sys_path()
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOADED_LIBRARIES)
        self._numbers = itertools.count(1)

    def run(self, argv: list[str], *, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
        number = next(self._numbers)
        stdout, stderr = (self.work_dir / f"{number}.{name}" for name in ("out", "err"))
        argv = [str(a) for a in argv]
        process = self.context.Process(target=_run_like_python, args=(
            argv, str(REPO), command_env(**env), self.sys_path, str(stdout), str(stderr)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        streams = [path.read_text() if path.is_file() else "" for path in (stdout, stderr)]
        return subprocess.CompletedProcess([PYTHON, *argv], process.exitcode, *streams)
