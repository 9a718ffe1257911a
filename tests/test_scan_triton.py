"""The Triton scan backend against the reference scan (float64, same inputs) and the
golden network.

GPU tests are marked ``gpu`` and skip without CUDA. One test runs the same kernels
on the CPU in Triton's interpreter (tiny sizes, in a subprocess so that the
interpreter mode cannot leak into other tests), so CI without a GPU checks the
kernels' index arithmetic, chunking and gradients too.
"""

from __future__ import annotations

import pytest
import torch

from s4fusion import S4Fusion
from s4fusion.ops import cross_scan_ref, set_backend
from scan_helpers import projection_views
from triton_interpreter import worst_in_interpreter

triton = pytest.importorskip("triton", reason="the triton scan backend needs the triton package")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

from s4fusion.ops import triton_scan as ts  # noqa: E402  (after the importorskip of triton)

WHOLE_LINE_DEFAULT = ts.WHOLE_LINE_STEPS


@pytest.fixture(autouse=True)
def chunked_short_lines(monkeypatch):
    """The test images are small: their lines are cut into chunks as a large image's
    are (by default lines of up to WHOLE_LINE_STEPS steps stay whole), so that the
    tests run the chunk combines too."""
    monkeypatch.setattr(ts, "WHOLE_LINE_STEPS", 0)

F32_GOLDEN_TOL = 1e-5  # golden README section 5
# relative L2 error of (output, gradients) against a float64 reference on the same inputs
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (2e-2, 3e-2),
}
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")

# (b, M, d, N, H, W): odd sizes; > 32 lines (two line groups); a 1-pixel-wide map
CASES = [(2, 1, 6, 5, 7, 11), (1, 2, 9, 3, 13, 5), (1, 2, 4, 4, 37, 3), (3, 1, 5, 2, 1, 9)]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(b, M, d, N, H, W, dtype, device, seed=0, K=4, layout="channels_first"):
    """Scan inputs like the network's: activations in ``dtype``, A, D, delta_bias float32;
    ``channels_last``: u and delta with their channels innermost in memory, B and C
    slices of one wider tensor; ``projection``: the same, B and C views of the network's
    projection layout (``ops.projection_rows``: 16-byte aligned, read by vector loads)."""
    g = torch.Generator().manual_seed(seed)
    L = H * W
    act = [
        torch.randn(b, M, d, L, generator=g),
        0.5 * torch.randn(b, M, K, d, L, generator=g),
    ]
    A = -torch.exp(0.5 * torch.randn(K * d, N, generator=g))
    BC = [torch.randn(b, M, K, N, L, generator=g) for _ in range(2)]
    D = torch.randn(K * d, generator=g)
    bias = 0.5 * torch.randn(K * d, generator=g)
    u, delta = (t.to(device, dtype) for t in act)
    B, C = (t.to(device, dtype) for t in BC)
    if layout != "channels_first":
        u, delta = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (u, delta))
    if layout == "channels_last":
        wide = torch.cat([B, C], dim=3).permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
        B, C = wide[:, :, :, :N], wide[:, :, :, N:]
    elif layout == "projection":
        B, C = projection_views(B, C, dt_rank=3)
    return [t.requires_grad_() for t in (u, delta, A.to(device), B, C, D.to(device), bias.to(device))]


def reference_and_grads(inputs, gout, H, W):
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = cross_scan_ref(*ref_in, H, W)
    return ref, torch.autograd.grad(ref, ref_in, gout.double())


