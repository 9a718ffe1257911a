"""Scan ops (with the delta up-projection and the channel LayerNorm) and their
backends behind one dispatcher.

Models call :func:`cross_scan` or :func:`cross_scan_lowrank` (and strip-wise inference
:func:`cross_scan_state`),
:func:`split_projection`, :func:`dt_project`, :func:`layer_norm`, :func:`bias_silu`,
:func:`depthwise_conv_silu` and :func:`fold_patches` only, and the loss's frozen ResNet-50
:func:`bias_relu`; they never import a backend (:func:`split_projection` is PyTorch's own
operations on every device). A backend is a function with the signature of
:func:`s4fusion.ops.reference.cross_scan_ref` registered under a name with the
devices it serves and a probe saying whether it can run here, optionally with a
function with the signature of :func:`s4fusion.ops.reference.cross_scan_state_ref`,
one with that of :func:`s4fusion.ops.reference.cross_scan_lowrank_ref` (backends without
one up-project the delta by their :func:`dt_project` and scan it by their :func:`cross_scan`),
one with that of :func:`s4fusion.ops.reference.dt_project_ref`, one with that
of :func:`s4fusion.ops.reference.layer_norm_ref` and ones with those of
:func:`s4fusion.ops.reference.bias_silu_ref`, :func:`s4fusion.ops.reference.bias_relu_ref`,
:func:`s4fusion.ops.reference.depthwise_conv_silu_ref` and
:func:`s4fusion.ops.reference.fold_patches_ref` (backends without one use the reference's,
PyTorch's own operations).

Choosing a backend, in order: the ``backend=`` argument, then
:func:`set_backend` / the ``S4FUSION_SCAN_BACKEND`` environment variable, then
the fastest available backend for the input's device (``auto``).

Under :func:`torch.compile`, :func:`layer_norm`, :func:`dt_project`, :func:`bias_silu`,
:func:`bias_relu`, :func:`depthwise_conv_silu` and :func:`fold_patches` are the references
(inductor fuses them with their neighbours), and every scan call is a
graph break: the backend, its choice included, runs eagerly as an opaque call
(``torch.compiler.disable``, applied only when compiling, so that importing the
package does not import dynamo: :func:`prepare_for_compile`, which :func:`s4fusion.api.compiled` calls,
wraps the scans before tracing; without it they are wrapped during tracing,
and dynamo breaks the graph at that ``torch.compiler.disable`` call as well: two
breaks per scan call instead of one), and dynamo compiles the code between scans. Dynamo cannot trace the numba and
Triton kernels, and their autograd Functions save kernel-specific intermediates
for the backward pass, which an op with a fake implementation would have to
expose; the reference scan is a Python loop over tokens, which tracing would
unroll. The backend is therefore chosen at every call, as without compilation:
a compiled model follows :func:`set_backend`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .grad_buffers import completable
from .reference import (
    bias_relu_ref,
    bias_silu_ref,
    cross_scan_lowrank_ref,
    cross_scan_ref,
    cross_scan_state_ref,
    depthwise_conv_silu_ref,
    direction_orders,
    dt_project_ref,
    fold_patches_ref,
    layer_norm_ref,
    projection_rows,
    selective_scan_ref,
)

__all__ = [
    "bias_relu",
    "bias_relu_ref",
    "bias_silu",
    "bias_silu_ref",
    "cross_scan",
    "cross_scan_lowrank",
    "cross_scan_lowrank_ref",
    "cross_scan_ref",
    "cross_scan_state",
    "cross_scan_state_ref",
    "depthwise_conv_silu",
    "depthwise_conv_silu_ref",
    "dt_project",
    "dt_project_ref",
    "fold_patches",
    "fold_patches_ref",
    "layer_norm",
    "layer_norm_ref",
    "prepare_for_compile",
    "projection_rows",
    "selective_scan_ref",
    "split_projection",
    "direction_orders",
    "register_backend",
    "available_backends",
    "set_backend",
    "get_backend",
    "resolve_backend",
    "resolve_state_backend",
    "BackendUnavailableError",
]


class BackendUnavailableError(RuntimeError):
    """A scan backend was requested that cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn_loader: Callable[[], Callable]  # imports lazily, returns the cross_scan function
    devices: tuple[str, ...]  # device types served, e.g. ("cuda",)
    probe: Callable[[], Optional[str]]  # None when usable, else the reason it is not
    priority: int  # higher wins in auto mode
    how_to_get: str
    state_loader: Optional[Callable[[], Callable]]  # returns the cross_scan_state function; None: has none
    norm_loader: Callable[[], Callable]  # returns the layer_norm function (the reference's by default)
    proj_loader: Callable[[], Callable]  # returns the dt_project function (the reference's by default)
    bias_silu_loader: Callable[[], Callable]  # returns the bias_silu function (the reference's by default)
    bias_relu_loader: Callable[[], Callable]  # returns the bias_relu function (the reference's by default)
    conv_silu_loader: Callable[[], Callable]  # returns the depthwise_conv_silu function (the reference's by default)
    fold_loader: Callable[[], Callable]  # returns the fold_patches function (the reference's by default)
    lowrank_loader: Optional[Callable[[], Callable]]  # returns the cross_scan_lowrank function; None: composed


