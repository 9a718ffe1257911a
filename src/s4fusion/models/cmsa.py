"""Cross-Modal Spatial Awareness (CMSA): Patch Mark, Interleaving, Cross SS2D,
Recovering (paper section 3.3; RELEASED-MODEL-FACTS.md 2.7, 3.3)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .ss2d import NUM_DIRECTIONS, GatedScanBranch, uniform_


class PatchMark(nn.Module):
    """One mark per position from both modalities: m = W [a_ir; a_vi] (bias-free).

    ``mark_proj`` (d, 2d), infrared channels first.
    """

    matmul_weights = ("mark_proj",)

    def __init__(self, d_inner: int) -> None:
        super().__init__()
        self.mark_proj = uniform_((d_inner, 2 * d_inner), (2 * d_inner) ** -0.5)

    def forward(self, a_ir: torch.Tensor, a_vi: torch.Tensor) -> torch.Tensor:
        """a_ir, a_vi (b, d, L) -> mark (b, d, L), computed token-major (channels
        innermost in memory)."""
        d = a_ir.shape[1]
        w = self.mark_proj
        return (a_ir.transpose(1, 2) @ w[:, :d].t() + a_vi.transpose(1, 2) @ w[:, d:].t()).transpose(1, 2)


class CMSABlock(GatedScanBranch):
    """The CMSA block: shared input branch, Patch Mark, Cross SS2D scan over the
    interleaved sequences (infrared token first at every position, in every one of
    the four directions), Recovering, shared output branch. Returns the two outputs
    without residual.

    Per modality: ``x_proj_weight`` (infrared) and ``y_proj_weight`` (visible), each
    (K, R+2N, d), computing delta (low rank), B and C from the *unmarked* features.
    Shared: delta up-projection and bias, A, D, the mark, in/out projections, conv.
    With ``patch_mark=False`` (ablation, paper Table 3 Exp. 5) no mark is created
    and the scan input is the unmarked features.
    """

    matmul_weights = ("x_proj_weight", "y_proj_weight")

    def __init__(
        self, dim: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float, patch_mark: bool = True
    ) -> None:
        super().__init__(dim, d_state, expand, dt_rank, d_conv, eps)
        rows = dt_rank + 2 * d_state
        self.x_proj_weight = uniform_((NUM_DIRECTIONS, rows, self.d_inner), self.d_inner**-0.5)
        self.y_proj_weight = uniform_((NUM_DIRECTIONS, rows, self.d_inner), self.d_inner**-0.5)
        self.patch_mark = PatchMark(self.d_inner) if patch_mark else None

    def scan_inputs(self, a_ir: torch.Tensor, a_vi: torch.Tensor, direction: int | None = None):
        """a_ir, a_vi (b, d, H, W) -> u (b, 2, d, L), the low-rank delta (b, 2, K, L, R), B, C
        (b, 2, K, N, L) in row-major position order (modality 0 = infrared), u with its
        channels innermost in memory; with ``direction``, that direction's only (K = 1)."""
        b, d, H, W = a_ir.shape
        a = torch.stack([t.reshape(b, d, H * W).transpose(1, 2) for t in (a_ir, a_vi)], 1)  # (b, 2, L, d)
        u = a.transpose(2, 3)
        low, B, C = self.project(u, torch.stack([self.x_proj_weight, self.y_proj_weight]), direction)
        if self.patch_mark is not None:
            # (from a's token-major slices: their gradients then stack into a's layout, and
            # a's gradients add up as contiguous tensors)
            mark = self.patch_mark(*(t.transpose(1, 2) for t in a.unbind(1)))  # (b, d, L), channels innermost
            u = (a + mark.transpose(1, 2)[:, None]).transpose(2, 3)
        return u, low, B, C

    def cross_ss2d(self, a_ir: torch.Tensor, a_vi: torch.Tensor) -> torch.Tensor:
        """Patch Mark, Interleaving, Cross SS2D and Recovering: a_ir, a_vi (b, d, H, W)
        -> (b, 2, d, H*W), modality 0 = infrared."""
        H, W = a_ir.shape[-2:]
        return self.scan(*self.scan_inputs(a_ir, a_vi), H, W)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (infrared), y (visible): (b, H, W, C) each -> (out_x, out_y), same shapes."""
        a_x, z_x = self.branch_in(x)
        a_y, z_y = self.branch_in(y)
        # unbound from the tokens-major view: the stacked gradient that reaches the scan
        # then has its channels innermost, the layout the GPU scan reads
        o_x, o_y = (o.transpose(1, 2) for o in self.cross_ss2d(a_x, a_y).transpose(2, 3).unbind(1))
        return self.branch_out(o_x, z_x), self.branch_out(o_y, z_y)


class ResidualPairStack(nn.Module):
    """Blocks mapping (x, y) -> (u, v), applied with a residual on each stream
    (x <- x + u, y <- y + v); output x + y. Subclasses fill ``self.blocks``."""

    blocks: nn.ModuleList

    def forward(self, x: torch.Tensor, y: torch.Tensor, trace: dict | None = None, name: str = "") -> torch.Tensor:
        """x (infrared), y (visible): (b, H, W, C) -> fused (b, H, W, C)."""
        for j, block in enumerate(self.blocks):
            u, v = block(x, y)
            if trace is not None:
                trace[f"{name}.block{j}.out_x"], trace[f"{name}.block{j}.out_y"] = u, v
            x, y = x + u, y + v
        return x + y


class CMSA(ResidualPairStack):
    """``depth`` CMSA blocks with residuals on each stream; output F = x + y."""

    def __init__(
        self,
        dim: int,
        depth: int,
        d_state: int,
        expand: float,
        dt_rank: int,
        d_conv: int,
        eps: float,
        patch_mark: bool = True,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            CMSABlock(dim, d_state, expand, dt_rank, d_conv, eps, patch_mark) for _ in range(depth)
        )
