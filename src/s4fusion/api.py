"""Fusing images from Python: ``s4fusion.fuse`` and ``fuse_images``.

``fuse(infrared, visible)`` takes one pair in any of these forms (the two may
differ) and returns the fused image in the form of ``visible``:

==========================  ===========================================  ==========================================
``visible`` given as         accepted layouts                             result
==========================  ===========================================  ==========================================
path (``str``/``PathLike``)  any file :mod:`s4fusion.io` reads             numpy float32, (H, W, 3) or (H, W), [0, 1]
numpy array                  (H, W) grey or (H, W, 3|4); uint8, uint16,   numpy, same dtype as ``visible`` (uint8 /
                             float in [0, 1]                              uint16 rounded half up, float in [0, 1])
PIL image                    any mode                                     PIL image, ``RGB`` or ``L`` (8-bit)
torch tensor                 (H, W), (C, H, W), (B, C, H, W), C = 1 or 3;  tensor of the same layout with C = 3 or 1,
                             float in [0, 1] or uint8                     ``visible``'s dtype and device
==========================  ===========================================  ==========================================

The infrared image may have any of these forms too (tensors (H, W), (1, H, W)
or (B, 1, H, W)); it is normalised to [0, 1] by ``ir_norm`` (see :mod:`s4fusion.io`).
The network sees the infrared image and the visible Y channel; the output is
colour (the fused Y with the visible image's Cr/Cb, released ``YCrCb2RGB``)
unless ``gray=True`` or the visible image is grey. Outputs are clamped to [0, 1];
call the model itself for the raw, unclamped network output.

Large images are fused band by band when a whole-image pass would not fit the
memory budget (:mod:`s4fusion.tiling`): the scan states are carried from band to
band, so the result equals the whole-image result up to float rounding.
``tile=0`` never uses bands, ``tile=N`` forces bands of an N x N-pixel tile's
worth of tokens.

``compile=True`` runs whole-image passes through the network compiled with
:func:`torch.compile` (:func:`compiled`): the first pass at each batch and image
size compiles (tens of seconds), later ones run faster. Band-wise passes always
run the network uncompiled.

Whole-image passes on a CUDA device replay CUDA graphs (:func:`graphed`): the
whole network launches at once, without the host's per-kernel launch cost (on an
H200, :func:`fuse` of a 481x649 pair, numpy in and out, takes 16.7 ms replayed
against 34.8 ms launched kernel by kernel). ``cuda_graph="auto"`` (the default)
records a graph at the second pass of a batch and image size, so one-off sizes run
as usual, and only for passes that need at most 1/:data:`GRAPH_LIMIT` of the memory
budget; ``True`` records at the first pass of every size (CUDA only); ``False``
never records.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checkpoint as ckpt
from . import cuda_graphs, io, ops, tiling
from .cast_weights import LOWER_DTYPES, CastWeights
from .models import S4Fusion
from .ops.reference import autocast_dtype

__all__ = [
    "FusionError",
    "PRECISIONS",
    "WEIGHTS_FILE",
    "default_weights",
    "example_pair",
    "load_model",
    "compiled",
    "COMPILE_LIMIT",
    "cudnn_autotune",
    "graphed",
    "GRAPH_LIMIT",
    "resolve_device",
    "prepare_pair",
    "PreparedPair",
    "fuse_luma",
    "fuse_prepared",
    "fuse",
    "fuse_images",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREPARE_THREADS = 4  # threads preparing (reading, converting) the pairs of one fuse_images call
# fuse_images works through its pairs in windows of this many (at least batch_size): the next
# window is prepared while the network fuses this one, and at most two windows are held prepared
PREPARE_WINDOW = 16
WEIGHTS_FILE = "s4fusion.safetensors"
_KINDS = "give a path, numpy array, PIL image or torch tensor"
# Compiled versions dynamo keeps of each function of the network (its recompile limit,
# 8 by default) while a compiled model runs. The network's scales share their code,
# so one input shape takes up to two versions per scale (VSS and CMSA blocks): about
# ten shapes of the default network compile before torch warns and runs the rest of
# the shapes eagerly.
COMPILE_LIMIT = 64
_COMPILED_ATTR = "_s4fusion_compiled"
# CUDA graphs a model keeps (one per input shape, precision and device; the oldest
# goes first): each holds the memory of one pass at its size.
GRAPH_LIMIT = 4
# Input keys whose passes a model counts before their graph is recorded (the oldest
# count goes first).
_SEEN_LIMIT = 64
_GRAPHED_ATTR = "_s4fusion_graphed"
PathLike = Union[str, os.PathLike]


class FusionError(ValueError):
    """A pair cannot be fused (sizes differ, too small, bad option, non-finite
    output); the message names the inputs and says what to do."""


# ------------------------------------------------------------------- weights
def default_weights() -> Path:
    """The weights file bundled with the package (``s4fusion/weights/s4fusion.safetensors``).

    Raises FileNotFoundError saying that weights must be given when this
    installation has none."""
    path = Path(os.fspath(importlib.resources.files("s4fusion") / "weights" / WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled S4Fusion weights in this installation ({path} does not exist); "
            "give weights explicitly: --weights FILE on the command line, or model=FILE / an S4Fusion "
            "instance in Python (FILE: a .safetensors file or folder written by save_pretrained, or the "
            "authors' released checkpoint .pth/.pkl)"
        )
    return path


def example_pair() -> tuple[Path, Path]:
    """(infrared, visible) paths of the bundled example pair (MSRS 00123D crop,
    see ``s4fusion/examples/LICENSE.md``)."""
    root = importlib.resources.files("s4fusion") / "examples"
    return Path(os.fspath(root / "ir.png")), Path(os.fspath(root / "vi.png"))


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the named
    device, which must exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionError(f"device {device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


def load_model(weights: Union[PathLike, None] = None, device: Union[str, torch.device, None] = None) -> S4Fusion:
    """Load a network for inference (eval mode, on ``device``).

    ``weights``: a ``.safetensors`` file or folder written by ``save_pretrained``,
    a checkpoint of ``s4fusion train`` (``.pt``, with its config and topology), or the
    authors' released checkpoint (``.pth``, ``.pkl``, ...); None: the bundled weights
    (:func:`default_weights`). Raises CheckpointError for a missing, unreadable,
    mismatched or non-finite checkpoint."""
    path = Path(weights) if weights is not None else default_weights()
    if path.suffix.lower() in ckpt.TORCH_SUFFIXES:
        model = S4Fusion.from_torch_checkpoint(path)
    else:
        model = S4Fusion.from_pretrained(path)
    return model.eval().to(resolve_device(device))


def _model(model: Union[S4Fusion, PathLike, None], device: Union[str, torch.device, None]) -> S4Fusion:
    if isinstance(model, S4Fusion):
        if device is not None:
            target = resolve_device(device)
            if next(model.parameters()).device != target:
                model = model.to(target)
        return model
    return load_model(model, device)


class _CompiledSlot:
    """Where a model keeps its compiled forward (:func:`compiled`). A copy or a
    pickle of the model gets an empty slot: the compiled module is bound to the
    model it was made from."""

    __slots__ = ("forward",)

    def __init__(self) -> None:
        self.forward: Optional[Callable[..., torch.Tensor]] = None

    def __reduce__(self) -> tuple:
        return (_CompiledSlot, ())


def compiled(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``model`` compiled with :func:`torch.compile` (inductor, static shapes), made
    once per model and process and kept on the model; a copy of the model compiles
    anew. Calls take and return what ``model(...)`` does, in training too (same
    parameters, gradients through the compiled code).

    Every scan is a graph break (:mod:`s4fusion.ops`): inductor fuses the layers
    between the scans, which run as opaque calls of the scan backend. Compilation is
    lazy: the first call with a new input shape (batch, height, width), dtype,
    device, autocast, grad or train/eval mode compiles, and later calls with the
    same ones reuse it. Shapes are static (``dynamic=False``): the scales share their
    code, so dynamic shapes would make every scale's code shape-generic. Up to
    :data:`COMPILE_LIMIT` versions of each function are kept. On the CPU, inductor
    needs a C++ compiler."""
    slot = vars(model).get(_COMPILED_ATTR)
    if slot is None:
        slot = _CompiledSlot()
        setattr(model, _COMPILED_ATTR, slot)
    if slot.forward is None:
        ops.prepare_for_compile()
        module = torch.compile(model, dynamic=False)

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            # cache_size_limit: the recompile limit's name in every torch since 2.1
            with torch._dynamo.config.patch(cache_size_limit=COMPILE_LIMIT):
                return module(*args, **kwargs)

        slot.forward = forward
    return slot.forward


