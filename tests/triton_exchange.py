"""The backward kernel's halving exchange (``_sum_scatter``, ``_scatter_slots``) run by
a small Triton kernel on one warp of lanes, and checked against plain group sums."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from s4fusion.ops.triton_scan import _scatter_slots, _sum_scatter

LANES = 32  # one warp


@triton.jit
def _exchange(
    x_ptr, sum_ptr, first_ptr, own_ptr,
    E: tl.constexpr, NX: tl.constexpr, CT: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """x (NX, E) -> every lane's R sums (R, E), the index of its first one and whether it
    holds them."""
    lane = tl.arange(0, E)
    X = tl.tuple([])
    for i in tl.static_range(NX):
        X = X + (tl.load(x_ptr + i * E + lane),)
    S = _sum_scatter(X, lane, NX, CT, STRIDE)
    first, own = _scatter_slots(lane, NX, CT, STRIDE)
    for i in tl.static_range(R):
        tl.store(sum_ptr + i * E + lane, S[i])
    tl.store(first_ptr + lane, first)
    tl.store(own_ptr + lane, own.to(tl.int32))


def worst_error(device: str) -> float:
    """Largest error, over value counts, group sizes and lane strides, of the sums the
    lanes hold, each against the float64 sum of its value over its group (CT lanes
    STRIDE apart) and relative to the sum of the absolute values; 1.0 when a group's
    sums are not each held by exactly one lane of the group."""
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for stride in (1, 2, 4):
        for ct in (1, 2, 4, 8, 16, 32):
            if ct * stride > LANES:
                continue
            # powers of two, and multiples of the group (the backward's 2 * tokens * states)
            for nx in sorted({1, 2, 4, 8, 16} | {m * ct for m in (3, 6) if m * ct <= 48}):
                worst = max(worst, _case(device, g, nx, ct, stride))
    return worst


def _case(device: str, g: torch.Generator, nx: int, ct: int, stride: int) -> float:
    r = max(1, nx // ct)
    x = torch.randn(nx, LANES, generator=g, dtype=torch.float64)
    sums = torch.empty(r, LANES, device=device)
    first = torch.empty(LANES, dtype=torch.int32, device=device)
    own = torch.empty(LANES, dtype=torch.int32, device=device)
    _exchange[(1,)](x.float().to(device), sums, first, own, E=LANES, NX=nx, CT=ct, STRIDE=stride, R=r, num_warps=1)
    sums, first, own = sums.cpu().double(), first.cpu(), own.cpu()
    # lane = (block * ct + member) * stride + offset: a group is one (block, offset)
    xs = x.float().double().view(nx, LANES // (ct * stride), ct, stride)
    expected, scale = xs.sum(2), xs.abs().sum(2)  # (value, block, offset)
    worst = 0.0
    for blk in range(LANES // (ct * stride)):
        for off in range(stride):
            held = []
            for member in range(ct):
                lane = (blk * ct + member) * stride + off
                if own[lane]:
                    for i in range(r):
                        v = int(first[lane]) + i
                        held.append(v)
                        err = abs(sums[i, lane].item() - expected[v, blk, off].item()) / scale[v, blk, off].item()
                        worst = max(worst, err)
            if sorted(held) != list(range(nx)):
                return 1.0
    return worst
