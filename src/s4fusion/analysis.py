"""The paper's analyses of CMSA: the learned time steps (delta) of Cross SS2D
(appendix A.3.2, Table 5) and the feature maps before and after CMSA (section 8,
Fig. 5).

Delta (RELEASED-MODEL-FACTS.md sections 3.3, 3.4). In every direction the
interleaved sequence is ``ir_0, vi_0, ir_1, vi_1, ...``: the step *into* a
visible token goes from the infrared token of the same position to the visible
one (a cross-modal step, no move in space); the step into an infrared token
comes from the visible token of the previous position in the scan (a spatial
step). Each token's step is ``softplus(delta_raw + bias)`` with ``delta_raw``
computed from that token's own modality (``x_proj_weight`` for infrared,
``y_proj_weight`` for visible) and the shared up-projection and bias. So:

* ``raw_ir`` / ``raw_vi``: mean raw delta (before bias and softplus) of the
  infrared / visible tokens, over directions, channels and positions. This is
  what the authors' unreleased code accumulated (``mean(delta_x)``,
  ``mean(delta_y)``; facts 3.4) and what the paper's Table 5 reports as
  Delta_I / Delta_V per layer (it averages over all CMSA blocks of a layer and the
  MSRS test images; its values are negative, so they cannot be the softplus
  steps).
* ``step_spatial``: mean of ``softplus(delta_raw + bias)`` over the infrared
  tokens except the first token of each scan direction (which has no
  predecessor): the steps that move in space.
* ``step_cross``: mean of ``softplus(delta_raw + bias)`` over the visible tokens:
  the steps between the two modalities at one position.
* ``c_ir`` / ``c_vi``: mean of C per modality (also accumulated by the authors).

Every statistic is first averaged over one block and one image; a layer's value
is the mean over its blocks and the images (every image weighs the same).

Capturing does not change the forward: :func:`capture_scan_inputs` wraps
:meth:`CMSABlock.scan_inputs` of a model's blocks for the duration of a
``with`` block.
"""

from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, load_infrared, load_visible, scan_pairs
from .io import atomic_write
from .models import S4Fusion
from .models.cmsa import CMSABlock
from .ops import direction_orders

__all__ = [
    "DELTA_FIELDS",
    "DeltaRow",
    "DeltaReport",
    "capture_scan_inputs",
    "block_delta_stats",
    "delta_statistics",
    "delta_statistics_folder",
    "format_delta_table",
    "LayerFeatures",
    "REDUCTIONS",
    "cmsa_feature_maps",
    "feature_grid",
    "save_feature_grid",
]

# Per-image, per-block statistics, in table order.
DELTA_FIELDS = ("raw_ir", "raw_vi", "step_spatial", "step_cross", "c_ir", "c_vi")
_HEADERS = {
    "layer": "layer",
    "blocks": "blocks",
    "images": "images",
    "raw_ir": "raw delta ir",
    "raw_vi": "raw delta vi",
    "step_spatial": "step vi->ir (space)",
    "step_cross": "step ir->vi (same pos.)",
    "c_ir": "mean C ir",
    "c_vi": "mean C vi",
}

