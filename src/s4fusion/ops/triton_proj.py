"""The delta up-projection for half-precision inference as a Triton kernel: the GPU
twin of :func:`s4fusion.ops.reference.dt_project_ref` for a bfloat16 or float16
``low`` where no gradient is needed.

Per scan direction k, delta = low W_k^T with low (tokens, R) and W_k (d, R), R of 3
to 12: every output element is an R-term sum, so the op only moves memory (it
writes the K d L delta). Under bfloat16 autocast cuBLAS treats it as a batched GEMM
with an inner size of 3 to 12 and picks kernels meant for large inner sizes (on an
H200, ``magma_sgemmEx`` at 40 us for the finest scale of a 481x649 fuse). Here a
program computes BL whole tokens with R broadcast multiply-adds in float32 and
writes them as one contiguous block, channels innermost, as the scan reads them;
the result has low's dtype, the weight is not rounded to it first.

The reference runs instead (BENCHMARKS.md, session 13, H200):
* for a float32 ``low``: cuBLAS's float32 kernels are as fast at the network's
  shapes, and a fuse with this kernel measured 0.4-1.7% slower;
* where autograd needs a gradient: a Triton backward (dL/d(low) per token over the
  channels, dL/dW over the tokens) made the training step 3.7% (float32) and 17%
  (bfloat16) slower than cuBLAS's.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .reference import check_dt_project_args, dt_project_ref

__all__ = ["dt_project_triton"]

TILE = 4096  # output elements of a program's tile: BL tokens x BD channels
WARPS = 2


@triton.jit
def _proj_fwd_kernel(
    low_ptr, w_ptr, out_ptr,  # low (b, M, K, L, R) any strides, w (K, d, R) dense, out (b, M, K, L, d) dense
    L, d, sl_b, sl_m, sl_k, sl_l, sl_r,
    M: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """BL whole tokens (BD >= d channels) of one direction's (L, d) output: the tile is
    one contiguous block of memory, written by full sectors whatever d and the dtype."""
    pid_bmk = tl.program_id(1)
    bi = pid_bmk // (M * K)
    m = (pid_bmk // K) % M
    k = pid_bmk % K
    rows = tl.program_id(0) * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    rmask = rows < L
    cmask = cols < d
    lp = low_ptr + bi.to(tl.int64) * sl_b + m * sl_m + k * sl_k + rows.to(tl.int64) * sl_l
    acc = tl.zeros([BL, BD], tl.float32)
    for r in tl.static_range(R):
        x = tl.load(lp + r * sl_r, mask=rmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (k * d + cols) * R + r, mask=cmask, other=0.0).to(tl.float32)
        acc += x[:, None] * w[None, :]
    o = (pid_bmk.to(tl.int64) * L + rows[:, None]) * d + cols[None, :]
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _tile(d: int) -> tuple[int, int]:
    bd = triton.next_power_of_2(d)
    return max(1, TILE // bd), bd


def dt_project_triton(low: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """low (b, M, K, L, R), weight (K, d, R) -> delta (b, M, K, d, L) in low's dtype,
    channels innermost in memory; see :func:`s4fusion.ops.reference.dt_project_ref`
    (which runs instead for a float32 ``low`` and where autograd needs a gradient)."""
    check_dt_project_args(low, weight)
    if low.dtype == torch.float32 or (torch.is_grad_enabled() and (low.requires_grad or weight.requires_grad)):
        return dt_project_ref(low, weight)
    b, M, K, L, R = low.shape
    d = weight.shape[1]
    w = weight.contiguous()
    out = torch.empty(b, M, K, L, d, device=low.device, dtype=low.dtype)
    if out.numel():
        with torch.cuda.device(low.device) if low.is_cuda else contextlib.nullcontext():
            bl, bd = _tile(d)
            _proj_fwd_kernel[(triton.cdiv(L, bl), b * M * K)](
                low, w, out, L, d, *low.stride(), M=M, K=K, R=R, BL=bl, BD=bd, num_warps=WARPS
            )
    return out.transpose(3, 4)
