"""Weights on disk: the authors' released checkpoint format and our safetensors format.

Released format: ``torch.save({'model': state_dict})`` with keys prefixed
``vmunet.`` (RELEASED-MODEL-FACTS.md appendix A). Our modules use the paper's
names; :data:`RELEASED_KEY_MAP` is the documented one-to-one mapping (released
key prefix -> our key prefix, the rest of the key unchanged):

=================================================  ==========================================
released                                           s4fusion
=================================================  ==========================================
``vmunet.patch_embed_x.`` / ``patch_embed_y.``     ``embed_ir.`` / ``embed_vi.``
``vmunet.layers_x.{i}.blocks.{j}.ln_1.``           ``encoder_ir.{i}.blocks.{j}.norm.``
``vmunet.layers_x.{i}.blocks.{j}.self_attention.`` ``encoder_ir.{i}.blocks.{j}.ss2d.``
``vmunet.layers_x.{i}.downsample.``                ``encoder_ir.{i}.merge.``
(``layers_y`` likewise)                            (``encoder_vi``)
``vmunet.fusion_layers.{i}.layers.{j}.mark_proj``  ``cmsa.{i}.blocks.{j}.patch_mark.mark_proj``
``vmunet.fusion_layers.{i}.layers.{j}.``           ``cmsa.{i}.blocks.{j}.``
``vmunet.layers_up.{i}.blocks.{j}.ln_1.``          ``decoder.{i}.blocks.{j}.norm.``
``vmunet.layers_up.{i}.blocks.{j}.self_attention.`` ``decoder.{i}.blocks.{j}.ss2d.``
``vmunet.layers_up.{i}.upsample.``                 ``decoder.{i}.expand.``
``vmunet.final_up.``                               ``head.``
``vmunet.final_conv.``                             ``head.out_conv.``
=================================================  ==========================================

Our own format is one ``.safetensors`` file whose metadata holds the network
config (``s4fusion_config``, JSON, including the topology); a directory path
holds ``model.safetensors`` and a readable copy of the config in ``config.json``.

Training checkpoints of ``s4fusion train`` (``torch.save`` of a dict with
``format`` = :data:`TRAINING_FORMAT`, the model state under ``model`` and the run's
config, whose ``model`` entry is the network config) can be fused with directly:
:func:`load_torch_checkpoint` tells them from released checkpoints and returns
their network config, so a run's topology and sizes are never replaced by the
released defaults.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from .io import atomic_write, atomic_write_text

FORMAT_NAME = "s4fusion"
CONFIG_KEY = "s4fusion_config"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the network."""


RELEASED_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("vmunet.patch_embed_x.", "embed_ir."),
    ("vmunet.patch_embed_y.", "embed_vi."),
    ("vmunet.layers_x.{i}.blocks.{j}.ln_1.", "encoder_ir.{i}.blocks.{j}.norm."),
    ("vmunet.layers_x.{i}.blocks.{j}.self_attention.", "encoder_ir.{i}.blocks.{j}.ss2d."),
    ("vmunet.layers_x.{i}.downsample.", "encoder_ir.{i}.merge."),
    ("vmunet.layers_y.{i}.blocks.{j}.ln_1.", "encoder_vi.{i}.blocks.{j}.norm."),
    ("vmunet.layers_y.{i}.blocks.{j}.self_attention.", "encoder_vi.{i}.blocks.{j}.ss2d."),
    ("vmunet.layers_y.{i}.downsample.", "encoder_vi.{i}.merge."),
    ("vmunet.fusion_layers.{i}.layers.{j}.mark_proj", "cmsa.{i}.blocks.{j}.patch_mark.mark_proj"),
    ("vmunet.fusion_layers.{i}.layers.{j}.", "cmsa.{i}.blocks.{j}."),
    ("vmunet.layers_up.{i}.blocks.{j}.ln_1.", "decoder.{i}.blocks.{j}.norm."),
    ("vmunet.layers_up.{i}.blocks.{j}.self_attention.", "decoder.{i}.blocks.{j}.ss2d."),
    ("vmunet.layers_up.{i}.upsample.", "decoder.{i}.expand."),
    ("vmunet.final_up.", "head."),
    ("vmunet.final_conv.", "head.out_conv."),
)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern)


_FORWARD = [(_compile(src), dst) for src, dst in RELEASED_KEY_MAP]
# Inverse: our "head." prefix also covers "head.out_conv.", so try longer targets first.
_BACKWARD = sorted(((_compile(dst), src) for src, dst in RELEASED_KEY_MAP), key=lambda r: -len(r[0].pattern))


def _map_key(key: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end():]
    return None


def released_to_ours(key: str) -> str:
    out = _map_key(key, _FORWARD)
    if out is None:
        raise CheckpointError(f"unexpected key in released checkpoint: {key!r} (no mapping to S4Fusion modules)")
    return out


def ours_to_released(key: str) -> str:
    out = _map_key(key, _BACKWARD)
    if out is None:
        raise CheckpointError(f"key {key!r} has no released-format name")
    return out


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict check of names and shapes; raises CheckpointError naming every problem."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong))
    if problems:
        raise CheckpointError(f"{source} does not fit this S4Fusion config: " + " | ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in: {bad}")


TRAINING_FORMAT = "s4fusion-train-1"  # the ``format`` entry of s4fusion training checkpoints
TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt", ".tar")  # files read with torch.load


def _torch_load(path: Path, what: str) -> object:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a torch file
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def _is_training_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAINING_FORMAT


def load_torch_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """Read a ``torch.save`` checkpoint: an s4fusion training checkpoint gives
    (its model state, its network config dict); the authors' released checkpoint
    gives (the state under our key names, None: the released configuration)."""
    path = Path(path)
    obj = _torch_load(path, "checkpoint")
    if _is_training_checkpoint(obj):
        config = obj.get("config")
        if not isinstance(obj.get("model"), Mapping) or not isinstance(config, Mapping) or "model" not in config:
            raise CheckpointError(f"{path}: damaged s4fusion training checkpoint (no model state or config)")
        return dict(obj["model"]), dict(config["model"])
    return _released_state(obj, path), None


def load_released_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a released ``{'model': state_dict}`` file and return it with our key names."""
    path = Path(path)
    obj = _torch_load(path, "released checkpoint")
    if _is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path} is an s4fusion training checkpoint, not the authors' release; load it with "
            "s4fusion.api.load_model(path) or S4Fusion.from_training_checkpoint(path), "
            "which keep its config and topology"
        )
    return _released_state(obj, path)


def _released_state(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a released S4Fusion checkpoint ({{'model': state_dict}})")
    return {released_to_ours(k): v for k, v in obj.items()}


def save_weights(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], config: dict, extra_metadata: dict | None = None
) -> Path:
    """Write ``state`` (and ``config``) atomically; returns the weights file written."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": FORMAT_NAME, CONFIG_KEY: json.dumps(config, sort_keys=True)}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        weights = path
    else:
        weights = path / WEIGHTS_FILE
        atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    atomic_write(weights, lambda t: save_file(tensors, t, metadata=metadata))
    return weights


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read our format: returns (state_dict, config dict, all metadata)."""
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"S4Fusion weights not found: {weights}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read S4Fusion weights {weights}: {type(e).__name__}: {e}") from e
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{weights} has no S4Fusion config in its metadata; was it written by save_pretrained? "
            "(for the authors' model.pkl use S4Fusion.from_released_checkpoint)"
        )
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: the stored config is not valid JSON: {e}") from e
    return state, config, metadata
