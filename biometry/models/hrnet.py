"""``hrnet_compact``: a small HRNet (Sun et al. 2019) for heatmap landmarks.

Layout: a stem of strided convs down to 1/``stem_stride`` (2 or 4); then ``stages`` stages,
each running ``blocks`` residual blocks on every branch and then a fusion that sums, into every
branch, all branches brought to its resolution (1x1 conv + bilinear up-sampling from lower
resolutions, chains of strided convs from higher ones). Strided convs are 4x4 (``down_conv``)
rather than HRNet's 3x3 so every branch keeps the codec's pixel centres. Branch ``b`` works at
1/(``stem_stride`` * 2**b) with ``width * 2**b`` channels. Branches are added one per stage
(2 in the first, then 3, ...), and the last stage always has all ``branches``; it fuses into the
highest-resolution branch only, where the head resamples to the output stride and makes the
heatmaps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biometry.models._registry import ModelOptions, check_int, make_config, register_model
from biometry.models.blocks import (
    BasicBlock,
    ConvNormAct,
    check_input,
    down_conv,
    head_conv,
    init_weights,
    pad_to_multiple,
    resize,
)


@dataclass(frozen=True)
class HRNetConfig(ModelOptions):
    """``ModelOptions`` plus the HRNet options.

    Attributes:
        branches: parallel resolutions, 2 to 4 (default 3).
        stages: fusion stages (default 3); a branch is added per stage until all are there.
        blocks: residual blocks per branch per stage (default 2).
        stem_stride: resolution of the first branch, 2 or 4 (default 4).
        depth: down-sampling levels of the lowest branch, ``log2(stem_stride) + branches - 1``.
            Give ``depth`` or ``branches`` and the other follows; giving both, they must agree.
    """

    depth: int | None = None
    branches: int | None = None
    stages: int = 3
    blocks: int = 2
    stem_stride: int = 4

    def __post_init__(self) -> None:
        if self.stem_stride not in (2, 4) or isinstance(self.stem_stride, bool):
            raise ValueError(f"stem_stride must be 2 or 4 but got {self.stem_stride!r}.")
        stem_levels = self.stem_stride.bit_length() - 1
        depth, branches = self.depth, self.branches
        if branches is None and depth is not None:
            check_int("depth", depth, low=1)
            branches = depth - stem_levels + 1
            if not 2 <= branches <= 4:
                raise ValueError(
                    f"depth must be in [{stem_levels + 1}, {stem_levels + 3}] for "
                    f"stem_stride={self.stem_stride} but got {depth}."
                )
        branches = 3 if branches is None else branches
        check_int("branches", branches, low=2, high=4)
        expected = stem_levels + branches - 1
        if depth is not None and depth != expected:
            raise ValueError(
                f"depth must equal log2(stem_stride) + branches - 1 = {expected} but got {depth}; "
                f"give only one of depth and branches."
            )
        object.__setattr__(self, "branches", branches)
        object.__setattr__(self, "depth", expected)
        super().__post_init__()
        check_int("stages", self.stages, low=1)
        check_int("blocks", self.blocks, low=1)


def branch_counts(cfg: HRNetConfig) -> list[int]:
    """Branches in each stage: 2, 3, ... capped at ``branches``; the last stage has them all."""
    return [min(cfg.branches, k + 2) for k in range(cfg.stages - 1)] + [cfg.branches]


def down_chain(in_ch: int, out_ch: int, steps: int, norm: str) -> nn.Sequential:
    """``steps`` centre-keeping strided convs (ReLU between, none after the last): in_ch -> out_ch."""
    layers = [down_conv(in_ch, in_ch, norm=norm) for _ in range(steps - 1)]
    layers.append(down_conv(in_ch, out_ch, norm=norm, act=False))
    return nn.Sequential(*layers)


class Transition(nn.Module):
    """Keep the existing branches; make each new one from the lowest existing branch."""

    def __init__(self, chans: list[int], n_in: int, n_out: int, norm: str):
        super().__init__()
        self.n_in = n_in
        self.new = nn.ModuleList(
            down_chain(chans[n_in - 1], chans[b], b - n_in + 1, norm) for b in range(n_in, n_out)
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return xs + [F.relu(make(xs[self.n_in - 1])) for make in self.new]


class Fuse(nn.Module):
    """Output ``i`` = ReLU(sum over branches ``j`` of branch ``j`` brought to branch ``i``)."""

    def __init__(self, chans: list[int], n_branches: int, n_outputs: int, norm: str):
        super().__init__()
        self.paths = nn.ModuleList()
        for i in range(n_outputs):
            row = nn.ModuleList()
            for j in range(n_branches):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution: 1x1 conv here, bilinear up-sampling in forward
                    row.append(ConvNormAct(chans[j], chans[i], kernel_size=1, norm=norm, act=False))
                else:  # higher resolution: strided convs
                    row.append(down_chain(chans[j], chans[i], i - j, norm))
            self.paths.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, row in enumerate(self.paths):
            size = xs[i].shape[-2:]
            outs.append(F.relu(sum(resize(path(x), size) for path, x in zip(row, xs))))
        return outs


class Stage(nn.Module):
    """``blocks`` BasicBlocks on each branch, then a fusion into ``n_outputs`` branches."""

    def __init__(self, chans: list[int], n_branches: int, n_outputs: int, cfg: HRNetConfig):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(chans[b], norm=cfg.norm) for _ in range(cfg.blocks)))
            for b in range(n_branches)
        )
        self.fuse = Fuse(chans, n_branches, n_outputs, cfg.norm)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fuse([branch(x) for branch, x in zip(self.branches, xs)])


class HRNetCompact(nn.Module):
    """Compact HRNet heatmap regressor: parallel multi-resolution branches with repeated fusion.

    ``forward(x: (B, in_channels, H, W)) -> (B, out_channels, H // s, W // s)`` raw heatmaps
    (and the head-region logits last, with ``mask_head``).
    """

    def __init__(self, cfg: HRNetConfig):
        super().__init__()
        self.cfg = cfg
        self.output_stride = cfg.output_stride
        self.pad_multiple = 2**cfg.depth
        chans = [cfg.width * 2**b for b in range(cfg.branches)]
        stem = [down_conv(cfg.in_channels, cfg.width, norm=cfg.norm)]
        if cfg.stem_stride == 4:
            stem.append(down_conv(cfg.width, cfg.width, norm=cfg.norm))
        self.stem = nn.Sequential(*stem)
        counts = branch_counts(cfg)
        self.transitions = nn.ModuleList(
            Transition(chans, n_in, n_out, cfg.norm) for n_in, n_out in zip([1] + counts, counts)
        )
        self.stages = nn.ModuleList(
            Stage(chans, n, n if k < cfg.stages - 1 else 1, cfg) for k, n in enumerate(counts)
        )
        self.head = nn.Sequential(
            ConvNormAct(cfg.width, cfg.width, norm=cfg.norm), head_conv(cfg.width, cfg.out_channels)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.cfg.in_channels, self.output_stride)
        h, w = (n // self.output_stride for n in x.shape[-2:])
        padded = pad_to_multiple(x, self.pad_multiple)
        xs = [self.stem(padded)]
        for transition, stage in zip(self.transitions, self.stages):
            xs = stage(transition(xs))
        y = self.to_output_stride(xs[0], padded.shape[-2:])
        return self.head(y)[..., :h, :w]

    def to_output_stride(self, x: torch.Tensor, padded_hw: torch.Size) -> torch.Tensor:
        """Bilinear up-sampling (or average pooling) from the stem stride to the output stride."""
        ratio = self.output_stride / self.cfg.stem_stride
        if ratio > 1:
            return F.avg_pool2d(x, int(ratio))
        return resize(x, [n // self.output_stride for n in padded_hw])


@register_model
def hrnet_compact(**kwargs) -> HRNetCompact:
    """HRNet-style: stem to 1/4, 3 branches (1/4, 1/8, 1/16), 3 fusion stages of 2 blocks."""
    return HRNetCompact(make_config(HRNetConfig, "hrnet_compact", kwargs))
