"""Independent branches of a forward pass run concurrently on CUDA streams.

S4Fusion's two encoders never read each other's maps, and each fusion module reads
only the maps entering one encoder stage; one after the other on one stream, their
kernels leave the GPU partly idle (the scans' last waves, the small maps' kernels,
the gaps between dependent launches). :class:`Branches` runs each such chain on a
stream of its own and orders the streams by the tensors that pass between them, so
the same kernels run on the same inputs (the results are those of one stream) and
overlap where the data allows. Recorded in a CUDA graph, the streams become parallel
branches of the graph.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

__all__ = ["Branches", "MAIN"]

MAIN = "main"  # the stream that was current when the branches were made

T = TypeVar("T")

# side streams per device, made once: cuBLAS and cuDNN keep a workspace per stream, so a
# new stream per pass would allocate new ones every pass
_STREAMS: dict[int, list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _STREAMS.setdefault(index, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device=index))
    return streams[:count]


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _tensors(item)


class Branches:
    """Named branches of one pass on the device of ``like``.

    ``on(branch, fn)(*args)`` returns ``fn(*args)``, launched on the branch's stream
    once every tensor among ``args`` that another branch's call returned is made;
    tensors from before the branches (made on :data:`MAIN`'s stream) are ready for
    all. :data:`MAIN` runs on the stream that was current at creation. ``join()``
    makes that stream wait for every branch. Every tensor a branch's call returned is
    held until ``join()``: a stream's caching allocator may hand a freed block to that
    stream's next allocation while another stream still reads it.

    Disabled (``enabled`` false, or ``like`` not on a CUDA device): ``on(branch, fn)``
    is ``fn`` itself, so the calls are plain calls in program order on the current
    stream (under ``torch.compile`` no wrapper frame is compiled once per ``fn``)."""

    def __init__(self, like: torch.Tensor, names: Sequence[str], enabled: bool) -> None:
        self.enabled = enabled and like.is_cuda
        if not self.enabled:
            return
        self.main = torch.cuda.current_stream(like.device)
        side = _side_streams(like.device, len(names))
        for stream in side:
            stream.wait_stream(self.main)
        self.streams = {MAIN: self.main, **dict(zip(names, side))}
        self.last: dict[str, torch.cuda.Event] = {}  # the event after each branch's last run
        self.made: dict[int, tuple[torch.Tensor, str, torch.cuda.Event]] = {}  # id -> (tensor, branch, event)

    def on(self, branch: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, to be called on the branch's stream (``fn`` itself when disabled)."""
        return functools.partial(self._run, branch, fn) if self.enabled else fn

    def _run(self, branch: str, fn: Callable[..., T], *args: Any) -> T:
        stream = self.streams[branch]
        for t in _tensors(args):
            entry = self.made.get(id(t))
            if entry is not None and entry[0] is t and entry[1] != branch:
                stream.wait_event(entry[2])
        with torch.cuda.stream(stream):
            out = fn(*args)
            event = torch.cuda.Event()
            event.record(stream)
        self.last[branch] = event
        for t in _tensors(out):
            self.made[id(t)] = (t, branch, event)
        return out

    def join(self) -> None:
        if not self.enabled:
            return
        for branch, event in self.last.items():
            if branch != MAIN:
                self.main.wait_event(event)
        self.last.clear()
        self.made.clear()