_BACKENDS: dict[str, Backend] = {}
_forced: Optional[str] = None


def register_backend(
    name: str,
    fn_loader: Callable[[], Callable],
    devices: tuple[str, ...],
    probe: Callable[[], Optional[str]],
    priority: int,
    how_to_get: str = "",
    state_loader: Optional[Callable[[], Callable]] = None,
    norm_loader: Optional[Callable[[], Callable]] = None,
    proj_loader: Optional[Callable[[], Callable]] = None,
    bias_silu_loader: Optional[Callable[[], Callable]] = None,
    bias_relu_loader: Optional[Callable[[], Callable]] = None,
    conv_silu_loader: Optional[Callable[[], Callable]] = None,
    fold_loader: Optional[Callable[[], Callable]] = None,
    lowrank_loader: Optional[Callable[[], Callable]] = None,
) -> None:
    norm_loader = norm_loader or (lambda: layer_norm_ref)
    proj_loader = proj_loader or (lambda: dt_project_ref)
    bias_silu_loader = bias_silu_loader or (lambda: bias_silu_ref)
    bias_relu_loader = bias_relu_loader or (lambda: bias_relu_ref)
    conv_silu_loader = conv_silu_loader or (lambda: depthwise_conv_silu_ref)
    fold_loader = fold_loader or (lambda: fold_patches_ref)
    _BACKENDS[name] = Backend(
        name, fn_loader, devices, probe, priority, how_to_get,
        state_loader, norm_loader, proj_loader, bias_silu_loader, bias_relu_loader, conv_silu_loader, fold_loader,
        lowrank_loader,
    )  # fmt: skip


def _no_reason() -> Optional[str]:
    return None


register_backend(
    "reference",
    lambda: cross_scan_ref,
    devices=("cpu", "cuda", "mps", "xpu"),
    probe=_no_reason,
    priority=0,
    state_loader=lambda: cross_scan_state_ref,
)

# Fast backends register themselves from their own modules (imported here so
# registration happens on package import; the heavy imports stay lazy).
from . import backends as _backends  # noqa: E402,F401


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Names of the backends that can run here (optionally: on this device type)."""
    out = []
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if device_type is not None and device_type not in b.devices:
            continue
        if b.probe() is None:
            out.append(b.name)
    return out


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call (``None`` or ``"auto"``: choose by device)."""
    global _forced
    if name in (None, "auto"):
        _forced = None
        return
    _check_name(name)
    _forced = name


def get_backend() -> str:
    return _forced or os.environ.get("S4FUSION_SCAN_BACKEND", "auto") or "auto"


