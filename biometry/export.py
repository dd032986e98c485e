"""Export a model folder's network to ONNX, as an exported model folder.

The exported folder holds ``model.yaml`` (the source folder's spec: decoding, orientation, input
size, post-processing steps, uncertainty threshold) and the network as ONNX instead of
``model.pt`` (:func:`biometry.onnx_model.network_files`). It is a model folder like any other:
``evaluate`` and ``predict`` take it as ``--model`` and run the network through onnxruntime.
The batch size is dynamic; the input size is the spec's.

Example::

    export_onnx("runs/NAME/best", "runs/NAME/best.onnx")  # -> best.onnx/model.onnx + model.yaml
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from biometry import atomic
from biometry.errors import BiometryInputError
from biometry.models import ENSEMBLE, MeanOfModels
from biometry.onnx_model import (
    INPUT_NAME, OUTPUT_NAME, OnnxNetwork, network_files, network_from_bytes,
)

OPSET = 17
OPSETS = range(11, 21)  # from the resize semantics the models use to the exporter's last
CHECK_BATCHES = (1, 3)  # the exported graph is compared with the torch network at these sizes
MAX_MAP_DIFFERENCE = 1e-3  # largest output-map difference an export may show


@dataclass(frozen=True)
class Exported:
    """What :func:`export_onnx` wrote: the folder, its files and the largest difference between
    the ONNX graphs' output maps and the torch network's on random input."""

    folder: Path
    files: list[str]
    max_map_difference: float


def export_onnx(model_folder: str | Path, out: str | Path, *, opset: int = OPSET) -> Exported:
    """Write the exported model folder ``out`` for the model folder ``model_folder``.

    A ``"median"`` ensemble is exported member by member (its predictor decodes each on its own);
    any other model, a ``"maps"`` ensemble included, is one graph. Each graph is checked against
    the torch network before anything is written.
    """
    from biometry.inference import load_model_folder, write_model_spec

    if opset not in OPSETS:
        raise BiometryInputError(f"--opset must be between {OPSETS[0]} and {OPSETS[-1]} but got "
                                 f"{opset}")
    model, spec = load_model_folder(model_folder)
    if any(isinstance(module, OnnxNetwork) for module in model.modules()):
        raise BiometryInputError(f"{model_folder}: already an exported model folder")
    out = checked_out_folder(Path(out))
    graphs, difference = {}, 0.0
    for name, network in zip(network_files(spec), networks_to_export(model, spec)):
        graphs[name] = onnx_graph(network, tuple(spec.input_hw), opset=opset)
        difference = max(difference, graph_difference(graphs[name], network, spec,
                                                      where=out / name))
    if difference > MAX_MAP_DIFFERENCE:
        raise BiometryInputError(f"{model_folder}: the ONNX graph's maps differ from the torch "
                                 f"network's by {difference:.3g} (more than "
                                 f"{MAX_MAP_DIFFERENCE:g}); nothing written")
    out.mkdir(parents=True, exist_ok=True)
    for name, graph in graphs.items():
        atomic.write_file(out / name, lambda tmp, graph=graph: tmp.write_bytes(graph))
    write_model_spec(out, spec)
    return Exported(folder=out, files=[*graphs, "model.yaml"], max_map_difference=difference)


def checked_out_folder(out: Path) -> Path:
    """``out`` when it can become an exported model folder: not a file, and no ``model.pt`` in
    it (a folder holding both loads the torch weights)."""
    if out.exists() and not out.is_dir():
        raise BiometryInputError(f"--out {out}: a file; export writes a model folder")
    if (out / "model.pt").exists():
        raise BiometryInputError(f"--out {out}: holds model.pt; export into a new folder")
    return out


def networks_to_export(model: nn.Module, spec) -> list[nn.Module]:
    """The modules behind :func:`~biometry.onnx_model.network_files`, in its order."""
    if spec.architecture == ENSEMBLE and spec.combine == "median":
        return list(model.members)
    if isinstance(model, MeanOfModels):
        with torch.no_grad():  # the members' output shapes checked once, outside the tracer
            model(torch.zeros(1, 1, *spec.input_hw))
        return [AveragedMaps(model.members)]
    return [model]


class AveragedMaps(nn.Module):
    """A ``"maps"`` ensemble's forward (:class:`~biometry.models.MeanOfModels`) as the tracer can
    follow it: without the Python check of the members' output shapes."""

    def __init__(self, members: nn.ModuleList):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


@torch.no_grad()
def onnx_graph(network: nn.Module, input_hw: tuple[int, int], *, opset: int = OPSET) -> bytes:
    """``network`` serialized as ONNX by the TorchScript-based exporter, batch size dynamic.

    The tracer warns where a model checks its input's shape in Python; the checks hold for the
    spec's input size, which is the only one the graph takes (:func:`~biometry.onnx_model.
    check_signature`)."""
    example = torch.zeros(2, 1, *input_hw)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter is the legacy one
        torch.onnx.export(network.eval().cpu(), (example,), buffer, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset)
    graph = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(graph))
    return graph


@torch.no_grad()
def graph_difference(graph: bytes, network: nn.Module, spec, *, where: Path) -> float:
    """Largest absolute difference between the graph's and the network's output maps on seeded
    random input, at each batch size of :data:`CHECK_BATCHES`."""
    exported = network_from_bytes(graph, where=where, input_hw=tuple(spec.input_hw))
    generator = torch.Generator().manual_seed(0)
    difference = 0.0
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, 1, *spec.input_hw, generator=generator)
        difference = max(difference, float((exported(x) - network(x)).abs().max()))
    return difference
