"""The delta up-projection in half precision as Triton kernels: the GPU twin of
:func:`s4fusion.ops.reference.dt_project_ref` for a bfloat16 or float16 ``low`` (as
bfloat16 autocast gives it), forward and backward.

Per scan direction k, delta = low W_k^T with low (tokens, R) and W_k (d, R), R of 3
to 12: every output element is an R-term sum, so the op only moves memory (it
writes the K d L delta). Under bfloat16 autocast cuBLAS treats it as a batched GEMM
with an inner size of 3 to 12 and picks kernels meant for large inner sizes (on an
H200, ``magma_sgemmEx`` at 40 us for the finest scale of a 481x649 fuse, and
``magma_sgemmEx`` and sm75 WMMA kernels of 86-181 us in the training step).

* Forward: a program walks a run of tokens of one direction, BL whole tokens at a
  time, with R broadcast multiply-adds in float32, and writes each tile as one
  contiguous block, channels innermost, as the scan reads them; the result has low's
  dtype, the weight is not rounded to it first.
* Backward: a program walks a run of tokens of one direction, BL at a time, reading
  dL/d(delta) once: dL/d(low) = G W_k per tile and its partial dL/dW_k = low^T G,
  both on tensor cores with float32 sums; the partials are summed on the host by
  one reduction. dL/d(low) has low's dtype, dL/dW the weight's.

Both kernels are compiled for each width d (the network has three), so that the
rows of a tile are known to be aligned and are moved by full vectors: with d a
runtime value a width of 72 (not a multiple of 16) was written and read one element
at a time (BENCHMARKS.md session 24).

For a ``low`` of any other dtype the reference runs: cuBLAS's float32 kernels are at least
as fast at the network's shapes, and a fuse with the forward kernel measured 0.4-1.7%
slower (BENCHMARKS.md, session 13, H200); float64 keeps its precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_dt_project_args, dt_project_ref
from .triton_grid import launch_device, runs_of_tiles

__all__ = ["dt_project_triton"]

# Launch constants, chosen by a sweep on an H200 (BENCHMARKS.md session 24).
TILE = 4096  # forward: output elements of a tile, BL tokens x BD channels
WARPS = 1
PROGRAMS_PER_SM = 8  # forward programs per multiprocessor (each loops over tiles)
BWD_TOKENS = 64  # backward: tokens per tile, fewer (at least 16) where the tile would
BWD_TILE = 32768  # hold more than this many elements of dL/d(delta) (widths above 512)
BWD_WARPS = 4
BWD_PROGRAMS_PER_SM = 2  # backward programs per multiprocessor (each loops over tiles)


@triton.jit
def _proj_fwd_kernel(
    low_ptr, w_ptr, out_ptr,  # low (b, M, K, L, R) any strides, w (K, d, R) dense, out (b, M, K, L, d) dense
    L, rows_per_program, sl_b, sl_m, sl_k, sl_l, sl_r,
    d: tl.constexpr, M: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """A run of tokens of one direction's (L, d) output, BL whole tokens (BD >= d
    channels) at a time: each tile is one contiguous block of memory, written by full
    vectors (d is a compile-time constant, so the rows' alignment is known); W_k is
    read once per program."""
    pid_bmk = tl.program_id(1)
    bi = pid_bmk // (M * K)
    m = (pid_bmk // K) % M
    k = pid_bmk % K
    cols = tl.arange(0, BD)
    cmask = cols < d
    WR = tl.tuple([])  # per r: W_k[:, r] (BD,) f32
    for r in tl.static_range(R):
        WR = WR + (tl.load(w_ptr + (k * d + cols) * R + r, mask=cmask, other=0.0).to(tl.float32),)
    lp = low_ptr + bi.to(tl.int64) * sl_b + m * sl_m + k * sl_k
    op = out_ptr + pid_bmk.to(tl.int64) * L * d
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, L)
    for r0 in range(first, last, BL):
        rows = r0 + tl.arange(0, BL)
        rmask = rows < last
        acc = tl.zeros([BL, BD], tl.float32)
        for r in tl.static_range(R):
            x = tl.load(lp + rows.to(tl.int64) * sl_l + r * sl_r, mask=rmask, other=0.0).to(tl.float32)
            acc += x[:, None] * WR[r][None, :]
        o = rows.to(tl.int64)[:, None] * d + cols[None, :]
        tl.store(op + o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _proj_bwd_kernel(
    g_ptr,  # (b, M, K, L, d) dL/d(delta), any strides (DENSE: dense), low's dtype
    low_ptr,  # (b, M, K, L, R), any strides
    w_ptr,  # (K, d, R) dense
    gl_ptr,  # (b, M, K, L, R) dense out: dL/d(low)
    part_ptr,  # (b*M*K, P, R, d) f32 out: every program's partial dL/dW (summed on the host)
    L, rows_per_program,
    sg_b, sg_m, sg_k, sg_l, sg_c, sl_b, sl_m, sl_k, sl_l, sl_r,
    d: tl.constexpr, M: tl.constexpr, K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr,
    BD: tl.constexpr, DENSE: tl.constexpr,
):  # fmt: skip
    """A run of tokens of one direction, BL at a time, on tensor cores with float32
    sums: dL/d(low) = G W_k per tile (W_k rounded to G's dtype, as autocast's product
    rounds it), and low^T G summed over the run (exact products). A dense G (the
    scan's gradient) is read by full vectors (d is a compile-time constant)."""
    pid_p = tl.program_id(0)
    pid_bmk = tl.program_id(1)
    bi = pid_bmk // (M * K)
    m = (pid_bmk // K) % M
    k = pid_bmk % K
    cols = tl.arange(0, BD)
    rr = tl.arange(0, RP)
    cmask = cols < d
    qmask = rr < R
    dtype = gl_ptr.dtype.element_ty
    if DENSE:
        gp = g_ptr + pid_bmk.to(tl.int64) * L * d
    else:
        gp = g_ptr + bi.to(tl.int64) * sg_b + m * sg_m + k * sg_k
    lp = low_ptr + bi.to(tl.int64) * sl_b + m * sl_m + k * sl_k
    w = tl.load(w_ptr + (k * d + cols[:, None]) * R + rr[None, :], mask=cmask[:, None] & qmask[None, :], other=0.0)
    w = w.to(dtype)  # (BD, RP)
    acc = tl.zeros([RP, BD], tl.float32)
    first = pid_p * rows_per_program
    last = tl.minimum(first + rows_per_program, L)
    for r0 in range(first, last, BL):
        rows = r0 + tl.arange(0, BL)
        tmask = rows < last
        rl = rows.to(tl.int64)[:, None]
        if DENSE:
            go = rl * d + cols[None, :]
        else:
            go = rl * sg_l + cols[None, :] * sg_c
        g = tl.load(gp + go, mask=tmask[:, None] & cmask[None, :], other=0.0)
        x = tl.load(lp + rl * sl_l + rr[None, :] * sl_r, mask=tmask[:, None] & qmask[None, :], other=0.0)
        gl = tl.dot(g.to(dtype), w)  # (BL, RP)
        o = (pid_bmk.to(tl.int64) * L + rl) * R + rr[None, :]
        tl.store(gl_ptr + o, gl.to(dtype), mask=tmask[:, None] & qmask[None, :])
        acc = tl.dot(tl.trans(x.to(dtype)), g.to(dtype), acc)  # (RP, BD)
    part = part_ptr + (pid_bmk.to(tl.int64) * tl.num_programs(0) + pid_p) * R * d
    tl.store(part + rr[:, None] * d + cols[None, :], acc, mask=qmask[:, None] & cmask[None, :])


def _forward(low: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, M, K, L, R = low.shape
    d = weight.shape[1]
    out = torch.empty(b, M, K, L, d, device=low.device, dtype=low.dtype)
    if out.numel():
        bd = triton.next_power_of_2(d)
        bl = max(1, TILE // bd)
        runs, per_run = runs_of_tiles(L, bl, b * M * K, low.device, PROGRAMS_PER_SM)
        _proj_fwd_kernel[(runs, b * M * K)](
            low, weight.contiguous(), out, L, per_run, *low.stride(), d=d, M=M, K=K, R=R, BL=bl, BD=bd,
            num_warps=WARPS,
        )  # fmt: skip
    return out.transpose(3, 4)


def _dense(g: torch.Tensor) -> bool:
    """Whether g (b, M, K, L, d) is laid out densely in that order (size-1 dimensions
    aside), as the scan's gradient of delta is."""
    expected = 1
    for size, stride in reversed(list(zip(g.shape, g.stride()))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _backward(low: torch.Tensor, weight: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, M, K, L, R = low.shape
    d = weight.shape[1]
    g = gout.transpose(3, 4)  # (b, M, K, L, d)
    bd = max(16, triton.next_power_of_2(d))
    bl = max(16, min(BWD_TOKENS, BWD_TILE // bd))
    per_bmk, per_program = runs_of_tiles(L, bl, b * M * K, low.device, BWD_PROGRAMS_PER_SM)
    g_low = torch.empty(b, M, K, L, R, device=low.device, dtype=low.dtype)
    parts = torch.empty(b * M, K, per_bmk, R, d, device=low.device, dtype=torch.float32)
    _proj_bwd_kernel[(per_bmk, b * M * K)](
        g, low, weight.contiguous(), g_low, parts, L, per_program, *g.stride(), *low.stride(),
        d=d, M=M, K=K, R=R, RP=max(16, triton.next_power_of_2(R)), BL=bl, BD=bd, DENSE=_dense(g),
        num_warps=BWD_WARPS,
    )  # fmt: skip
    return g_low, parts.sum((0, 2)).transpose(1, 2).to(weight.dtype)  # (K, d, R)


class _DtProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, low, weight):  # type: ignore[override]
        ctx.save_for_backward(low, weight)
        return _forward(low, weight)

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        low, weight = ctx.saved_tensors
        if not low.numel() or not weight.shape[1]:
            return torch.zeros_like(low), torch.zeros_like(weight)
        return _backward(low, weight, gout)


def dt_project_triton(low: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """low (b, M, K, L, R), weight (K, d, R) -> delta (b, M, K, d, L) in low's dtype,
    channels innermost in memory; see :func:`s4fusion.ops.reference.dt_project_ref`
    (which runs instead for a ``low`` of another dtype: float32, float64).
    Differentiable in both inputs."""
    if low.dtype not in (torch.bfloat16, torch.float16):
        return dt_project_ref(low, weight)  # (which checks the arguments)
    check_dt_project_args(low, weight)
    with launch_device(low):
        return _DtProject.apply(low, weight)