# ------------------------------------------------------------------ on the GPU


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "projection"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}M{}d{}N{}_{}x{}".format(*c))
@pytest.mark.gpu
@needs_cuda
def test_matches_reference_forward_and_every_gradient(case, dtype, layout, monkeypatch):
    b, M, d, N, H, W = case
    new_like = ts._new_like  # (buffers that the kernels must fill entirely start as NaN)
    monkeypatch.setattr(ts, "_new_like", lambda x, dt, zero: new_like(x, dt, True).fill_(0.0 if zero else torch.nan))
    inputs = make_inputs(b, M, d, N, H, W, dtype, "cuda", layout=layout)
    out = ts.cross_scan_triton(*inputs, H, W)
    assert out.dtype == dtype and out.shape == (b, M, d, H * W)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    if layout != "channels_first":  # dL/dy as the network hands it over; otherwise with the tokens innermost
        gout = gout.transpose(2, 3).contiguous().transpose(2, 3)
    grads = torch.autograd.grad(out, inputs, gout)
    ref, ref_grads = reference_and_grads(inputs, gout, H, W)
    out_tol, grad_tol = TOLERANCES[dtype]
    assert rel(out, ref) < out_tol
    for name, x, g, gr in zip(NAMES, inputs, grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert rel(g, gr) < grad_tol, (name, rel(g, gr))
    for x, g in zip(inputs[:2], grads[:2]):  # u and delta: their gradients have their layout
        long = [i for i, n in enumerate(x.shape) if n > 1]
        assert [g.stride(i) for i in long] == [x.stride(i) for i in long]
    for x, g in zip(inputs[3:5], grads[3:5]):  # B and C: their dimensions in their order in memory
        long = [i for i, n in enumerate(x.shape) if n > 1]
        assert sorted(long, key=g.stride) == sorted(long, key=x.stride)


@pytest.mark.parametrize(
    "cb,parts,steps,red", [(1, 4, 2, None), (1, 4, 4, None), (2, 2, 4, None), (2, 8, 4, None), (1, 1, 4, None),
                           (2, 4, 4, "RED_VALUES"), (2, 4, 4, "RED_PAIRS")]
)  # fmt: skip
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}M{}d{}N{}_{}x{}".format(*c))
@pytest.mark.gpu
@needs_cuda
def test_other_backward_launch_configurations_match_the_reference(case, cb, parts, steps, red, monkeypatch):
    """The backward kernel with other lane widths, groups and blocks than the default
    (two channels, four lanes per group, four steps), and with the other ways of adding
    dL/dB and dL/dC than the device's (one value at a time, as on GPUs before compute
    capability 9.0; pairs by two atomic adds)."""
    monkeypatch.setattr(ts, "BWD_CB", cb)
    monkeypatch.setattr(ts, "BWD_PARTS", parts)
    monkeypatch.setattr(ts, "BWD_STEPS", steps)
    if red is not None:
        monkeypatch.setattr(ts, "_reductions", lambda device: getattr(ts, red).value)
    b, M, d, N, H, W = case
    inputs = make_inputs(b, M, d, N, H, W, torch.float32, "cuda", layout="channels_last")
    out = ts.cross_scan_triton(*inputs, H, W)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    grads = torch.autograd.grad(out, inputs, gout)
    _, ref_grads = reference_and_grads(inputs, gout, H, W)
    for name, g, gr in zip(NAMES, grads, ref_grads):
        assert rel(g, gr) < TOLERANCES[torch.float32][1], (name, rel(g, gr))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}M{}d{}N{}_{}x{}".format(*c))
@pytest.mark.gpu
@needs_cuda
def test_bfloat16_checkpoints_cost_gradients_less_than_bfloat16_inputs_do(case, monkeypatch):
    """With bfloat16 inputs the backward stores its block checkpoints in bfloat16: the
    gradients stay as close to the float64 reference as with float32 checkpoints, within
    a fraction of the bfloat16 tolerance; float16 and float32 inputs keep float32 ones."""
    b, M, d, N, H, W = case
    inputs = make_inputs(b, M, d, N, H, W, torch.bfloat16, "cuda", layout="projection")
    gout = torch.randn(b, M, d, H * W, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    gout = gout.transpose(2, 3).contiguous().transpose(2, 3)
    assert ts._checkpoint_dtype(torch.bfloat16) == torch.bfloat16
    assert ts._checkpoint_dtype(torch.float16) == ts._checkpoint_dtype(torch.float32) == torch.float32
    results = {}
    for ck in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(ts, "_checkpoint_dtype", lambda dtype, ck=ck: ck)
        out = ts.cross_scan_triton(*inputs, H, W)
        results[ck] = [out, *torch.autograd.grad(out, inputs, gout)]
    _, ref_grads = reference_and_grads(inputs, gout, H, W)
    grad_tol = TOLERANCES[torch.bfloat16][1]
    for name, g16, g32, gr in zip(NAMES, results[torch.bfloat16][1:], results[torch.float32][1:], ref_grads):
        assert rel(g16, gr) < rel(g32, gr) + grad_tol / 4, (name, rel(g16, gr), rel(g32, gr))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}M{}d{}N{}_{}x{}".format(*c))
