"""Arguments several commands share, written once so their names and help stay the same."""
from __future__ import annotations

import argparse
from pathlib import Path

DATA_HELP = "HC18-style folder or landmark CSV"


def add_data_out_skip(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    """DATA (positional, or ``--data``), ``--out`` and ``--skip-bad``."""
    if positional:
        parser.add_argument("data", type=Path, help=DATA_HELP)
    else:
        parser.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    add_out(parser)
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad rows/images with a warning instead of stopping")


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="model folder (model.pt + model.yaml), e.g. runs/NAME/best")
