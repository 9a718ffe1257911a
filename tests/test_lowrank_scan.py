"""The scan of the low-rank delta (``ops.cross_scan_lowrank``): the reference is the
scan of the delta that ``dt_project`` up-projects; the Triton backend's scan kernels
compute each delta from the low-rank one themselves, in float32, when no gradient is
wanted (the (b, M, K, d, L) delta is never written) and compose the two ops otherwise.
With ``out_dtype=torch.float32`` the output is the kernels' float32 sums: for inputs in
any dtype as close to float64 on the same values as float32 inputs are.

The network hands the op the low-rank delta, B and C as views of its input projection
(``ops.projection_rows``), so most cases here do too. GPU tests skip without CUDA; one
test runs the kernels on the CPU in Triton's interpreter (in a subprocess), so CI without
a GPU checks the up-projection's indexing too.
"""

from __future__ import annotations

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import cross_scan_lowrank_ref, cross_scan_ref, dt_project_ref, projection_rows
from scan_helpers import bf16_network_with_and_without, composed_lowrank_scan, rel
from triton_interpreter import worst_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error of the output against float64 on the same inputs (the scan's
# tolerances, test_scan_triton; the delta rounded to the dtype as a matrix product rounds it)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (b, M, K, d, N, R, H, W): odd sizes, one and two modalities, one to four directions,
# ranks 1 to 12 (the network's 3, 6 and 12), a one-pixel-wide map, a network width
CASES = [(2, 1, 4, 6, 5, 3, 7, 11), (1, 2, 4, 9, 3, 6, 13, 5), (1, 2, 2, 4, 4, 1, 37, 3), (3, 1, 1, 5, 2, 12, 1, 9),
         (1, 2, 4, 72, 18, 3, 17, 23)]  # fmt: skip


def make_inputs(b, M, K, d, N, R, H, W, dtype, device, layout="projection", seed=0):
    """u (b, M, d, L) channels innermost and low (b, M, K, L, R), B, C (b, M, K, N, L) in
    ``dtype``; dt_weight (K, d, R), A, D, delta_bias float32 (float64 for float64 inputs),
    as the network passes them.
    ``projection``: low, B and C views of one token-major projection laid out by
    ``ops.projection_rows``; ``contiguous``: each its own tensor; ``rank_last``: low with
    its rank stride not 1."""
    g = torch.Generator().manual_seed(seed + d + R)
    L = H * W
    u = torch.randn(b, M, L, d, generator=g).to(device, dtype).transpose(2, 3)
    rows, ob, oc, ol = projection_rows(R, N)
    P = torch.randn(b, M, L, K, rows, generator=g).to(device, dtype)
    low, B, C = (P[..., o : o + n].permute(0, 1, 3, 2, 4) for o, n in ((ol, R), (ob, N), (oc, N)))
    B, C = B.transpose(3, 4), C.transpose(3, 4)  # (b, M, K, N, L), states innermost
    if layout == "contiguous":
        low, B, C = low.contiguous(), B.contiguous(), C.contiguous()
    elif layout == "rank_last":
        low = low.transpose(3, 4).contiguous().transpose(3, 4)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    dt_weight = (torch.randn(K, d, R, generator=g) * R**-0.5).to(device, wide)
    A = -torch.exp(0.5 * torch.randn(K * d, N, generator=g)).to(device, wide)
    D = torch.randn(K * d, generator=g).to(device, wide)
    bias = (0.5 * torch.randn(K * d, generator=g) - 1.0).to(device, wide)
    return [u, low, dt_weight, A, B, C, D, bias]


def reference(inputs, H, W):
    """The float64 reference of the same values (the fused kernels take the up-projection's
    weight as it is, where ``dt_project_ref`` rounds it to the low-rank delta's dtype)."""
    return cross_scan_lowrank_ref(*(t.detach().double() for t in inputs), H, W)


# ------------------------------------------------------------------ on the CPU


def test_reference_is_the_scan_of_the_up_projected_delta():
    u, low, w, A, B, C, D, bias = make_inputs(2, 2, 4, 5, 3, 2, 3, 4, torch.float64, "cpu")
    expected = cross_scan_ref(u, dt_project_ref(low, w), A, B, C, D, bias, 3, 4)
    assert torch.equal(cross_scan_lowrank_ref(u, low, w, A, B, C, D, bias, 3, 4), expected)
    for backend in ops.available_backends("cpu"):  # (composed: no CPU backend fuses them)
        out = ops.cross_scan_lowrank(u, low, w, A, B, C, D, bias, 3, 4, backend=backend)
        assert rel(out, expected) < 1e-12, backend


def test_gradients_reach_the_low_rank_delta_and_the_up_projection():
    x = [t.requires_grad_() for t in make_inputs(1, 2, 4, 5, 3, 2, 3, 4, torch.float64, "cpu", "contiguous")]
    fixed = [t.detach() for t in x[3:]]
    assert torch.autograd.gradcheck(lambda *t: cross_scan_lowrank_ref(*t, *fixed, 3, 4), x[:3], eps=1e-6, atol=1e-7)
    out = ops.cross_scan_lowrank(*x, 3, 4)
    grads = torch.autograd.grad(out.square().sum(), x)
    ref = cross_scan_lowrank_ref(*x, 3, 4)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), x)):
        assert rel(g, r) < 1e-10


