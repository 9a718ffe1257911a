"""Band-wise (tiled) inference for images that do not fit in memory at once.

A whole-image pass holds every scan layer's working set for the whole map at
once. Band-wise execution (:mod:`s4fusion.models.streaming`) keeps only the maps
between blocks for the whole image and computes each block's scans band by band,
carrying the scan states across bands: its output equals the whole-image output
up to float rounding, unlike independent overlapping tiles, which lack the
context that the selective scans carry along whole rows and columns.

Sizes: a *tile* of N pixels means bands of about as many tokens as an N x N
pixel tile has at the finest scale (:func:`tile_tokens`); a band spans the whole
map in one direction and as many rows (or columns) as that budget allows.

Memory: :func:`estimate_bytes` is an analytic estimate of the peak memory of one
forward pass, whole-image or band-wise, either for a fused scan backend (the CPU
and GPU kernels, which do not materialise per-state tensors) or for the
reference scan (which materialises ``exp(delta * A)``, ``delta * B * u``, ``B`` and
``C`` per channel and state for a whole sequence, about 10x more); it was checked
against measured peaks (tests). :func:`memory_budget` is the usable share of the
device's free memory; :func:`choose_band` picks the largest band that fits.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .models import S4Fusion, S4FusionConfig
from .models.streaming import banded

__all__ = [
    "BAND_TOKENS",
    "SAFETY",
    "padded_size",
    "tile_tokens",
    "estimate_bytes",
    "memory_budget",
    "choose_band",
    "banded_forward",
]

# Largest band chosen automatically, in tokens: larger bands save no time. On the 2-core CPU
# (BENCHMARKS.md), a 3000x4000 pair took 148 s / 5.9 GiB with 20,000-token bands and 244 s /
# 8.4 GiB with 1,023,188; at 1500x2000, 38 s with 20,000 against 41 s for the whole image.
BAND_TOKENS = 20_000
SAFETY = 1.5  # margin on the analytic estimate (allocator rounding, workspaces, measured scatter)
CPU_SHARE = 0.6  # share of the available RAM used as the default CPU budget
CUDA_SHARE = 0.8  # share of the free GPU memory used as the default GPU budget
NUM_DIRECTIONS = 4


def padded_size(config: S4FusionConfig, height: int, width: int) -> tuple[int, int]:
    """Padded (height, width) of the released padding rule (side = pad_offset mod pad_multiple)."""
    m, o = config.pad_multiple, config.pad_offset
    return height + (o - height) % m, width + (o - width) % m


def _tokens(config: S4FusionConfig, side: int) -> int:
    """Finest-scale tokens along a padded side."""
    return (side - config.patch_size) // config.patch_stride + 1


def tile_tokens(config: S4FusionConfig, tile: int) -> int:
    """Band size in tokens of an N-pixel tile: the finest-scale tokens of an N x N
    pixel tile. Raises ValueError below the network's smallest image."""
    smallest = config.pad_multiple + config.pad_offset
    if tile < smallest:
        raise ValueError(f"tile size {tile} is too small: tiles must be at least {smallest} pixels")
    return _tokens(config, tile) ** 2


def _scan_bytes(
    M: int, tokens: float, d: int, d_state: int, dt_rank: int, fused: bool, K: int = NUM_DIRECTIONS
) -> float:
    """Working set (float32 bytes) of one SS2D / Cross SS2D call over ``M`` modalities
    and ``K`` directions (all four in a whole-image pass, one in a band's call).

    Around every backend, per modality and token: the projections ``x_proj``
    (K, R+2N) and a contiguous copy of B and C, ``delta`` (K, d), the scan output
    per direction (K, d) and a few (d,) maps (input, gate, conv output, normalised
    output). The reference scan adds B, C, ``exp(delta A)`` and ``delta B u``
    materialised per channel and state, (K*d, N) per step each, and unfolded and
    interleaved copies of its inputs."""
    floats = M * tokens * (2 * K * d + 2 * K * (dt_rank + 2 * d_state) + 6 * d)
    if not fused:
        floats += M * tokens * K * (4 * d * d_state + 8 * d + 4 * d_state + dt_rank + 2 * d_state)
    return 4.0 * floats


