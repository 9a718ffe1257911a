"""A convolution's bias and the activation after it as Triton kernels: the GPU twins of
:func:`s4fusion.ops.reference.bias_silu_ref` (forward and backward),
:func:`s4fusion.ops.reference.bias_relu_ref` (forward; its backward is one PyTorch op)
and, without gradients, :func:`s4fusion.ops.reference.depthwise_conv_silu_ref`.

PyTorch runs a convolution's bias as a separate broadcast add after cuDNN's kernel,
the SiLU as another pass, and in training their backward as a SiLU-backward pass
and a sum of the gradient over (b, H, W) for the bias; on channels-last maps that
sum is a strided reduction (on an H200, 55 us for a 20x144x38x38 bf16 map, 1.03 ms
per training step of the default network: BENCHMARKS.md, session 14).

* bias + SiLU forward: ``silu(x + bias)`` per element in float32 (the bias rounded to
  x's dtype first, as the reference casts it), written once in x's dtype.
* bias + SiLU backward: a program walks a run of tokens (rows of the channels-last
  map) for one block of channels, recomputes ``x + bias``, writes dL/dx and keeps its
  partial dL/dbias in float32; the partials are summed on the host by one reduction.
* bias + ReLU forward: ``relu((x + bias) + residual)`` in x's dtype, the additions in
  the reference's order and precision (so the result is the reference's, bit for
  bit): one pass where PyTorch makes three (bias, residual, ReLU). The backward is
  the ReLU's, ``dL/dx = dL/dresidual = dL/dy where y > 0``.
* depthwise convolution + bias + SiLU forward, where no gradient is wanted (fusing):
  one kernel reads x in any layout (the network's is a strided slice of the input
  projection's output) and writes the channels-last result, where PyTorch makes a
  channels-last copy of x, runs cuDNN's convolution and the bias + SiLU kernel after it.

For the bias ops x must be channels-last (what a convolution returns for its
channels-last input); other layouts run the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import (
    bias_relu_ref,
    bias_silu_ref,
    check_bias_relu_args,
    check_bias_silu_args,
    check_depthwise_conv_silu_args,
    depthwise_conv,
)
from .triton_grid import forward_only_operands, launch_device, runs_of_tiles

__all__ = ["bias_relu_triton", "bias_silu_triton", "depthwise_conv_silu_triton"]

TILE = 4096  # elements of a program's tile: BR tokens x BC channels
CONV_TILE = 2048  # the same for the depthwise convolution (K * K loads per element)
WARPS = 4
BWD_PROGRAMS_PER_SM = 4  # backward programs per multiprocessor (each walks a run of tiles)


@triton.jit
def _bias_silu_fwd_kernel(x_ptr, b_ptr, o_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """x, o (R, C) dense (channels-last tokens), bias (C,)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    m = (rows < R)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    s = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + bias[None, :]
    tl.store(o_ptr + offs, (s / (1.0 + tl.exp(-s))).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dwconv_silu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, T, C, H, W,
    sxb, sxc, sxh, sxw,  # x's strides (any layout)
    swc, swi, swj,  # the weight's strides (channel, row, column)
    K: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """o (T = b*H*W tokens, C) dense channels-last = silu(conv(x) + bias): BR tokens (in
    row-major order, across rows and images) x BC channels per program; each tap is one
    masked load (zero padding), the sum in float32 rounded to o's dtype as the
    convolution's output is, then the bias rounded to it, the SiLU in float32."""
    t = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    tm = t < T
    w = t % W
    h = t // W % H
    bi = (t // W // H).to(tl.int64)
    P: tl.constexpr = (K - 1) // 2
    base = x_ptr + bi * sxb
    cx = c.to(tl.int64)[None, :] * sxc
    acc = tl.zeros([BR, BC], tl.float32)
    for i in tl.static_range(K):
        hh = h + (i - P)
        rm = tm & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = w + (j - P)
            m = (rm & (ww >= 0) & (ww < W))[:, None] & cm[None, :]
            at = (hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw)[:, None] + cx
            xv = tl.load(base[:, None] + at, mask=m, other=0.0)
            wv = tl.load(w_ptr + c * swc + i * swi + j * swj, mask=cm, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    dt = o_ptr.dtype.element_ty
    bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(dt).to(tl.float32)
    s = acc.to(dt).to(tl.float32) + bias[None, :]
    offs = t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(o_ptr + offs, (s / (1.0 + tl.exp(-s))).to(dt), mask=tm[:, None] & cm[None, :])


@triton.jit
def _bias_relu_fwd_kernel(x_ptr, b_ptr, r_ptr, o_ptr, R, C, RESIDUAL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """x, residual, o (R, C) dense (channels-last tokens), bias (C,); the sums in x's dtype."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    m = (rows < R)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    dt = x_ptr.dtype.element_ty
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(dt)
    y = (tl.load(x_ptr + offs, mask=m, other=0.0) + bias[None, :]).to(dt)
    if RESIDUAL:
        y = (y + tl.load(r_ptr + offs, mask=m, other=0.0)).to(dt)
    tl.store(o_ptr + offs, tl.where((y > 0) | (y != y), y, 0.0).to(dt), mask=m)  # (NaN stays NaN)


@triton.jit
def _bias_silu_bwd_kernel(
    x_ptr, b_ptr, g_ptr, dx_ptr,  # x, g, dx (R, C) dense
    part_ptr,  # (programs, C) f32: this program's partial sum of dL/dbias
    R, C, rows_per_program, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.zeros([BR, BC], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, R)
    for r0 in range(first, last, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows < last)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        s = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + bias[None, :]
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-s))
        ds = tl.where(m, g * sig * (1.0 + s * (1.0 - sig)), 0.0)
        tl.store(dx_ptr + offs, ds.to(dx_ptr.dtype.element_ty), mask=m)
        acc += ds
    tl.store(part_ptr + pid * C + cols, tl.sum(acc, axis=0), mask=cmask)


@functools.lru_cache(maxsize=None)
def _tile(C: int, tile: int = 0) -> tuple[int, int]:
    """(BR, BC) of a tile of ``tile`` elements (default TILE): the widest channel block
    of 32, 64 or 128 that pads C least (C = 72: 32, three blocks; 144: 32; 288: 32; 48:
    64; 192: 64)."""
    padded = {w: triton.cdiv(C, w) * w for w in (128, 64, 32)}
    bc = min(padded, key=lambda w: (padded[w], -w))
    return (tile or TILE) // bc, bc


def _token_matrix(x: torch.Tensor) -> tuple[int, int]:
    """(R, C): a dense channels-last x (b, C, H, W) is in memory the (R, C) matrix of its
    R = b*H*W tokens, which the kernels index; such tensors go to them as they are (no
    views: in an eager pass an op's host time is what it costs against PyTorch's ops)."""
    C = x.shape[1]
    return x.numel() // max(C, 1), C


class _BiasSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):  # type: ignore[override]
        out = torch.empty_like(x, memory_format=torch.channels_last)
        R, C = _token_matrix(x)
        if out.numel():
            br, bc = _tile(C)
            _bias_silu_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
                x, bias, out, R, C, BR=br, BC=bc, num_warps=WARPS
            )
        ctx.save_for_backward(x, bias)
        return out

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        x, bias = ctx.saved_tensors
        R, C = _token_matrix(x)
        if not x.numel():
            return torch.zeros_like(x), torch.zeros_like(bias)
        g = gout.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        br, bc = _tile(C)
        blocks = triton.cdiv(C, bc)
        programs, per_program = runs_of_tiles(R, br, blocks, x.device, BWD_PROGRAMS_PER_SM)
        parts = torch.empty(programs, C, device=x.device, dtype=torch.float32)
        _bias_silu_bwd_kernel[(programs, blocks)](
            x, bias, g, dx, parts, R, C, per_program, BR=br, BC=bc, num_warps=WARPS
        )
        return dx, parts.sum(0).to(bias.dtype)


def bias_silu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu(x + bias)`` per channel of a channels-last x (b, C, H, W), the bias
    rounded to x's dtype, in x's dtype and layout; see
    :func:`s4fusion.ops.reference.bias_silu_ref` (which runs instead for x in another
    layout). Differentiable in both inputs."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return bias_silu_ref(x, bias)  # (which checks the arguments)
    check_bias_silu_args(x, bias)
    with launch_device(x):
        return _BiasSiLU.apply(x, bias)


def depthwise_conv_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu(conv(x) + bias)`` of a depthwise convolution; see
    :func:`s4fusion.ops.reference.depthwise_conv_silu_ref`. Where no gradient is
    wanted, one kernel (:func:`_dwconv_silu_fwd_kernel`) reads x in its own layout (the
    network passes a strided slice of its input projection), so neither the
    channels-last copy of x nor the convolution's output exists; elsewhere (and for
    weight and x of different dtypes outside autocast) the convolution runs on a
    channels-last copy of x and :func:`bias_silu_triton` after it, differentiable in
    every input."""
    check_depthwise_conv_silu_args(x, weight, bias)
    x, weight, forward_only = forward_only_operands(x, weight, bias, (torch.float32, torch.bfloat16, torch.float16))
    if not forward_only:
        return bias_silu_triton(depthwise_conv(x, weight), bias)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    R, C = _token_matrix(out)
    if out.numel():
        br, bc = _tile(C, CONV_TILE)
        H, W = x.shape[-2:]
        with launch_device(x):
            _dwconv_silu_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
                x, weight, bias, out, R, C, H, W, *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
                K=weight.shape[-1], BR=br, BC=bc, num_warps=WARPS,
            )  # fmt: skip
    return out


class _BiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual):  # type: ignore[override]
        out = torch.empty_like(x, memory_format=torch.channels_last)
        R, C = _token_matrix(x)
        if R and C:
            br, bc = _tile(C)
            _bias_relu_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
                x, bias, x if residual is None else residual, out, R, C,
                RESIDUAL=residual is not None, BR=br, BC=bc, num_warps=WARPS,
            )  # fmt: skip
        ctx.save_for_backward(out)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        g = torch.where(out <= 0, 0.0, gout)  # PyTorch's ReLU backward (threshold_backward)
        gbias = g.sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return g, gbias, g if ctx.needs_input_grad[2] else None


def bias_relu_triton(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu((x + bias) + residual)`` per channel of a channels-last x (b, C, H, W)
    (residual optional, in x's dtype and layout), the bias rounded to x's dtype, in x's
    dtype and layout; see :func:`s4fusion.ops.reference.bias_relu_ref` (which runs
    instead for x or a residual in another layout). Differentiable in every input."""
    cl = torch.channels_last
    if not (x.is_contiguous(memory_format=cl) and (residual is None or residual.is_contiguous(memory_format=cl))):
        return bias_relu_ref(x, bias, residual)  # (which checks the arguments)
    check_bias_relu_args(x, bias, residual)
    with launch_device(x):
        return _BiasReLU.apply(x, bias, residual)