def test_shapes_are_checked():
    u, low, w, A, B, C, D, bias = make_inputs(1, 2, 4, 5, 3, 2, 3, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"low must be \(b, M, K, L, R\) = \(1, 2, K, 12, R\)"):
        cross_scan_lowrank_ref(u, low[:, :, :, :5], w, A, B, C, D, bias, 3, 4)
    with pytest.raises(ValueError, match=r"dt_weight must be \(K, d, R\) = \(4, 5, 2\)"):
        cross_scan_lowrank_ref(u, low, w[:, :, :1], A, B, C, D, bias, 3, 4)
    with pytest.raises(ValueError, match=r"cross_scan: B must be"):
        cross_scan_lowrank_ref(u, low, w, A, B[:, :, :2], C, D, bias, 3, 4)


INTERPRETER_CHECK = """
from s4fusion.ops import triton_scan as ts
from test_lowrank_scan import make_inputs, reference
ts.FWD_UNROLL, ts.FWD_LANES, ts.WHOLE_LINE_STEPS = 2, 8, 0  # several programs and chunks per line
ts.dt_project_triton = None  # (the composed path would fail: only the fused one may run)
worst = 0.0
for case, dtype, layout, pf in [
    ((1, 2, 4, 5, 3, 3, 4, 3), torch.float32, "projection", True),
    ((2, 1, 2, 6, 4, 1, 3, 5), torch.float32, "rank_last", False),
    ((1, 2, 1, 3, 2, 2, 2, 3), torch.float16, "contiguous", False),
    ((1, 1, 4, 4, 18, 6, 3, 4), torch.bfloat16, "projection", True),
]:
    ts.FWD_PREFETCH = (pf, pf)
    x = make_inputs(*case, dtype, "cpu", layout)
    H, W = case[-2:]
    with torch.no_grad():
        out = ts.cross_scan_lowrank_triton(*x, H, W)
        sums = ts.cross_scan_lowrank_triton(*x, H, W, out_dtype=torch.float32)
    ref = reference(x, H, W)
    scale = 1.0 if dtype == torch.float32 else 1e-3  # (half precision: errors about 1e-3)
    worst = max(worst, scale * ((out.double() - ref).norm() / ref.norm()).item())
    worst = max(worst, ((sums.double() - ref).norm() / ref.norm()).item())
    if out.dtype != dtype or sums.dtype != torch.float32:
        worst = float("inf")
print("WORST", worst)
"""


def test_fused_kernels_in_the_triton_interpreter_match_the_reference():
    pytest.importorskip("triton", reason="the scan kernels need the triton package")
    assert worst_in_interpreter(INTERPRETER_CHECK) < 1e-5


# ------------------------------------------------------------------ on the GPU


