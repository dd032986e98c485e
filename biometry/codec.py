"""Heatmap codec: keypoints in input pixels <-> Gaussian heatmaps at a stride (mmpose style).

Heatmap pixel ``j`` has its centre at input pixel ``j * stride + (stride - 1) / 2``; only this module
knows that. Keypoints are (x, y) arrays.

Every decoder production runs lives here, behind :meth:`HeatmapCodec.decode` (soft-argmax =
expectation of coordinates under ``softmax(beta * map)``):

- ``decode="global"``: over the whole map (what training's coordinate loss differentiates);
- ``decode="window"``: over a window of :attr:`HeatmapCodec.window_radius` around the peak, so
  stray mass far from the peak does not pull the estimate towards the map centre;
- ``decode="argmax"``: the integer peak with mmpose's quarter-pixel shift (not differentiable);
- ``pairing="unordered"``: both endpoints of a diameter from the sum of its two maps, each in its
  own window of the same radius (:func:`pair_soft_argmax`), whatever ``decode`` says.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DECODES = ("global", "window", "argmax")
PAIRINGS = ("ordered", "unordered")
WINDOW_SIGMAS = 4.0  # default window half size, in Gaussian sigmas


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number but got {beta!r}.")
    return float(beta)


def soft_argmax(heatmaps: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """Differentiable expectation of (x, y) under ``softmax(beta * map)`` over each whole map.

    Args:
        heatmaps: (B, K, h, w) tensor.
        beta: inverse temperature of the softmax.

    Returns:
        (B, K, 2) tensor of (x, y) in heatmap pixels.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w) but got shape {tuple(heatmaps.shape)}.")
    keep = torch.ones_like(heatmaps, dtype=torch.bool)
    return _masked_softmax_mean(_check_beta(beta) * heatmaps.float(), keep)[0]


