"""UNet heatmap models: ``unet`` (one decoder) and ``unet_multihead`` (a BPD and an OFD decoder).

Encoder level ``i`` (0 = input resolution) has ``width * 2**i`` channels, except the bottleneck
(level ``depth``), which keeps the channels of level ``depth - 1`` (as in the bilinear UNet; it
halves the parameters). Down-sampling is 2x2 max-pooling; up-sampling is bilinear followed by the
level's DoubleConv on ``concat(upsampled, skip)``. The decoder stops at level
``log2(output_stride)`` and a 1x1 conv gives the heatmaps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biometry.models._registry import ModelOptions, check_positive, make_config, register_model
from biometry.models.blocks import (
    DoubleConv,
    check_input,
    head_conv,
    init_weights,
    pad_to_multiple,
    resize,
)


@dataclass(frozen=True)
class UNetConfig(ModelOptions):
    """``ModelOptions`` plus ``decoder_width``: each decoder's channels at level ``i`` are
    ``round(decoder_width * width * 2**i)`` (at least 1). The default 0.5 is the bilinear UNet's
    (the decoder at level ``i`` has the channels of encoder level ``i - 1``)."""

    decoder_width: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("decoder_width", self.decoder_width)


def encoder_channels(cfg: UNetConfig) -> list[int]:
    """Channels of encoder levels ``0..depth`` (the bottleneck repeats the level above)."""
    return [cfg.width * 2 ** min(i, cfg.depth - 1) for i in range(cfg.depth + 1)]


class Encoder(nn.Module):
    """DoubleConv per level, max-pool between levels; returns the features of every level."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chans = encoder_channels(cfg)
        ins = [cfg.in_channels] + chans[:-1]
        self.levels = nn.ModuleList(DoubleConv(i, o, norm=cfg.norm) for i, o in zip(ins, chans))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Bilinear up-sampling + DoubleConv on ``concat(up, skip)`` down to level ``log2(stride)``."""

    def __init__(self, cfg: UNetConfig, out_channels: int):
        super().__init__()
        enc = encoder_channels(cfg)
        self.first_level = cfg.output_stride.bit_length() - 1  # log2(output_stride)
        levels = range(cfg.depth - 1, self.first_level - 1, -1)  # deepest first
        dec = {i: max(1, round(cfg.decoder_width * cfg.width * 2**i)) for i in levels}
        blocks, below = [], enc[cfg.depth]
        for i in levels:
            blocks.append(DoubleConv(below + enc[i], dec[i], norm=cfg.norm))
            below = dec[i]
        self.blocks = nn.ModuleList(blocks)
        self.head = head_conv(below, out_channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[self.first_level:-1])):
            x = block(torch.cat([resize(x, skip.shape[-2:]), skip], dim=1))
        return self.head(x)


class UNet(nn.Module):
    """UNet heatmap regressor: one shared encoder, one decoder per head, heatmaps concatenated.

    ``forward(x: (B, in_channels, H, W)) -> (B, num_keypoints, H // s, W // s)`` raw heatmaps.
    With ``heads=2`` each decoder makes ``num_keypoints // 2`` heatmaps (BPD1, BPD2 | OFD1, OFD2).
    With ``mask_head`` the last decoder also makes the head-region logits (the last channel).
    """

    def __init__(self, cfg: UNetConfig, *, heads: int = 1):
        super().__init__()
        if cfg.num_keypoints % heads:
            raise ValueError(
                f"num_keypoints must be divisible by the {heads} heads but got {cfg.num_keypoints}."
            )
        self.cfg = cfg
        self.output_stride = cfg.output_stride
        self.pad_multiple = 2**cfg.depth
        self.encoder = Encoder(cfg)
        per_head = cfg.num_keypoints // heads
        extra = [0] * (heads - 1) + [int(cfg.mask_head)]
        self.decoders = nn.ModuleList(Decoder(cfg, per_head + e) for e in extra)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.cfg.in_channels, self.output_stride)
        h, w = (n // self.output_stride for n in x.shape[-2:])
        feats = self.encoder(pad_to_multiple(x, self.pad_multiple))
        heatmaps = torch.cat([decoder(feats) for decoder in self.decoders], dim=1)
        return heatmaps[..., :h, :w]


def _build_unet(kwargs: dict, *, heads: int, name: str, defaults: dict | None = None) -> UNet:
    cfg = make_config(UNetConfig, name, {**(defaults or {}), **kwargs})
    return UNet(cfg, heads=heads)


@register_model
def unet(**kwargs) -> UNet:
    """Classic UNet, one decoder for the 4 heatmaps."""
    return _build_unet(kwargs, heads=1, name="unet")


@register_model
def unet_multihead(**kwargs) -> UNet:
    """Shared encoder, a BPD decoder and an OFD decoder (2 heatmaps each).

    Each decoder defaults to half the width of ``unet``'s (``decoder_width=0.25``), so both
    variants have about the same number of parameters (0.80M vs 0.83M at width 16).
    """
    if kwargs.get("num_keypoints", 4) != 4:
        raise ValueError(
            f"unet_multihead makes 4 heatmaps (BPD1, BPD2, OFD1, OFD2) but got "
            f"num_keypoints={kwargs['num_keypoints']!r}."
        )
    return _build_unet(kwargs, heads=2, name="unet_multihead", defaults={"decoder_width": 0.25})