def _forbid_composition(monkeypatch):
    """Make the composed path (the up-projection op, then the scan) fail, so that a
    result proves the fused kernels ran."""
    from s4fusion.ops import triton_scan as ts

    def composed(*args):
        raise AssertionError("the up-projection ran: the composed path, not the fused kernels")

    monkeypatch.setattr(ts, "dt_project_triton", composed)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["projection", "contiguous", "rank_last"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_kernels_match_the_reference_without_gradients(case, dtype, layout, monkeypatch):
    from s4fusion.ops.triton_scan import cross_scan_lowrank_triton

    x = make_inputs(*case, dtype, "cuda", layout)
    H, W = case[-2:]
    with torch.no_grad():
        composed = composed_lowrank_scan(*x, H, W)
        _forbid_composition(monkeypatch)
        out = cross_scan_lowrank_triton(*x, H, W)
    with torch.no_grad():
        sums = cross_scan_lowrank_triton(*x, H, W, out_dtype=torch.float32)
    assert out.dtype == dtype and out.shape == x[0].shape and sums.dtype == torch.float32
    ref = reference(x, H, W)
    assert rel(out, ref) < TOLERANCES[dtype]
    assert rel(sums, ref) < TOLERANCES[torch.float32]  # (only the inputs were rounded)
    # the composed ops round the same delta (a rounding may differ in the last place) and
    # the same output: in half precision the two differ as each differs from float64
    assert rel(out, composed) < (1e-6 if dtype == torch.float32 else 0.5 * TOLERANCES[dtype])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
def test_with_gradients_the_ops_are_composed(dtype):
    """Where a gradient is wanted the delta is up-projected by its op (whose backward
    gives the gradients of the low-rank delta and of the weight), then scanned."""
    case = CASES[1]
    H, W = case[-2:]
    x = [t.detach().requires_grad_() for t in make_inputs(*case, dtype, "cuda")]
    out = ops.cross_scan_lowrank(*x, H, W)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, x, gout)
    ref_in = [t.detach().double().requires_grad_() for t in x]
    ref_in[2] = x[2].detach().to(dtype).double().requires_grad_()  # (as dt_project_ref rounds it)
    ref = cross_scan_lowrank_ref(*ref_in, H, W)
    ref_grads = torch.autograd.grad(ref, ref_in, gout.double())
    assert rel(out, ref) < TOLERANCES[dtype]
    wide = ops.cross_scan_lowrank(*x, H, W, out_dtype=torch.float32)  # (the scan's output, converted)
    assert wide.dtype == torch.float32 and wide.requires_grad and rel(wide, ref) < TOLERANCES[dtype]
    for name, t, g, r in zip(("u", "low", "dt_weight", "A", "B", "C", "D", "delta_bias"), x, grads, ref_grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel(g, r) < 3 * TOLERANCES[dtype], name


@needs_cuda
@pytest.mark.gpu
def test_under_autocast_the_fused_kernels_take_the_low_rank_delta_in_its_dtype(monkeypatch):
    """bf16 autocast: a bf16 low-rank delta (the network's) is fused; a float32 one is
    up-projected by autocast's bf16 matrix product first, as the reference does."""
    from s4fusion.ops.triton_scan import cross_scan_lowrank_triton

    case = CASES[0]
    H, W = case[-2:]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        wide = make_inputs(*case, torch.float32, "cuda")
        composed = cross_scan_lowrank_triton(*wide, H, W)
        expected = cross_scan_lowrank_ref(*wide, H, W)
        narrow = make_inputs(*case, torch.bfloat16, "cuda")
        _forbid_composition(monkeypatch)
        fused = cross_scan_lowrank_triton(*narrow, H, W)
    assert composed.dtype == torch.float32 and fused.dtype == torch.bfloat16
    assert rel(composed, expected) < 1e-5
    assert rel(fused, reference(narrow, H, W)) < TOLERANCES[torch.bfloat16]


@needs_cuda
@pytest.mark.gpu
def test_network_in_bf16_with_the_fused_kernels_matches_the_composed_ops(monkeypatch):
    """The default network fusing under bf16 autocast: with the fused kernels as with the
    up-projection op then the scan (the scan's output converted to float32 after rounding
    to bf16), both close to float32."""
    exact, kernel, ops_ = bf16_network_with_and_without(monkeypatch, "lowrank", composed_lowrank_scan)
    assert (kernel - ops_).abs().max() < 2e-2
    assert (kernel - exact).abs().max() < 5e-2 and (ops_ - exact).abs().max() < 5e-2
