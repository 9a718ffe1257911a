"""The S4Fusion head's patch fold as a Triton kernel, without gradients: the GPU twin of
:func:`s4fusion.ops.reference.fold_patches_ref` (a transposed convolution whose input
is the decoder's channels-last token map).

cuDNN runs it as a data-gradient convolution kernel of one output channel after an
NCHW copy of the input and converts its layout twice (on an H200 about 0.33 ms for a
961x1297 image, at the end of the network's pass, where nothing else overlaps it).
Here, in bfloat16 and float16 (in float32 cuDNN's kernel was faster: BENCHMARKS.md,
session 26), one program computes a run of output pixels of one image and output channel:
each pixel is covered by at most ceil(p / stride) patches along each axis, and for each
it loads the patch token's C channels (contiguous in the channels-last map) and the
weight's C values at the pixel's place in that patch, and sums their products in
float32; the bias rounded to the output dtype is added and the sum rounded once.
Where gradients are wanted, the reference runs (PyTorch's transposed convolution).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_fold_patches_args, fold_patches_ref
from .triton_grid import forward_only_operands, launch_device

__all__ = ["fold_patches_triton"]

PIXELS = 64  # output pixels per program
WARPS = 4


@triton.jit
def _fold_patches_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, h, w, C, O, HO, WO,
    sxb, sxh, sxw, sxc,  # x (b, h, w, C)
    swc, swo, swi, swj,  # weight (C, O, p, p)
    sob, soo, soy, sox,  # out (b, O, HO, WO)
    P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    NP: tl.constexpr = (P + S - 1) // S  # patches covering a pixel along one axis, at most
    blocks = tl.cdiv(HO * WO, BP)
    pid = tl.program_id(0)
    o = pid // blocks % O
    bi = (pid // blocks // O).to(tl.int64)
    pix = pid % blocks * BP + tl.arange(0, BP)
    pm = pix < HO * WO
    y = pix // WO
    xx = pix % WO
    c = tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BP], tl.float32)
    for a in tl.static_range(NP):
        ph = y // S - a  # patch row; the pixel's row in it
        i = y - ph * S
        vy = pm & (ph >= 0) & (ph < h) & (i < P)
        for q in tl.static_range(NP):
            pw = xx // S - q
            j = xx - pw * S
            v = (vy & (pw >= 0) & (pw < w) & (j < P))[:, None] & cm[None, :]
            tok = bi * sxb + ph.to(tl.int64) * sxh + pw.to(tl.int64) * sxw
            xv = tl.load(x_ptr + tok[:, None] + c[None, :] * sxc, mask=v, other=0.0)
            wv = tl.load(w_ptr + c[None, :] * swc + o * swo + (i * swi + j * swj)[:, None], mask=v, other=0.0)
            acc += tl.sum(xv.to(tl.float32) * wv.to(tl.float32), axis=1)
    dt = o_ptr.dtype.element_ty
    out = acc + tl.load(b_ptr + o).to(dt).to(tl.float32)
    tl.store(o_ptr + bi * sob + o * soo + y.to(tl.int64) * soy + xx.to(tl.int64) * sox, out.to(dt), mask=pm)


def fold_patches_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """Overlapping patches summed onto an image (x (b, h, w, C) in any layout, weight
    (C, O, p, p), bias (O,)); see :func:`s4fusion.ops.reference.fold_patches_ref`, which
    runs instead in float32, where gradients are wanted, and for x and weight of
    different dtypes outside autocast. Contiguous (b, O, H, W) result."""
    check_fold_patches_args(x, weight, bias, stride)
    # (not in float32: there cuDNN's kernel was faster, BENCHMARKS.md session 26)
    x, weight, forward_only = forward_only_operands(x, weight, bias, (torch.bfloat16, torch.float16))
    if not forward_only:
        return fold_patches_ref(x, weight, bias, stride)
    b, h, w, C = x.shape
    O, p = weight.shape[1], weight.shape[2]
    HO, WO = (h - 1) * stride + p, (w - 1) * stride + p
    out = torch.empty(b, O, HO, WO, device=x.device, dtype=x.dtype)
    if out.numel():
        with launch_device(x):
            _fold_patches_kernel[(b * O * triton.cdiv(HO * WO, PIXELS),)](
                x, weight, bias, out, h, w, C, O, HO, WO, *x.stride(), *weight.stride(), *out.stride(),
                P=p, S=stride, BP=PIXELS, BC=triton.next_power_of_2(C), num_warps=WARPS,
            )  # fmt: skip
    return out
