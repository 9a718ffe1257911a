"""The scan kernels' elementwise helpers (softplus, sigmoid) applied by a small Triton
kernel, for their accuracy tests on the GPU and in Triton's interpreter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from s4fusion.ops.triton_scan import _sigmoid, _softplus


@triton.jit
def _apply(x_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(sp_ptr + i, _softplus(x), mask=i < n)
    tl.store(sg_ptr + i, _sigmoid(x), mask=i < n)


def worst_ulp(device: str) -> float:
    """Largest error of the kernels' softplus and sigmoid against float64 torch, on float32
    inputs from -100 to 100 and around softplus's threshold (20), in units of
    ``|f(x)| * 2**-23 * max(1, |x|) + 1e-37``: float32 ulps, scaled by |x| because an
    exponential of a float32 argument x is only that accurate (x * log2(e) rounds), and
    with an absolute term for results below float32's normal range, which the kernels
    flush to zero."""
    x = torch.cat(
        [
            torch.linspace(-100.0, 100.0, 400_001, dtype=torch.float64),
            torch.tensor([0.0, -0.0, 20.0, 19.99999, 20.00001, -87.0, -88.0, 1e-30, -1e-30], dtype=torch.float64),
        ]
    ).float()
    xd = x.to(device)
    sp, sg = torch.empty_like(xd), torch.empty_like(xd)
    _apply[(triton.cdiv(x.numel(), 1024),)](xd, sp, sg, x.numel(), BLOCK=1024)
    worst = 0.0
    for got, ref in ((sp, F.softplus(x.double())), (sg, torch.sigmoid(x.double()))):
        err = (got.cpu().double() - ref).abs() / (ref.abs() * 2.0**-23 * x.double().abs().clamp_min(1) + 1e-37)
        worst = max(worst, err.max().item())
    return worst
