"""Helpers shared by the scan backend tests (test_scan_cpu, test_scan_state)."""

from __future__ import annotations

import torch

# relative error (Frobenius norm) allowed against the reference, by dtype
FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| (Frobenius), in float64."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def make_inputs(b, M, d, N, H, W, dtype=torch.float64, seed=0, K=4):
    """Random scan inputs with a mix of short and long memory: softplus(delta +
    bias) spans about 0.02 .. 3, A about -0.4 .. -3."""
    g = torch.Generator().manual_seed(seed)
    L = H * W
    return [
        torch.randn(b, M, d, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, M, K, d, L, generator=g, dtype=torch.float64).to(dtype),
        (-torch.exp(0.5 * torch.randn(K * d, N, generator=g, dtype=torch.float64))).to(dtype),
        torch.randn(b, M, K, N, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, M, K, N, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(K * d, generator=g, dtype=torch.float64).to(dtype),
        (2 * torch.randn(K * d, generator=g, dtype=torch.float64) - 1).to(dtype),
    ]
