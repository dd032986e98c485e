"""Training loss: heatmap MSE, coordinate L1 and geometric priors of the two head diameters.

Landmark rows are BPD1, BPD2, OFD1, OFD2 (``biometry.records``); coordinates are (x, y) in model
input pixels, divided by ``coord_scale`` before any coordinate term so the terms are comparable
across input sizes (the trainer passes the input width).

Typical magnitudes at the start of training (sigma 2 heatmaps, coords scaled by the input width):
heatmap ~1e-3, coord ~1e-1, angle ~0.5, centre ~1e-1, order ~1e-1, mask ~0.6; the weights set
the balance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biometry.records import BPD, OFD

TERMS = ("heatmap", "coord", "angle", "centre", "order", "mask")
HEATMAP_PAIRINGS = ("labelled", "invariant", "summed")
_EPS = 1e-12  # floor of |BPD| * |OFD| in the angle term (scaled units squared)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms; a weight of 0 switches the term off (it is still reported).

    Example:
        >>> cfg = LossConfig(coord_weight=1.0, angle_weight=0.1)
        >>> cfg.weights()["angle"]
        0.1

    Attributes:
        heatmap_weight: weight of the MSE between predicted and target heatmaps.
        channel_weights: per-landmark weights (BPD1, BPD2, OFD1, OFD2) inside the heatmap and
            coordinate terms, e.g. ``(2, 2, 1, 1)`` to stress the BPD. They are normalised by their
            sum, so they change the emphasis, not the scale.
        coord_weight: weight of the L1 error of the decoded (soft-argmax) coordinates, invariant to
            the endpoint order within each pair (the better of the two assignments counts).
        angle_weight: weight of the perpendicularity prior: mean cos^2 of the angle between the
            predicted BPD and OFD (0 at 90 degrees, 0.5 at 45, 1 when parallel).
        centre_weight: weight of the distance between the predicted BPD and OFD midpoints.
        order_weight: weight of ``relu(|BPD| - |OFD|)``: the BPD must not be longer than the OFD.
        mask_weight: weight of the soft Dice loss between the model's head-region logits (a
            model built with ``mask_head``) and the ellipse the labelled landmarks span
            (``HeatmapCodec.encode_head_region``): dense supervision of where the head is, so that
            a trunk or a whole fetus in view is not taken for it. Each image counts equally,
            whatever the size of its head.
        heatmap_pairing: how the heatmap term treats the endpoint order within a pair:
            ``"labelled"`` (each channel against its labelled endpoint), ``"invariant"`` (each
            pair against the better of the two assignments, like the coordinate term) or
            ``"summed"`` (the sum of a pair's two maps against the sum of its two targets: the
            order is free, for the unordered decoding ``biometry.codec.pair_soft_argmax``).

    At least one of ``heatmap_weight`` and ``coord_weight`` must be positive: the priors alone do not
    locate the landmarks.
    """

    heatmap_weight: float = 1.0
    channel_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    coord_weight: float = 0.0
    angle_weight: float = 0.0
    centre_weight: float = 0.0
    order_weight: float = 0.0
    mask_weight: float = 0.0
    heatmap_pairing: str = "labelled"

    def __post_init__(self) -> None:
        for term in TERMS:
            _check_weight(f"{term}_weight", getattr(self, f"{term}_weight"))
        cw = self.channel_weights
        if not isinstance(cw, (list, tuple)) or len(cw) != 4:
            raise ValueError(
                f"channel_weights must have 4 values (BPD1, BPD2, OFD1, OFD2) but got {cw!r}."
            )
        for w in cw:
            _check_weight("channel_weights", w)
        if self.heatmap_pairing not in HEATMAP_PAIRINGS:
            raise ValueError(f"heatmap_pairing must be one of {HEATMAP_PAIRINGS} but got "
                             f"{self.heatmap_pairing!r}.")
        if sum(cw) == 0:
            raise ValueError(f"channel_weights cannot all be 0 but got {tuple(cw)!r}.")
        object.__setattr__(self, "channel_weights", tuple(float(w) for w in cw))
        if self.heatmap_weight == 0 and self.coord_weight == 0:
            raise ValueError(
                "heatmap_weight and coord_weight cannot both be 0; the other terms do not locate "
                "the landmarks."
            )

    def weights(self) -> dict[str, float]:
        """``{"heatmap": heatmap_weight, "coord": ..., "angle": ..., "centre": ..., "order": ...,
        "mask": ...}``."""
        return {term: float(getattr(self, f"{term}_weight")) for term in TERMS}


