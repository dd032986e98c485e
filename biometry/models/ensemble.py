"""Several trained models of one output layout as one model.

The seeds of one recipe fail on different images (docs/experiments.md, "the same recipe, three
seeds"); combining them keeps what they agree on. Two ways (:data:`ENSEMBLE_COMBINES`):
``"maps"`` averages the members' raw output maps before decoding (the module's ``forward``);
``"median"`` decodes each member on its own (its post-processing steps included) and takes
the median of their landmarks, coordinate by coordinate (:class:`biometry.inference.
LandmarkPredictor` does it, reading ``combine`` from the model's spec), so one member's miss is outvoted instead of averaged in
(docs/experiments.md, "median of the seeds").
An ensemble is saved like any model (``model.pt`` holds one state dict, keys ``members.K.*``;
``model.yaml`` names :data:`ENSEMBLE` as its architecture, lists the members' architectures
and options, and says ``combine``), so every command loads it the same way.

Example:
    >>> import torch
    >>> members = [{"architecture": "unet", "model_kwargs": {"width": 4, "output_stride": 4}}] * 2
    >>> create_ensemble(members)(torch.zeros(1, 1, 64, 96)).shape
    torch.Size([1, 4, 16, 24])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from biometry.constants import ENSEMBLE_COMBINES  # noqa: F401  (re-exported by biometry.models)
from biometry.models._registry import create_model

ENSEMBLE = "ensemble"


class MeanOfModels(nn.Module):
    """The members' raw output maps (heatmaps and mask logits alike), averaged. How a predictor
    combines the members (:data:`ENSEMBLE_COMBINES`) is the predictor's strategy, read from the
    model's spec; this module is only the ``"maps"`` way and the holder of the members."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x) for member in self.members]
        shapes = {tuple(out.shape) for out in outputs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members give outputs of different shapes: {sorted(shapes)}.")
        return torch.stack(outputs).mean(dim=0)


def create_ensemble(members: list[dict[str, Any]]) -> MeanOfModels:
    """An ensemble of ``create_model(m["architecture"], **m["model_kwargs"])`` for each member."""
    if not isinstance(members, list) or not members:
        raise ValueError(f"ensemble 'members' must be a non-empty list but got {members!r}.")
    models = []
    for k, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("architecture"), str):
            raise ValueError(f"ensemble member {k} must name its 'architecture' but got {member!r}.")
        if member["architecture"] == ENSEMBLE:
            raise ValueError(f"ensemble member {k} cannot itself be an ensemble.")
        models.append(create_model(member["architecture"], **dict(member.get("model_kwargs") or {})))
    return MeanOfModels(models)
