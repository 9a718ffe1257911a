"""Typed training configuration: a TOML (or JSON) file plus ``key.sub=value`` overrides.

Defaults are the paper's recipe (section 4 and appendix A.1; RELEASED-MODEL-FACTS.md
section 6.6): AdamW, warm-up then cosine from 3e-4 up to 1.5e-3 and down to 6e-4,
batch 20, 800 epochs, random 229 x 229 crops with flips. Where the paper and the
release are silent the choice is ours and marked *[open]* below.

The file mirrors the dataclasses: top-level keys of :class:`TrainConfig` and one
table per section (``[model]`` = :class:`~s4fusion.models.S4FusionConfig`,
``[data]``, ``[loss]`` = :class:`~s4fusion.losses.LossConfig`, ``[optim]``,
``[schedule]``). Every key is checked: an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the key (and the file). Overrides use
dotted keys and TOML values (``optim.weight_decay=0.05``,
``data.train=["a","b"]``); a value that is not valid TOML is taken as a string
(``run_dir=runs/x``); ``none`` sets an optional value to None. Relative paths are
relative to the working directory (run from the repository root for the
example configs in ``configs/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..data import HIGH_BIT_DEPTH_RULES, SMALL_IMAGE_RULES
from ..losses import LossConfig
from ..models import S4FusionConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_diff",
    "RESUMABLE_CHANGES",
]

PRECISIONS = ("bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration file, key or value is invalid."""