def _check_weight(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number but got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite but got {value}.")
    if value < 0:
        raise ValueError(f"{name} cannot be negative but got {value}.")


# ---------------------------------------------------------------------------------------------
# Terms. Shapes: heatmaps (B, 4, h, w); coords (B, 4, 2) already divided by coord_scale.


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, channel_weights: torch.Tensor) -> torch.Tensor:
    """Channel-weighted mean of the per-channel MSE (plain MSE with equal weights)."""
    per_channel = (pred - target).square().mean(dim=(0, 2, 3))  # (4,)
    return (per_channel * channel_weights).sum() / channel_weights.sum()


def heatmap_mse_order_invariant(pred: torch.Tensor, target: torch.Tensor,
                                channel_weights: torch.Tensor) -> torch.Tensor:
    """``heatmap_mse`` with, per pair and image, the better endpoint assignment of the targets."""
    straight = (pred - target).square().mean(dim=(2, 3)) * channel_weights  # (B, 4)
    swapped = (pred - target[:, [1, 0, 3, 2]]).square().mean(dim=(2, 3)) * channel_weights
    pairs = [torch.minimum(straight[:, list(p)].sum(1), swapped[:, list(p)].sum(1)) for p in (BPD, OFD)]
    return (pairs[0] + pairs[1]).mean() / channel_weights.sum()


def heatmap_mse_summed(pred: torch.Tensor, target: torch.Tensor,
                       channel_weights: torch.Tensor) -> torch.Tensor:
    """MSE of each pair's summed maps against its summed targets, weighted by the pair's mean
    channel weight: which channel holds which endpoint does not matter."""
    pairs = [list(p) for p in (BPD, OFD)]
    per_pair = torch.stack([(pred[:, p].sum(1) - target[:, p].sum(1)).square().mean()
                            for p in pairs])
    weights = torch.stack([channel_weights[p].mean() for p in pairs])
    return (per_pair * weights).sum() / weights.sum()


