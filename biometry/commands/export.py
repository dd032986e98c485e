"""``python -m biometry export --model MODEL --format onnx --out DIR``: the model folder's network
exported to ONNX, as an exported model folder.

``DIR`` receives ``model.onnx`` (a ``"median"`` ensemble: ``member0.onnx``, ``member1.onnx``, ...)
and ``model.yaml``, the model's spec with its post-processing steps. ``DIR`` is a model folder:
``evaluate`` and ``predict`` take it as ``--model`` and run the network through onnxruntime.
Naming it ``NAME.onnx`` keeps it apart from the torch folder, e.g. ``runs/NAME/best.onnx``.
"""
from __future__ import annotations

import argparse

from biometry.commands._arguments import add_model, add_out
from biometry.commands.evaluate import check_model_folder

FORMATS = ("onnx",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="what the network is exported as (default onnx)")
    add_out(parser)
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset version, 11 to 20 (default 17)")


def run(args: argparse.Namespace) -> int:
    from biometry.export import OPSET, export_onnx

    check_model_folder(args.model)
    exported = export_onnx(args.model, args.out, opset=OPSET if args.opset is None else args.opset)
    files = ", ".join(str(exported.folder / name) for name in exported.files)
    print(f"wrote {files}; the output maps match the torch network's to "
          f"{exported.max_map_difference:.2g} on random input")
    return 0
