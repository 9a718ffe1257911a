"""Registration of the fast scan backends (the triton one has no state op:
:func:`s4fusion.ops.cross_scan_state` runs the CPU kernel on host copies on the
GPU, see :func:`s4fusion.ops.resolve_state_backend`; it has a LayerNorm, a delta
up-projection, a scan of the low-rank delta, a bias + SiLU, a depthwise convolution + SiLU
and the head's patch fold of its own, the CPU one uses PyTorch's).

Each backend lives in its own module and is imported only when first used;
the probe functions here only check whether it could be imported/run.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from . import register_backend


def _cpu_probe() -> Optional[str]:
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    return None


def _cpu_loader():
    from .cpu_scan import cross_scan_cpu

    return cross_scan_cpu


def _cpu_state_loader():
    from .cpu_scan import cross_scan_state_cpu

    return cross_scan_state_cpu


register_backend(
    "cpu",
    _cpu_loader,
    devices=("cpu",),
    probe=_cpu_probe,
    priority=10,
    how_to_get="pip install numba",
    state_loader=_cpu_state_loader,
)


_triton_reason: list[Optional[str]] = []  # the probe's answer, computed once per process


def _triton_probe() -> Optional[str]:
    if not _triton_reason:
        import torch

        if importlib.util.find_spec("triton") is None:
            _triton_reason.append("triton is not installed")
        elif not torch.cuda.is_available():
            _triton_reason.append("no CUDA device is available")
        else:
            _triton_reason.append(None)
    return _triton_reason[0]


def _triton_loader():
    from .triton_scan import cross_scan_triton

    return cross_scan_triton


def _triton_lowrank_loader():
    from .triton_scan import cross_scan_lowrank_triton

    return cross_scan_lowrank_triton


def _triton_proj_loader():
    from .triton_proj import dt_project_triton

    return dt_project_triton


def _triton_bias_silu_loader():
    from .triton_act import bias_silu_triton

    return bias_silu_triton


def _triton_bias_relu_loader():
    from .triton_act import bias_relu_triton

    return bias_relu_triton


def _triton_conv_silu_loader():
    from .triton_act import depthwise_conv_silu_triton

    return depthwise_conv_silu_triton


def _triton_fold_loader():
    from .triton_fold import fold_patches_triton

    return fold_patches_triton


def _triton_norm_loader():
    from .triton_norm import layer_norm_triton

    return layer_norm_triton


register_backend(
    "triton",
    _triton_loader,
    devices=("cuda",),
    probe=_triton_probe,
    priority=20,
    how_to_get="install triton (it ships with PyTorch's CUDA wheels on Linux)",
    norm_loader=_triton_norm_loader,
    proj_loader=_triton_proj_loader,
    bias_silu_loader=_triton_bias_silu_loader,
    bias_relu_loader=_triton_bias_relu_loader,
    conv_silu_loader=_triton_conv_silu_loader,
    fold_loader=_triton_fold_loader,
    lowrank_loader=_triton_lowrank_loader,
)
