"""Faults on purpose, for the reliability tests: ``BIOMETRY_FAULT`` parsed into trial hooks.

Nothing here runs unless the environment variable is set. The tests set it on the search's
command, so the trials Ray starts in other processes inherit it (on a local cluster):

    BIOMETRY_FAULT="raise_at_epoch=2"                       every trial raises before epoch 2
    BIOMETRY_FAULT="raise_at_epoch=2,once_file=/tmp/f"      only the first trial to get there
        (it creates /tmp/f, holding "pid cwd epoch"), so a restarted trial succeeds
    BIOMETRY_FAULT="sleep_s=1.5"                            sleep after each epoch's report,
        so a test can kill a trial's process mid-trial
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from biometry.errors import BiometryInputError

FAULT_ENV = "BIOMETRY_FAULT"
FAULT_KEYS = {"raise_at_epoch": int, "once_file": str, "sleep_s": float}


@dataclass(frozen=True)
class InjectedFaults:
    """Trial hooks (``run_trial(hooks=...)``) that raise at an epoch or slow every epoch down."""

    raise_at_epoch: int | None = None
    once_file: str | None = None
    sleep_s: float = 0.0

    def on_epoch_start(self, epoch: int) -> None:
        if self.raise_at_epoch != epoch:
            return
        if self.once_file is not None:
            try:
                fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # fired already, in this trial before a restart or in another trial
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {os.getcwd()} {epoch}\n")
        raise RuntimeError(f"{FAULT_ENV}: injected fault at epoch {epoch}")

    def after_report(self, epoch: int) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)


def faults_from_env() -> InjectedFaults | None:
    """The hooks ``BIOMETRY_FAULT`` asks for; None when it is unset or empty."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return None
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in FAULT_KEYS:
            raise BiometryInputError(f"{FAULT_ENV}: unknown key '{key}' (known: "
                                     f"{', '.join(FAULT_KEYS)})")
        try:
            faults[key] = FAULT_KEYS[key](value)
        except ValueError:
            raise BiometryInputError(f"{FAULT_ENV}: '{key}' must be "
                                     f"{FAULT_KEYS[key].__name__} but got {value!r}") from None
    return InjectedFaults(**faults)