def argmax_peaks(heatmaps: torch.Tensor, *, refine: bool = True) -> torch.Tensor:
    """Integer peak of each map, with mmpose's quarter-pixel shift towards the higher neighbour.

    Args:
        heatmaps: (B, K, h, w) tensor.
        refine: apply the quarter-pixel shift.

    Returns:
        (B, K, 2) tensor of (x, y) in heatmap pixels (no gradient).
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w) but got shape {tuple(heatmaps.shape)}.")
    maps = heatmaps.detach().float()
    b, k, h, w = maps.shape
    peak = maps.reshape(b, k, h * w).argmax(-1)
    iy, ix = peak // w, peak % w
    coords = torch.stack([ix, iy], -1).to(maps.dtype)
    if refine:
        flat = maps.reshape(b, k, h * w)

        def value(y, x):
            return flat.gather(-1, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))[..., None])[..., 0]

        dx = value(iy, ix + 1) - value(iy, ix - 1)
        dy = value(iy + 1, ix) - value(iy - 1, ix)
        inner_x = ((ix > 0) & (ix < w - 1)).to(maps.dtype)
        inner_y = ((iy > 0) & (iy < h - 1)).to(maps.dtype)
        coords = coords + 0.25 * torch.stack([inner_x * torch.sign(dx), inner_y * torch.sign(dy)], -1)
    return coords


def window_soft_argmax(heatmaps: torch.Tensor, *, beta: float, radius: int) -> torch.Tensor:
    """``softmax(beta * map)`` expectation over a ``(2 radius + 1)^2`` window around each map's peak.

    A model trained through the whole-map soft-argmax still leaves stray mass on hard images (a
    second blob, a faint ridge along the skull); over the whole map that mass pulls the estimate
    towards the map centre and shortens both diameters. The window keeps the sub-pixel estimate
    of the peak and drops the rest. Differentiable in the map values inside the window.

    Args:
        heatmaps: (B, K, h, w) tensor.
        beta: inverse temperature of the softmax.
        radius: window half size in heatmap pixels (Chebyshev distance to the peak).

    Returns:
        (B, K, 2) tensor of (x, y) in heatmap pixels.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w) but got shape {tuple(heatmaps.shape)}.")
    if not _is_positive_int(radius):
        raise ValueError(f"radius must be a positive integer but got {radius!r}.")
    beta = _check_beta(beta)
    b, k, h, w = heatmaps.shape
    peak = heatmaps.detach().reshape(b, k, h * w).argmax(-1)
    ys = torch.arange(h, device=heatmaps.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=heatmaps.device).view(1, 1, 1, w)
    window = (((ys - (peak // w)[..., None, None]).abs() <= radius)
              & ((xs - (peak % w)[..., None, None]).abs() <= radius))
    return _masked_softmax_mean(beta * heatmaps.float(), window)[0]


def _masked_softmax_mean(logits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax`` of (B, K, h, w) ``logits`` over the pixels where ``keep`` is true (each map
    keeps at least one) -> ((B, K, 2) expected (x, y) in heatmap pixels, the distribution)."""
    b, k, h, w = logits.shape
    masked = logits.masked_fill(~keep, float("-inf")).reshape(b, k, h * w)
    prob = torch.softmax(masked, -1).reshape(b, k, h, w)
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device)
    mean = torch.stack([(prob.sum(-2) * xs).sum(-1), (prob.sum(-1) * ys).sum(-1)], -1)
    return mean, prob


PAIRINGS = ("ordered", "unordered")


def pair_soft_argmax(heatmaps: torch.Tensor, *, beta: float, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unordered decoding: both endpoints of a diameter from the sum of its two maps.

    Channels (BPD1, BPD2, OFD1, OFD2) are summed per pair, so it does not matter which channel
    holds which end, or whether the model splits each end between both channels (what a fixed
    endpoint order teaches it where the labelled order flips, and what a per-channel soft-argmax
    averages to the middle of the head). In each pair map the first endpoint is the highest peak,
    the second the highest peak farther than ``radius`` from it (Chebyshev distance); each is the
    ``softmax(beta * map)`` expectation over the pixels within ``radius`` of its peak and nearer
    to it than to the other peak. Differentiable in the map values.

    Args:
        heatmaps: (B, 4, h, w) tensor.
        beta: inverse temperature of the softmax.
        radius: window half size in heatmap pixels.

    Returns:
        ``(coords, spread)``: (B, 4, 2) (x, y) in heatmap pixels, endpoints of a pair in arbitrary
        order; (B, 4) the standard deviation (heatmap pixels) of ``softmax(beta * map)`` over each
        endpoint's half of the map (pixels nearer its peak), an uncertainty that grows with stray
        mass and does not count the other endpoint's peak.
    """
    if heatmaps.ndim != 4 or heatmaps.shape[1] != 4:
        raise ValueError(f"heatmaps must be (B, 4, h, w) but got shape {tuple(heatmaps.shape)}.")
    if not (_is_positive_int(radius)):
        raise ValueError(f"radius must be a positive integer but got {radius!r}.")
    beta = _check_beta(beta)
    b, _, h, w = heatmaps.shape
    pair_maps = torch.stack([heatmaps[:, 0] + heatmaps[:, 1], heatmaps[:, 2] + heatmaps[:, 3]], 1)
    ys = torch.arange(h, device=heatmaps.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=heatmaps.device).view(1, 1, 1, w)

    def peak_grid(flat_index):
        py, px = (flat_index // w)[..., None, None], (flat_index % w)[..., None, None]
        chebyshev = torch.maximum((ys - py).abs(), (xs - px).abs())
        squared = (ys - py).square() + (xs - px).square()
        return chebyshev, squared

    flat = pair_maps.detach().reshape(b, 2, h * w)
    cheb1, sq1 = peak_grid(flat.argmax(-1))
    second = flat.masked_fill((cheb1 <= radius).reshape(b, 2, h * w), float("-inf")).argmax(-1)
    cheb2, sq2 = peak_grid(second)
    cells = (sq1 <= sq2, sq2 < sq1)
    logits = beta * pair_maps.float()
    coords, spreads = [], []
    for cell, cheb in zip(cells, (cheb1, cheb2)):
        coords.append(_masked_softmax_mean(logits, cell & (cheb <= radius))[0])
        mean, prob = _masked_softmax_mean(logits, cell)
        var = (prob * ((xs - mean[..., 0, None, None]).square()
                       + (ys - mean[..., 1, None, None]).square())).sum((-2, -1))
        spreads.append(var.clamp_min(0.0).sqrt())
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (endpoint, pair) -> rows BPD1, BPD2, OFD1, OFD2
    return (torch.stack([coords[e][:, p] for e, p in order], 1),
            torch.stack([spreads[e][:, p] for e, p in order], 1))


class HeatmapCodec:
    """Keypoints (input pixels) <-> unnormalised Gaussian heatmaps (peak 1) at a stride.

    Args:
        input_hw: (H, W) of the model input; both must divide by ``stride``.
        stride: input pixels per heatmap pixel.
        sigma: Gaussian standard deviation in heatmap pixels.
        window_sigmas: half size of every decoding window, in sigmas (:attr:`window_radius`).

    Example:
        >>> codec = HeatmapCodec(input_hw=(64, 96), stride=4, sigma=1.5)
        >>> maps = torch.from_numpy(codec.encode(np.array([[40.3, 21.7]])))[None]
        >>> maps.shape
        torch.Size([1, 1, 16, 24])
        >>> coords, _ = codec.decode(maps, beta=20.0, decode="window")
        >>> np.round(coords[0].numpy(), 1).tolist()
        [[40.3, 21.7]]
    """

    def __init__(self, *, input_hw: tuple[int, int], stride: int, sigma: float,
                 window_sigmas: float = WINDOW_SIGMAS):
        if not (isinstance(input_hw, (tuple, list)) and len(input_hw) == 2 and all(map(_is_positive_int, input_hw))):
            raise ValueError(f"input_hw must be two positive integers (height, width) but got {input_hw!r}.")
        if not _is_positive_int(stride):
            raise ValueError(f"stride must be a positive integer but got {stride!r}.")
        if input_hw[0] % stride or input_hw[1] % stride:
            raise ValueError(
                f"input_hw must be divisible by stride but got {tuple(input_hw)} and stride {stride}."
            )
        for name, value in (("sigma", sigma), ("window_sigmas", window_sigmas)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                    and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number but got {value!r}.")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.stride = int(stride)
        self.sigma = float(sigma)
        self.window_sigmas = float(window_sigmas)

    def __repr__(self) -> str:
        return (f"HeatmapCodec(input_hw={self.input_hw}, stride={self.stride}, sigma={self.sigma}, "
                f"window_sigmas={self.window_sigmas})")

    @property
    def window_radius(self) -> int:
        """Half size of every decoding window in heatmap pixels: ceil(window_sigmas * sigma),
        at least 2."""
        return max(2, math.ceil(self.window_sigmas * self.sigma))

    def decode(self, heatmaps: torch.Tensor, *, beta: float, decode: str = "global",
               pairing: str = "ordered") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 4, h, w) raw maps -> ((B, 4, 2) input pixels, (B, 4) spread in heatmap pixels of
        the unordered decoding or None). See the module docstring for ``decode`` and ``pairing``.
        """
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS} but got {pairing!r}.")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES} but got {decode!r}.")
        heatmaps = heatmaps.float()
        spread = None
        if pairing == "unordered":
            coords, spread = pair_soft_argmax(heatmaps, beta=beta, radius=self.window_radius)
        elif decode == "window":
            coords = window_soft_argmax(heatmaps, beta=beta, radius=self.window_radius)
        elif decode == "argmax":
            coords = argmax_peaks(heatmaps)
        else:
            coords = soft_argmax(heatmaps, beta=beta)
        return self.to_input_coords(coords), spread

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        """(h, w) = input_hw // stride."""
        return self.input_hw[0] // self.stride, self.input_hw[1] // self.stride

    def to_heatmap_coords(self, points):
        """(..., 2) input pixels -> heatmap pixels (numpy array or torch tensor alike)."""
        return (points - (self.stride - 1) / 2) / self.stride

    def to_input_coords(self, coords):
        """(..., 2) heatmap pixels -> input pixels (numpy array or torch tensor alike)."""
        return coords * self.stride + (self.stride - 1) / 2

    def keypoint_weights(self, keypoints: np.ndarray) -> np.ndarray:
        """(K, 2) input pixels -> float32 (K,): 1 for a finite point on the input, else 0."""
        pts = np.asarray(keypoints, dtype=np.float64)
        h, w = self.input_hw
        inside = (
            np.isfinite(pts).all(axis=-1)
            & (pts[..., 0] >= -0.5) & (pts[..., 0] <= w - 0.5)
            & (pts[..., 1] >= -0.5) & (pts[..., 1] <= h - 0.5)
        )
        return inside.astype(np.float32)

    def encode(self, keypoints: np.ndarray) -> np.ndarray:
        """(K, 2) input pixels -> float32 (K, h, w) Gaussians with peak 1 at each keypoint.

        A non-finite keypoint gives an all-zero map.
        """
        pts = np.asarray(keypoints, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"keypoints must be (K, 2) but got shape {pts.shape}.")
        h, w = self.heatmap_hw
        centre = self.to_heatmap_coords(pts)
        finite = np.isfinite(centre).all(axis=1)
        centre = np.where(finite[:, None], centre, 0.0)
        gx = np.exp(-((np.arange(w) - centre[:, :1]) ** 2) / (2 * self.sigma**2))
        gy = np.exp(-((np.arange(h) - centre[:, 1:]) ** 2) / (2 * self.sigma**2))
        maps = gy[:, :, None] * gx[:, None, :]
        maps[~finite] = 0.0
        return maps.astype(np.float32)

    def encode_head_region(self, keypoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, 2) input-pixel landmarks (BPD1, BPD2, OFD1, OFD2) -> ((B, h, w) float 0/1 mask
        of the ellipse they span, (B,) float 1 where it is defined).

        The ellipse is centred on the mean of the four points, its major axis along the OFD, its
        semi-axes half the OFD and BPD lengths; endpoint order does not matter. An image with a
        non-finite or degenerate (zero-length) diameter gets an empty mask and weight 0.
        """
        pts = keypoints.float()
        bpd, ofd = pts[:, 1] - pts[:, 0], pts[:, 3] - pts[:, 2]
        semi_minor = torch.linalg.vector_norm(bpd, dim=-1) / 2
        semi_major = torch.linalg.vector_norm(ofd, dim=-1) / 2
        valid = torch.isfinite(pts).all(dim=(1, 2)) & (semi_minor > 0) & (semi_major > 0)
        pts = torch.where(valid[:, None, None], pts, torch.zeros_like(pts))
        centre = pts.mean(dim=1)  # (B, 2)
        along = ofd / (2 * semi_major).clamp_min(1e-6)[:, None]  # unit OFD direction
        h, w = self.heatmap_hw
        ys, xs = torch.meshgrid(torch.arange(h, device=pts.device, dtype=pts.dtype),
                                torch.arange(w, device=pts.device, dtype=pts.dtype), indexing="ij")
        grid = self.to_input_coords(torch.stack([xs, ys], dim=-1))  # (h, w, 2) input pixels
        offset = grid[None] - centre[:, None, None]  # (B, h, w, 2)
        u = (offset * along[:, None, None]).sum(-1)
        v = offset[..., 0] * -along[:, None, None, 1] + offset[..., 1] * along[:, None, None, 0]
        inside = ((u / semi_major.clamp_min(1e-6)[:, None, None]).square()
                  + (v / semi_minor.clamp_min(1e-6)[:, None, None]).square()) <= 1
        mask = (inside & valid[:, None, None]).float()
        return mask, valid.float()
