"""Typed configuration of the S4Fusion network.

Defaults are the released configuration (RELEASED-MODEL-FACTS.md section 1.1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

TOPOLOGIES = ("released", "paper")
# "cmsa" is S4Fusion; the others are the fusion replacements of the paper's ablation
# study (Table 3), defined in ablation.py.
FUSIONS = ("cmsa", "add", "cnn", "cross_attention", "fssm")
CROSS_ATTENTION_HEADS = 8  # heads of the cross-attention ablation (the authors' default)


@dataclass
class S4FusionConfig:
    """Every size of the network.

    ``topology``: ``"released"`` is exactly the authors' released network (the
    finest-scale CMSA exists but its output is discarded); ``"paper"`` feeds that
    output to the decoder as the paper's text describes (facts section 1.4).

    ``fusion`` selects the module at every scale (``"cmsa"`` or an ablation of
    ``FUSIONS``, see ``s4fusion.models.ablation``); ``patch_mark=False`` removes the
    Patch Mark from the CMSA blocks (paper Table 3, Exp. 5).
    """

    in_chans: int = 1  # channels of each source image (infrared, visible Y)
    out_chans: int = 1  # channels of the fused image
    dims: tuple[int, ...] = (48, 96, 192)  # encoder/CMSA width per scale, finest first
    depths: tuple[int, ...] = (1, 2, 1)  # VSS blocks per encoder stage, finest first
    decoder_depths: tuple[int, ...] = (1, 2, 1)  # VSS blocks per decoder stage, coarsest first
    patch_size: int = 4  # overlapping patch embedding kernel
    patch_stride: int = 3  # overlapping patch embedding stride (patches overlap by size - stride)
    fold_chans: int = 12  # channels of the folded map before the 1x1 output conv
    ss2d_d_state: int = 12  # state size N of the VSS blocks
    cmsa_d_state: int = 18  # state size N of the CMSA blocks (and of the "fssm" ablation blocks)
    cmsa_depth: int = 3  # CMSA blocks per scale (layers / blocks of the "cross_attention" / "fssm" ablations)
    expand: float = 1.5  # d_inner = int(expand * C)
    d_conv: int = 3  # depthwise conv kernel inside SS2D / Cross SS2D
    dt_rank_divisor: int = 16  # dt_rank = ceil(C / dt_rank_divisor)
    norm_eps: float = 1e-5  # every LayerNorm
    topology: str = "released"
    fusion: str = "cmsa"  # fusion module at every scale, one of FUSIONS
    patch_mark: bool = True  # CMSA blocks add the Patch Mark to the scan input

    def __post_init__(self) -> None:
        self.dims = tuple(int(d) for d in self.dims)
        self.depths = tuple(int(d) for d in self.depths)
        self.decoder_depths = tuple(int(d) for d in self.decoder_depths)
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        n = len(self.dims)
        if n < 1 or len(self.depths) != n or len(self.decoder_depths) != n:
            raise ValueError(
                f"dims {self.dims}, depths {self.depths} and decoder_depths "
                f"{self.decoder_depths} must have the same (non-zero) length"
            )
        for a, b in zip(self.dims, self.dims[1:]):
            if b != 2 * a:
                raise ValueError(f"each scale must double the width (patch merging 4C -> 2C): {self.dims}")
        if self.patch_stride > self.patch_size:
            raise ValueError("patch_stride must not exceed patch_size (patches must cover the image)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not isinstance(self.patch_mark, bool):
            raise ValueError(f"patch_mark must be true or false, got {self.patch_mark!r}")
        if not self.patch_mark and self.fusion != "cmsa":
            raise ValueError(f"patch_mark=False applies to fusion='cmsa' only; fusion={self.fusion!r} has no Patch Mark")
        if self.fusion == "cross_attention" and any(d % CROSS_ATTENTION_HEADS for d in self.dims):
            raise ValueError(
                f"fusion='cross_attention' needs every width divisible by its {CROSS_ATTENTION_HEADS} heads, "
                f"got dims {self.dims}"
            )

    @property
    def num_scales(self) -> int:
        return len(self.dims)

    def d_inner(self, dim: int) -> int:
        return int(self.expand * dim)

    def dt_rank(self, dim: int) -> int:
        return math.ceil(dim / self.dt_rank_divisor)

    @property
    def pad_multiple(self) -> int:
        """Padded sides satisfy ``side % pad_multiple == pad_offset``."""
        return self.patch_stride * 2 ** (self.num_scales - 1)

    @property
    def pad_offset(self) -> int:
        return (self.patch_size - self.patch_stride) % self.pad_multiple

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "S4FusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown S4FusionConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)
