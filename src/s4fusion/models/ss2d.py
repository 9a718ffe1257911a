"""SS2D (VMamba's 2-D selective scan) and the VSS block."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import ops
from .layers import DepthwiseConvSiLU, LayerNorm

NUM_DIRECTIONS = 4
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


def init_dt_bias(d_inner: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """softplus^-1 of a log-uniform step in [DT_MIN, DT_MAX), floored at DT_INIT_FLOOR."""
    dt = torch.exp(
        torch.rand(d_inner, generator=generator) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    ).clamp(min=DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))


def projection_index(dt_rank: int, d_state: int) -> torch.Tensor:
    """For each row of :func:`s4fusion.ops.projection_rows`'s layout, the row of an input
    projection weight (low-rank delta, B, C: R + 2N rows) it holds; its unused rows hold
    row 0, whose outputs there nothing reads (so their gradient is zero)."""
    R, N = dt_rank, d_state
    rows, ob, oc, ol = ops.projection_rows(R, N)
    source = [0] * rows
    source[ob : ob + N] = range(R, R + N)
    source[oc : oc + N] = range(R + N, R + 2 * N)
    source[ol : ol + R] = range(R)
    return torch.tensor(source)


def uniform_(shape: tuple[int, ...], bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class ScanParams(nn.Module):
    """Per-direction parameters of a selective scan shared by SS2D and Cross SS2D.

    ``dt_projs_weight`` (K, d, R) up-projects the low-rank delta; ``dt_projs_bias``
    (K, d); ``A_logs`` (K*d, N) with A = -exp(A_logs); ``Ds`` (K*d,) skip.
    Subclasses add the input projections (``x_proj_weight``: (K, R+2N, d)).
    """

    def __init__(self, d_inner: int, dt_rank: int, d_state: int) -> None:
        super().__init__()
        K = NUM_DIRECTIONS
        self.d_inner, self.dt_rank, self.d_state = d_inner, dt_rank, d_state
        self.dt_projs_weight = uniform_((K, d_inner, dt_rank), dt_rank**-0.5)
        self.dt_projs_bias = nn.Parameter(torch.stack([init_dt_bias(d_inner) for _ in range(K)]))
        A = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d_inner, 1)
        self.A_logs = nn.Parameter(A)
        self.Ds = nn.Parameter(torch.ones(K * d_inner))
        # (a constant, not saved: the layout is this code's, not the weights')
        self.register_buffer("proj_index", projection_index(dt_rank, d_state), persistent=False)
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

    def project(self, a: torch.Tensor, x_proj_weight: torch.Tensor, direction: int | None = None):
        """a (b, M, d, L), x_proj_weight (M, K, R+2N, d) (one per modality) -> the low-rank
        delta (b, M, K, L, R), B (b, M, K, N, L), C (b, M, K, N, L), all in row-major
        position order (the projections are position-wise, so no unfolding is needed
        before them); with ``direction``, that direction's only (K = 1).

        Computed token-major: P = a x_proj^T (b, M, L, K*rows), its rows per direction
        laid out by :func:`s4fusion.ops.projection_rows` (B and C 16-byte aligned, unused
        rows between), read as views: the low-rank delta, B and C (their gradients are
        written into P's in one pass: :func:`s4fusion.ops.split_projection`). B and C
        have their states innermost in memory, as the GPU scan reads them. With one
        modality the projection is a single GEMM over every token of the batch (its
        weight gradient too). The delta is up-projected by :meth:`scan` (or by
        :meth:`delta` for one direction)."""
        R, N = self.dt_rank, self.d_state
        if direction is not None:
            x_proj_weight = x_proj_weight[:, direction : direction + 1]
        M, K, _, d = x_proj_weight.shape
        b, L = a.shape[0], a.shape[3]
        rows = ops.projection_rows(R, N)[0]
        # the parameter's rows (low-rank delta, B, C) gathered into that layout
        weight = x_proj_weight.index_select(2, self.proj_index)  # (M, K, rows, d)
        w = weight.reshape(M, K * rows, d).transpose(1, 2)  # (M, d, K*rows)
        P = (a.transpose(2, 3) @ (w[0] if M == 1 else w)).view(b, M, L, K, rows)
        low, B, C = ops.split_projection(P, R, N)
        return low.permute(0, 1, 3, 2, 4), B.permute(0, 1, 3, 4, 2), C.permute(0, 1, 3, 4, 2)

    def delta(self, low: torch.Tensor, direction: int | None = None) -> torch.Tensor:
        """The low-rank delta (b, M, K, L, R) up-projected: (b, M, K, d, L), channels
        innermost in memory (:func:`s4fusion.ops.dt_project`); with ``direction``, that
        direction's only (K = 1), as :meth:`project` gives it."""
        weight = self.dt_projs_weight
        if direction is not None:
            weight = weight[direction : direction + 1]
        return ops.dt_project(low, weight)

    def scan(self, u, low, B, C, height: int, width: int) -> torch.Tensor:
        """u (b, M, d, L), low (b, M, K, L, R), B/C (b, M, K, N, L) -> (b, M, d, L): the
        scan of the delta up-projected from ``low`` (:func:`s4fusion.ops.cross_scan_lowrank`).
        Without grad mode in float32 for lower-precision inputs (the scan's float32 sums,
        which the output LayerNorm reads as they are: no conversion to the autocast dtype);
        with grad mode in u's dtype (the scan's backward then reads the LayerNorm's
        gradient in it)."""
        return ops.cross_scan_lowrank(
            u,
            low,
            self.dt_projs_weight,
            -torch.exp(self.A_logs),
            B,
            C,
            self.Ds,
            self.dt_projs_bias.reshape(-1),
            height,
            width,
            out_dtype=None if torch.is_grad_enabled() else torch.promote_types(u.dtype, torch.float32),
        )


class GatedScanBranch(ScanParams):
    """What SS2D and Cross SS2D share around their scan: the input projection into
    (x, z), the depthwise conv + SiLU, and the output LayerNorm, SiLU(z) gate and
    output projection."""

    def __init__(self, dim: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float) -> None:
        d_inner = int(expand * dim)
        super().__init__(d_inner, dt_rank, d_state)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = DepthwiseConvSiLU(d_inner, d_conv)
        self.out_norm = LayerNorm(d_inner, eps=eps, matmul_input=True)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def branch_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, H, W, C) -> a (b, d, H, W) after conv + SiLU, z (b, H, W, d)."""
        xz = self.in_proj(x)
        x_in, z = xz.chunk(2, dim=-1)
        return self.conv_act(x_in), z

    def conv_act(self, x_in: torch.Tensor) -> torch.Tensor:
        """The depthwise conv + SiLU of the branch: x_in (b, H, W, d) (a slice of the
        input projection's output) -> a (b, d, H, W), channels innermost in memory
        (``torch.channels_last``)."""
        return self.conv2d(x_in.permute(0, 3, 1, 2))

    def branch_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y (b, d, L) scan output, z (b, H, W, d) -> (b, H, W, C)."""
        b, H, W, d = z.shape
        y = y.transpose(1, 2).reshape(b, H, W, d)
        return self.out_proj(self.out_norm(y, gate=z))


class SS2D(GatedScanBranch):
    """2-D selective scan over four directions (RELEASED-MODEL-FACTS.md 2.2, 3.2)."""

    matmul_weights = ("x_proj_weight",)

    def __init__(self, dim: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float) -> None:
        super().__init__(dim, d_state, expand, dt_rank, d_conv, eps)
        self.x_proj_weight = uniform_((NUM_DIRECTIONS, dt_rank + 2 * d_state, self.d_inner), self.d_inner**-0.5)

    def core(self, a: torch.Tensor) -> torch.Tensor:
        """a (b, d, H, W) -> sum of the four direction scans (b, d, H*W)."""
        b, d, H, W = a.shape
        u = a.reshape(b, 1, d, H * W)
        return self.scan(u, *self.project(u, self.x_proj_weight[None]), H, W).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, H, W, C) -> (b, H, W, C)
        a, z = self.branch_in(x)
        return self.branch_out(self.core(a), z)


class VSSBlock(nn.Module):
    """x + SS2D(LayerNorm(x)), channels last."""

    def __init__(self, dim: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps=eps, matmul_input=True)  # read by ss2d.in_proj only
        self.ss2d = SS2D(dim, d_state, expand, dt_rank, d_conv, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, H, W, C)
        return x + self.ss2d(self.norm(x))