def _check_name(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailableError(
            f"unknown scan backend {name!r}; known backends: {sorted(_BACKENDS)} (or 'auto')"
        )
    return _BACKENDS[name]


def resolve_backend(device: torch.device, name: Optional[str] = None) -> str:
    """The backend name that a call on ``device`` will use."""
    name = name or get_backend()
    if name != "auto":
        b = _check_name(name)
        if device.type not in b.devices:
            raise BackendUnavailableError(
                f"scan backend {name!r} runs on {b.devices}, not on {device.type!r}; "
                f"use backend='auto' or one of {available_backends(device.type)}"
            )
        reason = b.probe()
        if reason is not None:
            raise BackendUnavailableError(
                f"scan backend {name!r} is not available: {reason}. {b.how_to_get}".strip()
            )
        return name
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if device.type in b.devices and b.probe() is None:
            return b.name
    return "reference"


_loaded: dict[tuple[str, str], Callable] = {}


def _load(name: str, kind: str = "fn") -> Callable:
    """Backend ``name``'s function of this kind (``fn``: cross_scan, ``state``,
    ``norm``, ``proj``, ``bias_silu``, ``bias_relu``, ``conv_silu``, ``fold``, ``lowrank``),
    imported on first use."""
    fn = _loaded.get((name, kind))
    if fn is None:
        fn = _loaded[(name, kind)] = getattr(_BACKENDS[name], f"{kind}_loader")()
    return fn


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gate: Optional[torch.Tensor] = None,
    matmul_input: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LayerNorm of x (..., C) over its last dimension, times ``silu(gate)`` when a
    gate is given; under autocast with ``matmul_input``, in autocast's dtype; see
    :func:`s4fusion.ops.reference.layer_norm_ref`. Runs on the LayerNorm of the
    backend that :func:`cross_scan` would use for ``x``'s device (``backend`` forces
    one)."""
    if torch.compiler.is_compiling():
        return layer_norm_ref(x, weight, bias, eps, gate, matmul_input)
    return _load(resolve_backend(x.device, backend), "norm")(x, weight, bias, eps, gate, matmul_input)


def dt_project(low: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """The per-direction up-projection of the low-rank delta: low (b, M, K, L, R),
    weight (K, d, R) -> delta (b, M, K, d, L), channels innermost in memory; see
    :func:`s4fusion.ops.reference.dt_project_ref`. Runs on the up-projection of the
    backend that :func:`cross_scan` would use for ``low``'s device (``backend``
    forces one)."""
    if torch.compiler.is_compiling():
        return dt_project_ref(low, weight)
    return _load(resolve_backend(low.device, backend), "proj")(low, weight)


def _pieces_of(P: torch.Tensor, pieces) -> tuple[torch.Tensor, ...]:
    """The views of P's last dimension at ``pieces``: (first row, rows) each."""
    return tuple(P[..., first : first + width] for first, width in pieces)


def _runs(pieces, rows: int) -> list[tuple[int, int, Optional[int]]]:
    """P's rows [0, rows) as runs (first row, rows, index of the piece or None for
    unused rows), in row order."""
    runs, row = [], 0
    for first, width, i in sorted((first, width, i) for i, (first, width) in enumerate(pieces)):
        if first > row:
            runs.append((row, first - row, None))
        runs.append((first, width, i))
        row = first + width
    if rows > row:
        runs.append((row, rows - row, None))
    return runs


class _SplitProjection(torch.autograd.Function):
    """The low-rank delta, B and C as views of a projection in
    :func:`projection_rows`' layout, whose backward writes dL/dP in one pass: the three
    gradients and zeros for the unused rows, concatenated in row order, or, where the
    scan wrote dL/dB and dL/dC into a buffer laid out as P (:mod:`.grad_buffers`), that
    buffer completed in place. (Autograd's own backward of three views gives each a
    zero-filled tensor of P's size, copies the gradient in and adds the three.)"""

    SCANNED = (1, 2)  # the pieces whose gradients a scan backend may write into one buffer: B, C

    @staticmethod
    def forward(ctx, P, pieces):  # type: ignore[override]
        ctx.runs = _runs(pieces, P.shape[-1])
        ctx.layout = (P.shape, P.stride(), P.storage_offset())
        return _pieces_of(P, pieces)

    @staticmethod
    def _completed(ctx, grads) -> Optional[torch.Tensor]:
        """dL/dP in the buffer that the gradients of B and C are views of at their places
        in P's layout (:func:`.grad_buffers.completable`), its other rows written here;
        else None."""
        buffer = completable(*(grads[i] for i in _SplitProjection.SCANNED))
        if buffer is None:
            return None
        shape, stride, offset = ctx.layout
        for first, _, i in ctx.runs:
            g = grads[i] if i in _SplitProjection.SCANNED else None
            if g is not None and (g.stride() != stride or g.storage_offset() != offset + first * stride[-1]):
                return None
        dP = buffer.as_strided(shape, stride, offset)
        for first, width, i in ctx.runs:
            if i in _SplitProjection.SCANNED:
                continue
            rows = dP[..., first : first + width]
            if i is not None and grads[i] is not None:
                rows.copy_(grads[i])
            else:
                rows.zero_()
        return dP

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        dP = _SplitProjection._completed(ctx, grads)
        if dP is not None:
            return dP, None
        like = next(g for g in grads if g is not None)
        zero = like.new_zeros(())
        parts = [
            grads[i] if i is not None and grads[i] is not None else zero.expand(*like.shape[:-1], width)
            for _, width, i in ctx.runs
        ]
        return torch.cat(parts, dim=-1), None


