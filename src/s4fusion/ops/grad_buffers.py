"""Gradients of B and C written into one buffer laid out as the projection they are views of.

In the network, B and C are views of one projection P (b, M, L, K, rows) in
:func:`s4fusion.ops.projection_rows`' layout (:func:`s4fusion.ops.split_projection`), and
P's gradient is their gradients and the low-rank delta's, in P's layout. A scan backend
that must write dL/dB and dL/dC anyway (the Triton one converts its float32 sums to the
inputs' dtype) can write them, through :func:`sibling_gradients`, into a new buffer at
B's and C's places in their storage; :func:`split_projection`'s backward then completes
that buffer into dL/dP in place (the low-rank delta's rows and zeros for the unused
ones) instead of concatenating the three gradients into a new tensor.

Only buffers made here are completed in place (:func:`completable`): whatever other
tensor a gradient is a view of is never written.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

__all__ = ["sibling_gradients", "completable"]

_made: dict[int, weakref.ref] = {}  # id -> the buffers sibling_gradients made, while they live
# at most this many elements in the buffer per element of B and C together (the network's
# projections: rows / 2N = 4/3)
MAX_SPREAD = 2


def _disjoint(B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether views B and C of one storage, with one shape and strides, each without
    repeated elements, share no element. Sufficient conditions: ordered by stride, every
    dimension's stride at least the extent of the ones before (no repeats); one dimension
    of stride 1 and n > 1 elements, every other dimension's stride a multiple of q, and
    C's offset from B's, modulo q, in [n, q - n] (two elements' offsets differ by s + q m
    with |s| < n)."""
    long = sorted((st, n) for st, n in zip(B.stride(), B.shape) if n > 1)
    extent = 1
    for st, n in long:
        if st < extent:
            return False
        extent = st * n
    unit = [n for st, n in long if st == 1]
    if len(unit) != 1:
        return False
    n = unit[0]
    delta = C.storage_offset() - B.storage_offset()
    others = [st for st, size in long if st != 1]
    if not others:
        return abs(delta) >= n
    q = math.gcd(*others)
    return n <= delta % q <= q - n


def sibling_gradients(B: torch.Tensor, C: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Uninitialised tensors for dL/dB and dL/dC, with B's and C's dtype, shape, strides and
    storage offsets, as views of one new buffer the size of their storage, which
    :func:`completable` recognises; None unless B and C are disjoint views of one storage
    with one dtype, shape and strides and that storage is at most ``MAX_SPREAD`` times
    their size."""
    if B.dtype != C.dtype or B.shape != C.shape or B.stride() != C.stride() or B.device != C.device:
        return None
    storage = B.untyped_storage()
    if storage.data_ptr() != C.untyped_storage().data_ptr() or not _disjoint(B, C):
        return None
    size = storage.nbytes() // B.element_size()
    if size > MAX_SPREAD * (B.numel() + C.numel()):
        return None
    buffer = torch.empty(size, dtype=B.dtype, device=B.device)
    key = id(buffer)
    _made[key] = weakref.ref(buffer, lambda _, key=key: _made.pop(key, None))
    return (
        buffer.as_strided(B.shape, B.stride(), B.storage_offset()),
        buffer.as_strided(C.shape, C.stride(), C.storage_offset()),
    )


def completable(*grads: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The buffer of :func:`sibling_gradients` that every one of ``grads`` is a view of
    (after any further views, such as a permutation), or None."""
    bases = {id(g._base) if g is not None and g._base is not None else None for g in grads}
    if len(bases) != 1 or None in bases:
        return None
    base = grads[0]._base
    made = _made.get(id(base))
    return base if made is not None and made() is base else None
