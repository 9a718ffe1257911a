"""Tiled inference (s4fusion.tiling): tile layout, blending weights, memory
estimate, and tiled output == whole-image output where both fit."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from s4fusion import S4Fusion, S4FusionConfig, io, tiling
from s4fusion.api import fuse_luma

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MSRS = SHARED / "data" / "test" / "MSRS"
TINY = dict(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)


@pytest.fixture(scope="module")
def tiny_model() -> S4Fusion:
    torch.manual_seed(0)
    return S4Fusion(S4FusionConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def whole(tiny_model, real_pair) -> torch.Tensor:
    """The whole-image output of the tiny model on the real pair."""
    with torch.no_grad():
        return tiny_model(*real_pair)


@pytest.fixture(scope="module")
def real_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real 100x100 pair (MSRS test 00123D): infrared and visible Y, (1, 1, H, W)."""
    ir = io.read_infrared(MSRS / "ir" / "00123D.png")[120:220, 100:200]
    vi = io.read_visible(MSRS / "vi" / "00123D.png")[120:220, 100:200]
    y = io.rgb_to_ycrcb(vi[..., 0], vi[..., 1], vi[..., 2])[0]
    return torch.from_numpy(ir.copy())[None, None], torch.from_numpy(y.copy())[None, None]


class CountingForward:
    """Wraps model.forward_padded to record the tile shapes it is called with."""

    def __init__(self, model: S4Fusion, monkeypatch) -> None:
        self.shapes: list[tuple[int, ...]] = []
        original = model.forward_padded

        def counted(ir, vi, trace=None):
            self.shapes.append(tuple(ir.shape))
            return original(ir, vi, trace)

        monkeypatch.setattr(model, "forward_padded", counted)


