"""Embedding, resampling and output layers of S4Fusion (channels last between modules)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension (same parameters and state dict)
    computed by :func:`s4fusion.ops.layer_norm`: on a GPU, the scan backend's
    LayerNorm kernel. ``gate`` (x's shape) multiplies the result by ``silu(gate)``.

    ``matmul_input``: the owner reads the result only with a linear layer. Under
    autocast the result then comes in autocast's dtype (rounded once in the kernel)
    instead of float32: the values the layer would have cast it to, without the cast."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, matmul_input: bool = False) -> None:
        super().__init__(normalized_shape, eps=eps)
        self.matmul_input = matmul_input

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, gate, self.matmul_input)


class DepthwiseConvSiLU(nn.Conv2d):
    """The depthwise conv + SiLU of the SS2D / Cross SS2D branches (same padding,
    bias): (b, d, H, W) in any layout -> ``silu(conv(x) + bias)``, channels-last, by
    :func:`s4fusion.ops.depthwise_conv_silu`: the convolution without its bias on a
    channels-last copy of x, then the bias and the SiLU as one op (on a GPU one kernel
    each way); on a GPU without gradients, all of it one kernel reading x as it lies.
    The weight is kept channels-last, like the inputs: the weight's gradient then has
    the weight's strides (DDP's gradient-layout contract; otherwise DDP warns and copies
    the gradient into its buckets). Parameters and state dict are ``nn.Conv2d``'s; the bias
    stays float32 under autocast (the op casts it and sums its gradient in float32), so
    :class:`s4fusion.cast_weights.CastWeights` leaves it alone."""

    float32_parameters = ("bias",)

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__(channels, channels, kernel, padding=(kernel - 1) // 2, groups=channels)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.depthwise_conv_silu(x, self.weight, self.bias)


def conv2d_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s convolution of x without its bias (zero padding), for a bias that the
    next op adds (on CUDA, PyTorch adds a convolution's bias in a pass of its own)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel ``patch_size``, stride ``stride``, no padding) + LayerNorm.
    (b, in_chans, H, W) -> (b, h, w, dim), h = (H - patch_size) // stride + 1."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(img).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> channels (order: (even,even), (odd,even), (even,odd),
    (odd,odd) as (row, col)), LayerNorm(4C), Linear 4C -> 2C.
    (b, H, W, C) -> (b, H/2, W/2, 2C)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(4 * dim, eps=eps, matmul_input=True)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"patch merging needs an even token grid, got {tuple(x.shape[1:3])}")
        b, H, W, C = x.shape
        # (b, H/2, row parity, W/2, col parity, C) -> (b, H/2, W/2, col parity, row parity, C): one copy
        x = x.reshape(b, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(b, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear 2c -> 4c, channels split as (p1, p2, c) onto a 2x2 neighbourhood,
    LayerNorm(c). (b, h, w, 2c) -> (b, 2h, 2w, c)."""

    def __init__(self, dim_out: int, eps: float) -> None:
        super().__init__()
        self.expand = nn.Linear(2 * dim_out, 4 * dim_out, bias=False)
        self.norm = LayerNorm(dim_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        c = self.norm.normalized_shape[0]
        x = self.expand(x).view(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
        return self.norm(x)


class ReleasedUnusedNorm(nn.Module):
    """The released ``final_up.norm`` LayerNorm(fold_chans), which the released
    forward never applies. Its values are carried as buffers (not parameters: they
    are never used or trained) so that released checkpoints load strictly and can be
    exported again unchanged."""

    def __init__(self, chans: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(chans))
        self.register_buffer("bias", torch.zeros(chans))


class FoldHead(nn.Module):
    """Final patch expanding, Fold and output projection.

    Linear dim -> fold_chans * patch_size**2 (no bias), then ``F.fold`` of the
    overlapping patches (overlaps are summed, not averaged) onto the padded image
    grid, then a 1x1 conv fold_chans -> out_chans. No activation, no clamp.

    ``norm`` carries the never-applied released ``final_up.norm`` (see
    :class:`ReleasedUnusedNorm`).
    """

    def __init__(self, dim: int, fold_chans: int, out_chans: int, patch_size: int, stride: int):
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.expand = nn.Linear(dim, fold_chans * patch_size**2, bias=False)
        self.norm = ReleasedUnusedNorm(fold_chans)
        self.out_conv = nn.Conv2d(fold_chans, out_chans, 1)

    def fold_input(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, w, dim) -> (b, fold_chans*p*p, h*w)."""
        b, h, w, _ = x.shape
        return self.expand(x).permute(0, 3, 1, 2).reshape(b, -1, h * w)

    def fold(self, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.fold(cols, size, kernel_size=self.patch_size, stride=self.stride)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """x (b, h, w, dim) -> image (b, out_chans, H, W) with H, W = size.

        The expansion, the Fold and the 1x1 conv are linear, so they are computed as one
        transposed convolution of x (kernel ``patch_size``, stride ``stride``: Fold's
        scatter) with their composed weight, plus the conv's bias: the same sums in
        another order (equal to ``out_conv(fold(fold_input(x)))`` up to float rounding),
        ``fold_chans / out_chans`` times less work and no (b, fold_chans*p*p, h*w)
        intermediate (:func:`s4fusion.ops.fold_patches`; on a GPU without gradients one
        kernel reading x in place). ``size`` must be the grid the patches cover,
        (h-1)*stride + p."""
        b, h, w, _ = x.shape
        p, s = self.patch_size, self.stride
        if tuple(size) != ((h - 1) * s + p, (w - 1) * s + p):
            raise ValueError(f"a {h}x{w} patch grid covers {(h - 1) * s + p}x{(w - 1) * s + p} pixels, not {size}")
        conv = self.out_conv.weight[:, :, 0, 0]  # (out_chans, fold_chans)
        expand = self.expand.weight.view(conv.shape[1], p, p, -1)  # (fold_chans, p, p, dim)
        weight = torch.einsum("oc,cijd->doij", conv, expand).contiguous()  # (dim, out_chans, p, p)
        return ops.fold_patches(x, weight, self.out_conv.bias, s)
