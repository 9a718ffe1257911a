"""LayerNorm over the channels (last dimension) as Triton kernels, optionally
multiplied by a SiLU gate: the GPU twin of :func:`s4fusion.ops.reference.layer_norm_ref`.

S4Fusion normalises tokens of 48 to 384 channels, and many of them (up to millions
per call). PyTorch's CUDA LayerNorm gives every token a thread block of its own,
so at these widths most of its threads idle and its time goes into scheduling
blocks; here a program normalises a tile of BR tokens x BC channels. The gated
form (SS2D's ``out_norm(y) * silu(z)``) reads z once and writes one tensor instead
of three.

Forward statistics are computed in float32 as in PyTorch (biased variance,
``rstd = 1 / sqrt(var + eps)``; a constant token normalises to exactly the bias);
inputs may be float32, bfloat16 or float16. The backward recomputes the
normalised input from the saved mean and rstd; every program adds its partial sums
of dL/dweight and dL/dbias atomically (float32) into one zeroed buffer (torch's sum
over the programs' partials took about 10 us per call on an H200, 0.4 ms per training
step; the sums' order, and so their last bits, vary from run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import autocast_dtype
from .triton_grid import launch_device, runs_of_tiles

__all__ = ["layer_norm_triton"]

# Launch configuration (`benchmarks/bench_norm.py --sweep`): elements of a program's tile (BR
# tokens x BC channels), backward programs per multiprocessor (each loops over tiles), warps
# per forward and backward program.
TILE = 2048
BWD_PROGRAMS_PER_SM = 4
FWD_WARPS, BWD_WARPS = 4, 4


@triton.jit
def _ln_fwd_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, o_ptr, mean_ptr, rstd_ptr,
    R, C, sx_r, sx_c, sz_r, sz_c, eps,
    GATE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """o = layer_norm(x) (* silu(z)): x, z (R, C) with any strides, o (R, C) dense."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BC)
    rmask = rows < R
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    r = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r * sx_r + cols[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
    # the mean shifted by each row's first value: exact for a constant row (a zero-padded
    # border), which then normalises to exactly the bias (as on PyTorch's CPU; its CUDA
    # kernel was measured 1e-4 off there)
    x0 = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)
    mean = x0 + tl.sum(tl.where(m, x - x0[:, None], 0.0), axis=1) / C
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    o = xc * rstd[:, None] * w[None, :] + b[None, :]
    if GATE:
        z = tl.load(z_ptr + r * sz_r + cols[None, :] * sz_c, mask=m, other=0.0).to(tl.float32)
        o = o * (z / (1.0 + tl.exp(-z)))
    tl.store(o_ptr + r * C + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, g_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dz_ptr,  # (R, C) dense
    sum_ptr,  # (2, C) f32, zeroed: every program adds its partial sums of dL/dweight and dL/dbias
    R, C, rows_per_program, sx_r, sx_c, sz_r, sz_c, sg_r, sg_c,
    GATE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BC)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # per-element sums, reduced over the rows once at the end (not per tile)
    dw = tl.zeros([BR, BC], tl.float32)
    db = tl.zeros([BR, BC], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, R)
    for r0 in range(first, last, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < last
        m = rmask[:, None] & cmask[None, :]
        r = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r * sx_r + cols[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r * sg_r + cols[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        if GATE:
            z = tl.load(z_ptr + r * sz_r + cols[None, :] * sz_c, mask=m, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-z))
            normed = xhat * w[None, :] + b[None, :]
            dz = g * normed * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + r * C + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
            g = g * z * sig
        dw += g * xhat
        db += g
        dxhat = g * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / C
        c2 = tl.sum(dxhat, axis=1) / C
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + r * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(sum_ptr + cols, tl.sum(dw, axis=0), mask=cmask, sem="relaxed")
    tl.atomic_add(sum_ptr + C + cols, tl.sum(db, axis=0), mask=cmask, sem="relaxed")


def _tile(C: int) -> tuple[int, int]:
    bc = triton.next_power_of_2(C)
    return max(1, TILE // bc), bc


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (R, C), a view where the leading dimensions merge, else a copy."""
    return t.reshape(-1, t.shape[-1])


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, gate, out_dtype):  # type: ignore[override]
        C = x.shape[-1]
        x2 = _rows(x)
        z2 = _rows(gate) if gate is not None else x2
        R = x2.shape[0]
        out = torch.empty(R, C, device=x.device, dtype=out_dtype)
        mean = torch.empty(R, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        br, bc = _tile(C)
        if R:
            _ln_fwd_kernel[(triton.cdiv(R, br),)](
                x2, z2, weight, bias, out, mean, rstd, R, C, *x2.stride(), *z2.stride(), eps,
                GATE=gate is not None, BR=br, BC=bc, num_warps=FWD_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(x2, z2, weight, bias, mean, rstd)
        ctx.shapes = (x.shape, x.dtype, None if gate is None else (gate.shape, gate.dtype))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        x2, z2, weight, bias, mean, rstd = ctx.saved_tensors
        x_shape, x_dtype, gate_info = ctx.shapes
        R, C = x2.shape
        g2 = _rows(gout)
        dx = torch.empty(R, C, device=x2.device, dtype=x_dtype)
        dz = torch.empty(R, C, device=x2.device, dtype=gate_info[1]) if gate_info is not None else dx
        br, bc = _tile(C)
        programs, per_program = runs_of_tiles(R, br, 1, x2.device, BWD_PROGRAMS_PER_SM)
        sums = torch.zeros(2, C, device=x2.device, dtype=torch.float32)
        _ln_bwd_kernel[(programs,)](
            x2, z2, weight, bias, g2, mean, rstd, dx, dz, sums, R, C, per_program,
            *x2.stride(), *z2.stride(), *g2.stride(), GATE=gate_info is not None, BR=br, BC=bc, num_warps=BWD_WARPS,
        )  # fmt: skip
        g_gate = dz.view(gate_info[0]) if gate_info is not None and ctx.needs_input_grad[4] else None
        return (
            dx.view(x_shape),
            sums[0].to(weight.dtype),
            sums[1].to(bias.dtype),
            None,
            g_gate,
            None,
        )


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    matmul_input: bool = False,
) -> torch.Tensor:
    """LayerNorm of x (..., C) over C with ``weight``/``bias`` (C,), times
    ``silu(gate)`` when given (gate: x's shape). The result has x's dtype (promoted
    with the gate's), or float32 under autocast (which runs LayerNorm in float32); with
    ``matmul_input``, autocast's dtype under autocast: the float32 result rounded once,
    as the matrix product reading it would cast it (the same values, one kernel less)."""
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"layer_norm: weight and bias must be ({C},) for input {tuple(x.shape)}, "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"layer_norm: gate {tuple(gate.shape)} must have the input's shape {tuple(x.shape)}")
    lower = autocast_dtype(x.device.type)
    if lower is not None:
        out_dtype = lower if matmul_input else torch.float32
    else:
        out_dtype = x.dtype if gate is None else torch.promote_types(x.dtype, gate.dtype)
    with launch_device(x):
        return _LayerNorm.apply(x, weight, bias, float(eps), gate, out_dtype)
