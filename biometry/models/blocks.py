"""Conv blocks and size helpers shared by the architectures (shapes are (B, C, H, W))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d (``"batch"``) or GroupNorm with up to 8 groups (``"group"``)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(channels, MAX_GROUPS), channels)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU (``act=False`` drops the ReLU); 'same' padding by default."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, norm: str = "group", act: bool = True):
        padding = kernel_size // 2 if padding is None else padding
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False),
            norm_layer(norm, out_ch),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def down_conv(in_ch: int, out_ch: int, *, norm: str = "group", act: bool = True) -> ConvNormAct:
    """2x down-sampling conv that keeps pixel centres where the codec puts them.

    A 4x4 kernel, stride 2, padding 1 centres output pixel ``j`` on input ``2j + 0.5``, the centre
    of the 2x2 cell it stands for (like max-pooling); the usual 3x3 stride-2 conv centres it on
    ``2j``, half a pixel off at every level (1.5 input pixels at stride 4). Even sizes halve exactly.
    """
    return ConvNormAct(in_ch, out_ch, kernel_size=4, stride=2, padding=1, norm=norm, act=act)


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvNormAct: the UNet level block."""

    def __init__(self, in_ch: int, out_ch: int, *, norm: str = "group"):
        super().__init__(ConvNormAct(in_ch, out_ch, norm=norm), ConvNormAct(out_ch, out_ch, norm=norm))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity shortcut (channels kept)."""

    def __init__(self, channels: int, *, norm: str = "group"):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, norm=norm)
        self.conv2 = ConvNormAct(channels, channels, norm=norm, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit norms; heads (``_is_head``) start near zero (flat heatmaps)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if getattr(m, "_is_head", False):
                nn.init.normal_(m.weight, std=1e-3)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def head_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """The 1x1 conv that produces heatmaps (raw scores, no activation)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    conv._is_head = True
    return conv


# ---------------------------------------------------------------------------------------------
# Sizes


def check_input(x: torch.Tensor, in_channels: int, output_stride: int) -> None:
    """Raise ``ValueError`` unless ``x`` is (B, in_channels, H, W) with H, W divisible by the stride."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"input must have shape (B, {in_channels}, H, W) but got {tuple(x.shape)}."
        )
    h, w = x.shape[-2:]
    if h % output_stride or w % output_stride:
        raise ValueError(
            f"input height and width must be divisible by output_stride={output_stride} "
            f"but got ({h}, {w})."
        )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``x`` at the bottom and right so H and W are multiples of ``multiple``.

    Padding at the bottom/right keeps pixel (0, 0) where it was, so cropping the output back to
    its top-left corner is exact (the letterbox pads the same sides).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = F.pad(x, (0, pad_w, 0, pad_h))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``: pixel centres stay consistent across strides)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