def split_projection(
    P: torch.Tensor, dt_rank: int, d_state: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The low-rank delta (..., R), B (..., N) and C (..., N) of a projection P (...,
    rows) laid out by :func:`projection_rows`, as views of P; the gradient of P is
    written in one pass: a concatenation, or the buffer a scan backend wrote the
    gradients of B and C into, completed in place (:mod:`.grad_buffers`) (under
    :func:`torch.compile`, plain slices, which inductor fuses)."""
    rows, ob, oc, ol = projection_rows(dt_rank, d_state)
    if P.shape[-1] != rows:
        raise ValueError(f"split_projection: P has {P.shape[-1]} rows, projection_rows({dt_rank}, {d_state}) {rows}")
    pieces = ((ol, dt_rank), (ob, d_state), (oc, d_state))  # (first row in P, rows) of the low-rank delta, B, C
    if torch.compiler.is_compiling() or not P.requires_grad:
        return _pieces_of(P, pieces)
    return _SplitProjection.apply(P, pieces)


def bias_silu(x: torch.Tensor, bias: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(x + bias)`` per channel of x (b, C, H, W), the bias cast to x's dtype; see
    :func:`s4fusion.ops.reference.bias_silu_ref`. Runs on the op of the backend that
    :func:`cross_scan` would use for ``x``'s device (``backend`` forces one)."""
    if torch.compiler.is_compiling():
        return bias_silu_ref(x, bias)
    return _load(resolve_backend(x.device, backend), "bias_silu")(x, bias)


def depthwise_conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    """``silu(conv(x) + bias)`` of a depthwise convolution (x (b, C, H, W) in any
    layout, weight (C, 1, k, k), k odd, stride 1, the map's size kept), channels-last;
    see :func:`s4fusion.ops.reference.depthwise_conv_silu_ref`. Runs on the op of the
    backend that :func:`cross_scan` would use for ``x``'s device (``backend`` forces
    one)."""
    if torch.compiler.is_compiling():
        return depthwise_conv_silu_ref(x, weight, bias)
    return _load(resolve_backend(x.device, backend), "conv_silu")(x, weight, bias)


def fold_patches(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, backend: Optional[str] = None
) -> torch.Tensor:
    """Overlapping patches of a channels-last token map x (b, h, w, C) summed onto an
    image by weight (C, O, p, p) with stride ``stride``, plus bias (O,): the S4Fusion
    head; see :func:`s4fusion.ops.reference.fold_patches_ref`. Runs on the op of the
    backend that :func:`cross_scan` would use for ``x``'s device (``backend`` forces
    one)."""
    if torch.compiler.is_compiling():
        return fold_patches_ref(x, weight, bias, stride)
    return _load(resolve_backend(x.device, backend), "fold")(x, weight, bias, stride)


def bias_relu(
    x: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """``relu((x + bias) + residual)`` per channel of x (b, C, H, W), the bias cast to
    x's dtype (the residual optional); see :func:`s4fusion.ops.reference.bias_relu_ref`.
    Runs on the op of the backend that :func:`cross_scan` would use for ``x``'s device
    (``backend`` forces one)."""
    if torch.compiler.is_compiling():
        return bias_relu_ref(x, bias, residual)
    return _load(resolve_backend(x.device, backend), "bias_relu")(x, bias, residual)


_opaque: dict[str, Callable] = {}  # the scan calls wrapped in torch.compiler.disable


def prepare_for_compile() -> None:
    """Wrap the scan calls in ``torch.compiler.disable`` now (this imports dynamo),
    outside of tracing, so that a compiled model breaks its graph at the scans only."""
    if not _opaque:
        _opaque["scan"] = torch.compiler.disable(_cross_scan_eager)
        _opaque["state"] = torch.compiler.disable(_cross_scan_state_eager)


def cross_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SS2D / Cross SS2D scan core; see :func:`s4fusion.ops.reference.cross_scan_ref`
    for the exact semantics and layouts. ``backend`` forces one backend."""
    args = (u, delta, A, B, C, D, delta_bias, height, width, backend)
    if torch.compiler.is_compiling():
        opaque = _opaque.get("scan") or torch.compiler.disable(_cross_scan_eager)
        return opaque(*args)
    return _cross_scan_eager(*args)


def _cross_scan_eager(u, delta, A, B, C, D, delta_bias, height, width, backend):
    name = resolve_backend(u.device, backend)
    return _load(name)(u, delta, A, B, C, D, delta_bias, height, width)


def cross_scan_lowrank(
    u: torch.Tensor,
    low: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """:func:`cross_scan` of the delta :func:`dt_project` up-projects from the low-rank
    delta ``low`` (b, M, K, L, R) by ``dt_weight`` (K, d, R), in ``out_dtype`` (default
    u's; float32: a backend whose kernels sum in float32 returns those sums unrounded);
    see :func:`s4fusion.ops.reference.cross_scan_lowrank_ref`. A backend may fuse the two
    (``triton`` does without gradients: the delta is never written); otherwise, and
    under :func:`torch.compile`, the up-projection then the scan. ``backend`` forces one
    backend."""
    if not torch.compiler.is_compiling():
        name = resolve_backend(u.device, backend)
        if _BACKENDS[name].lowrank_loader is not None:
            return _load(name, "lowrank")(u, low, dt_weight, A, B, C, D, delta_bias, height, width, out_dtype)
    delta = dt_project(low, dt_weight, backend=backend)
    out = cross_scan(u, delta, A, B, C, D, delta_bias, height, width, backend=backend)
    return out if out_dtype is None else out.to(out_dtype)


def cross_scan_state(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
    direction: int,
    h0: torch.Tensor,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scan direction of :func:`cross_scan` from a given state, returning the
    final state, for running a map in strips (inference only: refuses inputs that
    require grad while grad mode is on); see
    :func:`s4fusion.ops.reference.cross_scan_state_ref` for the exact semantics.

    u, delta (b, M, d, L), A (d, N), B, C (b, M, N, L), delta_bias (d,),
    direction 0..3, h0 (b, d, N) -> y (b, M, d, L) in ``u.dtype`` (no D skip),
    h_last (b, d, N) in the state dtype.

    The backend is chosen as for :func:`cross_scan` (``backend`` forces one);
    where it has no state op (``triton``), :func:`resolve_state_backend` says
    which one runs instead, whether chosen automatically or forced: on a GPU,
    the CPU kernel on host copies of the inputs when numba is installed.
    """
    args = (u, delta, A, B, C, delta_bias, height, width, direction, h0, backend)
    if torch.compiler.is_compiling():
        opaque = _opaque.get("state") or torch.compiler.disable(_cross_scan_state_eager)
        return opaque(*args)
    return _cross_scan_state_eager(*args)


def _cross_scan_state_eager(u, delta, A, B, C, delta_bias, height, width, direction, h0, backend):
    name = resolve_state_backend(u.device, backend)
    fn = _load(name, "state")
    if u.device.type in _BACKENDS[name].devices:
        return fn(u, delta, A, B, C, delta_bias, height, width, direction, h0)
    host = [t.cpu() for t in (u, delta, A, B, C, delta_bias, h0)]
    y, h_last = fn(*host[:6], height, width, direction, host[6])
    return y.to(u.device), h_last.to(u.device)


def resolve_state_backend(device: torch.device, name: Optional[str] = None) -> str:
    """The backend name that a :func:`cross_scan_state` call on ``device`` will use:
    the backend :func:`cross_scan` would use; if it has no state op (``triton``),
    the fastest available one that has, on ``device`` or, for the CPU kernel, on
    host copies of the inputs (the plain-PyTorch loop of ``reference`` on a GPU
    would take a kernel launch per scan step)."""
    name = resolve_backend(device, name)
    if _BACKENDS[name].state_loader is not None:
        return name
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if b.state_loader is not None and b.probe() is None and (device.type in b.devices or "cpu" in b.devices):
            return b.name
    return "reference"
