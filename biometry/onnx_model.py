"""A network exported to ONNX, run by onnxruntime behind the ``torch.nn.Module`` interface.

An exported model folder holds ``model.yaml`` and ONNX files instead of ``model.pt``
(:func:`network_files` names them). :func:`biometry.inference.load_model_folder` returns
:func:`load_onnx_network` for such a folder, so :class:`~biometry.inference.LandmarkPredictor`
and every command run it unchanged: decoding, orientation and post-processing stay in this
project's code, only the network pass moves to onnxruntime.

Example::

    model, spec = load_model_folder("runs/NAME/best.onnx")  # an OnnxNetwork, or several
    LandmarkPredictor(model, spec).predict([image], pixel_mm=[0.15])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from biometry.errors import BiometryInputError
from biometry.models import ENSEMBLE, MeanOfModels

ONNX_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "maps"


def network_files(spec) -> list[str]:
    """The ONNX files of an exported folder, by its spec: ``model.onnx`` (one graph, a ``"maps"``
    ensemble included), or ``member0.onnx``, ``member1.onnx``, ... for a ``"median"`` ensemble,
    whose predictor decodes every member on its own."""
    if spec.architecture == ENSEMBLE and spec.combine == "median":
        return [f"member{k}.onnx" for k in range(len(spec.model_kwargs.get("members") or []))]
    return [ONNX_FILE]


def holds_onnx_network(folder: Path) -> bool:
    """Whether ``folder`` is an exported model folder: ONNX files and no ``model.pt`` (a folder
    with both loads the torch weights)."""
    return not (folder / "model.pt").exists() and any(folder.glob("*.onnx"))


class OnnxNetwork(nn.Module):
    """(B, 1, H, W) float input -> the exported network's output maps, through an onnxruntime
    session. It has no parameters; ``to(device)`` moves nothing, the output lands on the input's
    device."""

    def __init__(self, session, *, path: Path):
        super().__init__()
        self.session = session
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.detach().cpu().numpy().astype(np.float32, copy=False)
        (maps,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: image})
        return torch.from_numpy(maps).to(x.device)

    def extra_repr(self) -> str:
        return str(self.path)


def load_onnx_network(folder: str | Path, spec, *,
                      device: str | torch.device = "cpu") -> nn.Module:
    """The exported folder's network: one :class:`OnnxNetwork`, or a
    :class:`~biometry.models.MeanOfModels` of one per member for a ``"median"`` ensemble.
    A missing or bad file, or one outside ``folder``, is one error naming it."""
    folder = Path(folder)
    names = network_files(spec)
    networks = [open_session(checked_path(folder, name, names), spec, device=device)
                for name in names]
    if spec.architecture == ENSEMBLE and spec.combine == "median":
        if not networks:
            raise BiometryInputError(f"{folder / 'model.yaml'}: an ensemble lists no members")
        return MeanOfModels(networks).eval()
    return networks[0].eval()


def checked_path(folder: Path, name: str, names: list[str]) -> Path:
    """``folder / name`` when it is a file inside ``folder`` (a link out of it is refused)."""
    path = folder / name
    if not path.is_file():
        raise BiometryInputError(f"{path}: not found (an exported model folder holds model.yaml "
                                 f"and {', '.join(names)})")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BiometryInputError(f"{path}: points outside the model folder {folder}")
    return path


def open_session(path: Path, spec, *, device: str | torch.device = "cpu") -> OnnxNetwork:
    """The network in ``path``, read as bytes so that no file beside it is ever opened."""
    return network_from_bytes(path.read_bytes(), where=path, input_hw=tuple(spec.input_hw),
                              device=device)


def network_from_bytes(graph: bytes, *, where: Path, input_hw: tuple[int, int],
                       device: str | torch.device = "cpu") -> OnnxNetwork:
    """An onnxruntime session of the serialized ``graph`` on as many threads as torch uses; its
    input must be (batch, 1, H, W) of ``input_hw``. Errors name ``where``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(graph, options, providers=session_providers(device))
    except Exception as err:  # onnxruntime raises its own types for a bad file
        raise BiometryInputError(f"{where}: cannot load the ONNX network "
                                 f"({type(err).__name__})") from None
    check_signature(session, where, input_hw)
    return OnnxNetwork(session, path=where)


def session_providers(device: str | torch.device) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_signature(session, path: Path, input_hw: tuple[int, int]) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise BiometryInputError(f"{path}: the network must take one input '{INPUT_NAME}' and "
                                 f"give '{OUTPUT_NAME}' (python -m biometry export writes it)")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [1, *input_hw]:
        raise BiometryInputError(f"{path}: the network's input is {shape}, the model.yaml's is "
                                 f"[batch, 1, {input_hw[0]}, {input_hw[1]}]")
