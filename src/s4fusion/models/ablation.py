"""Fusion modules of the paper's ablation study (Table 3, Exp. 1-4) and the
size-matched ablation configurations.

Each module replaces one CMSA (one scale) and has the CMSA interface
``forward(x, y, trace=None, name="") -> fused``: ``x`` (infrared) and ``y``
(visible) are (B, H, W, C) channels-last features, the result is (B, H, W, C).
The definitions follow the authors' unreleased ``modules/ablation.py``
(RELEASED-MODEL-FACTS.md section 8):

* :class:`AddFusion` (Exp. 1, "ADD"): ``x + y``, no parameters.
* :class:`CNNFusion` (Exp. 2, "CNN"): 1x1 conv on the channel concatenation
  [x; y] to ``k = int(2C // 1.4)`` channels, one residual ``BasicBlock(k, k)``,
  1x1 conv to C channels.
* :class:`CrossAttentionFusion` (Exp. 3, "CA"): ``depth`` CMX-style efficient
  cross-attention layers applied in sequence (no residual, no norm); output x + y.
* :class:`FSSMFusion` (Exp. 4, "FSSM", FusionMamba's idea): ``depth`` blocks with a
  residual per stream; each block scans every modality separately over the four
  SS2D directions (no interleaving, no Patch Mark) with the selective parameters
  (delta, A, B, C, D, delta bias) of the *other* modality; output x + y.

:data:`ABLATION_PRESETS` holds the configurations of the paper's experiments,
with widths chosen so that every fusion replacement has (within a few %) the
parameter count of S4Fusion (the paper, appendix A.1: "adjusted its layer count
and channel numbers to match the parameter count"); :func:`parameter_table`
builds them and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cmsa import ResidualPairStack
from .config import CROSS_ATTENTION_HEADS, S4FusionConfig
from .layers import DepthwiseConvSiLU, LayerNorm
from .ss2d import NUM_DIRECTIONS, ScanParams, uniform_

__all__ = [
    "AddFusion",
    "BasicBlock",
    "CNNFusion",
    "CrossAttentionLayer",
    "CrossAttentionFusion",
    "FSSMBlock",
    "FSSMFusion",
    "build_ablation_fusion",
    "ABLATION_PRESETS",
    "ablation_config",
    "ParameterCount",
    "parameter_table",
]


class AddFusion(nn.Module):
    """Element-wise sum of the two streams (Exp. 1). No parameters."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, trace: Optional[dict] = None, name: str = "") -> torch.Tensor:
        """x, y (B, H, W, C) -> x + y (B, H, W, C)."""
        return x + y


class _ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d, optionally followed by ReLU. (B, C, H, W) layout."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, relu: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (stride 1, same width):
    ``relu(convbn(relu(convbn(v))) + v)`` with 3x3 convolutions. (B, C, H, W) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _ConvBN(channels, channels, 3, 1, 1, relu=True)
        self.conv2 = _ConvBN(channels, channels, 3, 1, 1, relu=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(v)) + v)


class CNNFusion(nn.Module):
    """Convolutional fusion (Exp. 2): [x; y] (2C channels) -> 1x1 conv -> k channels
    -> BasicBlock(k) -> 1x1 conv -> C channels, with ``k = int(2C // 1.4)`` as in the
    authors' ``CNNs`` (k = 68 / 137 / 274 at C = 48 / 96 / 192). Only 3x3
    neighbourhoods: no global receptive field."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int((2 * dim) // 1.4)
        self.reduce = nn.Conv2d(2 * dim, hidden, 1)
        self.block = BasicBlock(hidden)
        self.project = nn.Conv2d(hidden, dim, 1)
        # it runs on channels-last maps: weights channels-last too, so that their gradients
        # have their strides (DDP's gradient-layout contract); values unchanged
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, y: torch.Tensor, trace: Optional[dict] = None, name: str = "") -> torch.Tensor:
        """x, y (B, H, W, C) -> (B, H, W, C)."""
        v = torch.cat([x, y], dim=-1).permute(0, 3, 1, 2)  # (B, 2C, H, W), infrared channels first
        v = self.project(self.block(self.reduce(v)))
        return v.permute(0, 2, 3, 1)


class CrossAttentionLayer(nn.Module):
    """CMX-style efficient cross attention between two token sets.

    Per modality m: the queries are the tokens themselves split into heads (no
    projection); keys and values come from ``kv{m}`` (Linear C -> 2C). A
    (head_dim x head_dim) context ``softmax_over_keys(k^T v * scale)`` is built per
    modality and each modality's queries read the *other* modality's context:
    ``x1' = q1 @ ctx2``, ``x2' = q2 @ ctx1``. Tokens (B, N, C) -> same."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.kv2 = nn.Linear(dim, 2 * dim, bias=False)

    def _context(self, tokens: torch.Tensor, kv: nn.Linear) -> torch.Tensor:
        """(B, N, C) -> (B, heads, head_dim, head_dim)."""
        b, n, c = tokens.shape
        k, v = kv(tokens).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return ((k.transpose(-2, -1) @ v) * self.scale).softmax(dim=-2)

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        return tokens.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x1.shape
        ctx1, ctx2 = self._context(x1, self.kv1), self._context(x2, self.kv2)
        out1 = (self._heads(x1) @ ctx2).transpose(1, 2).reshape(b, n, c)
        out2 = (self._heads(x2) @ ctx1).transpose(1, 2).reshape(b, n, c)
        return out1, out2


