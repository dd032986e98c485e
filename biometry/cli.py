"""``python -m biometry COMMAND``: inspect, eda, evaluate, predict, export.

Each command lives in ``biometry/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``. Bad input raises :class:`BiometryInputError`; it is printed as one line on
stderr (the traceback only with ``--debug``) and the exit status is 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from biometry.errors import run_cli

COMMANDS = {
    "inspect": "import a data set, check it, write landmarks.csv, inspect.json and overlays",
    "eda": "data-quality report and outliers.csv",
    "evaluate": "predictions and metrics of a model on labelled data",
    "predict": "predictions of a model on unlabelled images",
    "export": "the model's network as ONNX, in a model folder that evaluate and predict run",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m biometry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"biometry.commands.{name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.add_argument("--debug", action="store_true", help="show the traceback on errors")
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import cv2

    # OpenCV logs a corrupt PNG as a WARN line on stderr, before our one error line
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args._run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