ScanCallback = Callable[[int, int, CMSABlock, tuple, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextmanager
def capture_scan_inputs(model: S4Fusion, callback: ScanCallback) -> Iterator[None]:
    """Within the ``with`` block, every call of a CMSA block's ``scan_inputs``
    also calls ``callback(layer, block, module, (H, W), u, delta, B, C)``.

    ``layer`` is the scale of the CMSA (0 = finest), ``block`` the index of the
    block in it; u (b, 2, d, L), delta (b, 2, K, d, L) raw (before bias and
    softplus), B and C (b, 2, K, N, L) in row-major position order, modality 0 =
    infrared (:meth:`CMSABlock.scan_inputs`). The forward is unchanged."""
    wrapped: list[CMSABlock] = []
    try:
        for i, fusion in enumerate(model.cmsa):
            for j, block in enumerate(getattr(fusion, "blocks", ())):
                if not isinstance(block, CMSABlock):
                    continue
                original = block.scan_inputs

                def scan_inputs(a_ir, a_vi, _orig=original, _i=i, _j=j, _block=block):
                    out = _orig(a_ir, a_vi)
                    u, low, B, C = out
                    callback(_i, _j, _block, tuple(a_ir.shape[-2:]), u, _block.delta(low), B, C)
                    return out

                block.scan_inputs = scan_inputs
                wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.scan_inputs


def block_delta_stats(
    delta: torch.Tensor, C: torch.Tensor, delta_bias: torch.Tensor, height: int, width: int
) -> dict[str, torch.Tensor]:
    """The statistics of :data:`DELTA_FIELDS` for one CMSA block call.

    delta (b, 2, K, d, L) raw, C (b, 2, K, N, L), map layout (L = height*width,
    row-major), modality 0 = infrared; delta_bias (K*d,). Returns a dict of (b,)
    float64 tensors, one value per batch element."""
    b, _, K, d, L = delta.shape
    delta, C = delta.double(), C.double()
    step = F.softplus(delta + delta_bias.double().view(1, 1, K, d, 1))
    first = direction_orders(height, width, delta.device)[:K, 0]  # row-major position scanned first, per direction
    spatial = torch.ones(K, L, dtype=torch.bool, device=delta.device)
    spatial[torch.arange(K, device=delta.device), first] = False
    spatial_mean = (step[:, 0] * spatial[None, :, None, :]).sum(dim=(1, 2, 3)) / (d * spatial.sum())
    return {
        "raw_ir": delta[:, 0].mean(dim=(1, 2, 3)),
        "raw_vi": delta[:, 1].mean(dim=(1, 2, 3)),
        "step_spatial": spatial_mean,
        "step_cross": step[:, 1].mean(dim=(1, 2, 3)),
        "c_ir": C[:, 0].mean(dim=(1, 2, 3)),
        "c_vi": C[:, 1].mean(dim=(1, 2, 3)),
    }


@dataclass
class DeltaRow:
    """Statistics of one CMSA layer (scale), averaged over its blocks and the images."""

    layer: int
    blocks: int
    images: int
    raw_ir: float
    raw_vi: float
    step_spatial: float
    step_cross: float
    c_ir: float
    c_vi: float


@dataclass
class DeltaReport:
    """Result of a delta analysis: one row per CMSA layer, the images used and the
    files that could not be used (path, reason)."""

    rows: list[DeltaRow] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _pad(model: S4Fusion, image: torch.Tensor) -> torch.Tensor:
    top, bottom, left, right = model.padding_for(*image.shape[-2:])
    return F.pad(image, (left, right, top, bottom))


def _run_all_scales(model: S4Fusion, infrared: torch.Tensor, visible: torch.Tensor) -> dict:
    """Forward with a trace (so the finest CMSA runs in the released topology too);
    returns the trace."""
    trace: dict = {}
    model.forward_padded(_pad(model, infrared), _pad(model, visible), trace)
    return trace


def delta_statistics(
    model: S4Fusion, pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]]
) -> DeltaReport:
    """Delta statistics of every CMSA layer of ``model`` over ``pairs`` of
    ``(name, infrared, visible)``, each image (1, H, W) or (1, 1, H, W) in [0, 1].

    Every CMSA runs, including the finest one whose output the released decoder
    discards. The model must use CMSA fusion (``config.fusion == "cmsa"``); it is
    put in eval mode."""
    if model.config.fusion != "cmsa":
        raise ValueError(
            f"the delta analysis needs CMSA fusion (Cross SS2D); this model has fusion={model.config.fusion!r}"
        )
    device = next(model.parameters()).device
    sums: dict[int, dict[str, float]] = {}
    blocks: dict[int, set[int]] = {}
    counts: dict[int, int] = {}
    report = DeltaReport()

    def record(i, j, block, hw, u, delta, B, C):
        stats = block_delta_stats(delta, C, block.dt_projs_bias.detach().reshape(-1), *hw)
        acc = sums.setdefault(i, dict.fromkeys(DELTA_FIELDS, 0.0))
        for k in DELTA_FIELDS:
            acc[k] += float(stats[k].sum())
        counts[i] = counts.get(i, 0) + delta.shape[0]
        blocks.setdefault(i, set()).add(j)

    model.eval()
    with torch.no_grad(), capture_scan_inputs(model, record):
        for name, infrared, visible in pairs:
            ir = infrared.reshape(1, 1, *infrared.shape[-2:]).to(device)
            vi = visible.reshape(1, 1, *visible.shape[-2:]).to(device)
            _run_all_scales(model, ir, vi)
            report.images.append(name)
    for i in sorted(sums):
        n = counts[i]
        report.rows.append(
            DeltaRow(layer=i, blocks=len(blocks[i]), images=n // len(blocks[i]), **{k: sums[i][k] / n for k in DELTA_FIELDS})
        )
    return report


def delta_statistics_folder(model: S4Fusion, folder: str | os.PathLike, limit: Optional[int] = None) -> DeltaReport:
    """:func:`delta_statistics` over the pairs of a dataset folder (``ir/`` and ``vi/``
    with matching file names, :func:`s4fusion.data.scan_pairs`), in name order,
    at most ``limit`` pairs. A file that cannot be used is listed in
    ``report.problems`` and skipped; no usable pair at all is a DataError."""
    scan = scan_pairs(folder)
    problems = list(scan.problems)
    pairs = scan.pairs[:limit] if limit else scan.pairs

    def load() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for pair in pairs:
            try:
                yield pair.name, load_infrared(pair.infrared), load_visible(pair.visible)
            except DataError as e:
                problems.append((pair.infrared, str(e)))

    report = delta_statistics(model, load())
    report.problems = problems
    if not report.images:
        raise DataError(f"{os.fspath(folder)}: no pair could be read; problems: {problems}")
    return report


def format_delta_table(rows: Sequence[DeltaRow], fmt: str = "text") -> str:
    """The rows as an aligned text table (``"text"``), a Markdown table
    (``"markdown"``) or CSV (``"csv"``, machine-readable column names)."""
    keys = [f.name for f in fields(DeltaRow)]
    cells = [[str(getattr(r, k)) if k in ("layer", "blocks", "images") else f"{getattr(r, k):.6g}" for k in keys] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(keys)
        writer.writerows(cells)
        return buf.getvalue()
    headers = [_HEADERS[k] for k in keys]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    if fmt == "text":
        widths = [max(len(h), *(len(c[n]) for c in cells)) for n, h in enumerate(headers)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths)) for c in cells]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown table format {fmt!r}; use 'text', 'markdown' or 'csv'")


