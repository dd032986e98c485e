"""The live trial table in the terminal: the best trials first, 120 columns at most.

Plain text from plain values (no Ray here): ``search.tune_api.TrialTableReporter`` hands each
trial's id, status, config and last result to :func:`table_lines` while the search runs.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from biometry.constants import BEST_OBJECTIVE, OBJECTIVE

WIDTH = 120
MAX_ROWS = 15  # trials beyond are counted on one line
GAP = "  "

# (trial-config key, header, format): shown when some trial's config has the key; the table
# drops them from the right if it would be wider than WIDTH
PARAMETER_COLUMNS = (
    ("model.name", "model", "{}"),
    ("model.width", "width", "{}"),
    ("model.depth", "depth", "{}"),
    ("train.lr", "lr", "{:.3g}"),
    ("train.sigma", "sigma", "{:.3g}"),
)
# (reported metric, header, format); mm: the validation split's L1 errors
METRIC_COLUMNS = (
    ("training_iteration", "epoch", "{}"),
    (OBJECTIVE, "val mm", "{:.3f}"),
    (BEST_OBJECTIVE, "best mm", "{:.3f}"),
    ("bpd_l1_mm", "BPD", "{:.2f}"),
    ("ofd_l1_mm", "OFD", "{:.2f}"),
    ("hc_l1_mm", "HC", "{:.2f}"),
)
LEGEND = "best mm: the trial's best epoch so far; val mm, BPD, OFD, HC: its last epoch (L1 error)"


@dataclass(frozen=True)
class TrialRow:
    """What the table shows of one trial."""

    trial_id: str
    status: str
    config: dict[str, Any]
    result: dict[str, Any]

    def best_value(self) -> float:
        value = self.result.get(BEST_OBJECTIVE)
        try:
            value = float(value)
        except (TypeError, ValueError):
            return math.inf
        return value if math.isfinite(value) else math.inf


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first; trials without a finite value yet keep their order, after the others."""
    return sorted(rows, key=TrialRow.best_value)  # sorted() is stable


def table_lines(rows: list[TrialRow], *, total: int | None = None, elapsed_s: float = 0.0,
                notes: Sequence[str] = (), width: int = WIDTH,
                max_rows: int = MAX_ROWS) -> list[str]:
    """A status line (time, trials started of ``total``, per state), the ``notes`` (Ray's
    resource and scheduler lines), then one line per trial, best first; every line at most
    ``width`` characters, and trials past ``max_rows`` counted on the last line."""
    counts = Counter(row.status for row in rows)
    started = f"{len(rows)} of {total}" if total else f"{len(rows)}"
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [f"== search {_clock(elapsed_s)}: {started} trials"
             f"{f' ({states})' if states else ''} ==", *notes]
    shown = ranked(rows)[:max_rows]
    if shown:
        lines += _table(shown, width=width)
        lines.append(LEGEND)
    if len(rows) > len(shown):
        hidden = Counter(row.status for row in ranked(rows)[max_rows:])
        lines.append(f"... {len(rows) - len(shown)} more trials, below these: "
                     + ", ".join(f"{n} {state}" for state, n in sorted(hidden.items())))
    return [_clip(line, width) for line in lines]


def _table(rows: list[TrialRow], *, width: int) -> list[str]:
    params = [c for c in PARAMETER_COLUMNS if any(c[0] in row.config for row in rows)]
    metrics = [c for c in METRIC_COLUMNS if any(c[0] in row.result for row in rows)]
    while True:
        columns = [("trial", [r.trial_id for r in rows]), ("status", [r.status for r in rows])]
        columns += [(head, [_cell(r.config, key, fmt) for r in rows]) for key, head, fmt in params]
        columns += [(head, [_cell(r.result, key, fmt) for r in rows]) for key, head, fmt in metrics]
        lines = _render(columns)
        if not params or max(map(len, lines)) <= width:
            return lines
        params = params[:-1]


def _render(columns: list[tuple[str, list[str]]]) -> list[str]:
    """Text columns left-aligned, the others (numbers) right-aligned."""
    text = {"trial", "status", "model"}
    widths = [max(len(head), *map(len, cells)) for head, cells in columns]

    def line(values: list[str]) -> str:
        cells = [v.ljust(w) if head in text else v.rjust(w)
                 for v, w, (head, _) in zip(values, widths, columns)]
        return GAP.join(cells).rstrip()

    rows = zip(*(cells for _, cells in columns))
    return [line([head for head, _ in columns])] + [line(list(values)) for values in rows]


def _cell(values: dict[str, Any], key: str, fmt: str) -> str:
    value = values.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
