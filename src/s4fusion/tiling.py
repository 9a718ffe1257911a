"""Tiled inference for images that do not fit in memory at once.

The image pair is zero-padded exactly as :meth:`S4Fusion.forward` pads it (the
released padding), and the *padded* image is cut into overlapping tiles whose
sides are valid network sizes (``side % pad_multiple == pad_offset``, 12k+1 for
the released network) and whose corners lie on the network's coarsest token
grid (multiples of ``pad_multiple`` pixels). Each tile is therefore processed on
exactly the same patch and token grid as in the whole-image run; the only
difference is the context a tile cannot see.

Blending: along each axis, where two tiles overlap by ``L`` pixels, each tile's
weight is 0 on the quarter of the overlap nearest its own edge, rises as a raised
cosine over the middle half and is 1 on the far quarter; the two weights of a
pair sum to 1 at every pixel. The 2-D weight of a tile is the product of its two
axis weights, and the blended output is ``sum(w * tile) / sum(w)``. The result
is continuous across tile borders (no seams), and no pixel takes anything from
a tile closer than ``L / 4`` to that tile's inner edge.

How close tiled output is to the whole-image output depends on the weights'
effective receptive field (the selective scans carry context along whole rows
and columns, decaying at rates the weights set): the overlap must cover the
range over which context still matters. The tests measure it for a
constructor-initialised network; tiling is only used when the image would not
fit the memory budget (or when asked for).

Memory: :func:`estimate_bytes` is an analytic estimate of the peak memory of one
forward pass, either for a fused scan backend (the CPU and GPU kernels, which
do not materialise per-state tensors) or for the reference scan (which
materialises ``exp(delta * A)``, ``delta * B * u``, ``B`` and ``C`` per channel and
state for a whole sequence, about 10x more); it was checked against measured
peaks (tests). :func:`memory_budget` is the usable share of the device's free
memory; :func:`choose_tile` picks the largest tile that fits.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .models import S4Fusion, S4FusionConfig

__all__ = [
    "DEFAULT_OVERLAP",
    "SAFETY",
    "padded_size",
    "valid_tile",
    "tile_starts",
    "fit_tile",
    "axis_weights",
    "estimate_bytes",
    "memory_budget",
    "choose_tile",
    "tiled_forward",
]

DEFAULT_OVERLAP = 96  # pixels; rounded up to a multiple of the network's grid
SAFETY = 1.5  # margin on the analytic estimate (allocator rounding, workspaces, measured scatter)
CPU_SHARE = 0.6  # share of the available RAM used as the default CPU budget
CUDA_SHARE = 0.8  # share of the free GPU memory used as the default GPU budget
NUM_DIRECTIONS = 4


def padded_size(config: S4FusionConfig, height: int, width: int) -> tuple[int, int]:
    """Padded (height, width) of the released padding rule (side = pad_offset mod pad_multiple)."""
    m, o = config.pad_multiple, config.pad_offset
    return height + (o - height) % m, width + (o - width) % m


def valid_tile(config: S4FusionConfig, tile: int) -> int:
    """The largest valid tile side (``pad_offset`` mod ``pad_multiple``) <= ``tile``."""
    m, o = config.pad_multiple, config.pad_offset
    side = (tile - o) // m * m + o
    if side < m + o:
        raise ValueError(f"tile size {tile} is too small: tiles must be at least {m + o} pixels")
    return side


def _overlap(config: S4FusionConfig, overlap: int, tile: int) -> int:
    """Overlap rounded up to a multiple of the grid; at least one grid step; at
    most half the tile."""
    m = config.pad_multiple
    if overlap < 0:
        raise ValueError(f"tile overlap must be >= 0, got {overlap}")
    overlap = max(m, math.ceil(overlap / m) * m)
    if 2 * overlap > tile - 1:
        raise ValueError(
            f"tile overlap {overlap} px is more than half the tile ({tile} px); use a larger tile or a smaller overlap"
        )
    return overlap


def tile_starts(padded: int, tile: int, overlap: int, step: int) -> list[int]:
    """Start offsets of the tiles along one axis of length ``padded``: multiples of
    ``step``, the first 0, the last ``padded - tile``, evenly spread so that
    neighbours overlap by at least ``overlap`` pixels."""
    if tile >= padded:
        return [0]
    span = (padded - tile) // step  # in grid steps
    advance = (tile - overlap) // step  # largest advance keeping the overlap
    if advance < 1:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves no room to advance (grid {step})")
    n = math.ceil(span / advance) + 1
    return [round(i * span / (n - 1)) * step for i in range(n)]


def fit_tile(padded: int, tile: int, overlap: int, step: int) -> int:
    """The smallest tile side (``tile`` minus a multiple of ``step``) that covers an
    axis of length ``padded`` with as few tiles as ``tile`` does: the work is spread
    evenly instead of giving a few tiles a very large overlap."""
    if tile >= padded:
        return padded
    count = len(tile_starts(padded, tile, overlap, step))
    side = tile
    while side - step > 2 * overlap and len(tile_starts(padded, side - step, overlap, step)) <= count:
        side -= step
    return side


def _ramp(u: torch.Tensor) -> torch.Tensor:
    """0 for u <= 0, 1 for u >= 1, raised cosine between; ramp(u) + ramp(1 - u) = 1."""
    return 0.5 - 0.5 * torch.cos(math.pi * u.clamp(0.0, 1.0))


def axis_weights(length: int, before: Optional[int], after: Optional[int]) -> torch.Tensor:
    """(length,) float64 blending weights of a tile along one axis. ``before`` /
    ``after``: its overlap in pixels with the previous / next tile (None at an
    image border, where the weight stays 1)."""
    x = torch.arange(length, dtype=torch.float64)
    w = torch.ones(length, dtype=torch.float64)
    for overlap, distance in ((before, x), (after, length - 1 - x)):
        if overlap:
            span = overlap - 1  # distances of the two tiles to their edges sum to overlap - 1
            w = w * _ramp((distance - span / 4) / (span / 2))
    return w


def _scan_bytes(M: int, tokens: float, d: int, d_state: int, dt_rank: int, fused: bool) -> float:
    """Working set (float32 bytes) of one SS2D / Cross SS2D call over ``M`` modalities.

    Around every backend, per modality and token: the projections ``x_proj``
    (K, R+2N) and a contiguous copy of B and C, ``delta`` (K, d), the scan output
    per direction (K, d) and a few (d,) maps (input, gate, conv output, normalised
    output). The reference scan adds B, C, ``exp(delta A)`` and ``delta B u``
    materialised per channel and state, (K*d, N) per step each, and unfolded and
    interleaved copies of its inputs."""
    K = NUM_DIRECTIONS
    floats = M * tokens * (2 * K * d + 2 * K * (dt_rank + 2 * d_state) + 6 * d)
    if not fused:
        floats += M * tokens * K * (4 * d * d_state + 8 * d + 4 * d_state + dt_rank + 2 * d_state)
    return 4.0 * floats


def estimate_bytes(
    config: S4FusionConfig, height: int, width: int, batch: int = 1, fused_scan: bool = True
) -> int:
    """Estimated peak memory (bytes) of one inference forward pass on a (batch, 1,
    height, width) pair (padded internally), in float32.

    Peak = the feature maps that stay alive through the pass (encoder skips and
    outputs, CMSA outputs, decoder state) + the larger of the biggest scan call's
    working set (:func:`_scan_bytes`; ``fused_scan`` False for the reference scan,
    which materialises per-state tensors) and the head's image-sized tensors, times
    :data:`SAFETY`. Checked against measured peaks in the tests."""
    hp, wp = padded_size(config, height, width)
    k, s = config.patch_size, config.patch_stride
    tokens0 = ((hp - k) // s + 1) * ((wp - k) // s + 1)
    scan = 0.0
    maps = 0.0
    for i, dim in enumerate(config.dims):
        tokens = tokens0 / 4**i
        d, r = config.d_inner(dim), config.dt_rank(dim)
        if config.depths[i] or config.decoder_depths[config.num_scales - 1 - i]:
            scan = max(scan, _scan_bytes(1, tokens, d, config.ss2d_d_state, r, fused_scan))
        if config.cmsa_depth and (i > 0 or config.topology == "paper"):
            scan = max(scan, _scan_bytes(2, tokens, d, config.cmsa_d_state, r, fused_scan))
        maps += 4.0 * tokens * 6 * dim
    head = 4.0 * (tokens0 * config.dims[0] * 4 + hp * wp * (config.fold_chans + 4))
    return int(batch * (maps + max(scan, head)) * SAFETY)


def _available_ram() -> int:
    """Bytes of RAM available to this process (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4 << 30  # unknown platform: assume 4 GiB


def memory_budget(device: torch.device) -> int:
    """Default memory budget in bytes: :data:`CUDA_SHARE` of the GPU's free memory,
    or :data:`CPU_SHARE` of the available RAM elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_SHARE)
    return int(_available_ram() * CPU_SHARE)


def choose_tile(
    config: S4FusionConfig, height: int, width: int, budget: int, overlap: int, fused_scan: bool = True
) -> Optional[int]:
    """None when one (1, 1, height, width) pass fits ``budget`` bytes; otherwise the
    largest valid square tile side whose pass fits. Raises ValueError when even a
    tile with room for the overlap does not fit."""

    def fits(h: int, w: int) -> bool:
        return estimate_bytes(config, h, w, 1, fused_scan) <= budget

    if fits(height, width):
        return None
    m, o = config.pad_multiple, config.pad_offset
    lo = valid_tile(config, 2 * max(m, math.ceil(overlap / m) * m) + m + o)  # smallest tile leaving an advance
    if not fits(lo, lo):
        raise ValueError(
            f"the memory budget ({budget / 2**30:.2f} GiB) is too small even for {lo}x{lo}-pixel tiles "
            f"with a {overlap}-pixel overlap; raise the budget or lower the overlap"
        )
    hi = max(padded_size(config, height, width))
    while hi - lo > m:  # binary search over valid sides
        mid = valid_tile(config, (lo + hi) // 2)
        if mid <= lo:
            break
        if fits(mid, mid):
            lo = mid
        else:
            hi = mid
    return lo


@torch.no_grad()
def tiled_forward(
    model: S4Fusion,
    infrared: torch.Tensor,
    visible: torch.Tensor,
    tile: int,
    overlap: int = DEFAULT_OVERLAP,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """``model(infrared, visible)`` computed tile by tile.

    Args:
        infrared, visible: (B, 1, H, W) float tensors on the model's device.
        tile: tile side in pixels, rounded down to a valid network size.
        overlap: minimum overlap of neighbouring tiles in pixels, rounded up to a
            multiple of the network grid (``pad_multiple``, 12), at most half a tile.
        progress: called as ``progress(done, total)`` after each tile.
    Returns:
        (B, 1, H, W) fused, unclamped, in float32 (or the input dtype if wider).
    """
    cfg = model.config
    if infrared.shape != visible.shape or infrared.dim() != 4:
        raise ValueError(f"infrared {tuple(infrared.shape)} and visible {tuple(visible.shape)} must be equal (B,1,H,W)")
    batch, _, height, width = infrared.shape
    top, bottom, left, right = model.padding_for(height, width)
    pad = (left, right, top, bottom)
    ir_p, vi_p = F.pad(infrared, pad), F.pad(visible, pad)
    hp, wp = ir_p.shape[-2:]
    tile = valid_tile(cfg, tile)
    if tile < max(hp, wp):  # the overlap matters only along an axis that is split
        overlap = _overlap(cfg, overlap, tile)
    step = cfg.pad_multiple
    th, tw = fit_tile(hp, tile, overlap, step), fit_tile(wp, tile, overlap, step)
    ys, xs = tile_starts(hp, th, overlap, step), tile_starts(wp, tw, overlap, step)

    def weights(starts: list[int], length: int) -> list[torch.Tensor]:
        out = []
        for i, s in enumerate(starts):
            before = starts[i - 1] + length - s if i > 0 else None
            after = s + length - starts[i + 1] if i + 1 < len(starts) else None
            out.append(axis_weights(length, before, after))
        return out

    wy, wx = weights(ys, th), weights(xs, tw)
    acc_dtype = torch.promote_types(infrared.dtype, torch.float32)
    acc = torch.zeros(batch, 1, hp, wp, dtype=acc_dtype, device=infrared.device)
    norm = torch.zeros(hp, wp, dtype=acc_dtype, device=infrared.device)
    total = batch * len(ys) * len(xs)
    for n, (b, i, j) in enumerate(itertools.product(range(batch), range(len(ys)), range(len(xs)))):
        y, x = ys[i], xs[j]
        window = (slice(b, b + 1), slice(None), slice(y, y + th), slice(x, x + tw))
        out = model.forward_padded(ir_p[window], vi_p[window])
        w = (wy[i][:, None] * wx[j][None, :]).to(device=acc.device, dtype=acc_dtype)
        acc[b, :, y : y + th, x : x + tw] += out[0].to(acc_dtype) * w
        if b == 0:
            norm[y : y + th, x : x + tw] += w
        if progress is not None:
            progress(n + 1, total)
    return (acc / norm)[:, :, top : top + height, left : left + width]
