"""Launch helpers shared by the Triton backends: the device their launches run on, the
grid arithmetic of the backward kernels (LayerNorm, delta up-projection, bias + SiLU)
whose programs each walk a run of rows and write one partial sum, and when a
forward-only kernel (depthwise convolution, patch fold) may serve a call."""

from __future__ import annotations

import contextlib

import torch
import triton

from .reference import autocast_dtype


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context an op's Triton launches for tensor ``t`` run in. Triton launches on
    the current CUDA device (autograd makes the backward's current), so ``t``'s device is
    made current unless it already is (skipping the switch saves host time per call);
    nothing for a CPU tensor (the interpreter)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def forward_only_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtypes: tuple[torch.dtype, ...]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """x and weight of a convolution-like op as its kernel takes them (under autocast
    cast to autocast's dtype, as autocast casts a convolution's input and weight), and
    whether a forward-only kernel may run: no gradient wanted, and x and weight of one
    dtype among ``dtypes``."""
    lower = autocast_dtype(x.device.type)
    if lower is not None:
        x, weight = x.to(lower), weight.to(lower)
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    return x, weight, not grads and weight.dtype == x.dtype and x.dtype in dtypes


def runs_of_tiles(rows: int, tile: int, sets: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """Cut each of ``sets`` independent sets of ``rows`` rows into runs of whole tiles
    of ``tile`` rows, so that all sets together have about ``per_sm`` runs per
    multiprocessor of ``device`` (one on a CPU, for the interpreter). Returns (runs
    per set, rows per run); the last run of a set may be shorter."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    runs = max(1, min(triton.cdiv(rows, tile), triton.cdiv(per_sm * sms, sets)))
    per_run = triton.cdiv(triton.cdiv(rows, runs), tile) * tile
    return max(1, triton.cdiv(rows, per_run)), per_run
