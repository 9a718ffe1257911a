"""A model's matrix-product weights kept as bf16 / fp16 copies for inference under autocast.

Under :func:`torch.autocast`, every linear layer, convolution and matrix product
casts its float32 weights to the autocast dtype, in every pass: for the default
network that is 136 parameters, cast by 115 small kernels per forward on a CUDA
device (stacked and sliced weights share or split casts; BENCHMARKS.md, session 14). :class:`CastWeights` keeps those parameters as
copies in the lower dtype, refreshed from the float32 parameters by one
``torch._foreach_copy_`` (a few multi-tensor kernels), and runs the model with the
copies in their place (:func:`torch.func.functional_call`). Autocast then finds them
already in its dtype and casts nothing. The copies hold exactly the values autocast's
casts would make (the same rounding), so the output is bit for bit the autocast one.

Which parameters: the weights and biases of ``nn.Linear``, ``nn.Conv*`` and
``nn.ConvTranspose*`` modules, and the parameters a module lists in its class
attribute ``matmul_weights`` (raw weights that only matrix products consume, e.g.
:class:`s4fusion.models.SS2D`'s ``x_proj_weight``). Parameters that run in float32
(LayerNorm, A, D, the delta up-projection and its bias) are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

__all__ = ["CastWeights", "matmul_parameter_names"]

_MATMUL_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
)  # fmt: skip
LOWER_DTYPES = (torch.bfloat16, torch.float16)


def matmul_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that only matrix
    products and convolutions consume: those that autocast casts to its dtype."""
    names = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = list(getattr(type(module), "matmul_weights", ()))
        if isinstance(module, _MATMUL_MODULES):
            own += ["weight", "bias"]
        names.extend(dot + n for n in own if module._parameters.get(n) is not None)
    return names


class CastWeights:
    """``model`` called with its matrix-product weights (:func:`matmul_parameter_names`)
    replaced by ``dtype`` copies, which every call first refreshes from the float32
    parameters (so changes made in place, by ``load_state_dict`` or an optimizer step,
    are seen; a CUDA graph of a call records the refresh too). For inference under
    autocast in ``dtype``: a call with grad mode on raises RuntimeError (gradients
    would not reach the float32 parameters). A parameter replaced by a new tensor is
    not seen: make a new CastWeights."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        if dtype not in LOWER_DTYPES:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        params = dict(model.named_parameters())
        self.model, self.dtype = model, dtype
        self.names = matmul_parameter_names(model)
        self._sources = [params[n].detach() for n in self.names]
        self._copies = [torch.empty_like(p, dtype=dtype) for p in self._sources]  # the parameters' strides

    def refresh(self) -> None:
        """Copy the float32 parameters into the low-precision copies."""
        torch._foreach_copy_(self._copies, self._sources)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "CastWeights is for inference: gradients would not reach the float32 parameters; "
                "call it under torch.inference_mode() or torch.no_grad(), or call the model itself to train"
            )
        self.refresh()
        return functional_call(self.model, dict(zip(self.names, self._copies)), args, kwargs)