# ---------------------------------------------------------------- feature maps
REDUCTIONS = ("mean", "norm")


@dataclass
class LayerFeatures:
    """Feature maps of one fusion layer (scale), (h, w, C) each, cropped to the
    image (the network's zero padding removed, to the nearest token).

    ``infrared_out`` / ``visible_out``: each stream after the last block (CMSA and
    FSSM: input plus the blocks' residual updates; cross attention: the last
    layer's output); None for fusions without separate streams (add, cnn).
    ``fused``: the module's output (infrared_out + visible_out for CMSA)."""

    layer: int
    infrared_in: torch.Tensor
    visible_in: torch.Tensor
    infrared_out: Optional[torch.Tensor]
    visible_out: Optional[torch.Tensor]
    fused: torch.Tensor


def cmsa_feature_maps(
    model: S4Fusion, infrared: torch.Tensor, visible: torch.Tensor
) -> tuple[list[LayerFeatures], torch.Tensor]:
    """Feature maps entering and leaving each fusion layer for one pair
    (each (1, H, W) or (1, 1, H, W) in [0, 1]), and the fused image (H, W).
    The model is put in eval mode."""
    device = next(model.parameters()).device
    ir = infrared.reshape(1, 1, *infrared.shape[-2:]).to(device)
    vi = visible.reshape(1, 1, *visible.shape[-2:]).to(device)
    H, W = ir.shape[-2:]
    top, _, left, _ = model.padding_for(H, W)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, fusion in enumerate(model.cmsa):
        handles.append(fusion.register_forward_pre_hook(lambda m, args, _i=i: inputs.__setitem__(_i, args[:2])))
        handles.append(fusion.register_forward_hook(lambda m, args, out, _i=i: outputs.__setitem__(_i, out)))
    model.eval()
    try:
        with torch.no_grad():
            trace = _run_all_scales(model, ir, vi)
    finally:
        for h in handles:
            h.remove()
    cfg = model.config
    fused_image = trace["fused.padded"][0, 0, top : top + H, left : left + W]
    layers = []
    for i in sorted(inputs):
        stride = cfg.patch_stride * 2**i
        x, y = inputs[i]
        x_out, y_out = _stream_outputs(trace, f"fusion.{i}", x, y)
        h, w = x.shape[1:3]
        r0, r1 = top // stride, min(h, -(-(top + H) // stride))
        c0, c1 = left // stride, min(w, -(-(left + W) // stride))

        def crop(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[0, r0:r1, c0:c1].detach().float().cpu()

        layers.append(LayerFeatures(i, crop(x), crop(y), crop(x_out), crop(y_out), crop(outputs[i])))
    return layers, fused_image.detach().float().cpu()


def _stream_outputs(trace: dict, name: str, x: torch.Tensor, y: torch.Tensor):
    """Each stream after a fusion module, from its trace entries (None if it has no streams)."""
    if f"{name}.block0.out_x" in trace:  # residual blocks (CMSA, FSSM)
        j = 0
        while f"{name}.block{j}.out_x" in trace:
            x, y = x + trace[f"{name}.block{j}.out_x"], y + trace[f"{name}.block{j}.out_y"]
            j += 1
        return x, y
    if f"{name}.layer0.out_x" in trace:  # layers without residual (cross attention)
        j = 0
        while f"{name}.layer{j + 1}.out_x" in trace:
            j += 1
        return trace[f"{name}.layer{j}.out_x"], trace[f"{name}.layer{j}.out_y"]
    return None, None


def _reduce(t: torch.Tensor, reduce: str) -> np.ndarray:
    """(h, w, C) -> (h, w) float64: channel mean or L2 norm over channels."""
    if reduce == "mean":
        out = t.double().mean(dim=-1)
    elif reduce == "norm":
        out = t.double().norm(dim=-1)
    else:
        raise ValueError(f"unknown channel reduction {reduce!r}; use one of {REDUCTIONS}")
    return out.numpy()


def _to_uint8(values: np.ndarray, normalise: bool) -> np.ndarray:
    """Min-max to 0..255 (``normalise``), else clamp [0, 1] -> 0..255."""
    values = np.asarray(values, dtype=np.float64)
    if normalise:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def feature_grid(
    layers: Sequence[LayerFeatures],
    infrared: torch.Tensor,
    visible: torch.Tensor,
    fused: torch.Tensor,
    reduce: str = "mean",
    panel: int = 256,
    unused_layers: Sequence[int] = (),
):
    """A PIL image: one row with the input images and the fused image, then one row
    per fusion layer with the feature maps (infrared in, visible in, infrared
    out, visible out, fused), each reduced over channels (``reduce``), min-max
    normalised on its own and resized (nearest) so that its longer side is
    ``panel`` pixels. Layers in ``unused_layers`` are labelled as not used by the
    decoder."""
    from PIL import Image, ImageDraw, ImageFont

    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown channel reduction {reduce!r}; use one of {REDUCTIONS}")
    H, W = fused.shape[-2:]
    scale = panel / max(H, W)
    pw, ph = max(1, round(W * scale)), max(1, round(H * scale))
    titles = ["infrared in", "visible in", "infrared out", "visible out", "fused (output)"]
    label_w, title_h, gap = 150, 18, 4
    cols = len(titles)
    grid = Image.new("L", (label_w + cols * (pw + gap), title_h + (1 + len(layers)) * (ph + gap)), 255)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()

    def put(row: int, col: int, array: Optional[np.ndarray], normalise: bool) -> None:
        x0, y0 = label_w + col * (pw + gap), title_h + row * (ph + gap)
        if array is None:
            draw.line([(x0, y0), (x0 + pw - 1, y0 + ph - 1)], fill=180)
            return
        grid.paste(Image.fromarray(_to_uint8(array, normalise)).resize((pw, ph), Image.NEAREST), (x0, y0))

    for c, t in enumerate(titles):
        draw.text((label_w + c * (pw + gap) + 2, 2), t, fill=0, font=font)
    draw.text((2, title_h + 2), "images", fill=0, font=font)
    put(0, 0, infrared.reshape(H, W).double().numpy(), False)
    put(0, 1, visible.reshape(H, W).double().numpy(), False)
    put(0, 2, None, False)
    put(0, 3, None, False)
    put(0, 4, fused.double().numpy(), False)
    for r, lf in enumerate(layers, start=1):
        label = f"layer {lf.layer}: {lf.fused.shape[-1]} ch\n{lf.fused.shape[0]}x{lf.fused.shape[1]} tokens"
        if lf.layer in unused_layers:
            label += "\n(output unused by\nthe released decoder)"
        draw.multiline_text((2, title_h + r * (ph + gap) + 2), label, fill=0, font=font)
        maps = [lf.infrared_in, lf.visible_in, lf.infrared_out, lf.visible_out, lf.fused]
        for c, t in enumerate(maps):
            put(r, c, None if t is None else _reduce(t, reduce), True)
    return grid


def save_feature_grid(
    model: S4Fusion,
    infrared: torch.Tensor,
    visible: torch.Tensor,
    path: str | os.PathLike,
    reduce: str = "mean",
    panel: int = 256,
) -> list[LayerFeatures]:
    """Compute :func:`cmsa_feature_maps` and write :func:`feature_grid` to ``path``
    (PNG, atomically: a temporary file in the same folder, then renamed).
    Returns the feature maps."""
    layers, fused = cmsa_feature_maps(model, infrared, visible)
    unused = (0,) if model.config.topology == "released" else ()
    grid = feature_grid(layers, infrared, visible, fused, reduce, panel, unused)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return layers