class CrossAttentionFusion(nn.Module):
    """``depth`` cross-attention layers in sequence, ``(x, y) <- layer(x, y)`` (no
    residual, no norm, as the authors' ``CrossAttention``), output x + y (Exp. 3).
    Attention over all tokens of the map, but through a channel context only: no
    spatial interaction between positions beyond a global average."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, num_heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, y: torch.Tensor, trace: Optional[dict] = None, name: str = "") -> torch.Tensor:
        """x, y (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        x, y = x.reshape(b, h * w, c), y.reshape(b, h * w, c)
        for j, layer in enumerate(self.layers):
            x, y = layer(x, y)
            if trace is not None:
                trace[f"{name}.layer{j}.out_x"] = x.reshape(b, h, w, c)
                trace[f"{name}.layer{j}.out_y"] = y.reshape(b, h, w, c)
        return (x + y).reshape(b, h, w, c)


class _ModalityScan(ScanParams):
    """The selective parameters of one modality in an FSSM block: ``x_proj_weight``
    (K, R+2N, d) for the low-rank delta, B and C, plus the delta up-projection and
    bias, ``A_logs`` and ``Ds`` of :class:`ScanParams`."""

    matmul_weights = ("x_proj_weight",)

    def __init__(self, d_inner: int, dt_rank: int, d_state: int) -> None:
        super().__init__(d_inner, dt_rank, d_state)
        self.x_proj_weight = uniform_((NUM_DIRECTIONS, dt_rank + 2 * d_state, d_inner), d_inner**-0.5)


class FSSMBlock(nn.Module):
    """Cross-modal SSM block without interleaving (FusionMamba's FSSM).

    Shared between the modalities (as in a CMSA block): ``in_proj`` (2d, C, no
    bias), depthwise ``conv2d`` + SiLU, ``out_norm`` LayerNorm(d), ``out_proj`` (C, d).
    Per modality (``ir``, ``vi``): all selective-scan parameters. The infrared
    stream is scanned (four SS2D directions, length H*W, no Patch Mark) with delta,
    B, C computed from the *visible* features by the visible parameters and with the
    visible A, D and delta bias; the visible stream likewise with the infrared
    ones. Returns (out_x, out_y) without residual, (B, H, W, C) each."""

    def __init__(self, dim: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float) -> None:
        super().__init__()
        d_inner = int(expand * dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = DepthwiseConvSiLU(d_inner, d_conv)
        self.ir = _ModalityScan(d_inner, dt_rank, d_state)
        self.vi = _ModalityScan(d_inner, dt_rank, d_state)
        self.out_norm = LayerNorm(d_inner, eps=eps, matmul_input=True)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def _branch_in(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> a (B, d, H, W) after conv + SiLU, gate z (B, H, W, d)."""
        a, z = self.in_proj(v).chunk(2, dim=-1)
        return self.conv2d(a.permute(0, 3, 1, 2)), z

    def _branch_out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """scan output (B, d, L) and gate z (B, H, W, d) -> (B, H, W, C)."""
        b, h, w, d = z.shape
        return self.out_proj(self.out_norm(o.transpose(1, 2).reshape(b, h, w, d), gate=z))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_x, z_x = self._branch_in(x)
        a_y, z_y = self._branch_in(y)
        b, d, h, w = a_x.shape
        a_x, a_y = a_x.reshape(b, 1, d, h * w), a_y.reshape(b, 1, d, h * w)
        low_x, B_x, C_x = self.ir.project(a_x, self.ir.x_proj_weight[None])
        low_y, B_y, C_y = self.vi.project(a_y, self.vi.x_proj_weight[None])
        # M = 1 scans through the dispatcher; each stream driven by the other's parameters.
        o_x = self.vi.scan(a_x, low_y, B_y, C_y, h, w).squeeze(1)
        o_y = self.ir.scan(a_y, low_x, B_x, C_x, h, w).squeeze(1)
        return self._branch_out(o_x, z_x), self._branch_out(o_y, z_y)


class FSSMFusion(ResidualPairStack):
    """``depth`` FSSM blocks with a residual on each stream; output x + y (Exp. 4)."""

    def __init__(self, dim: int, depth: int, d_state: int, expand: float, dt_rank: int, d_conv: int, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(FSSMBlock(dim, d_state, expand, dt_rank, d_conv, eps) for _ in range(depth))


def build_ablation_fusion(cfg: S4FusionConfig, dim: int) -> nn.Module:
    """The fusion module of ``cfg.fusion`` (any value but ``"cmsa"``) at width ``dim``.

    ``cfg.cmsa_depth`` is the number of layers (cross attention) or blocks (FSSM) per
    scale and ``cfg.cmsa_d_state`` the FSSM state size, as the authors passed
    ``num_fusion_layer`` and ``d_state`` to their replacements."""
    if cfg.fusion == "add":
        return AddFusion()
    if cfg.fusion == "cnn":
        return CNNFusion(dim)
    if cfg.fusion == "cross_attention":
        return CrossAttentionFusion(dim, cfg.cmsa_depth, CROSS_ATTENTION_HEADS)
    if cfg.fusion == "fssm":
        return FSSMFusion(dim, cfg.cmsa_depth, cfg.cmsa_d_state, cfg.expand, cfg.dt_rank(dim), cfg.d_conv, cfg.norm_eps)
    raise ValueError(f"no ablation fusion module named {cfg.fusion!r}")


# Paper Table 3. Widths chosen so the total parameter count is within a few % of
# S4Fusion's 3,562,981 (see parameter_table / `s4fusion analyze params`).
ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "s4fusion": {},
    "add": {"fusion": "add", "dims": (77, 154, 308)},
    "cnn": {"fusion": "cnn"},
    "cross_attention": {"fusion": "cross_attention", "cmsa_depth": 11},
    "fssm": {"fusion": "fssm", "cmsa_d_state": 32},
    "no_patch_mark": {"patch_mark": False},
}


def ablation_config(name: str, base: Optional[S4FusionConfig] = None) -> S4FusionConfig:
    """The configuration of ablation ``name`` (a key of :data:`ABLATION_PRESETS`):
    ``base`` (default: the released configuration) with the preset's overrides."""
    if name not in ABLATION_PRESETS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATION_PRESETS)}")
    return replace(base or S4FusionConfig(), **ABLATION_PRESETS[name])


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one ablation network, and of its fusion modules alone."""

    name: str
    total: int
    fusion: int
    reference: int  # total of the S4Fusion network it is compared with

    @property
    def relative(self) -> float:
        """(total - reference) / reference."""
        return (self.total - self.reference) / self.reference


def parameter_table(base: Optional[S4FusionConfig] = None) -> list[ParameterCount]:
    """Build every preset of :data:`ABLATION_PRESETS` on ``base`` and count its
    parameters (BatchNorm running statistics are buffers, not counted)."""
    from .s4fusion import S4Fusion

    counts = []
    for name in ABLATION_PRESETS:
        model = S4Fusion(ablation_config(name, base))
        total = sum(p.numel() for p in model.parameters())
        fusion = sum(p.numel() for p in model.cmsa.parameters())
        counts.append((name, total, fusion))
    reference = counts[0][1]
    return [ParameterCount(name, total, fusion, reference) for name, total, fusion in counts]
