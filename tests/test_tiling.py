"""Band-wise (tiled) inference (s4fusion.tiling, s4fusion.models.streaming): the
band layout, band-wise output == whole-image output, and the memory estimate
against measured peaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s4fusion import S4Fusion, S4FusionConfig, io, ops, tiling
from s4fusion.api import fuse_luma
from s4fusion.models import streaming

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


# ------------------------------------------------------------ band layout
def test_direction_bands_are_contiguous_runs_of_each_scan_order():
    """Concatenating the bands of direction k, each in the band's own direction-k
    order, gives direction k's order of the whole map: the claim band-wise
    execution rests on."""
    for height, width, band in [(7, 9, 10), (7, 9, 1), (5, 11, 23), (12, 4, 8), (3, 3, 100)]:
        whole = ops.direction_orders(height, width)
        for k in range(4):
            seq = []
            for r0, r1, c0, c1 in streaming.direction_bands(height, width, band, k):
                local = ops.direction_orders(r1 - r0, c1 - c0)[k]
                rows, cols = local // (c1 - c0) + r0, local % (c1 - c0) + c0
                seq.append(rows * width + cols)
            assert torch.equal(torch.cat(seq), whole[k]), (height, width, band, k)


def test_tile_tokens():
    cfg = S4FusionConfig()
    assert tiling.tile_tokens(cfg, 13) == 16 and tiling.tile_tokens(cfg, 100) == 33**2
    with pytest.raises(ValueError, match="tile size 12 is too small: tiles must be at least 13 pixels"):
        tiling.tile_tokens(cfg, 12)


# ------------------------------------------------ band-wise == whole-image
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_banded_blocks_equal_whole_blocks(backend, monkeypatch):
    """One VSS block and one CMSA block (random weights, non-trivial biases and a
    long memory) band-wise with ragged bands equal their whole-map forward."""
    from s4fusion.models import CMSABlock, VSSBlock

    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"the {backend!r} scan backend is not available here (pip install numba)")
    monkeypatch.setenv("S4FUSION_SCAN_BACKEND", backend)
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for block, M in ((VSSBlock(16, 6, 1.5, 2, 3, 1e-5), 1), (CMSABlock(16, 7, 1.5, 2, 3, 1e-5), 2)):
        block = block.eval().to(dtype)
        with torch.no_grad():
            for p in block.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
            scan = block.ss2d if M == 1 else block
            scan.dt_projs_bias.fill_(-6.0)  # dt ~ 2.5e-3: context carried across many bands
        xs = [torch.randn(2, 11, 13, 16, dtype=dtype) for _ in range(M)]
        with torch.no_grad():
            whole = block(*xs)
            whole = whole if M == 2 else (whole,)
            for band in (1, 20, 60):
                banded = (streaming.vss_block_banded(block, *xs, band),) if M == 1 else (
                    streaming.cmsa_block_banded(block, *xs, band))
                for a, b in zip(banded, whole):
                    assert (a - b).abs().max().item() < tol, (type(block).__name__, band)


def test_banded_network_equals_whole_with_the_bundled_weights(real_pair):
    """The trained weights carry context over whole rows and columns (overlapping
    tiles missed it by up to 0.1); band-wise execution keeps it: the issue asks
    for 1e-3, we hold it to 1e-5."""
    from s4fusion.api import load_model

    model = load_model(None, "cpu")
    ir, vi = real_pair
    ir, vi = ir[..., :97, :], vi[..., :97, :]
    with torch.no_grad():
        whole = model(ir, vi)
        for band in (1, 150, 700):
            out = tiling.banded_forward(model, ir, vi, band)
            err = (out - whole).abs().max().item()
            assert out.shape == whole.shape and err < 1e-5, (band, err)
    assert all("forward" not in vars(m) for m in model.modules())  # the blocks are restored


def test_banded_refuses_autograd(tiny_model):
    with pytest.raises(RuntimeError, match="for inference"):
        with streaming.banded(tiny_model, 10):
            pass


def test_fuse_luma_goes_band_wise_under_a_small_budget(tiny_model, real_pair, whole, monkeypatch):
    ir, vi = real_pair
    cfg = tiny_model.config
    budget = tiling.estimate_bytes(cfg, 100, 100) - 1
    assert tiling.choose_band(cfg, 100, 100, tiling.estimate_bytes(cfg, 100, 100)) is None
    monkeypatch.setattr(tiling, "BAND_TOKENS", 300)  # several bands on the 36 x 36 finest map
    band = tiling.choose_band(cfg, 100, 100, budget)
    assert band == 300 and tiling.estimate_bytes(cfg, 100, 100, 1, True, band) <= budget
    calls = []
    original = tiling.banded_forward
    monkeypatch.setattr(
        tiling, "banded_forward", lambda m, i, v, b, p=None: calls.append((i.shape[0], b)) or original(m, i, v, b, p)
    )
    auto = fuse_luma(tiny_model, ir, vi, tile="auto", memory_budget=budget)
    status: list[str] = []
    forced = fuse_luma(tiny_model, ir, vi, tile=40, progress=status.append)
    assert calls == [(1, 300), (1, tiling.tile_tokens(cfg, 40))]
    # one status line per scan block run: 2 x 3 encoder, 2 CMSA (released topology), 3 decoder
    assert status == [f"band-wise, {n} blocks done" for n in range(1, 12)]
    assert (auto - whole).abs().max().item() < 1e-5
    assert (forced - whole).abs().max().item() < 1e-5
    # a batch runs band-wise one image at a time (the estimate is per image)
    pair = (torch.cat([ir, ir.flip(-1)]), torch.cat([vi, vi.flip(-1)]))
    with torch.no_grad():
        whole2 = tiny_model(*pair)
    both = fuse_luma(tiny_model, *pair, tile="auto", memory_budget=budget)
    assert calls[2:] == [(1, 300), (1, 300)]
    assert both.shape == (2, 1, 100, 100) and (both - whole2).abs().max().item() < 1e-5


def test_nested_banded_contexts_restore_each_other(tiny_model):
    with torch.no_grad(), streaming.banded(tiny_model, 50):
        outer = [vars(m).get("forward") for m in tiny_model.modules()]
        with streaming.banded(tiny_model, 10):
            pass
        assert [vars(m).get("forward") for m in tiny_model.modules()] == outer
    assert all("forward" not in vars(m) for m in tiny_model.modules())


# ----------------------------------------------------------- memory estimate
def test_choose_band_is_the_largest_that_fits():
    cfg = S4FusionConfig()
    for fused in (True, False):
        least = tiling.estimate_bytes(cfg, 3000, 4000, 1, fused, 1336)  # one-row bands of the 1336-token rows
        for factor in (1.05, 1.2, 1.4):
            budget = int(least * factor)
            band = tiling.choose_band(cfg, 3000, 4000, budget, fused, fused, largest=10**9)
            assert tiling.estimate_bytes(cfg, 3000, 4000, 1, fused, band) <= budget
            capped = tiling.choose_band(cfg, 3000, 4000, budget, fused, fused)
            if band >= tiling.BAND_TOKENS:  # automatic bands stop at BAND_TOKENS (larger ones are slower)
                assert capped == tiling.BAND_TOKENS, (band, capped)
            else:
                assert abs(capped - band) <= band // 32, (band, capped)
                assert tiling.estimate_bytes(cfg, 3000, 4000, 1, fused, capped) <= budget
            if band < 1000 * 1336:  # less than the whole finest map: a 5 % larger band does not fit
                assert tiling.estimate_bytes(cfg, 3000, 4000, 1, fused, int(band * 1.05) + 1) > budget
    with pytest.raises(ValueError, match="too small for a 4000x3000 image even band by band"):
        tiling.choose_band(cfg, 3000, 4000, 1 << 20)
    # linear in the number of pixels and in the batch
    a, b = tiling.estimate_bytes(cfg, 361, 361), tiling.estimate_bytes(cfg, 721, 721)
    assert 3.9 < b / a < 4.1
    assert tiling.estimate_bytes(cfg, 361, 361, batch=3) == pytest.approx(3 * a, rel=1e-6)
    # bands save memory, and smaller bands more
    assert tiling.estimate_bytes(cfg, 3000, 4000, 1, True, 10000) < tiling.estimate_bytes(cfg, 3000, 4000, 1, True, 100000) < tiling.estimate_bytes(cfg, 3000, 4000)


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
    backend, side, band = arg.split(":")
    side, band = int(side), (int(band) or None)
    ops.set_backend(backend)
    x, y = torch.rand(1, 1, side, side), torch.rand(1, 1, side, side)
    with torch.inference_mode():
        small = (x[..., :25, :25], y[..., :25, :25])
        model(*small)  # compile / warm up
        tiling.banded_forward(model, *small, 10)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current one
        base = status("VmRSS:")
        model(x, y) if band is None else tiling.banded_forward(model, x, y, band)
    estimate = tiling.estimate_bytes(model.config, side, side, 1, backend != "reference", band)
    print(backend, status("VmHWM:") - base, estimate)
"""


def test_estimate_bounds_measured_cpu_peak():
    """Peak resident memory of one forward pass (released network, CPU, fresh
    process), whole-image and band-wise, stays below the estimate, for the
    reference scan and for the fastest CPU backend, and the estimate is not wildly
    pessimistic."""
    from s4fusion import ops

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak resident memory")
    runs = ["reference:73:0", "reference:145:300"]
    fast = ops.resolve_backend(torch.device("cpu"))
    if fast != "reference":
        runs += [f"{fast}:241:0", f"{fast}:481:2000"]
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
