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
    x_ptr, sum_ptr, first_ptr, own_ptr, E: tl.constexpr, NX: tl.constexpr, CT: tl.constexpr, R: tl.constexpr
):
    """x (NX, E) -> every lane's R sums (R, E), the index of its first one and whether it
    holds them."""
    lane = tl.arange(0, E)
    X = tl.tuple([])
    for i in tl.static_range(NX):
        X = X + (tl.load(x_ptr + i * E + lane),)
    S = _sum_scatter(X, lane, NX, CT)
    first, own = _scatter_slots(lane, NX, CT)
    for i in tl.static_range(R):
        tl.store(sum_ptr + i * E + lane, S[i])
    tl.store(first_ptr + lane, first)
    tl.store(own_ptr + lane, own.to(tl.int32))


def worst_error(device: str) -> float:
    """Largest error, over value counts and group sizes, of the sums the lanes hold, each
    against the float64 sum of its value over its group and relative to the sum of the
    absolute values; 1.0 when a group's sums are not each held by exactly one lane."""
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for nx in (1, 2, 4, 8, 16):
        for ct in (1, 2, 4, 8, 16, 32):
            r = max(1, nx // ct)
            x = torch.randn(nx, LANES, generator=g, dtype=torch.float64)
            sums = torch.empty(r, LANES, device=device)
            first = torch.empty(LANES, dtype=torch.int32, device=device)
            own = torch.empty(LANES, dtype=torch.int32, device=device)
            _exchange[(1,)](x.float().to(device), sums, first, own, E=LANES, NX=nx, CT=ct, R=r, num_warps=1)
            sums, first, own = sums.cpu().double(), first.cpu(), own.cpu()
            xs = x.float().double().view(nx, LANES // ct, ct)
            expected, scale = xs.sum(-1), xs.abs().sum(-1)  # (value, group)
            for grp in range(LANES // ct):
                held = []
                for lane in range(grp * ct, (grp + 1) * ct):
                    if own[lane]:
                        for i in range(r):
                            v = int(first[lane]) + i
                            held.append(v)
                            err = abs(sums[i, lane].item() - expected[v, grp].item()) / scale[v, grp].item()
                            worst = max(worst, err)
                if sorted(held) != list(range(nx)):
                    return 1.0
    return worst
