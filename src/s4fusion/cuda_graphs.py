"""Recording a CUDA graph: the steps that the fusing API (:func:`s4fusion.api.graphed`)
and the trainer (:class:`s4fusion.training.step.TrainPass`) share."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

__all__ = ["record"]

T = TypeVar("T")


def record(
    fn: Callable[[], T], device: torch.device, before_recording: Optional[Callable[[], None]] = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn()`` recorded as one CUDA graph on ``device``; returns the graph and what the
    recorded call returned (the tensors every replay writes).

    ``fn`` runs once unrecorded first, on a side stream of ``device``: that run
    compiles every kernel it launches and settles the allocator, neither of which a
    recording may do; its result is dropped. ``before_recording()`` (if given) runs
    next, then the recording, on the same side stream (``torch.cuda.graph``'s own
    capture stream belongs to whichever device was current when it first recorded).
    Everything happens with ``device`` current; replay there too. Only this thread's
    calls are checked during the recording (``thread_local``): a data loader's
    pin-memory thread may allocate or query pinned memory meanwhile."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        if before_recording is not None:
            before_recording()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = fn()
    return graph, out