def coord_l1(pred: torch.Tensor, true: torch.Tensor, channel_weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 (mean over x, y) with, per pair and image, the better endpoint assignment."""
    err = (pred - true).abs().mean(dim=-1) * channel_weights  # (B, 4), as labelled
    swapped = (pred - true[:, [1, 0, 3, 2]]).abs().mean(dim=-1) * channel_weights
    pairs = [torch.minimum(err[:, list(p)].sum(1), swapped[:, list(p)].sum(1)) for p in (BPD, OFD)]
    return (pairs[0] + pairs[1]).mean() / channel_weights.sum()


def _diameters(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BPD and OFD vectors (B, 2): second endpoint minus first."""
    return coords[:, BPD[1]] - coords[:, BPD[0]], coords[:, OFD[1]] - coords[:, OFD[0]]


def angle_penalty(coords: torch.Tensor) -> torch.Tensor:
    """Mean cos^2 of the angle between the BPD and the OFD (endpoint order does not matter)."""
    bpd, ofd = _diameters(coords)
    norms = (torch.linalg.vector_norm(bpd, dim=-1) * torch.linalg.vector_norm(ofd, dim=-1))
    cos = (bpd * ofd).sum(-1) / norms.clamp_min(_EPS)
    return cos.square().mean()


def centre_offset(coords: torch.Tensor) -> torch.Tensor:
    """Mean distance between the BPD midpoint and the OFD midpoint."""
    mid_bpd = coords[:, list(BPD)].mean(dim=1)
    mid_ofd = coords[:, list(OFD)].mean(dim=1)
    return torch.linalg.vector_norm(mid_bpd - mid_ofd, dim=-1).mean()


def order_penalty(coords: torch.Tensor) -> torch.Tensor:
    """Mean ``relu(|BPD| - |OFD|)``."""
    bpd, ofd = _diameters(coords)
    excess = torch.linalg.vector_norm(bpd, dim=-1) - torch.linalg.vector_norm(ofd, dim=-1)
    return F.relu(excess).mean()


def mask_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid images of ``1 - soft Dice(sigmoid(logits), target)``; (B, h, w) maps,
    (B,) 0/1 ``valid``. 0 when no image is valid."""
    prob = torch.sigmoid(logits.float())
    overlap = (prob * target).sum(dim=(1, 2))
    dice = (2 * overlap + 1.0) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
    return ((1 - dice) * valid).sum() / valid.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------


def biometry_loss(
    pred_heatmaps: torch.Tensor,
    target_heatmaps: torch.Tensor,
    pred_coords: torch.Tensor,
    true_coords: torch.Tensor,
    cfg: LossConfig,
    *,
    coord_scale: float = 1.0,
    mask: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the terms of ``cfg``; every term is also returned for logging.

    Args:
        pred_heatmaps: (B, 4, h, w) raw model output (any float dtype; computed in float32).
        target_heatmaps: (B, 4, h, w) codec targets.
        pred_coords: (B, 4, 2) decoded (x, y) in input pixels, differentiable.
        true_coords: (B, 4, 2) labelled (x, y) in input pixels.
        cfg: the weights.
        coord_scale: coordinates are divided by it before the coordinate terms (e.g. the input
            width, so errors are fractions of the image).
        mask: ``(logits (B, h, w), target (B, h, w), valid (B,))`` for the mask term; required
            when ``cfg.mask_weight`` is above 0 (without it the term is reported as 0).

    Returns:
        ``(total, terms)``: ``total`` is the scalar to back-propagate, ``sum(weight * term)`` over
        the terms whose weight is above 0 (a term with weight 0 costs nothing, not even a NaN).
        ``terms`` maps "heatmap", "coord", "angle", "centre", "order", "mask" to the detached unweighted
        values, and "total" to the detached total.
    """
    _check_shapes(pred_heatmaps, target_heatmaps, pred_coords, true_coords)
    if isinstance(coord_scale, bool) or not (isinstance(coord_scale, (int, float))
                                             and math.isfinite(coord_scale) and coord_scale > 0):
        raise ValueError(f"coord_scale must be positive but got {coord_scale!r}.")
    weights = cfg.weights()
    if weights["mask"] > 0 and mask is None:
        raise ValueError("mask_weight is above 0 but no mask was given; build the model with "
                         "mask_head=True and pass mask=(logits, target, valid).")
    channel_weights = torch.tensor(cfg.channel_weights, device=pred_heatmaps.device)
    heatmap_term = {"labelled": heatmap_mse, "invariant": heatmap_mse_order_invariant,
                    "summed": heatmap_mse_summed}[cfg.heatmap_pairing]
    pred = pred_coords.float() / coord_scale
    true = true_coords.float() / coord_scale
    values = {
        "heatmap": heatmap_term(pred_heatmaps.float(), target_heatmaps.float(), channel_weights),
        "coord": coord_l1(pred, true, channel_weights),
        "angle": angle_penalty(pred),
        "centre": centre_offset(pred),
        "order": order_penalty(pred),
        "mask": mask_dice(*mask) if mask is not None else pred_coords.new_zeros(()),
    }
    total = sum(weights[t] * values[t] for t in TERMS if weights[t] > 0)
    terms = {t: v.detach() for t, v in values.items()}
    terms["total"] = total.detach()
    return total, terms


def _check_shapes(pred_hm, target_hm, pred_xy, true_xy) -> None:
    if pred_hm.ndim != 4 or pred_hm.shape[1] != 4 or pred_hm.shape != target_hm.shape:
        raise ValueError(
            f"pred_heatmaps and target_heatmaps must both be (B, 4, h, w) but got "
            f"{tuple(pred_hm.shape)} and {tuple(target_hm.shape)}."
        )
    batch = pred_hm.shape[0]
    if pred_xy.shape != (batch, 4, 2) or true_xy.shape != (batch, 4, 2):
        raise ValueError(
            f"pred_coords and true_coords must both be ({batch}, 4, 2) but got "
            f"{tuple(pred_xy.shape)} and {tuple(true_xy.shape)}."
        )
