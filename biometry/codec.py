"""Heatmap codec: keypoints in input pixels <-> Gaussian heatmaps at a stride (mmpose style).

Heatmap pixel ``j`` has its centre at input pixel ``j * stride + (stride - 1) / 2``; only this module
knows that. Keypoints are (x, y) arrays.

Decoding modes (soft-argmax = expectation of coordinates under a distribution made from the map):

- ``"local"`` (default): non-negative part of the map in a ``(2r+1)^2`` window (``r = ceil(4 sigma)``)
  around the integer peak, divided by its sum. A map trained with MSE towards Gaussian targets is
  about 0 away from the peak, but the sum of small positive background values over the whole map
  still pulls a global expectation towards the map centre; the window keeps the sub-pixel accuracy
  and drops that bias. It is what the round trip uses (exact up to the sampled Gaussian's symmetry).
- ``"relu"``: the same normalisation over the whole map (what ``soft_argmax(mode="relu")`` trains).
- ``"softmax"``: ``softmax(beta * map)`` over the whole map, for models whose outputs are logits
  (integral regression). With peak-1 Gaussian maps and ``beta = 1`` the background dominates and the
  result sits near the map centre; large ``beta`` tends to argmax and loses the sub-pixel part.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DECODE_MODES = ("local", "relu", "softmax")


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES} but got {mode!r}.")
    return mode


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number but got {beta!r}.")
    return float(beta)


def _as_numpy(heatmaps) -> np.ndarray:
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps.detach().cpu().double().numpy()
    return np.asarray(heatmaps, dtype=np.float64)


def soft_argmax(heatmaps: torch.Tensor, *, beta: float = 1.0, mode: str = "softmax") -> torch.Tensor:
    """Differentiable expectation of (x, y) over each map, in heatmap pixels.

    Args:
        heatmaps: (B, K, h, w) tensor.
        beta: inverse temperature of ``mode="softmax"``.
        mode: ``"softmax"`` (``softmax(beta * map)``) or ``"relu"`` (``relu(map) / sum``; a map with
            no positive value gives the map centre).

    Returns:
        (B, K, 2) tensor of (x, y) in heatmap pixels.
    """
    if mode not in ("softmax", "relu"):
        raise ValueError(f"mode must be 'softmax' or 'relu' but got {mode!r}.")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w) but got shape {tuple(heatmaps.shape)}.")
    b, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, k, h * w)
    if mode == "softmax":
        prob = torch.softmax(_check_beta(beta) * flat, dim=-1)
    else:
        pos = torch.relu(flat)
        total = pos.sum(dim=-1, keepdim=True)
        uniform = torch.full_like(pos, 1.0 / (h * w))
        prob = torch.where(total > 0, pos / total.clamp_min(torch.finfo(pos.dtype).tiny), uniform)
    prob = prob.reshape(b, k, h, w)
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device)
    x = (prob.sum(dim=2) * xs).sum(dim=-1)
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


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
        decode_mode: default mode of ``decode`` (see the module docstring): ``"local"``,
            ``"relu"`` or ``"softmax"``.
        beta: default inverse temperature of the ``"softmax"`` mode.

    Example:
        >>> codec = HeatmapCodec(input_hw=(64, 96), stride=4, sigma=1.5)
        >>> maps = codec.encode(np.array([[40.3, 21.7]]))
        >>> maps.shape
        (1, 16, 24)
        >>> keypoints, scores = codec.decode(maps)
        >>> np.round(keypoints, 2).tolist()
        [[40.3, 21.7]]
    """

    def __init__(
        self,
        *,
        input_hw: tuple[int, int],
        stride: int,
        sigma: float,
        decode_mode: str = "local",
        beta: float = 1.0,
    ):
        if not (isinstance(input_hw, (tuple, list)) and len(input_hw) == 2 and all(map(_is_positive_int, input_hw))):
            raise ValueError(f"input_hw must be two positive integers (height, width) but got {input_hw!r}.")
        if not _is_positive_int(stride):
            raise ValueError(f"stride must be a positive integer but got {stride!r}.")
        if input_hw[0] % stride or input_hw[1] % stride:
            raise ValueError(
                f"input_hw must be divisible by stride but got {tuple(input_hw)} and stride {stride}."
            )
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive number but got {sigma!r}.")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.stride = int(stride)
        self.sigma = float(sigma)
        self.decode_mode = _check_mode(decode_mode)
        self.beta = _check_beta(beta)

    def __repr__(self) -> str:
        return (
            f"HeatmapCodec(input_hw={self.input_hw}, stride={self.stride}, sigma={self.sigma}, "
            f"decode_mode={self.decode_mode!r}, beta={self.beta})"
        )

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        """(h, w) = input_hw // stride."""
        return self.input_hw[0] // self.stride, self.input_hw[1] // self.stride

    @property
    def window_radius(self) -> int:
        """Half size of the ``"local"`` decoding window in heatmap pixels: ceil(4 sigma)."""
        return max(1, math.ceil(4 * self.sigma))

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

    def decode(self, heatmaps, *, mode: str | None = None, beta: float | None = None):
        """Sub-pixel soft-argmax decoding.

        Args:
            heatmaps: (K, h, w) or (B, K, h, w), numpy or torch.
            mode: ``"local"``, ``"relu"`` or ``"softmax"``; default the codec's ``decode_mode``.
            beta: inverse temperature of ``"softmax"``; default the codec's ``beta``.

        Returns:
            keypoints float64 (..., K, 2) in input pixels; scores float64 (..., K) (each map's max).
        """
        maps = self._maps(heatmaps)
        mode = _check_mode(self.decode_mode if mode is None else mode)
        flat = maps.reshape(-1, *maps.shape[-2:])
        if mode == "local":
            coords = self._local_expectation(flat)
        else:
            prob = self._distribution(flat, mode, self.beta if beta is None else _check_beta(beta))
            coords = _expectation(prob)
        keypoints = self.to_input_coords(coords).reshape(*maps.shape[:-2], 2)
        return keypoints, maps.max(axis=(-2, -1))

    def decode_argmax(self, heatmaps, *, refine: bool = True):
        """Integer peak of each map, with mmpose's quarter-pixel shift towards the higher neighbour.

        Args:
            heatmaps: (K, h, w) or (B, K, h, w), numpy or torch.
            refine: apply the quarter-pixel shift.

        Returns:
            keypoints float64 (..., K, 2) in input pixels; scores float64 (..., K).
        """
        maps = self._maps(heatmaps)
        flat = maps.reshape(-1, *maps.shape[-2:])
        n, h, w = flat.shape
        iy, ix = np.unravel_index(flat.reshape(n, -1).argmax(axis=1), (h, w))
        coords = np.stack([ix, iy], axis=1).astype(np.float64)
        if refine:
            rows = np.arange(n)
            inner_x = (ix > 0) & (ix < w - 1)
            inner_y = (iy > 0) & (iy < h - 1)
            dx = flat[rows, iy, np.minimum(ix + 1, w - 1)] - flat[rows, iy, np.maximum(ix - 1, 0)]
            dy = flat[rows, np.minimum(iy + 1, h - 1), ix] - flat[rows, np.maximum(iy - 1, 0), ix]
            coords[:, 0] += np.where(inner_x, 0.25 * np.sign(dx), 0.0)
            coords[:, 1] += np.where(inner_y, 0.25 * np.sign(dy), 0.0)
        keypoints = self.to_input_coords(coords).reshape(*maps.shape[:-2], 2)
        return keypoints, maps.max(axis=(-2, -1))

    def _maps(self, heatmaps) -> np.ndarray:
        maps = _as_numpy(heatmaps)
        if maps.ndim not in (3, 4) or maps.shape[-2:] != self.heatmap_hw:
            raise ValueError(
                f"heatmaps must be (K, h, w) or (B, K, h, w) with (h, w) = {self.heatmap_hw} "
                f"but got shape {maps.shape}."
            )
        return maps

    @staticmethod
    def _distribution(flat: np.ndarray, mode: str, beta: float) -> np.ndarray:
        n, h, w = flat.shape
        if mode == "softmax":
            z = beta * flat.reshape(n, -1)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return (z / z.sum(axis=1, keepdims=True)).reshape(n, h, w)
        return _normalise_positive(flat)

    def _local_expectation(self, flat: np.ndarray) -> np.ndarray:
        n, h, w = flat.shape
        r = self.window_radius
        iy, ix = np.unravel_index(flat.reshape(n, -1).argmax(axis=1), (h, w))
        padded = np.pad(np.maximum(flat, 0.0), ((0, 0), (r, r), (r, r)))
        offsets = np.arange(-r, r + 1)
        rows = iy[:, None, None] + offsets[None, :, None] + r
        cols = ix[:, None, None] + offsets[None, None, :] + r
        window = padded[np.arange(n)[:, None, None], rows, cols]
        total = window.sum(axis=(1, 2))
        safe = np.where(total > 0, total, 1.0)
        dx = (window.sum(axis=1) * offsets).sum(axis=1) / safe
        dy = (window.sum(axis=2) * offsets).sum(axis=1) / safe
        return np.stack([ix + dx, iy + dy], axis=1).astype(np.float64)


def _normalise_positive(flat: np.ndarray) -> np.ndarray:
    """(n, h, w) -> relu(map) / sum, uniform where a map has no positive value."""
    pos = np.maximum(flat, 0.0)
    total = pos.sum(axis=(1, 2), keepdims=True)
    uniform = np.full_like(pos, 1.0 / (flat.shape[1] * flat.shape[2]))
    return np.where(total > 0, pos / np.where(total > 0, total, 1.0), uniform)


def _expectation(prob: np.ndarray) -> np.ndarray:
    """(n, h, w) distributions -> (n, 2) expected (x, y) in heatmap pixels."""
    n, h, w = prob.shape
    x = (prob.sum(axis=1) * np.arange(w)).sum(axis=1)
    y = (prob.sum(axis=2) * np.arange(h)).sum(axis=1)
    return np.stack([x, y], axis=1)
