"""Exact band-wise inference: S4Fusion on maps too large for one pass.

Every module of the network is local (per-token LayerNorm and Linear, the 3x3
depthwise conv of a scan branch with its one-token halo, patch merging and
expanding, the fold head) except the selective scans, which visit the whole map
in four orders: row-major (direction 0), column-major (1) and their reversals
(2, 3). A band of token rows is a contiguous run of the row-major orders, and a
band of token columns a contiguous run of the column-major orders; inside a
band, the direction's order is the band's own. So every direction is swept over
its own bands in its own order (rows top to bottom for 0, bottom to top for 2;
columns left to right for 1, right to left for 3), carrying the (b, d, N) state
from band to band with :func:`s4fusion.ops.cross_scan_state`. The state updates
are step for step those of the whole-map scan: the output equals the whole-map
output up to float rounding (the tests hold it to 1e-5).

What a VSS or CMSA block keeps for the whole map: its inputs and outputs, the
scan branch's input ``a`` per modality and the scan output accumulator, (b, M, d,
H, W) each. Everything else (the input projection, the per-direction delta, B, C,
the mark, the gate) exists for one band at a time. The maps between blocks, and
the modules other than these two blocks (embedding, merging, expanding, the
ablations' fusion modules, the head), run on the whole map as usual.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .. import ops
from .cmsa import CMSABlock
from .ss2d import NUM_DIRECTIONS, GatedScanBranch, VSSBlock

Band = tuple[int, int, int, int]  # token rows [r0, r1) x token columns [c0, c1)


def direction_bands(height: int, width: int, band_tokens: int, direction: int) -> list[Band]:
    """The bands that direction ``direction`` sweeps over a height x width token map,
    in its order, each of about ``band_tokens`` tokens (at least one row or column):
    bands of rows for directions 0 (top to bottom) and 2 (bottom to top), bands of
    columns for 1 (left to right) and 3 (right to left)."""
    n, across = (height, width) if direction % 2 == 0 else (width, height)
    size = max(1, band_tokens // across)
    spans = [(s, min(s + size, n)) for s in range(0, n, size)]
    if direction >= 2:
        spans.reverse()
    if direction % 2 == 0:
        return [(a, b, 0, width) for a, b in spans]
    return [(0, height, a, b) for a, b in spans]


def _row_bands(height: int, width: int, band_tokens: int) -> list[tuple[int, int]]:
    return [(r0, r1) for r0, r1, _, _ in direction_bands(height, width, band_tokens, 0)]


def _branch_input(branch: GatedScanBranch, x: torch.Tensor, band_tokens: int, norm=None) -> torch.Tensor:
    """The scan branch's ``a`` = SiLU(conv(in_proj(x)[..., :d])) of the whole map,
    computed by bands of rows with the conv's halo: x (b, H, W, C) (``norm``
    applied first, per token) -> (b, d, H, W)."""
    b, H, W, _ = x.shape
    d = branch.d_inner
    halo = (branch.conv2d.kernel_size[0] - 1) // 2
    a = None
    for r0, r1 in _row_bands(H, W, band_tokens):
        lo, hi = max(r0 - halo, 0), min(r1 + halo, H)
        xb = x[:, lo:hi] if norm is None else norm(x[:, lo:hi])
        ab = branch.conv_act(F.linear(xb, branch.in_proj.weight[:d]))[:, :, r0 - lo : r1 - lo]
        if a is None:  # the dtype the whole-map branch would give (bf16 under autocast)
            a = ab.new_empty(b, d, H, W)
        a[:, :, r0:r1] = ab
    return a


def _scan_bands(branch: GatedScanBranch, a: list[torch.Tensor], band_inputs: Callable, band_tokens: int):
    """The four direction scans of a VSS (one ``a``) or Cross SS2D (two) block,
    swept over bands: a[m] (b, d, H, W) scan branch inputs; ``band_inputs(bands, k)``
    gives the scan inputs (u, low-rank delta, B, C) of direction k from the bands of the a[m]
    (the block's own projections, with K = 1) -> the recovered sum of the
    directions plus the D skip, (b, M, d, H, W) in float32 (float64 for float64
    inputs)."""
    b, d, H, W = a[0].shape
    M, N = len(a), branch.d_state
    A = -torch.exp(branch.A_logs).view(NUM_DIRECTIONS, d, N)
    D = branch.Ds.view(NUM_DIRECTIONS, d).sum(0)
    acc_dtype = torch.promote_types(a[0].dtype, torch.float32)
    out = torch.zeros(b, M, d, H, W, dtype=acc_dtype, device=a[0].device)
    for k in range(NUM_DIRECTIONS):
        h = torch.zeros(b, d, N, dtype=acc_dtype, device=a[0].device)
        for r0, r1, c0, c1 in direction_bands(H, W, band_tokens, k):
            hs, ws = r1 - r0, c1 - c0
            u, low, B, C = band_inputs([t[:, :, r0:r1, c0:c1] for t in a], k)  # u (b, M, d, L), others K = 1
            delta = branch.delta(low, k)[:, :, 0]
            y, h = ops.cross_scan_state(u, delta, A[k], B[:, :, 0], C[:, :, 0], branch.dt_projs_bias[k], hs, ws, k, h)
            y = y.to(acc_dtype)
            if k == 0:
                y = y + D[:, None] * u
            out[:, :, :, r0:r1, c0:c1] += y.view(b, M, d, hs, ws)
    return out


def _branch_output(
    branch: GatedScanBranch, y: torch.Tensor, x: torch.Tensor, band_tokens: int, norm=None
) -> torch.Tensor:
    """out_proj(out_norm(y) * SiLU(z)) by bands of rows: y (b, d, H, W) scan output,
    x (b, H, W, C) the branch input (``norm`` applied first) -> (b, H, W, C)."""
    d = branch.d_inner
    b, H, W, _ = x.shape
    out = torch.empty_like(x)
    for r0, r1 in _row_bands(H, W, band_tokens):
        xb = x[:, r0:r1] if norm is None else norm(x[:, r0:r1])
        z = F.linear(xb, branch.in_proj.weight[d:])
        out[:, r0:r1] = branch.branch_out(y[:, :, r0:r1].reshape(b, d, -1).to(x.dtype), z)
    return out


def vss_block_banded(block: VSSBlock, x: torch.Tensor, band_tokens: int) -> torch.Tensor:
    """:meth:`VSSBlock.forward` band by band: x (b, H, W, C) -> same."""
    ss2d = block.ss2d

    def band_inputs(a: list[torch.Tensor], k: int):
        u = a[0].flatten(2)[:, None]  # (b, 1, d, L)
        return (u, *ss2d.project(u, ss2d.x_proj_weight[None], k))

    a = _branch_input(ss2d, x, band_tokens, block.norm)
    y = _scan_bands(ss2d, [a], band_inputs, band_tokens)[:, 0]
    del a
    return x + _branch_output(ss2d, y, x, band_tokens, block.norm)


def cmsa_block_banded(
    block: CMSABlock, x: torch.Tensor, y: torch.Tensor, band_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`CMSABlock.forward` band by band: x (infrared), y (visible) (b, H, W, C)
    -> the two outputs, without residual."""
    a = [_branch_input(block, x, band_tokens), _branch_input(block, y, band_tokens)]
    o = _scan_bands(block, a, lambda bands, k: block.scan_inputs(*bands, k), band_tokens)
    del a
    return _branch_output(block, o[:, 0], x, band_tokens), _branch_output(block, o[:, 1], y, band_tokens)


@contextlib.contextmanager
def banded(
    model: torch.nn.Module, band_tokens: int, progress: Optional[Callable[[int], None]] = None
) -> Iterator[torch.nn.Module]:
    """Within the ``with`` block, every VSS and CMSA block of ``model`` runs band by
    band, bands of about ``band_tokens`` tokens. Inference only (no autograd); the
    model must not be called from another thread meanwhile, since its blocks'
    ``forward`` is replaced for the duration. ``progress(n)`` is called after each
    block with the number of blocks done so far."""
    if band_tokens < 1:
        raise ValueError(f"band_tokens must be >= 1, got {band_tokens}")
    if torch.is_grad_enabled():
        raise RuntimeError("band-wise execution is for inference: use torch.no_grad() or torch.inference_mode()")
    patched = []  # (block, the instance attribute it had: an enclosing banded() context's)
    done = [0]  # blocks run, shared by the counters
    try:
        for block in model.modules():
            if isinstance(block, VSSBlock):
                fn = vss_block_banded
            elif isinstance(block, CMSABlock):
                fn = cmsa_block_banded
            else:
                continue
            patched.append((block, vars(block).get("forward")))
            block.forward = functools.partial(fn, block, band_tokens=band_tokens)
            if progress is not None:
                block.forward = _counted(block.forward, progress, done)
        yield model
    finally:
        for block, previous in patched:
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def _counted(fn: Callable, progress: Callable[[int], None], done: list[int]) -> Callable:
    def run(*args):
        out = fn(*args)
        done[0] += 1
        progress(done[0])
        return out

    return run