@pytest.mark.gpu
@needs_cuda
def test_checkpoints_kept_from_the_forward_give_the_sweeps_results(case, dtype, monkeypatch):
    """bfloat16 inputs: the forward stores the block checkpoints and the backward's walk
    computes the local adjoints only; results as with the backward's own sweep (which
    float32 inputs keep by default; here also forced the other way) up to the order of the
    atomic adds: within a few roundings of the output dtype."""
    b, M, d, N, H, W = case
    assert ts._keeps_checkpoints(torch.bfloat16) and not ts._keeps_checkpoints(torch.float32)
    assert not ts._keeps_checkpoints(torch.float16)
    inputs = make_inputs(b, M, d, N, H, W, dtype, "cuda", layout="projection")
    gout = torch.randn(b, M, d, H * W, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    results = {}
    for keep in (True, False):
        monkeypatch.setattr(ts, "_keeps_checkpoints", lambda dt, keep=keep: keep)
        out = ts.cross_scan_triton(*inputs, H, W)
        assert len(out.grad_fn.saved_tensors) == (10 if keep else 9)  # (the checkpoints among them, or not)
        results[keep] = [out, *torch.autograd.grad(out, inputs, gout)]
    tol = 1e-3 if dtype == torch.bfloat16 else 1e-6
    for name, kept, swept in zip(("y",) + NAMES, results[True], results[False]):
        assert rel(kept, swept) < tol, (name, rel(kept, swept))


@pytest.mark.gpu
@needs_cuda
def test_scans_without_gradients_keep_no_checkpoints():
    """A bfloat16 scan keeps its block checkpoints from the forward only where autograd
    records it: under no_grad (fusing) one of inputs that require gradients (as the
    network's parameters A, D, delta_bias do) allocates what one of inputs that do not
    does, and leaves only its output; with gradients recorded the graph holds them."""
    b, M, d, N, H, W = 1, 2, 64, 16, 48, 40
    inputs = make_inputs(b, M, d, N, H, W, torch.bfloat16, "cuda", layout="projection")
    L, NL, tb = H * W, max(H, W), ts._steps(ts.BWD_STEPS, M)
    checkpoints = b * 4 * NL * triton.cdiv(NL, tb) * N * d * 2  # bytes, bfloat16

    def run(grads: bool, record: bool) -> tuple[int, int]:
        x = [t.detach().requires_grad_(grads) for t in inputs]
        with torch.set_grad_enabled(record):
            ts.cross_scan_triton(*x, H, W)  # (compiled; the allocator's blocks cached)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = ts.cross_scan_triton(*x, H, W)
            held = torch.cuda.memory_allocated() - base
            del out
            return torch.cuda.max_memory_allocated() - base, held

    (peak, held), (plain_peak, plain_held) = run(True, False), run(False, False)
    assert peak == plain_peak and held == plain_held == b * M * d * L * 2, (peak, plain_peak, held, plain_held)
    assert run(True, True)[1] >= checkpoints + plain_held


@pytest.mark.gpu
@needs_cuda
def test_strided_inputs_give_the_contiguous_result():
    """Slices and transposed views (as the network passes them) are read in place."""
    b, M, d, N, H, W = 2, 2, 6, 4, 9, 7
    u, delta, A, B, C, D, bias = (t.detach() for t in make_inputs(b, M, d, N, H, W, torch.float32, "cuda"))
    out = ts.cross_scan_triton(u, delta, A, B, C, D, bias, H, W)
    wide = torch.randn(b, M, 4, 3 + 2 * N, H * W, device="cuda")
    wide[:, :, :, 3 : 3 + N], wide[:, :, :, 3 + N :] = B, C
    delta_t = delta.transpose(-1, -2).contiguous().transpose(-1, -2)  # channels innermost in memory
    strided = ts.cross_scan_triton(u, delta_t, A, wide[:, :, :, 3 : 3 + N], wide[:, :, :, 3 + N :], D, bias, H, W)
    assert not wide[:, :, :, 3 : 3 + N].is_contiguous() and not delta_t.is_contiguous()
    assert rel(strided, out) < 1e-6


@pytest.mark.gpu
@needs_cuda
def test_one_compiled_kernel_serves_every_image_size():
    """Image sizes whose scans take the same launch configurations compile nothing new.
    (The chunk combine has two: directions of at most SHORT_SLOTS chunk slots, and
    longer ones; these sizes' scans all have short ones, with lines cut into chunks.)"""
    sizes = ((11, 13), (15, 6), (3, 16))
    assert all(max(H, W) * ts._segments(H, W, 1, 4, 8, 2)[1] <= ts.SHORT_SLOTS for H, W in sizes)

    def variants() -> int:
        kernels = (ts._fwd_kernel, ts._chunk_combine_kernel, ts._bwd_kernel)
        caches = [getattr(k, "device_caches", None) for k in kernels]
        if any(c is None for c in caches):
            pytest.skip("this triton version does not expose its kernel caches")
        return sum(len(entry[0]) for c in caches for entry in c.values())

    counts = []
    for H, W in sizes:
        inputs = make_inputs(1, 2, 8, 6, H, W, torch.float32, "cuda")
        out = ts.cross_scan_triton(*inputs, H, W)
        torch.autograd.grad(out.sum(), inputs)
        counts.append(variants())
    assert counts[0] == counts[1] == counts[2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_network_on_the_second_gpu_equals_the_first_and_graphs_replay_there():
    from s4fusion import api

    torch.manual_seed(0)
    ir, vi = torch.rand(1, 1, 40, 52), torch.rand(1, 1, 40, 52)
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        model = S4Fusion.from_pretrained(api.default_weights(), map_location=dev).eval()
        x = [t.to(dev).requires_grad_() for t in (ir, vi)]
        out = model(*x)
        grads = torch.autograd.grad(out.sum(), x)
        with torch.inference_mode():
            graphed = [api.graphed(model)(ir.to(dev), vi.to(dev)) for _ in range(2)]
        outs.append([t.cpu() for t in (out.detach(), *grads, *graphed)])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_dispatcher_picks_triton_on_cuda():
    from s4fusion.ops import available_backends, resolve_backend

    assert "triton" in available_backends("cuda")
    assert resolve_backend(torch.device("cuda")) == "triton"


@pytest.mark.gpu
@needs_cuda
def test_golden_network_with_the_triton_backend(released_path, golden_inputs, golden_expected):
    model = S4Fusion.from_released_checkpoint(released_path).cuda().eval()
    set_backend("triton")
    try:
        with torch.no_grad():
            fused = model(golden_inputs["infrared"].float().cuda(), golden_inputs["visible"].float().cuda())
            padded = model.forward_padded(
                golden_inputs["infrared_padded"].float().cuda(), golden_inputs["visible_padded"].float().cuda()
            )
    finally:
        set_backend(None)
    assert rel(fused.cpu(), golden_expected["fused"]) < F32_GOLDEN_TOL
    assert rel(padded.cpu(), golden_expected["fused.padded"]) < F32_GOLDEN_TOL


@pytest.mark.gpu
@needs_cuda
def test_network_gradients_match_the_reference_backend(released_path, golden_inputs):
    """Every parameter's gradient through the whole network (scans fed the model's
    own strided views), triton vs reference backend, float32."""
    ir = golden_inputs["infrared"].float().cuda()
    vi = golden_inputs["visible"].float().cuda()
    grads = {}
    for backend in ("reference", "triton"):
        model = S4Fusion.from_released_checkpoint(released_path).cuda()
        set_backend(backend)
        try:
            loss = (model(ir, vi) - 0.5 * (ir + vi)).abs().mean()
            loss.backward()
        finally:
            set_backend(None)
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["triton"].keys() and grads["reference"]
    worst = max((rel(grads["triton"][n], g), n) for n, g in grads["reference"].items() if g.norm() > 0)
    assert worst[0] < 1e-4, worst


# ---------------------------------------------------------- chunking (on the CPU)

# (H, W, b, d, M) of every scan of a 481x649 and a 961x1297 fuse and of the training batch
SCAN_SHAPES = [
    (160, 216, 1, 72, 1), (80, 108, 1, 144, 1), (40, 54, 1, 288, 1), (80, 108, 1, 144, 2), (40, 54, 1, 288, 2),
    (320, 432, 1, 72, 1), (160, 216, 1, 144, 1), (80, 108, 1, 288, 1), (160, 216, 1, 144, 2), (80, 108, 1, 288, 2),
    (76, 76, 20, 72, 1), (38, 38, 20, 144, 1), (19, 19, 20, 288, 1), (38, 38, 20, 144, 2), (19, 19, 20, 288, 2),
]


def test_lines_are_cut_into_one_or_at_least_three_chunks(monkeypatch):
    """The forward's chunking: chunks of whole backward blocks that cover each line;
    short lines whole; never two chunks per line (BENCHMARKS.md, session 18)."""
    monkeypatch.setattr(ts, "WHOLE_LINE_STEPS", WHOLE_LINE_DEFAULT)
    for H, W, b, d, M in SCAN_SHAPES:
        seg, ns = ts._segments(H, W, b, 4, d, M)
        longest = max(H, W)
        assert seg % ts._steps(ts.BWD_STEPS, M) == 0 and (ns - 1) * seg < longest <= ns * seg, (H, W, seg, ns)
        assert ns != 2, (H, W, d, M)
        if longest <= WHOLE_LINE_DEFAULT:
            assert ns == 1, (H, W, d, M)
    assert ts._segments(160, 216, 1, 4, 72, 1)[1] == 3  # the finest scan of a 481x649 fuse: few lanes
    assert ts._segments(320, 432, 1, 4, 72, 1)[1] == 3  # of a 961x1297 fuse (about 2**17 lanes: two before)
    assert ts._segments(76, 76, 20, 4, 72, 1)[1] == 1  # the training batch has lanes enough


def test_channel_sums_of_the_backward_are_split_as_the_reductions_need():
    """The backward's exchange of dL/dB and dL/dC sums over CT lane groups (a power of
    two dividing the groups of a line, within a warp): adding pairs, CT divides a block's
    tokens, so that every lane holds the (B, C) pairs of whole tokens (4 for the network's
    scans); adding single values, CT divides the sums unless they are a power of two (the
    halving exchange), 8 where the groups of a line allow."""
    for groups in (1, 3, 4, 6, 36, 72, 144):
        for tokens, nq in ((1, 3), (2, 5), (4, 3), (8, 1), (4, 2)):
            sums = 2 * tokens * nq
            for red in (ts.RED_PAIRS.value, ts.RED_VECTOR.value, ts.RED_VALUES.value):
                ct = ts._group(groups, tokens, sums, red)
                assert ct & (ct - 1) == 0 and groups % ct == 0 and ct <= ts.BWD_GROUP and ct * ts.BWD_PARTS <= 32
                if red == ts.RED_VALUES.value:
                    assert sums & (sums - 1) == 0 or sums % ct == 0, (groups, sums, ct)
                else:
                    assert tokens % ct == 0, (groups, tokens, ct)
    for H, W, b, d, M in SCAN_SHAPES:
        tokens = ts._steps(ts.BWD_STEPS, M) * M
        for N in (12, 18):
            sums = 2 * tokens * -(-N // ts.BWD_PARTS)
            groups = -(-d // ts.BWD_CB)
            assert ts._group(groups, tokens, sums, ts.RED_VECTOR.value) == 4, (d, M, N)
            assert ts._group(groups, tokens, sums, ts.RED_VALUES.value) == (4 if d == 72 else 8), (d, M, N)


def pair_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's dL/dB and dL/dC buffers for B = x (zeros: ``_zeros_like``, ``_pairs``)."""
    (pairs,) = ts._zeros_like(x.device, ts._pairs(x))
    return pairs[..., 0], pairs[..., 1]


def test_gradients_of_B_and_C_are_interleaved_in_one_buffer_with_Bs_layout():
    """_pairs: two zero float32 tensors of x's shape and dimension order whose elements
    are neighbours in memory (dL/dB and dL/dC of one token and state); with other
    tensors in the one zeroed buffer of _zeros_like, each in its own layout."""
    x = torch.randn(2, 1, 4, 12, 35).permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)[..., :30]
    gb, gc = pair_like(x)
    assert gb.shape == gc.shape == x.shape and gb.dtype == gc.dtype == torch.float32
    assert gb.stride() == gc.stride() and gc.data_ptr() == gb.data_ptr() + 4
    assert gb.stride(3) == 2 and sorted(range(5), key=gb.stride) == sorted(range(5), key=x.stride)
    gb.fill_(1.0)
    assert gc.abs().sum() == 0 and gb.sum() == x.numel()
    u = torch.randn(2, 1, 7, 30).transpose(2, 3).contiguous().transpose(2, 3)  # (channels innermost)
    first, pairs, last = ts._zeros_like(torch.device("cpu"), u, ts._pairs(x), torch.empty(3, 5, device="meta"))
    assert first.shape == u.shape and first.stride() == u.stride() and last.stride() == (5, 1)
    assert pairs[..., 0].stride() == gb.stride()
    assert pairs.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # (one buffer)
    assert all((t.data_ptr() - first.data_ptr()) % 256 == 0 for t in (pairs, last))  # (from the buffer's start)
    assert first.data_ptr() + 4 * u.numel() <= pairs.data_ptr() and pairs.data_ptr() + 8 * x.numel() <= last.data_ptr()
    assert not any(t.abs().sum() for t in (first, pairs, last))


def test_kernels_specialise_only_on_unit_channel_and_state_strides(monkeypatch):
    """``_scan_jit`` keeps sizes, size-dependent strides, pointers and d out of triton's
    specialisation, except that triton compiles a kernel for each of ``_UNIT_STRIDES``
    being 1 or not (never for their alignment); with a triton whose ``jit`` lacks
    ``do_not_specialize_on_alignment`` (releases before it) none is specialised."""
    calls = []

    def new_jit(fn=None, *, do_not_specialize=(), do_not_specialize_on_alignment=()):
        calls.append((set(do_not_specialize), set(do_not_specialize_on_alignment)))
        return lambda f: f

    def old_jit(fn=None, *, do_not_specialize=()):
        calls.append((set(do_not_specialize), None))
        return lambda f: f

    for jit in (new_jit, old_jit):
        monkeypatch.setattr(ts.triton, "jit", jit)
        for kernel in (ts._fwd_kernel, ts._bwd_kernel):
            ts._scan_jit(kernel.fn)
    fixed = {"H", "W", "SEG", "d", "su_b", "sd_k", "sb_m", "u_ptr"}  # (some of them)
    unit = {"su_c", "sd_c", "sb_n", "sc_n"}
    for free, on_alignment in calls:
        assert fixed <= free and not free & {"K", "M", "N", "MODE", "CB"}  # (constexprs are not arguments)
        assert "sd_l" not in free  # (token strides are left to triton: they do not grow with the image)
        if on_alignment is None:
            assert unit <= free
        else:
            assert unit <= on_alignment and not unit & free and on_alignment <= set(ts._UNIT_STRIDES)
    assert calls[1][1] >= {"sgu_c", "sgd_c", "sgb_n", "sg_c"} and calls[0][1] >= {"sy_c"}


# ------------------------------------------------------- on the CPU (interpreter)

# what the interpreter checks start with: small launches, so that tiny images still have
# several programs, blocks and chunks per line
TINY_LAUNCHES = """
import torch
from s4fusion.ops import triton_scan as ts
from s4fusion.ops.reference import cross_scan_ref
ts.FWD_UNROLL, ts.BWD_STEPS, ts.COMBINE_ROWS, ts.SHORT_ROWS, ts.FWD_LANES, ts.BWD_LANES = 2, 2, 4, 4, 8, 8
ts.WHOLE_LINE_STEPS = 0  # (tiny images: their lines cut into chunks too)
_new_like = ts._new_like  # (buffers that the kernels must fill entirely start as NaN)
ts._new_like = lambda x, dtype, zero: _new_like(x, dtype, True).fill_(0.0 if zero else float("nan"))
"""

INTERPRETER_CHECK = TINY_LAUNCHES + """
# (segments of one block, combine blocks, several programs; "whole": one segment per line,
# of several blocks; forward and backward lanes of 1 or 2 channels, forward loads one
# iteration ahead or not; backward groups of 1, 2 or 4 lanes splitting the states, evenly
# or not, and fewer (token, channel) slots than lanes in a group; channel sums of dL/dB
# and dL/dC over 1 to 8 groups, added one at a time (0: more sums than a lane's, N = 1,
# and 12 sums over 2 groups) or in (B, C) pairs of whole tokens (1))
worst = 0.0
for b, M, d, N, H, W, last, whole, cb, pf, parts, red in [
    (1, 2, 5, 3, 4, 3, False, False, 2, True, 4, 1), (2, 1, 8, 2, 3, 5, False, False, 2, False, 1, 0),
    (1, 2, 4, 3, 3, 4, True, False, 1, False, 2, 1), (2, 1, 6, 2, 3, 5, True, True, 1, True, 4, 0),
    (1, 1, 16, 1, 3, 2, True, False, 2, False, 1, 0), (1, 1, 8, 12, 3, 5, True, False, 2, False, 4, 0),
    (1, 2, 3, 5, 3, 4, True, True, 1, False, 2, 1),
]:
    assert red in (ts.RED_VALUES.value, ts.RED_PAIRS.value)
    ts._reductions = lambda device, red=red: red
    ts.TARGET_LANES = 1 if whole else 1 << 17
    ts.FWD_CB = (cb, cb)
    ts.BWD_CB = cb
    ts.BWD_PARTS = parts
    ts.FWD_PREFETCH = (pf, pf)
    ts.SHORT_SLOTS = 0 if H * W % 2 else 128  # (the combine's constants of long scans or of short ones)
    g = torch.Generator().manual_seed(H * W)
    L, K = H * W, 4
    x = [torch.randn(b, M, d, L, generator=g), 0.5 * torch.randn(b, M, K, d, L, generator=g),
         -torch.exp(0.5 * torch.randn(K * d, N, generator=g)), torch.randn(b, M, K, N, L, generator=g),
         torch.randn(b, M, K, N, L, generator=g), torch.randn(K * d, generator=g),
         0.5 * torch.randn(K * d, generator=g)]
    if last:  # channels innermost in memory, B and C slices of one wider tensor, as the network passes them
        x[0], x[1] = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in x[:2])
        wide = torch.cat([x[3], x[4]], dim=3).permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
        x[3], x[4] = wide[:, :, :, :N], wide[:, :, :, N:]
    x = [t.requires_grad_() for t in x]
    out = ts.cross_scan_triton(*x, H, W)
    gout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, x, gout)
    xr = [t.detach().double().requires_grad_() for t in x]
    ref = cross_scan_ref(*xr, H, W)
    refs = [ref] + list(torch.autograd.grad(ref, xr, gout.double()))
    for a, r in zip([out, *grads], refs):
        worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
print("WORST", worst)
"""


def test_kernels_in_the_triton_interpreter_match_the_reference():
    assert worst_in_interpreter(INTERPRETER_CHECK) < 1e-5


VECTOR_CHECK = TINY_LAUNCHES + """
from scan_helpers import equal_and_error_of_scans, projection_views
# B and C views of the network's projection layout: vector loads of float32 values (N = 6
# and 5: chunks of 4, 2 and 1) and of bfloat16 pairs (N = 12, 18), forward loads one
# iteration ahead or not; their results must equal those of one load per state
worst = 0.0
for b, M, d, N, H, W, dtype, pf, kind in [
    (1, 2, 5, 6, 4, 3, torch.float32, True, 1), (2, 1, 8, 5, 3, 5, torch.float32, False, 1),
    (1, 1, 6, 18, 3, 4, torch.bfloat16, True, 2), (1, 2, 4, 12, 3, 3, torch.bfloat16, False, 2),
]:
    ts.FWD_PREFETCH = (pf, pf)
    g = torch.Generator().manual_seed(H * W)
    L, K = H * W, 4
    B, C = projection_views(*(torch.randn(b, M, K, N, L, generator=g).to(dtype) for _ in range(2)), dt_rank=3)
    assert ts._state_loads(B, C) == kind, ts._state_loads(B, C)
    shifted = B.as_strided(B.shape, B.stride(), B.storage_offset() + 1)  # not 16-byte aligned
    assert ts._state_loads(shifted, C) == 0 and ts._state_loads(B.contiguous(), C) == 0
    x = [torch.randn(b, M, d, L, generator=g).to(dtype), (0.5 * torch.randn(b, M, K, d, L, generator=g)).to(dtype),
         -torch.exp(0.5 * torch.randn(K * d, N, generator=g)), B, C, torch.randn(K * d, generator=g),
         0.5 * torch.randn(K * d, generator=g)]
    x = [t.detach().requires_grad_() for t in x]
    gout = torch.randn(b, M, d, L, generator=g).to(dtype)
    results = []
    for vector in (True, False):
        ts.VECTOR_STATES = vector
        out = ts.cross_scan_triton(*x, H, W)
        results.append([out, *torch.autograd.grad(out, x, gout)])
    ts.VECTOR_STATES = True
    worst = max(worst, equal_and_error_of_scans(results, x, gout, H, W))
print("WORST", worst)
"""


def test_vector_loads_of_the_projection_layout_in_the_interpreter():
    """B and C as the network's projection lays them out are read by vector loads, with
    the same results as one load per state, within float32 (bfloat16) accuracy of the
    reference."""
    assert worst_in_interpreter(VECTOR_CHECK) < 1e-5


KEPT_CHECK = TINY_LAUNCHES + """
from scan_helpers import equal_and_error_of_scans, projection_views
# the forward keeps the block checkpoints (bfloat16 inputs by default; float32 too here) and
# the backward's walk computes the local adjoints only: every result equals that of the
# backward's own sweep bit for bit (both store the states of one recurrence, and the
# adjoints are the same sums), with B and C as the network's views or not, M = 1 and 2,
# several chunks per line or whole lines, forward loads one iteration ahead or not
worst = 0.0
for b, M, d, N, H, W, dtype, views, whole, pf in [
    (1, 2, 5, 6, 4, 3, torch.bfloat16, True, False, True), (2, 1, 8, 12, 3, 5, torch.bfloat16, True, True, False),
    (1, 1, 6, 3, 3, 4, torch.float32, False, False, False), (1, 2, 4, 2, 3, 3, torch.float32, False, True, True),
]:
    ts.FWD_PREFETCH = ts.ADJOINT_PF = (pf, pf)
    ts.TARGET_LANES = 1 if whole else 1 << 17
    g = torch.Generator().manual_seed(H * W + M)
    L, K = H * W, 4
    B, C = (torch.randn(b, M, K, N, L, generator=g).to(dtype) for _ in range(2))
    if views:
        B, C = projection_views(B, C, dt_rank=3)
    x = [torch.randn(b, M, d, L, generator=g).to(dtype), (0.5 * torch.randn(b, M, K, d, L, generator=g)).to(dtype),
         -torch.exp(0.5 * torch.randn(K * d, N, generator=g)), B, C, torch.randn(K * d, generator=g),
         0.5 * torch.randn(K * d, generator=g)]
    x = [t.detach().requires_grad_() for t in x]
    gout = torch.randn(b, M, d, L, generator=g).to(dtype)
    assert ts._keeps_checkpoints(dtype) == (dtype == torch.bfloat16)
    keeps = ts._keeps_checkpoints
    results = []
    for keep in (True, False):
        ts._keeps_checkpoints = lambda dt, keep=keep: keep
        out = ts.cross_scan_triton(*x, H, W)
        assert len(out.grad_fn.saved_tensors) == (10 if keep else 9)  # (the checkpoints among them, or not)
        results.append([out, *torch.autograd.grad(out, x, gout)])
    ts._keeps_checkpoints = keeps
    worst = max(worst, equal_and_error_of_scans(results, x, gout, H, W))
print("WORST", worst)
"""


def test_checkpoints_kept_from_the_forward_give_the_sweeps_results_in_the_interpreter():
    """Where the forward stores the block checkpoints (bfloat16 inputs), the backward's
    walk computes only the chunks' local adjoints; every gradient equals that of the
    backward's own sweep exactly, and the reference within float32 (bfloat16) accuracy."""
    assert worst_in_interpreter(KEPT_CHECK) < 1e-5


def test_halving_exchange_leaves_every_group_sum_on_one_lane_in_the_interpreter():
    """The backward kernel's sums over lane groups (1 to 48 values, groups of 1 to 32
    lanes, neighbours or 2 and 4 lanes apart): float32 sums within a few roundings of
    float64."""
    check = "from triton_exchange import worst_error\nprint('WORST', worst_error('cpu'))\n"
    assert worst_in_interpreter(check) < 1e-6


# softplus of delta + delta_bias and its derivative, computed in the kernels from one exp2
# and one reciprocal each: within a few float32 ulps of float64 torch (see triton_math.py)
ACTIVATION_ULPS = 8


@pytest.mark.gpu
@needs_cuda
def test_kernel_softplus_and_sigmoid_are_float32_accurate_on_gpu():
    from triton_math import worst_ulp

    assert worst_ulp("cuda") < ACTIVATION_ULPS


def test_kernel_softplus_and_sigmoid_are_float32_accurate_in_the_interpreter():
    check = "from triton_math import worst_ulp\nprint('WORST', worst_ulp('cpu'))\n"
    assert worst_in_interpreter(check) < ACTIVATION_ULPS
