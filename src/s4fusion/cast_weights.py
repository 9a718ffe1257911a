"""A model's matrix-product weights as bf16 / fp16 copies, for passes under autocast.

Under :func:`torch.autocast`, every linear layer, convolution and matrix product
casts its float32 weights to the autocast dtype, in every pass: for the default
network that is 115 parameters, cast by 115 small kernels per forward on a CUDA
device (BENCHMARKS.md, session 14), and in training about as many more that widen
their gradients back to float32 (session 25). :class:`CastWeights` makes those
parameters' copies in the lower dtype by one ``torch._foreach_copy_`` (a few
multi-tensor kernels) and runs the model with the copies in their place
(:func:`torch.func.functional_call`). Autocast then finds them already in its dtype
and casts nothing. The copies hold exactly the values autocast's casts would make
(the same rounding), so the output is bit for bit the autocast one.
In grad mode the copies are differentiable (:class:`_LowerCopies`): their gradients,
summed in the lower dtype as autograd sums those of autocast's cached casts, are
widened to float32 by one multi-tensor copy at the end of the backward.

Which parameters: the weights and biases of ``nn.Linear``, ``nn.Conv*`` and
``nn.ConvTranspose*`` modules, and the parameters a module lists in its class
attribute ``matmul_weights`` (raw weights that only matrix products consume, e.g.
:class:`s4fusion.models.SS2D`'s ``x_proj_weight``), less those it lists in
``float32_parameters`` (a convolution's bias that an op of its own adds, taking it in
float32 and summing its gradient in float32: the depthwise convolutions' bias + SiLU).
Parameters that run in float32 (LayerNorm, A, D, the delta up-projection and its bias)
are left alone.
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
        kept = getattr(type(module), "float32_parameters", ())
        names.extend(dot + n for n in own if module._parameters.get(n) is not None and n not in kept)
    return names


class _LowerCopies(torch.autograd.Function):
    """``apply(dtype, *params)``: copies of the parameters in ``dtype``, made by one
    multi-tensor copy; the backward widens the copies' gradients to the parameters'
    dtypes by another, and gives None where a copy got no gradient (an unused
    parameter keeps ``.grad`` None, as under autocast's casts)."""

    @staticmethod
    def forward(ctx, dtype, *params):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.dtypes = [p.dtype for p in params]
        copies = [torch.empty_like(p, dtype=dtype) for p in params]  # the parameters' strides
        torch._foreach_copy_(copies, list(params))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        wide = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in wanted]  # the gradients' strides
        if wide:
            torch._foreach_copy_(wide, [grads[i] for i in wanted])
        out: list = [None] * len(grads)
        for i, w in zip(wanted, wide):
            out[i] = w
        return (None, *out)


class CastWeights:
    """``model`` called with its matrix-product weights (:func:`matmul_parameter_names`)
    replaced by ``dtype`` copies of the float32 parameters, made at every call (so
    changes made in place, by ``load_state_dict`` or an optimizer step, are seen; a
    CUDA graph of a call records the copy too). Without grad mode the copies are kept
    buffers, refreshed in place; in grad mode they are new tensors each call, and the
    backward passes their gradients on to the float32 parameters (:class:`_LowerCopies`).
    For passes under autocast in ``dtype``. A parameter replaced by a new tensor is not
    seen: make a new CastWeights."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        if dtype not in LOWER_DTYPES:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        params = dict(model.named_parameters())
        self.model, self.dtype = model, dtype
        self.names = matmul_parameter_names(model)
        self._params = [params[n] for n in self.names]
        self._sources = [p.detach() for p in self._params]
        self._copies = [torch.empty_like(p, dtype=dtype) for p in self._sources]  # the parameters' strides

    def refresh(self) -> None:
        """Copy the float32 parameters into the kept low-precision copies."""
        torch._foreach_copy_(self._copies, self._sources)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            copies = _LowerCopies.apply(self.dtype, *self._params)
        else:
            self.refresh()
            copies = self._copies
        return functional_call(self.model, dict(zip(self.names, copies)), args, kwargs)
