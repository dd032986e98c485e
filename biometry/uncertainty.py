"""Heatmap uncertainty: how spread out each predicted landmark distribution is.

Each map becomes a distribution over its pixels: ``relu(map) / sum`` (a map with no positive value
is uniform), or ``softmax(beta * map)`` when ``beta`` is given (models whose outputs are logits).
Functions take numpy arrays or torch tensors (any leading dimensions, maps last) and return the
same kind; torch results keep gradients.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _to_torch(heatmaps) -> tuple[torch.Tensor, bool]:
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps, False
    return torch.from_numpy(np.asarray(heatmaps, dtype=np.float64)), True


def _back(result: torch.Tensor, was_numpy: bool):
    return result.detach().numpy() if was_numpy else result


def _distribution(maps: torch.Tensor, beta: float | None) -> torch.Tensor:
    if maps.ndim < 2:
        raise ValueError(f"heatmaps must be (..., h, w) but got shape {tuple(maps.shape)}.")
    flat = maps.reshape(*maps.shape[:-2], -1)
    if beta is not None:
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number but got {beta!r}.")
        return torch.softmax(beta * flat, dim=-1).reshape(maps.shape)
    pos = torch.relu(flat)
    total = pos.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(pos, 1.0 / flat.shape[-1])
    prob = torch.where(total > 0, pos / total.clamp_min(torch.finfo(pos.dtype).tiny), uniform)
    return prob.reshape(maps.shape)


def heatmap_distribution(heatmaps, *, beta: float | None = None):
    """(..., h, w) -> (..., h, w) non-negative maps that sum to 1 over (h, w)."""
    maps, was_numpy = _to_torch(heatmaps)
    return _back(_distribution(maps, beta), was_numpy)


def heatmap_entropy(heatmaps, *, beta: float | None = None, normalized: bool = True):
    """(..., h, w) -> (...,) Shannon entropy of each map's distribution.

    In nats, or divided by ``log(h * w)`` when ``normalized`` (0 = one pixel, 1 = uniform).
    """
    maps, was_numpy = _to_torch(heatmaps)
    prob = _distribution(maps, beta).flatten(-2)
    entropy = -torch.special.xlogy(prob, prob).sum(dim=-1)
    if normalized:
        entropy = entropy / math.log(max(prob.shape[-1], 2))
    return _back(entropy, was_numpy)


def heatmap_spread(heatmaps, *, stride: int = 1, beta: float | None = None):
    """(..., h, w) -> (...,) ``sqrt(var_x + var_y)`` of each distribution, in input pixels.

    ``stride`` converts heatmap pixels to input pixels (a Gaussian map of sigma ``s`` heatmap
    pixels gives about ``s * sqrt(2) * stride``).
    """
    maps, was_numpy = _to_torch(heatmaps)
    prob = _distribution(maps, beta)
    h, w = prob.shape[-2:]
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device)
    px, py = prob.sum(dim=-2), prob.sum(dim=-1)
    mx, my = (px * xs).sum(dim=-1), (py * ys).sum(dim=-1)
    var = (px * (xs - mx[..., None]) ** 2).sum(dim=-1) + (py * (ys - my[..., None]) ** 2).sum(dim=-1)
    return _back(stride * torch.sqrt(var.clamp_min(0.0)), was_numpy)


def image_uncertainty(heatmaps, *, stride: int = 1, beta: float | None = None):
    """(B, K, h, w) -> (B,): one score per image, the mean ``heatmap_spread`` of its K maps.

    In input pixels; larger means less certain. Divide by the letterbox scale and multiply by the
    pixel spacing for mm.
    """
    maps, was_numpy = _to_torch(heatmaps)
    if maps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w) but got shape {tuple(maps.shape)}.")
    spread = heatmap_spread(maps, stride=stride, beta=beta)
    return _back(spread.mean(dim=-1), was_numpy)