@dataclass
class DataConfig:
    """Where the pairs are and how training samples are made (:mod:`s4fusion.data`)."""

    train: list[str] = field(default_factory=list)  # dataset folders, each with ir/ and vi/
    val: list[str] = field(default_factory=list)  # validation folders (whole images by default)
    val_fraction: float = 0.0  # extra seeded share of the training pairs held out for validation
    crop: int = 229  # training crop side (paper: 229)
    flips: bool = True  # random vertical then horizontal flip, p = 0.5 each
    small: str = "next"  # pairs smaller than the crop: "next" (the released loader) or "pad"
    high_bit_depth: str = "scale"  # 16-bit images: "scale" (/65535) or "minmax" (per image)
    workers: int = 4  # data-loading processes per training process (0: load in the main process)
    cache: bool = False  # decode the training pairs once, before the first step, and keep them in memory
    # (4 bytes per pixel of a pair; shared by the loader processes on Linux): a sample is then a crop, not
    # two decoded images, so a few CPU cores keep up with a fast GPU
    val_crop: int = 0  # validation: 0 = whole images, else a centred crop of this side

    def check(self) -> None:
        if not self.train:
            raise ConfigError("data.train is empty: name at least one dataset folder holding ir/ and vi/")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.crop < 13:
            raise ConfigError(f"data.crop must be at least 13 pixels (the network's smallest grid), got {self.crop}")
        if self.small not in SMALL_IMAGE_RULES:
            raise ConfigError(f"data.small must be one of {SMALL_IMAGE_RULES}, got {self.small!r}")
        if self.high_bit_depth not in HIGH_BIT_DEPTH_RULES:
            raise ConfigError(f"data.high_bit_depth must be one of {HIGH_BIT_DEPTH_RULES}, got {self.high_bit_depth!r}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.val_crop < 0:
            raise ConfigError(f"data.val_crop must be >= 0 (0 = whole images), got {self.val_crop}")


@dataclass
class OptimConfig:
    """AdamW (paper: "AdamW"; everything else [open]).

    ``betas``, ``eps`` and ``weight_decay`` are ``torch.optim.AdamW``'s defaults,
    i.e. what a script that only names AdamW and a learning rate uses. Weight
    decay applies to weight matrices and kernels only: biases (incl.
    ``dt_projs_bias``), LayerNorm parameters and the SSM ``A_logs`` and ``Ds``
    (the release marks them ``_no_weight_decay``) are not decayed."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping

    def check(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.eps must be > 0 and optim.weight_decay, optim.grad_clip >= 0")


@dataclass
class ScheduleConfig:
    """The released ``WarmupCosineSchedule`` (facts 6.5), stepped once per optimizer step.

    Linear warm-up from ``start_lr`` to ``ref_lr`` over ``warmup_epochs`` epochs, then
    a half cosine from ``ref_lr`` down to ``final_lr`` at the last step of the run
    (``T_max`` = epochs x steps per epoch). Paper: 3e-4 -> 1.5e-3 -> 6e-4. The
    warm-up length is [open]: 40 epochs is the value in the configs of I-JEPA,
    whose scheduler the release copies unchanged (5 % of the paper's 800 epochs)."""

    start_lr: float = 3e-4
    ref_lr: float = 1.5e-3
    final_lr: float = 6e-4
    warmup_epochs: float = 40.0

    def check(self) -> None:
        if min(self.start_lr, self.ref_lr, self.final_lr) < 0:
            raise ConfigError("schedule learning rates must be >= 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass
class TrainConfig:
    """One training run. Step counts are optimizer steps (global batches)."""

    model: S4FusionConfig = field(default_factory=S4FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run_dir: str = "runs/s4fusion"  # checkpoints, logs, splits and the final weights go here
    seed: int = 0  # model initialisation, data order, crops, splits
    epochs: int = 800  # paper: 800
    batch_size: int = 20  # global batch (split evenly over processes); paper: 20
    max_steps: int = 0  # stop after this global step (0: run all epochs); the schedule still spans all epochs
    device: str = "auto"  # "auto" (CUDA if present), "cpu" or "cuda"
    precision: str = "bf16"  # "bf16": bfloat16 autocast of the network on CUDA (fp32 on CPU); "fp32"
    log_every: int = 10  # steps between logged loss terms / progress updates
    image_every: int = 500  # steps between sample fused images in TensorBoard (0: never)
    val_every: int = 1000  # steps between validations (0: only at the end)
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest periodic checkpoints kept (0: keep all)
    progress: bool = True  # progress bar on rank 0
    cuda_graph: bool = True  # on CUDA: from the third step on (the twelfth under torchrun), forward, loss and
    # backward (with DDP's all-reduces) are replayed as one recorded CUDA graph (same kernels, far fewer
    # launches); the CPU runs eagerly
    val_metrics: list[str] = field(
        default_factory=lambda: ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"]
    )  # fusion metrics of s4fusion.metrics computed at validation ([] for none)
    resume: str = ""  # "": new run; "auto": newest checkpoint in run_dir if any; or a checkpoint path
    init_weights: str = ""  # new run only: start the network from these weights (a save_pretrained file
    # or folder, or "bundled" for the package's weights) instead of a random initialisation; the optimizer
    # and the schedule start fresh. The model config decides the topology, the file only the tensors.

    def check(self) -> None:
        self.data.check()
        self.optim.check()
        self.schedule.check()
        for key in ("epochs", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "image_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.run_dir:
            raise ConfigError("run_dir must not be empty")
        if self.val_metrics:
            try:
                from ..metrics import METRIC_NAMES
            except ImportError:
                return  # the metrics are optional; validation reports the loss terms only
            unknown = [m for m in self.val_metrics if m not in METRIC_NAMES]
            if unknown:
                raise ConfigError(f"val_metrics: unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists) that :func:`config_from_dict` reads back."""
        return json.loads(json.dumps(asdict(self)))


# Keys that may differ between a checkpoint's config and the config of the run
# that resumes it (they do not change the trajectory of the parameters).
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "device",
        "log_every",
        "image_every",
        "val_every",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
        "cuda_graph",
        "val_metrics",
        "resume",
        "run_dir",
        "data.workers",
        "data.cache",
        "data.val",
        "data.val_crop",
        "loss.resnet_weights",
    }
)


# --------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a field type; ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{key}] must be a table of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, e.g. [{'...'}], got {value!r}")
        if origin is list:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"[{prefix[:-1]}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}"
            + (f" (also unknown: {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; known keys in {where}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"[{prefix[:-1] or 'top level'}]: {e}") from e


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build and check a :class:`TrainConfig` from nested plain values."""
    cfg = _build(TrainConfig, values)
    cfg.check()
    return cfg


def _parse_value(text: str) -> Any:
    if text.strip().lower() == "none":
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to nested ``values`` (in place, returned)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.weight_decay=0.05)")
        parts = key.split(".")
        node = values
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a table")
            node = child
        node[parts[-1]] = _parse_value(text)
    return values


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Nested values of a ``.toml`` or ``.json`` config file; ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        if p.suffix.lower() == ".json":
            values = json.loads(p.read_text())
        else:
            with open(p, "rb") as f:
                values = tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be parsed: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a table of keys")
    return values


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the file (if any), then the overrides; checked."""
    values = read_config_file(path) if path is not None else {}
    apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{os.fspath(path)}: {e}") from e
        raise


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, object()) != fb.get(k, object()))