class _GraphedPass:
    """One recorded CUDA graph of ``model(infrared, visible_y)`` at one input shape,
    with the input buffers it reads and the output it writes."""

    def __init__(self, model: torch.nn.Module, infrared: torch.Tensor, visible_y: torch.Tensor) -> None:
        if infrared.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors; the inputs are on {infrared.device}")
        self.device = infrared.device
        self.infrared, self.visible_y = infrared.clone(), visible_y.clone()
        dtype = autocast_dtype("cuda")
        # under autocast, the weights' casts are one refresh of low-precision copies
        self.run = CastWeights(model, dtype) if dtype in LOWER_DTYPES else model
        self.graph, self.out = cuda_graphs.record(lambda: self.run(self.infrared, self.visible_y), self.device)

    def __call__(self, infrared: torch.Tensor, visible_y: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.infrared.copy_(infrared)
            self.visible_y.copy_(visible_y)
            self.graph.replay()
            return self.out.clone()


class _GraphSlot:
    """Where a model keeps its recorded passes (:func:`graphed`), most recent last, each
    with the storage addresses of the parameters and buffers it was recorded with, and
    how many passes of each input key without a graph it has run. A copy or a pickle of
    the model gets an empty slot: a graph is bound to the tensors it was recorded with."""

    __slots__ = ("passes", "seen")

    def __init__(self) -> None:
        self.passes: dict[tuple, tuple[tuple[int, ...], _GraphedPass]] = {}
        self.seen: dict[tuple, int] = {}

    def __reduce__(self) -> tuple:
        return (_GraphSlot, ())


def _tensor_addresses(model: torch.nn.Module) -> tuple[int, ...]:
    """Storage addresses of every parameter and buffer of ``model`` and its submodules,
    in a fixed order. Checked before every replay, so it walks the modules' own
    dictionaries: ``model.parameters()`` and ``buffers()`` took 0.8 ms for the default
    network on the development CPU, this 0.26 ms."""
    out: list[int] = []
    stack = [model]
    while stack:
        module = stack.pop()
        out.extend(t.data_ptr() for t in module._parameters.values() if t is not None)
        out.extend(t.data_ptr() for t in module._buffers.values() if t is not None)
        stack.extend(m for m in module._modules.values() if m is not None)
    return tuple(out)


def graphed(model: torch.nn.Module, record_at: int = 1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model``'s forward on a CUDA device replayed as CUDA graphs, for inference.

    The ``record_at``-th call with an input shape (batch, height, width), dtype,
    device and autocast precision runs the network once and records one CUDA graph
    of it (the calls before it run ``model`` as usual); later calls copy their inputs
    into the graph's buffers and replay it: every kernel of the pass launches at
    once, without the host's per-kernel launch cost, which at small and medium sizes
    is longer than the kernels. Under autocast, the graph runs ``model`` through
    :class:`s4fusion.cast_weights.CastWeights`: its matrix-product weights are cast by one
    refresh of low-precision copies instead of a cast kernel each (same values, same
    output). Up to :data:`GRAPH_LIMIT` graphs are kept per model
    (each holds the memory of one pass at its size); the oldest goes first. The
    result is a new tensor, as ``model(...)``'s. Record and replay under the same
    grad mode (``torch.inference_mode()`` in the fusing functions). Parameters
    changed in place (``load_state_dict``, an optimizer step) are seen by later
    replays; a graph whose parameters or buffers were replaced by new tensors
    (``load_state_dict(..., assign=True)``, ``model.half()``) is recorded again."""
    if record_at < 1:
        raise ValueError(f"record_at must be >= 1, got {record_at}")
    slot = vars(model).get(_GRAPHED_ATTR)
    if slot is None:
        slot = _GraphSlot()
        setattr(model, _GRAPHED_ATTR, slot)

    def forward(infrared: torch.Tensor, visible_y: torch.Tensor) -> torch.Tensor:
        key = (tuple(infrared.shape), tuple(visible_y.shape), infrared.dtype, infrared.device, autocast_dtype("cuda"))
        recorded, graph = slot.passes.pop(key, ((), None))
        if graph is None:
            calls = slot.seen.pop(key, 0) + 1
            if calls < record_at:
                slot.seen[key] = calls
                while len(slot.seen) > _SEEN_LIMIT:
                    del slot.seen[next(iter(slot.seen))]
                return model(infrared, visible_y)
        tensors = _tensor_addresses(model)
        if graph is None or recorded != tensors:
            del graph  # (its memory goes before the new recording)
            graph = _GraphedPass(model, infrared, visible_y)
            while len(slot.passes) >= GRAPH_LIMIT:
                del slot.passes[next(iter(slot.passes))]
        slot.passes[key] = (tensors, graph)
        return graph(infrared, visible_y)

    return forward


# ------------------------------------------------------------------- inputs
@dataclass
class PreparedPair:
    """One pair ready for the network. ``infrared``, ``y``: (H, W) float32 in [0, 1];
    ``cr``, ``cb``: the visible chroma (H, W), None when the visible image is grey."""

    infrared: np.ndarray
    y: np.ndarray
    cr: Optional[np.ndarray]
    cb: Optional[np.ndarray]
    name: str

    @property
    def size(self) -> tuple[int, int]:
        return self.infrared.shape  # (H, W)


def _tensor_to_hwc(t: torch.Tensor, name: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 3:
        if t.shape[0] not in (1, 3, 4):
            raise FusionError(f"{name}: tensor of shape {tuple(t.shape)}: expected (C, H, W) with C = 1, 3 or 4")
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise FusionError(f"{name}: tensor of shape {tuple(t.shape)}: expected (H, W) or (C, H, W)")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _infrared(src: Any, norm: str, percentiles: Sequence[float], name: str) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)):
        return io.read_infrared(src, norm, percentiles)
    if isinstance(src, Image.Image):
        return io.infrared_from_pil(src, norm, percentiles, name)
    if isinstance(src, torch.Tensor):
        src = _tensor_to_hwc(src, name)
    if isinstance(src, np.ndarray):
        return io.infrared_from_array(src, norm, percentiles, name)
    raise FusionError(f"{name}: unsupported input type {type(src).__name__}; {_KINDS}")


def _visible(src: Any, name: str) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)):
        return io.read_visible(src)
    if isinstance(src, Image.Image):
        return io.visible_from_pil(src, name)
    if isinstance(src, torch.Tensor):
        src = _tensor_to_hwc(src, name)
    if isinstance(src, np.ndarray):
        return io.visible_from_array(src, name)
    raise FusionError(f"{name}: unsupported input type {type(src).__name__}; {_KINDS}")


def _label(src: Any, default: str) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else default


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, 3]) float32 -> ``size`` (H', W') with antialiased bicubic, clamped to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
    t = F.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
    return (t[0, 0] if image.ndim == 2 else t[0].permute(1, 2, 0)).contiguous().numpy()


def prepare_pair(
    infrared: Any,
    visible: Any,
    *,
    ir_norm: str = "auto",
    ir_percentiles: Sequence[float] = io.DEFAULT_PERCENTILES,
    resize_visible: bool = False,
    resize_hint: str = "resize_visible=True",
) -> PreparedPair:
    """Read / convert one pair (any accepted form) into network inputs.

    Raises :class:`s4fusion.io.ImageError` for unreadable inputs and
    :class:`FusionError` when the sizes differ and ``resize_visible`` is off
    (``resize_hint`` names the option in the message)."""
    ir_name, vi_name = _label(infrared, "infrared"), _label(visible, "visible")
    ir = _infrared(infrared, ir_norm, ir_percentiles, ir_name)
    vi = _visible(visible, vi_name)
    if ir.shape != vi.shape[:2]:
        if not resize_visible:
            (h, w), (vh, vw) = ir.shape, vi.shape[:2]
            raise FusionError(
                f"infrared {ir_name} is {w}x{h} (width x height) but visible {vi_name} is {vw}x{vh}; "
                f"the images must be registered pairs of the same size. Use {resize_hint} to resize the "
                "visible image to the infrared size (only if they show the same field of view)"
            )
        vi = _resize(vi, ir.shape)
    if vi.ndim == 3:
        y, cr, cb = io.rgb_to_ycrcb(vi[..., 0], vi[..., 1], vi[..., 2])
    else:
        y, cr, cb = vi, None, None
    return PreparedPair(ir, np.ascontiguousarray(y, np.float32), cr, cb, f"{ir_name} + {vi_name}")


# ------------------------------------------------------------------ running
def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise FusionError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, precision: str) -> Iterator[None]:
    """cuDNN's benchmark mode (``torch.backends.cudnn.benchmark``) while fusing on a CUDA
    device in bf16 or fp16; the caller's setting comes back afterwards.

    For some reduced-precision depthwise convolutions of the network, cuDNN's heuristics
    choose a direct kernel several times slower than the one that timing the candidates
    finds (H200, bf16, the 288-channel convolutions of a 481x649 pair: 30 us a call
    against about 4 us; the whole pass 5.28 -> 5.08 ms, BENCHMARKS.md). In fp32 the
    heuristic choice measured as fast, so fp32 is left alone. The candidates are timed
    once per input shape, in a shape's first pass (before any CUDA graph of it is
    recorded)."""
    if device.type != "cuda" or PRECISIONS.get(precision) is None:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def fuse_luma(
    model: S4Fusion,
    infrared: torch.Tensor,
    visible_y: torch.Tensor,
    *,
    tile: Union[str, int] = "auto",
    memory_budget: Optional[int] = None,
    precision: str = "fp32",
    progress: Optional[Callable[[str], None]] = None,
    compile: bool = False,
    cuda_graph: Union[bool, str] = "auto",
) -> torch.Tensor:
    """The network on a batch: (B, 1, H, W) infrared and visible Y in [0, 1] ->
    (B, 1, H, W) float32 fused Y on the model's device, unclamped.

    ``tile``: ``"auto"`` runs band-wise only what does not fit ``memory_budget`` bytes
    (default :func:`s4fusion.tiling.memory_budget`), splitting the batch first (band-wise
    runs take one image at a time); ``0`` never; ``N`` runs band-wise with bands of an
    N-pixel tile's worth of tokens (:func:`s4fusion.tiling.tile_tokens`). Band-wise
    results equal whole-image ones up to float rounding (about 1e-7 in float32, a few
    1e-3 under bf16); ``progress`` receives a short status line as band-wise
    blocks finish. ``compile``: whole-image passes run :func:`compiled` ``model``
    (the first pass of each batch and image size compiles); band-wise passes run
    ``model`` uncompiled. ``cuda_graph``: whole-image passes replay :func:`graphed`
    ``model``; ``"auto"``: on a CUDA device without ``compile``, from the second pass
    of each batch and image size, for passes that need at most 1/:data:`GRAPH_LIMIT`
    of the memory budget; ``True`` (a model on a CUDA device, not with ``compile``):
    from the first pass of every size; ``False``: never. Raises :class:`FusionError`
    for an image smaller than the network minimum, a failed compilation, a bad option
    or a non-finite output."""
    device = next(model.parameters()).device
    if cuda_graph not in ("auto", True, False):
        raise FusionError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph != "auto":
        cuda_graph = bool(cuda_graph)
    if cuda_graph is True and compile:
        raise FusionError("choose one of compile and cuda_graph (--compile, --cuda-graph on), not both")
    if cuda_graph is True and device.type != "cuda":
        raise FusionError(
            f"cuda_graph needs the model on a CUDA device, it is on {device}; "
            "use device='cuda' (--device cuda) or fuse without cuda_graph (--cuda-graph off)"
        )
    infrared = infrared.to(device=device, dtype=torch.float32)
    visible_y = visible_y.to(device=device, dtype=torch.float32)
    batch, _, height, width = infrared.shape
    try:
        model.padding_for(height, width)
    except ValueError as e:
        raise FusionError(f"{width}x{height} (width x height) image: {e}") from e
    fused_scan = ops.resolve_backend(device) != "reference"
    budget = memory_budget  # the default is queried once, when needed
    if tile == "auto":
        budget = budget or tiling.memory_budget(device)
        fused_state = ops.resolve_state_backend(device) != "reference"
        try:
            band = tiling.choose_band(model.config, height, width, budget, fused_scan, fused_state)
        except ValueError as e:
            raise FusionError(str(e)) from e
        if band is not None:
            chunk = 1
        else:
            per_pass = tiling.estimate_bytes(model.config, height, width, 1, fused_scan)
            chunk = max(1, min(batch, budget // max(per_pass, 1)))
    elif isinstance(tile, int) and tile >= 0:
        try:
            band = tiling.tile_tokens(model.config, tile) if tile else None
        except ValueError as e:
            raise FusionError(str(e)) from e
        chunk = 1 if band is not None else batch
    else:
        raise FusionError(f"tile must be 'auto', 0 (never tile) or a tile size in pixels, got {tile!r}")
    graph_at = 0  # the pass of a shape at which its graph is recorded; 0: none
    if cuda_graph is True:
        graph_at = 1
    elif cuda_graph == "auto" and device.type == "cuda" and not compile and band is None:
        per_pass = tiling.estimate_bytes(model.config, height, width, chunk, fused_scan)
        budget = budget or tiling.memory_budget(device)
        graph_at = 2 if per_pass * GRAPH_LIMIT <= budget else 0
    outs = []
    with torch.inference_mode(), _autocast(device, precision), cudnn_autotune(device, precision):
        for first in range(0, batch, chunk):
            ir, vi = infrared[first : first + chunk], visible_y[first : first + chunk]
            if band is None:
                if compile:
                    out = _run_compiled(model, ir, vi)
                elif graph_at:
                    out = graphed(model, graph_at)(ir, vi)
                else:
                    out = model(ir, vi)
            else:
                report = None if progress is None else (lambda n: progress(f"band-wise, {n} blocks done"))
                out = tiling.banded_forward(model, ir, vi, band, report)
            outs.append(out.float())
    fused = torch.cat(outs)
    if not torch.isfinite(fused).all():
        hint = " (fp16 overflow is likely: use precision 'fp32' or 'bf16')" if precision == "fp16" else ""
        raise FusionError(f"the network output holds NaN or infinite values{hint}; check the weights and inputs")
    return fused


def _run_compiled(model: S4Fusion, infrared: torch.Tensor, visible_y: torch.Tensor) -> torch.Tensor:
    from torch._dynamo.exc import TorchDynamoException

    try:
        return compiled(model)(infrared, visible_y)
    except TorchDynamoException as e:
        batch, _, height, width = infrared.shape
        raise FusionError(
            f"torch.compile failed on a batch of {batch} {width}x{height} (width x height) images "
            f"({type(e).__name__}: {e}); fuse without compile (compile=False, or no --compile)"
        ) from e


def _compose(fused_y: np.ndarray, pair: PreparedPair, gray: bool) -> np.ndarray:
    """Fused Y (H, W) unclamped -> float32 (H, W, 3) colour or (H, W) grey in [0, 1]."""
    if gray or pair.cr is None:
        return np.clip(fused_y, 0.0, 1.0).astype(np.float32)
    return io.ycrcb_to_rgb_image(fused_y, pair.cr, pair.cb)


def fuse_prepared(
    model: S4Fusion,
    pairs: Sequence[PreparedPair],
    *,
    gray: bool = False,
    **run_options: Any,
) -> list[np.ndarray]:
    """Fuse prepared pairs of one size in one batch (:func:`fuse_luma` options) and
    compose the outputs: float32 (H, W, 3) colour or (H, W) grey in [0, 1]."""
    if not pairs:
        return []
    sizes = {p.size for p in pairs}
    if len(sizes) != 1:
        raise FusionError(f"one batch must hold pairs of one size, got sizes {sorted(sizes)}")
    ir = torch.from_numpy(np.stack([p.infrared for p in pairs]))[:, None]
    y = torch.from_numpy(np.stack([p.y for p in pairs]))[:, None]
    fused = fuse_luma(model, ir, y, **run_options).cpu().numpy()[:, 0]
    return [_compose(f, p, gray) for f, p in zip(fused, pairs)]


# ------------------------------------------------------------------- outputs
def _as_kind(image: np.ndarray, like: Any) -> Any:
    """Float [0, 1] result (H, W[, 3]) -> the form of the visible input ``like``."""
    if isinstance(like, (str, os.PathLike)):
        return image
    if isinstance(like, Image.Image):
        return Image.fromarray(io.quantize(image, 8), "RGB" if image.ndim == 3 else "L")
    if isinstance(like, np.ndarray):
        if like.dtype == np.uint8:
            return io.quantize(image, 8)
        if like.dtype == np.uint16:
            return io.quantize(image, 16)
        return image.astype(like.dtype if like.dtype.kind == "f" else np.float32)
    if isinstance(like, torch.Tensor):
        if like.dtype == torch.uint8:
            t = torch.from_numpy(io.quantize(image, 8))
        else:
            t = torch.from_numpy(image).to(like.dtype if like.is_floating_point() else torch.float32)
        if like.dim() == 3:
            t = t.permute(2, 0, 1) if t.dim() == 3 else t[None]
        return t.to(like.device)
    raise FusionError(f"unsupported visible input type {type(like).__name__}")


def _items(x: Any) -> list:
    return list(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else [x]


def fuse_images(
    infrared: Sequence[Any],
    visible: Sequence[Any],
    model: Union[S4Fusion, PathLike, None] = None,
    *,
    gray: bool = False,
    ir_norm: str = "auto",
    ir_percentiles: Sequence[float] = io.DEFAULT_PERCENTILES,
    resize_visible: bool = False,
    batch_size: int = 4,
    tile: Union[str, int] = "auto",
    memory_budget: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graph: Union[bool, str] = "auto",
) -> list:
    """Fuse a list of pairs; equal-size pairs run in batches of ``batch_size``.

    The pairs go through in windows of :data:`PREPARE_WINDOW` (at least ``batch_size``):
    threads read and convert the next window while the network fuses the current one,
    so memory holds at most two windows of prepared inputs (besides the results), and
    batches are formed within a window.

    ``infrared[i]`` and ``visible[i]`` form pair i (any forms :func:`fuse` takes);
    result i has the form of ``visible[i]``. ``model``: an :class:`S4Fusion`, a
    weights path, or None for the bundled weights; ``device`` None keeps a given
    model where it is (else CUDA when available), a named device moves the model
    there. ``compile``: run whole-image passes through :func:`compiled` ``model``
    (the first batch of each size compiles, later ones reuse it; band-wise passes
    run uncompiled); pays off for many pairs of few sizes. ``cuda_graph``: replay
    whole-image passes on a CUDA device as CUDA graphs (:func:`graphed`): ``"auto"``
    records one at the second batch of each size, ``True`` at the first (CUDA only,
    not with ``compile``), ``False`` never (see :func:`fuse_luma`). The first bad pair
    raises."""
    if len(infrared) != len(visible):
        raise FusionError(f"{len(infrared)} infrared images but {len(visible)} visible images")
    if batch_size < 1:
        raise FusionError(f"batch_size must be >= 1, got {batch_size}")
    net = _model(model, device)

    def prepare(pair: tuple[Any, Any]) -> PreparedPair:
        return prepare_pair(*pair, ir_norm=ir_norm, ir_percentiles=ir_percentiles, resize_visible=resize_visible)

    pairs = list(zip(infrared, visible))
    run = dict(tile=tile, memory_budget=memory_budget, precision=precision, compile=compile, cuda_graph=cuda_graph)
    results: list = [None] * len(pairs)

    def fuse_window(first: int, prepared: list[PreparedPair]) -> None:
        for indices in _batches([p.size for p in prepared], batch_size):
            outs = fuse_prepared(net, [prepared[k] for k in indices], gray=gray, **run)
            for k, out in zip(indices, outs):
                results[first + k] = _as_kind(out, visible[first + k])

    if len(pairs) <= 1:  # no thread pool for a single pair (fuse) or none
        fuse_window(0, [prepare(pair) for pair in pairs])
        return results
    window = max(PREPARE_WINDOW, batch_size)
    # decoding and conversion release the GIL for most of their time: threads overlap them with the network
    with ThreadPoolExecutor(max_workers=min(PREPARE_THREADS, len(pairs))) as pool:
        ahead = [pool.submit(prepare, pair) for pair in pairs[:window]]
        for first in range(0, len(pairs), window):
            prepared = [f.result() for f in ahead]  # the first bad pair (in order) raises
            ahead = [pool.submit(prepare, pair) for pair in pairs[first + window : first + 2 * window]]
            fuse_window(first, prepared)
    return results


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by size (first appearance order), in chunks of ``batch_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, s in enumerate(sizes):
        groups.setdefault(s, []).append(k)
    for members in groups.values():
        for first in range(0, len(members), batch_size):
            yield members[first : first + batch_size]


def fuse(
    infrared: Any,
    visible: Any,
    model: Union[S4Fusion, PathLike, None] = None,
    **options: Any,
) -> Any:
    """Fuse one infrared-visible pair; the result has the form of ``visible``.

    Inputs: paths, numpy arrays, PIL images or tensors (see the module docstring);
    a (B, C, H, W) tensor pair is fused as a batch. Options (:func:`fuse_images`):
    ``gray``, ``ir_norm`` (``auto|minmax|percentile|scale``), ``ir_percentiles``,
    ``resize_visible``, ``tile`` (``"auto"``, 0, N),
    ``memory_budget`` (bytes), ``device``, ``precision`` (``fp32|bf16|fp16``),
    ``batch_size``, ``compile``, ``cuda_graph``."""
    irs, vis = _items(infrared), _items(visible)
    if len(irs) != len(vis):
        raise FusionError(f"infrared batch of {len(irs)} but visible batch of {len(vis)}")
    out = fuse_images(irs, vis, model, **options)
    if isinstance(visible, torch.Tensor) and visible.dim() == 4:
        return torch.stack(out)
    return out[0]

