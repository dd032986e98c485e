"""Heatmap landmark models: one registry, ``create_model(name, **kwargs)`` makes them all.

Example:
    >>> import torch
    >>> from biometry.models import create_model, list_models
    >>> list_models()
    ['hrnet_compact', 'unet', 'unet_multihead']
    >>> create_model("unet", width=8, output_stride=4)(torch.zeros(1, 1, 96, 144)).shape
    torch.Size([1, 4, 24, 36])
"""
from biometry.models import hrnet as _hrnet  # noqa: F401  (registers hrnet_compact)
from biometry.models import unet as _unet  # noqa: F401  (registers unet, unet_multihead)
from biometry.models.ensemble import ENSEMBLE, ENSEMBLE_COMBINES, MeanOfModels, create_ensemble
from biometry.models._registry import (
    ModelInfo,
    ModelOptions,
    check_model_options,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
    split_mask,
)

__all__ = [
    "ENSEMBLE",
    "ENSEMBLE_COMBINES",
    "MeanOfModels",
    "create_ensemble",
    "ModelInfo",
    "ModelOptions",
    "check_model_options",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "split_mask",
]
