"""Launch-grid arithmetic shared by the Triton backward kernels (LayerNorm, delta
up-projection) whose programs each walk a run of rows and write one partial sum."""

from __future__ import annotations

import torch
import triton


def runs_of_tiles(rows: int, tile: int, sets: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """Cut each of ``sets`` independent sets of ``rows`` rows into runs of whole tiles
    of ``tile`` rows, so that all sets together have about ``per_sm`` runs per
    multiprocessor of ``device`` (one on a CPU, for the interpreter). Returns (runs
    per set, rows per run); the last run of a set may be shorter."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    runs = max(1, min(triton.cdiv(rows, tile), triton.cdiv(per_sm * sms, sets)))
    per_run = triton.cdiv(triton.cdiv(rows, runs), tile) * tile
    return max(1, triton.cdiv(rows, per_run)), per_run
