"""One training pass (forward, loss, backward), run eagerly or replayed as a CUDA graph."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from .. import cuda_graphs
from ..cast_weights import CastWeights

__all__ = ["TrainPass", "LaggedValues", "GRAPH_WARMUP_STEPS", "DDP_GRAPH_WARMUP_STEPS"]

# Eager calls before the pass is recorded: the first compiles the Triton kernels and
# creates cuBLAS/cuDNN state, the second runs with everything in place.
GRAPH_WARMUP_STEPS = 2
# Under DistributedDataParallel: PyTorch's CUDA-graph notes ask for at least 11 eager
# DDP iterations before a capture of the backward (DDP settles its gradient buckets
# during the first ones).
DDP_GRAPH_WARMUP_STEPS = 11


class TrainPass:
    """``pass_(infrared, visible) -> (fused, values)``: the network's forward (under
    bfloat16 autocast with ``bf16``), the loss and the backward pass, which leaves the
    gradients in the parameters' ``.grad``; the optimizer step is the caller's.

    ``loss_fn(fused, infrared, visible) -> (total, terms)`` with ``terms`` keyed by
    ``term_names``; ``values`` is ``(total, *terms)`` detached, float64, on the device.
    Inputs (B, 1, H, W) on the network's device.

    With ``cuda_graph`` (CUDA only: the caller decides) the first ``warmup_steps``
    calls (:data:`GRAPH_WARMUP_STEPS`; :data:`DDP_GRAPH_WARMUP_STEPS` for a network
    wrapped in DistributedDataParallel, whose gradient all-reduces are then recorded
    too) run eagerly; the next one records the pass once
    as a CUDA graph and every call from then on copies its batch into the graph's
    input buffers and replays it: one launch instead of a few thousand, the same
    kernels in the same order. The batch shape must then stay the same. Recording
    needs one unrecorded run first (on a side stream, its results are discarded), and
    it leaves the gradients as the graph's own tensors, overwritten by every replay:
    callers must not set them to None (``zero_grad`` is not needed). ``fused`` and
    ``values`` are then the graph's output buffers, valid until the next call.

    With ``bf16`` the network runs through :class:`s4fusion.cast_weights.CastWeights`:
    its matrix-product weights are cast to bfloat16 by one multi-tensor copy, and their
    gradients widened back by another, instead of a kernel each way per weight (the
    values autocast's casts give, bit for bit). Not under DistributedDataParallel: the
    gradients of the copies all reach the parameters at the end of the backward, so
    DDP's all-reduces could not overlap it; there autocast casts as usual.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        loss_fn: Callable,
        term_names: tuple[str, ...],
        optimizer: torch.optim.Optimizer,
        bf16: bool,
        cuda_graph: bool,
        warmup_steps: int = GRAPH_WARMUP_STEPS,
    ) -> None:
        self.net, self.loss_fn, self.term_names, self.optimizer = net, loss_fn, term_names, optimizer
        ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
        self.run = CastWeights(net, torch.bfloat16) if bf16 and not ddp else net
        self.bf16, self.cuda_graph, self.warmup_steps = bf16, cuda_graph, warmup_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def recorded(self) -> bool:
        return self.graph is not None

    def _run(self, infrared: torch.Tensor, visible: torch.Tensor, cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # autocast's cast cache must be off while recording (its casts would be freed
        # when autocast exits, memory the graph goes on using)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache) if self.bf16 else nullcontext():
            fused = self.run(infrared, visible)
        total, terms = self.loss_fn(fused.float(), infrared, visible)
        values = torch.stack([total.detach()] + [terms[k].detach() for k in self.term_names]).double()
        total.backward()
        # detached: a caller holding the output must not keep this step's autograd graph
        # (and its gradient-accumulation nodes, bound to the stream they ran on) alive
        return fused.detach(), values

    def __call__(self, infrared: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.graph is None and (not self.cuda_graph or self.calls <= self.warmup_steps):
            self.optimizer.zero_grad(set_to_none=True)
            return self._run(infrared, visible, cache=True)
        if self.graph is None:
            try:
                self.graph = self._record(infrared, visible)
            except Exception as e:  # e.g. an operation of a custom loss that a CUDA graph cannot hold
                raise RuntimeError(
                    f"recording the training pass as a CUDA graph failed ({type(e).__name__}: {e}); "
                    "train with cuda_graph = false (s4fusion train ... cuda_graph=false) to run it eagerly"
                ) from e
        else:
            if infrared.shape != self._inputs[0].shape or visible.shape != self._inputs[1].shape:
                raise ValueError(
                    f"the recorded training pass takes batches of shape {tuple(self._inputs[0].shape)}, got "
                    f"{tuple(infrared.shape)} and {tuple(visible.shape)}; train with cuda_graph = false"
                )
            self._inputs[0].copy_(infrared)
            self._inputs[1].copy_(visible)
        self.graph.replay()
        return self._outputs

    def _record(self, infrared: torch.Tensor, visible: torch.Tensor) -> torch.cuda.CUDAGraph:
        if infrared.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors; the batch is on {infrared.device}")
        self._inputs = (infrared.clone(), visible.clone())
        self.optimizer.zero_grad(set_to_none=True)
        # recorded with no gradients present, the backward writes (not adds) them
        graph, self._outputs = cuda_graphs.record(
            lambda: self._run(*self._inputs, cache=False),
            infrared.device,
            before_recording=lambda: self.optimizer.zero_grad(set_to_none=True),
        )
        return graph


class LaggedValues:
    """A step's loss values on the host, one step late, so that the host never waits
    for the step it has just launched.

    ``push(step, values)`` starts copying ``values`` (a 1-D device tensor) into a
    pinned host buffer without waiting and returns the previous step's values, whose
    copy has finished by then; ``settle()`` waits for the last pushed step and returns
    it. Each returns a list of ``(step, values)`` (float64, CPU), at most one.

    A trainer that read every step's values at once (``values.cpu()``) made the host
    wait for the whole step before it launched the optimizer and the next batch: the
    GPU idled for that host work (3 ms of an 83 ms step on an H200). The copy is
    stream-ordered, so a graph's output buffer may be overwritten by the next replay
    after ``push`` returns. One buffer serves every step: ``push`` settles (waits for
    and copies out) the previous step before it starts the next copy.
    """

    def __init__(self, length: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty(length, dtype=torch.float64, pin_memory=self.cuda)
        self.pending: Optional[tuple[int, Optional[torch.cuda.Event]]] = None

    def push(self, step: int, values: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        done = self.settle()
        self.buffer.copy_(values.detach(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, event)
        return done

    def settle(self) -> list[tuple[int, torch.Tensor]]:
        if self.pending is None:
            return []
        step, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return [(step, self.buffer.clone())]
