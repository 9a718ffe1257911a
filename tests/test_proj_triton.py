"""The Triton delta up-projection (half precision) against the reference (``low @ W^T``
per direction, float64, same inputs): forward and both gradients; the dispatcher's
choice of it.

GPU tests skip without CUDA; one test runs the same kernels on the CPU in
Triton's interpreter (in a subprocess, so that interpreter mode cannot leak into
other tests), so CI without a GPU checks their indexing, masking and gradients.
"""

from __future__ import annotations

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import dt_project_ref
from scan_helpers import (
    assert_errors_within,
    bf16_network_with_and_without,
    composed_lowrank_scan,
    errors_against_float64,
)
from triton_interpreter import worst_in_interpreter

triton = pytest.importorskip("triton", reason="the triton up-projection needs the triton package")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error of the kernels' (output, gradients) in half precision (float32 runs the
# reference) against a float64 reference on the same inputs: sums in float32, the
# output rounded once, dL/d(low) from the weight rounded to the input's dtype
TOLERANCES = {torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.5e-2)}

# (b, M, K, L, R, d, rows of P per direction): the network's ranks (3, 6, 12) and widths
# (72, 144, 288), odd sizes, one direction (strip-wise inference) and one token
CASES = [
    (1, 2, 4, 37, 3, 72, 27),
    (2, 1, 4, 19, 6, 144, 30),
    (1, 2, 4, 5, 12, 288, 48),
    (3, 1, 1, 23, 5, 7, 9),
    (1, 1, 4, 1, 2, 3, 2),
]


def _inputs(b, M, K, L, R, d, rows, dtype, device, seed=0):
    """low as the network passes it: a view of the token-major projection P (b, M, L, K,
    rows), permuted to (b, M, K, L, R)."""
    g = torch.Generator().manual_seed(seed + L)
    P = torch.randn(b, M, L, K, rows, generator=g)
    low = P.to(device, dtype)[..., :R].permute(0, 1, 3, 2, 4)
    w = (torch.randn(K, d, R, generator=g) * R**-0.5).to(device)
    return [low.detach().requires_grad_(), w.requires_grad_()]


def test_reference_is_the_per_direction_product():
    low, w = _inputs(2, 2, 4, 11, 3, 5, 7, torch.float64, "cpu")
    delta = dt_project_ref(low, w)
    expected = torch.einsum("bmklr,kdr->bmkdl", low, w.double())
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)
    assert delta.stride(3) == 1  # channels innermost in memory


def test_shapes_are_checked():
    low, w = _inputs(1, 2, 4, 5, 3, 8, 7, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight must be \(K, d, R\) = \(4, d, 3\)"):
        ops.dt_project(low, w[:, :, :2])
    with pytest.raises(ValueError, match=r"low must be \(b, M, K, L, R\)"):
        ops.dt_project(low[0], w)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}M{}K{}L{}R{}d{}".format(*c))
def test_matches_reference_forward_and_both_gradients(case, dtype):
    from s4fusion.ops.triton_proj import dt_project_triton

    ins = _inputs(*case, dtype, "cuda")
    b, M, K, L, R, d, _ = case
    gout = torch.randn(b, M, K, L, d, device="cuda").transpose(3, 4)  # the scan's layout
    out, grads, rel = errors_against_float64(dt_project_triton, dt_project_ref, ins, gout)
    assert out.dtype == dtype and out.shape == (b, M, K, d, L) and out.stride(3) == 1
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert_errors_within(rel, TOLERANCES[dtype])


@needs_cuda
@pytest.mark.gpu
def test_float32_and_float64_run_the_reference_and_bf16_the_kernel():
    from s4fusion.ops.triton_proj import dt_project_triton

    for dtype in (torch.float32, torch.float64):
        low, w = _inputs(1, 2, 4, 37, 3, 72, 27, dtype, "cuda")
        assert torch.equal(dt_project_triton(low, w), dt_project_ref(low, w))
    low, w = _inputs(1, 2, 4, 37, 3, 72, 27, torch.bfloat16, "cuda")
    # the kernel does not round the weight to bfloat16 as the reference does
    assert not torch.equal(dt_project_triton(low, w), dt_project_ref(low, w))


@needs_cuda
@pytest.mark.gpu
def test_dispatcher_uses_the_scan_backends_up_projection():
    from s4fusion.ops.triton_proj import dt_project_triton

    assert ops._load(ops.resolve_backend(torch.device("cuda")), "proj") is dt_project_triton
    low, w = _inputs(1, 2, 4, 9, 3, 8, 7, torch.float32, "cuda")
    torch.testing.assert_close(ops.dt_project(low, w), dt_project_ref(low, w), rtol=1e-6, atol=1e-6)


@needs_cuda
@pytest.mark.gpu
def test_network_in_bf16_with_the_kernel_matches_the_reference_projection(monkeypatch):
    """The default network fusing under bf16 autocast, its scans composed of the
    up-projection and the scan ops (as with gradients; without, the scan kernels
    up-project the delta themselves): with the kernel as with cuBLAS's product (which
    rounds the weight to bfloat16 first), both close to float32."""
    monkeypatch.setitem(ops._loaded, ("triton", "lowrank"), composed_lowrank_scan)
    exact, kernel, cublas = bf16_network_with_and_without(monkeypatch, "proj", dt_project_ref)
    assert (kernel - cublas).abs().max() < 2e-2
    assert (kernel - exact).abs().max() < 5e-2 and (cublas - exact).abs().max() < 5e-2


def test_cpu_backend_uses_the_reference():
    assert ops._load("cpu", "proj") is dt_project_ref


INTERPRETER_CHECK = """
from s4fusion.ops import triton_proj as tp
from s4fusion.ops.reference import dt_project_ref
tp.TILE, tp.BWD_TOKENS = 32, 16  # forward tiles of 1 to 4 tokens, several backward tiles and programs
tp.PROGRAMS_PER_SM = 2
tp.BWD_PROGRAMS_PER_SM = 2
worst = 0.0
# (widths that fill their power of two and ones that do not: masked channels)
for b, M, K, L, R, d, rows in [(1, 2, 4, 37, 3, 72, 7), (2, 1, 4, 19, 5, 7, 9), (1, 1, 1, 23, 2, 48, 4),
                               (1, 2, 3, 1, 3, 5, 3), (1, 1, 2, 41, 4, 20, 6)]:
    g = torch.Generator().manual_seed(L)
    low = torch.randn(b, M, L, K, rows, generator=g).half()[..., :R].permute(0, 1, 3, 2, 4).requires_grad_()
    w = torch.randn(K, d, R, generator=g).requires_grad_()
    out = tp.dt_project_triton(low, w)
    for dense in (True, False):  # dL/d(delta) with the channels innermost (the scan's) or the tokens
        gout = torch.randn(b, M, K, L, d, generator=g).transpose(3, 4)
        if not dense:
            gout = gout.contiguous()
        assert tp._dense(gout.transpose(3, 4)) == dense or min(L, d) == 1
        grads = torch.autograd.grad(out, (low, w), gout.half(), retain_graph=True)
        ref_in = [t.detach().double().requires_grad_() for t in (low, w)]
        ref = dt_project_ref(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, gout.half().double())
        for a, r in zip([out, *grads], [ref, *ref_grads]):
            worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
        if out.stride(3) != 1 or out.dtype != torch.float16 or grads[0].dtype != torch.float16:
            worst = float("inf")
print("WORST", worst)
"""


def test_kernels_in_the_triton_interpreter_match_the_reference():
    assert worst_in_interpreter(INTERPRETER_CHECK) < TOLERANCES[torch.float16][1]