def estimate_bytes(
    config: S4FusionConfig,
    height: int,
    width: int,
    batch: int = 1,
    fused_scan: bool = True,
    band_tokens: Optional[int] = None,
) -> int:
    """Estimated peak memory (bytes) of one inference forward pass on a (batch, 1,
    height, width) pair (padded internally), in float32; whole-image, or band-wise
    with bands of ``band_tokens`` tokens.

    Peak = the feature maps that stay alive through the pass (encoder skips and
    outputs, CMSA outputs, decoder state) + the larger of the head's image-sized
    tensors and the biggest scan layer's working set: whole-image, that is
    :func:`_scan_bytes` of the whole map (``fused_scan`` False for the reference
    scan, which materialises per-state tensors); band-wise, the block's whole-map
    scan input and output accumulator, (M, d) per token each, plus
    :func:`_scan_bytes` of one band. Times :data:`SAFETY`. Checked against
    measured peaks in the tests."""
    hp, wp = padded_size(config, height, width)
    tokens0 = _tokens(config, hp) * _tokens(config, wp)
    scan = 0.0
    maps = 0.0
    for i, dim in enumerate(config.dims):
        tokens = tokens0 / 4**i
        d, r = config.d_inner(dim), config.dt_rank(dim)
        layers = []
        if config.depths[i] or config.decoder_depths[config.num_scales - 1 - i]:
            layers.append((1, config.ss2d_d_state))
        if config.cmsa_depth and (i > 0 or config.topology == "paper"):
            layers.append((2, config.cmsa_d_state))
        for M, n in layers:
            if band_tokens is None or (M == 2 and config.fusion != "cmsa"):
                # whole image, or an ablation's fusion module (it runs on the whole map)
                work = _scan_bytes(M, tokens, d, n, r, fused_scan)
            else:
                band = min(tokens, band_tokens)
                work = 4.0 * tokens * M * 2 * d + _scan_bytes(M, band, d, n, r, fused_scan, 1)
            scan = max(scan, work)
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


def choose_band(
    config: S4FusionConfig,
    height: int,
    width: int,
    budget: int,
    fused_scan: bool = True,
    fused_state: bool = True,
    largest: Optional[int] = None,
) -> Optional[int]:
    """None when one whole-image (1, 1, height, width) pass fits ``budget`` bytes;
    otherwise the largest band (in tokens, at most ``largest``, default
    :data:`BAND_TOKENS`, at least one row or column of the finest map) whose
    band-wise pass fits. Raises
    ValueError when even one-row bands do not fit (the maps between blocks alone
    are over the budget). ``fused_scan`` / ``fused_state``: whether the whole-image
    scan / the band scan (:func:`s4fusion.ops.cross_scan_state`) has a fused backend
    here."""

    def fits(band: Optional[int]) -> bool:
        fused = fused_scan if band is None else fused_state
        return estimate_bytes(config, height, width, 1, fused, band) <= budget

    if fits(None):
        return None
    hp, wp = padded_size(config, height, width)
    lo = max(_tokens(config, hp), _tokens(config, wp))  # one row or column of the finest map
    if not fits(lo):
        raise ValueError(
            f"the memory budget ({budget / 2**30:.2f} GiB) is too small for a {width}x{height} image even band "
            f"by band (needs about {estimate_bytes(config, height, width, 1, fused_state, lo) / 2**30:.2f} GiB); "
            "raise the budget or fuse a smaller image"
        )
    hi = min(BAND_TOKENS if largest is None else largest, _tokens(config, hp) * _tokens(config, wp))
    if hi <= lo or fits(hi):
        return max(lo, hi)
    while hi - lo > max(1, lo // 64):  # binary search to within ~2 %
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@torch.no_grad()
def banded_forward(
    model: S4Fusion,
    infrared: torch.Tensor,
    visible: torch.Tensor,
    band_tokens: int,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """``model(infrared, visible)`` computed band-wise (see
    :mod:`s4fusion.models.streaming`): the same output up to float rounding, with
    the memory of :func:`estimate_bytes` for ``band_tokens``.

    Args:
        infrared, visible: (B, 1, H, W) float tensors on the model's device.
        band_tokens: tokens per band (:func:`tile_tokens` of a tile size, or
            :func:`choose_band`).
        progress: called as ``progress(n)`` after each of the network's scan blocks.
    Returns:
        (B, 1, H, W) fused, unclamped.
    """
    with banded(model, band_tokens, progress):
        return model(infrared, visible)
