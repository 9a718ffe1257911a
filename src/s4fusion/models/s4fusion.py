"""The S4Fusion network (RELEASED-MODEL-FACTS.md section 1.2)."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt
from .ablation import build_ablation_fusion
from .branches import MAIN, Branches
from .cmsa import CMSA
from .config import S4FusionConfig
from .layers import FoldHead, OverlapPatchEmbed, PatchExpand, PatchMerging
from .ss2d import VSSBlock


class EncoderStage(nn.Module):
    """VSS blocks, then patch merging (all stages but the coarsest)."""

    def __init__(self, cfg: S4FusionConfig, i: int) -> None:
        super().__init__()
        dim = cfg.dims[i]
        args = (cfg.ss2d_d_state, cfg.expand, cfg.dt_rank(dim), cfg.d_conv, cfg.norm_eps)
        self.blocks = nn.ModuleList(VSSBlock(dim, *args) for _ in range(cfg.depths[i]))
        self.merge = PatchMerging(dim, cfg.norm_eps) if i < cfg.num_scales - 1 else None

    def forward(self, x: torch.Tensor, trace: dict | None = None, name: str = "") -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            x = block(x)
            if trace is not None:
                trace[f"{name}.block{j}.out"] = x
        return self.merge(x) if self.merge is not None else x


class DecoderStage(nn.Module):
    """Patch expanding (all stages but the coarsest), then VSS blocks.
    Decoder stage i works at scale ``num_scales - 1 - i``."""

    def __init__(self, cfg: S4FusionConfig, i: int) -> None:
        super().__init__()
        scale = cfg.num_scales - 1 - i
        dim = cfg.dims[scale]
        args = (cfg.ss2d_d_state, cfg.expand, cfg.dt_rank(dim), cfg.d_conv, cfg.norm_eps)
        self.expand = PatchExpand(dim, cfg.norm_eps) if i > 0 else None
        self.blocks = nn.ModuleList(VSSBlock(dim, *args) for _ in range(cfg.decoder_depths[i]))

    def forward(self, x: torch.Tensor, trace: dict | None = None, name: str = "") -> torch.Tensor:
        if self.expand is not None:
            x = self.expand(x)
            if trace is not None:
                trace[f"{name}.upsample_out"] = x
        for j, block in enumerate(self.blocks):
            x = block(x)
            if trace is not None:
                trace[f"{name}.block{j}.out"] = x
        return x


class S4Fusion(nn.Module):
    """Saliency-aware selective state space fusion network.

    ``model(infrared, visible)``: two (B, 1, H, W) float tensors in [0, 1] of any
    H, W >= 2 -> fused (B, 1, H, W), unclamped. Inputs are zero-padded to the
    network's size grid (sides = 1 mod 12 by default) exactly as the released test
    script does, and the output is cropped back.

    Without autograd on a GPU the two encoders and each fusion module run on CUDA
    streams of their own (:class:`s4fusion.models.branches.Branches`; same kernels,
    same results); ``branch_streams = False`` (on the class or a network) runs
    everything on the current stream.
    """

    branch_streams = True

    def __init__(self, config: Optional[S4FusionConfig] = None) -> None:
        super().__init__()
        cfg = self.config = config or S4FusionConfig()
        emb = (cfg.in_chans, cfg.dims[0], cfg.patch_size, cfg.patch_stride, cfg.norm_eps)
        self.embed_ir = OverlapPatchEmbed(*emb)
        self.embed_vi = OverlapPatchEmbed(*emb)
        self.encoder_ir = nn.ModuleList(EncoderStage(cfg, i) for i in range(cfg.num_scales))
        self.encoder_vi = nn.ModuleList(EncoderStage(cfg, i) for i in range(cfg.num_scales))
        self.cmsa = nn.ModuleList(_fusion_module(cfg, d) for d in cfg.dims)
        self.decoder = nn.ModuleList(DecoderStage(cfg, i) for i in range(cfg.num_scales))
        self.head = FoldHead(cfg.dims[0], cfg.fold_chans, cfg.out_chans, cfg.patch_size, cfg.patch_stride)
        self.apply(_init_weights)

    # ------------------------------------------------------------------ sizes
    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding of the released test script: the
        smallest pad with padded side = pad_offset (mod pad_multiple); the extra pixel
        goes to the bottom / right."""
        cfg = self.config
        minimum = cfg.pad_multiple + cfg.pad_offset
        for name, side in (("height", height), ("width", width)):
            if side + (cfg.pad_offset - side) % cfg.pad_multiple < minimum:
                raise ValueError(
                    f"image {name} {side} is too small for S4Fusion: padded sides must be at least "
                    f"{minimum} pixels (any side of 2 or more is padded to that); resize or pad the image"
                )
        ph = (cfg.pad_offset - height) % cfg.pad_multiple
        pw = (cfg.pad_offset - width) % cfg.pad_multiple
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2

    # ---------------------------------------------------------------- forward
    def forward(self, infrared: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        _check_inputs(infrared, visible, self.config.in_chans)
        H, W = infrared.shape[-2:]
        top, bottom, left, right = self.padding_for(H, W)
        pad = (left, right, top, bottom)
        fused = self.forward_padded(F.pad(infrared, pad), F.pad(visible, pad))
        return fused[:, :, top : top + H, left : left + W]

    def forward_padded(
        self, infrared: torch.Tensor, visible: torch.Tensor, trace: Optional[dict] = None
    ) -> torch.Tensor:
        """The bare network on inputs already of the padded size (B, 1, H, W).

        With ``trace`` (a dict), every intermediate is stored in it under the names
        of the golden set (``embed.x``, ``enc.x.0.out``, ``fusion.1.out``, ...)."""
        n = self.config.num_scales
        # without autograd, the two encoders and each fusion module run on streams of
        # their own (on a GPU; Branches): the same kernels, overlapping where they can
        concurrent = (
            self.branch_streams and trace is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        )
        branches = Branches(infrared, ("infrared", "visible", *(f"fusion{i}" for i in range(n))), concurrent)
        x = branches.on("infrared", self.embed_ir)(infrared)
        y = branches.on("visible", self.embed_vi)(visible)
        if trace is not None:
            trace["embed.x"], trace["embed.y"] = x, y
        skips = []  # (x, y) entering each encoder stage: what CMSA_i fuses
        for i in range(n):
            skips.append((x, y))
            x = branches.on("infrared", self.encoder_ir[i])(x, trace, f"enc.x.{i}")
            y = branches.on("visible", self.encoder_vi[i])(y, trace, f"enc.y.{i}")
            if trace is not None:
                trace[f"enc.x.{i}.out"], trace[f"enc.y.{i}.out"] = x, y
        # The released decoder never uses the finest CMSA: skipping it is output-identical.
        first = 0 if (self.config.topology == "paper" or trace is not None) else 1
        fused = [None] * n
        for i in range(first, n):
            fused[i] = branches.on(f"fusion{i}", self.cmsa[i])(*skips[i], trace, f"fusion.{i}")
            if trace is not None:
                trace[f"fusion.{i}.out"] = fused[i]
        d = branches.on(MAIN, torch.add)(x, y)
        if trace is not None:
            trace["dec.in"] = d
        for i in range(n):
            if i > 0:
                d = branches.on(MAIN, torch.add)(d, fused[n - i])
            d = self.decoder[i](d, trace, f"dec.{i}")
            if trace is not None:
                trace[f"dec.{i}.out"] = d
        if self.config.topology == "paper":
            d = branches.on(MAIN, torch.add)(d, fused[0])
        branches.join()
        if trace is None:
            return self.head(d, tuple(infrared.shape[-2:]))
        cols = self.head.fold_input(d)
        folded = self.head.fold(cols, tuple(infrared.shape[-2:]))
        out = self.head.out_conv(folded)
        trace["fold.in"], trace["fold.out"], trace["fused.padded"] = cols, folded, out
        return out

    # ---------------------------------------------------------------- weights
    @classmethod
    def from_released_checkpoint(
        cls, path: str | os.PathLike, topology: str = "released", config: Optional[S4FusionConfig] = None
    ) -> "S4Fusion":
        """Load the authors' ``{'model': state_dict}`` checkpoint (e.g. ``model.pkl``),
        strictly, into a network of the released configuration (or ``config``)."""
        state = ckpt.load_released_state_dict(path)
        config = config or S4FusionConfig(topology=topology)
        return cls._from_state(config, state, f"released checkpoint {os.fspath(path)}")

    @classmethod
    def from_training_checkpoint(cls, path: str | os.PathLike) -> "S4Fusion":
        """The network of an ``s4fusion train`` checkpoint (``RUN/checkpoints/step_*.pt``)
        at its step, with the run's config and topology."""
        state, config = ckpt.load_torch_checkpoint(path)
        if config is None:
            raise ckpt.CheckpointError(
                f"{os.fspath(path)} is not an s4fusion training checkpoint; for the authors' release use "
                "S4Fusion.from_released_checkpoint"
            )
        return cls._from_state(cls._stored_config(config, path), state, f"training checkpoint {os.fspath(path)}")

    @classmethod
    def from_torch_checkpoint(cls, path: str | os.PathLike) -> "S4Fusion":
        """A ``torch.save`` file: an ``s4fusion train`` checkpoint (its own config and
        topology) or the authors' released checkpoint (the released configuration)."""
        state, config = ckpt.load_torch_checkpoint(path)
        if config is None:
            return cls._from_state(S4FusionConfig(), state, f"released checkpoint {os.fspath(path)}")
        return cls._from_state(cls._stored_config(config, path), state, f"training checkpoint {os.fspath(path)}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "S4Fusion":
        """Load weights written by :meth:`save_pretrained` (a ``.safetensors`` file or a directory)."""
        state, config, _ = ckpt.load_weights(path)
        model = cls._from_state(cls._stored_config(config, path), state, f"S4Fusion weights {os.fspath(path)}")
        return model.to(map_location)

    @staticmethod
    def _stored_config(config: dict, path: str | os.PathLike) -> S4FusionConfig:
        try:
            return S4FusionConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{os.fspath(path)}: invalid stored config: {e}") from e

    @classmethod
    def _from_state(cls, config: S4FusionConfig, state: dict[str, torch.Tensor], source: str) -> "S4Fusion":
        model = cls(config)
        ckpt.check_state_dict(model, state, source)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, path: str | os.PathLike, metadata: Optional[dict] = None) -> str:
        """Write the weights as safetensors with the config (and topology) in their
        metadata; ``path`` is a ``.safetensors`` file or a directory. Atomic."""
        return os.fspath(ckpt.save_weights(path, self.state_dict(), self.config.to_dict(), metadata))

    def fuse_images(self, infrared, visible, **options):
        """Fuse lists of pairs with this network; see :func:`s4fusion.api.fuse_images`."""
        from ..api import fuse_images

        return fuse_images(infrared, visible, model=self, **options)

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the released key names (``vmunet.`` prefix)."""
        return {ckpt.ours_to_released(k): v for k, v in self.state_dict().items()}


def _fusion_module(cfg: S4FusionConfig, dim: int) -> nn.Module:
    """The fusion module of one scale: CMSA, or the ablation replacement of ``cfg.fusion``."""
    if cfg.fusion == "cmsa":
        return CMSA(
            dim, cfg.cmsa_depth, cfg.cmsa_d_state, cfg.expand, cfg.dt_rank(dim), cfg.d_conv, cfg.norm_eps, cfg.patch_mark
        )
    return build_ablation_fusion(cfg, dim)


def _check_inputs(infrared: torch.Tensor, visible: torch.Tensor, chans: int) -> None:
    for name, t in (("infrared", infrared), ("visible", visible)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != chans:
            raise ValueError(f"{name} must have shape (B, {chans}, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [0, 1], got {t.dtype}")
    if infrared.shape != visible.shape:
        raise ValueError(
            f"infrared {tuple(infrared.shape)} and visible {tuple(visible.shape)} must have the same shape"
        )


def _init_weights(m: nn.Module) -> None:
    """The released initialisation: Linear trunc_normal(0.02) and zero bias; LayerNorm 1, 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