# -------------------------------------------------------------- tile layout
def test_tile_starts_cover_on_grid_with_overlap():
    for padded_units, tile_units, overlap_units in itertools.product(range(1, 40), range(2, 15), range(1, 7)):
        padded, tile, overlap = 12 * padded_units + 1, 12 * tile_units + 1, 12 * overlap_units
        if 2 * overlap > tile - 1:
            continue
        starts = tiling.tile_starts(padded, tile, overlap, 12)
        if tile >= padded:
            assert starts == [0]
            continue
        assert starts[0] == 0 and starts[-1] == padded - tile
        assert all(s % 12 == 0 for s in starts)
        steps = np.diff(starts)
        assert (steps > 0).all() and (tile - steps >= overlap).all()
        # the fewest tiles that keep the overlap
        assert len(starts) == 1 + -(-(padded - tile) // (12 * ((tile - overlap) // 12)))
        # the fitted tile keeps that count with the least work
        fit = tiling.fit_tile(padded, tile, overlap, 12)
        assert fit <= tile and fit % 12 == 1 and len(tiling.tile_starts(padded, fit, overlap, 12)) == len(starts)
        smaller = fit - 12
        if smaller > 2 * overlap:
            assert len(tiling.tile_starts(padded, smaller, overlap, 12)) > len(starts)


def test_axis_weights_partition_of_unity_and_edge_bands():
    for padded_units, tile_units, overlap_units in [(30, 8, 2), (21, 10, 3), (50, 13, 6), (9, 5, 2), (40, 6, 1)]:
        padded, tile, overlap = 12 * padded_units + 1, 12 * tile_units + 1, 12 * overlap_units
        starts = tiling.tile_starts(padded, tile, overlap, 12)
        total = torch.zeros(padded, dtype=torch.float64)
        for i, s in enumerate(starts):
            before = starts[i - 1] + tile - s if i else None
            after = s + tile - starts[i + 1] if i + 1 < len(starts) else None
            w = tiling.axis_weights(tile, before, after)
            assert (w >= 0).all() and (w <= 1).all()
            if before:  # nothing from the quarter of the overlap next to the tile's inner edge
                assert (w[: (before - 1) // 4] == 0).all()
            else:
                assert w[0] == 1
            if after:
                assert (w[tile - (after - 1) // 4 :] == 0).all()
            total[s : s + tile] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12), (padded, tile, overlap)


def test_valid_tile_and_bad_overlap(tiny_model):
    cfg = tiny_model.config
    assert tiling.valid_tile(cfg, 100) == 97 and tiling.valid_tile(cfg, 97) == 97 and tiling.valid_tile(cfg, 13) == 13
    with pytest.raises(ValueError, match="too small"):
        tiling.valid_tile(cfg, 12)
    x = torch.rand(1, 1, 50, 50)
    with pytest.raises(ValueError, match="more than half the tile"):
        tiling.tiled_forward(tiny_model, x, x, 37, overlap=24)


# ------------------------------------------------- tiled == untiled (1e-3)
def test_tiled_equals_untiled_on_real_pair(tiny_model, real_pair, whole, monkeypatch):
    ir, vi = real_pair
    calls = CountingForward(tiny_model, monkeypatch)
    tiled = tiling.tiled_forward(tiny_model, ir, vi, tile=73, overlap=24)
    assert calls.shapes == [(1, 1, 73, 73)] * 4  # 2 x 2 tiles of the padded 109 x 109 image
    err = (tiled - whole).abs().max().item()
    assert err < 1e-3, err
    assert tiled.shape == whole.shape


def test_tiled_with_one_tile_is_the_whole_image(tiny_model, real_pair):
    ir, vi = real_pair
    crop = (ir[..., :61, :70], vi[..., :61, :70])
    with torch.no_grad():
        whole = tiny_model(*crop)
    one = tiling.tiled_forward(tiny_model, *crop, tile=97)
    assert (one - whole).abs().max().item() < 1e-6


def test_fuse_luma_tiles_automatically_under_a_small_budget(tiny_model, real_pair, whole, monkeypatch):
    ir, vi = real_pair
    cfg = tiny_model.config
    # budget: enough for a 73 x 73 tile, not for the 109 x 109 padded image
    budget = tiling.estimate_bytes(cfg, 73, 73)
    assert tiling.choose_tile(cfg, 100, 100, budget, 24) == 73
    calls = CountingForward(tiny_model, monkeypatch)
    auto = fuse_luma(tiny_model, ir, vi, tile="auto", tile_overlap=24, memory_budget=budget)
    assert calls.shapes == [(1, 1, 73, 73)] * 4
    assert (auto - whole).abs().max().item() < 1e-3
    assert tiling.choose_tile(cfg, 100, 100, tiling.estimate_bytes(cfg, 100, 100), 24) is None


# ----------------------------------------------------------- memory estimate
def test_choose_tile_is_the_largest_that_fits():
    cfg = S4FusionConfig()
    for fused, budgets_mib in ((True, (100, 500, 4096)), (False, (1024, 4096, 20000))):
        for budget_mib in budgets_mib:
            budget = budget_mib << 20
            side = tiling.choose_tile(cfg, 3000, 4000, budget, 96, fused)
            assert side % 12 == 1
            assert tiling.estimate_bytes(cfg, side, side, 1, fused) <= budget
            assert tiling.estimate_bytes(cfg, side + 12, side + 12, 1, fused) > budget
    with pytest.raises(ValueError, match="too small even for"):
        tiling.choose_tile(cfg, 3000, 4000, 1 << 20, 96)
    # linear in the number of pixels and in the batch
    a, b = tiling.estimate_bytes(cfg, 361, 361), tiling.estimate_bytes(cfg, 721, 721)
    assert 3.9 < b / a < 4.1
    assert tiling.estimate_bytes(cfg, 361, 361, batch=3) == pytest.approx(3 * a, rel=1e-6)


MEASURE = """
import sys, torch
from s4fusion import S4Fusion, S4FusionConfig, ops, tiling

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

torch.set_num_threads(1)
torch.manual_seed(0)
model = S4Fusion(S4FusionConfig()).eval()
for arg in sys.argv[1:]:
    backend, side = arg.split(":")
    side = int(side)
    ops.set_backend(backend)
    x, y = torch.rand(1, 1, side, side), torch.rand(1, 1, side, side)
    with torch.inference_mode():
        model(x[..., :13, :13], y[..., :13, :13])  # compile / warm up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current one
        base = status("VmRSS:")
        model(x, y)
    print(backend, status("VmHWM:") - base, tiling.estimate_bytes(model.config, side, side, 1, backend != "reference"))
"""


def test_estimate_bounds_measured_cpu_peak():
    """Peak resident memory of one forward pass (released network, CPU, fresh
    process) stays below the estimate, for the reference scan and for the fastest
    CPU backend, and the estimate is not wildly pessimistic."""
    from s4fusion import ops

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak resident memory")
    runs = ["reference:73"]
    fast = ops.resolve_backend(torch.device("cpu"))
    if fast != "reference":
        runs.append(f"{fast}:241")
    # one process per measurement; a fixed mmap threshold makes glibc return freed
    # large blocks at once, so the resident size follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for run in runs:
        out = subprocess.run([sys.executable, "-c", MEASURE, run], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        backend, measured, estimate = out.stdout.split()
        measured, estimate = int(measured), int(estimate)
        assert measured < estimate < 2.5 * measured, (backend, measured, estimate)


@pytest.mark.gpu
def test_estimate_bounds_measured_cuda_peak():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    from s4fusion import ops

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig()).eval().to(device)
    fused = ops.resolve_backend(device) != "reference"
    for side in (193, 385):
        x = torch.rand(1, 1, side, side, device=device)
        with torch.inference_mode():
            model(x, x)  # warm up (kernel compilation, workspaces)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x, x)
            torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        estimate = tiling.estimate_bytes(model.config, side, side, 1, fused)
        assert measured < estimate, (side, measured, estimate)
