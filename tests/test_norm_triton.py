"""The Triton LayerNorm (optionally SiLU-gated) against the reference LayerNorm
(``F.layer_norm``, float64, same inputs), and the dispatcher's choice of it.

GPU tests skip without CUDA; one test runs the same kernels on the CPU in
Triton's interpreter (in a subprocess, so that interpreter mode cannot leak into
other tests), so CI without a GPU checks their indexing, masking and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4fusion import ops
from s4fusion.models.layers import LayerNorm
from s4fusion.ops import layer_norm_ref
from scan_helpers import assert_errors_within, errors_against_float64
from triton_interpreter import worst_in_interpreter

triton = pytest.importorskip("triton", reason="the triton LayerNorm needs the triton package")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error of (output, gradients) against a float64 reference on the same inputs
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 2e-2)}

# (leading shape, C, gated, strided input): the network's widths (48 ... 384) and wider, odd
# widths, a single token, and strided views (the gate is a chunk of the input projection)
CASES = [
    ((2, 13, 17), 48, False, False),
    ((1, 9, 11), 72, True, True),
    ((3, 5, 7), 576, False, True),
    ((1,), 5, True, False),
    ((4, 33), 37, True, False),
    ((2, 3, 3), 384, True, True),
]


def _inputs(lead, C, gated, strided, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed + C)
    x = torch.randn(*lead, 2 * C if strided else C, generator=g) * 1.7 + 0.3
    x = x[..., 1::2] if strided else x
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    z = torch.randn(*lead, 2 * C, generator=g)[..., C:] if gated else None
    cast = [x.to(device, dtype), w.to(device), b.to(device)] + ([z.to(device, dtype)] if gated else [])
    return [t.requires_grad_() for t in cast]


def _errors(fn, ins, gout):
    """fn (a layer_norm) on x, weight, bias[, gate] against the reference in float64."""

    def call(layer_norm):
        return lambda x, w, b, *gate: layer_norm(x, w, b, 1e-5, gate[0] if gate else None)

    out, _, rel = errors_against_float64(call(fn), call(layer_norm_ref), ins, gout)
    return out, rel


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}ch{'-gated' if c[2] else ''}{'-strided' if c[3] else ''}")
def test_matches_reference_forward_and_every_gradient(case, dtype):
    from s4fusion.ops.triton_norm import layer_norm_triton

    ins = _inputs(*case, dtype, "cuda")
    gout = torch.randn(*case[0], case[1], device="cuda")
    out, rel = _errors(layer_norm_triton, ins, gout)
    assert out.dtype == dtype and out.shape == ins[0].shape
    assert_errors_within(rel, TOLERANCES[dtype])


@needs_cuda
@pytest.mark.gpu
def test_autocast_gives_float32_like_pytorch():
    ins = _inputs((2, 7, 9), 72, True, True, torch.bfloat16, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.layer_norm(*ins[:3], 1e-5, ins[3])
        ref = layer_norm_ref(*ins[:3], 1e-5, ins[3])
    assert out.dtype == ref.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_dispatcher_uses_the_scan_backends_layer_norm():
    from s4fusion.ops.triton_norm import layer_norm_triton

    assert ops._load(ops.resolve_backend(torch.device("cuda")), "norm") is layer_norm_triton
    x, w, b = _inputs((3, 4), 48, False, False, torch.float32, "cuda")[:3]
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5, backend="reference"), F.layer_norm(x, (48,), w, b, 1e-5))


@needs_cuda
@pytest.mark.gpu
def test_constant_tokens_normalise_to_exactly_the_bias():
    from s4fusion.ops.triton_norm import layer_norm_triton

    x = torch.full((7, 72), 0.7310586, device="cuda")
    w, b = torch.randn(72, device="cuda"), torch.randn(72, device="cuda")
    assert torch.equal(layer_norm_triton(x, w, b, 1e-5), b.expand(7, 72))


def test_module_on_the_cpu_is_pytorchs_layer_norm_exactly():
    norm = LayerNorm(24, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, z = torch.randn(2, 5, 6, 24), torch.randn(2, 5, 6, 24)
    plain = torch.nn.LayerNorm(24, eps=1e-5)
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), plain(x))
    assert torch.equal(norm(x, gate=z), plain(x) * F.silu(z))


def test_matmul_input_under_autocast_is_the_float32_result_cast():
    x, w, b, z = (t.detach() for t in _inputs((2, 7, 9), 72, True, True, torch.float32, "cpu"))
    assert ops.layer_norm(x, w, b, 1e-5, z, matmul_input=True).dtype == torch.float32  # no autocast: no effect
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = ops.layer_norm(x, w, b, 1e-5, z)
        lower = ops.layer_norm(x, w, b, 1e-5, z, matmul_input=True)
    assert full.dtype == torch.float32 and lower.dtype == torch.bfloat16
    assert torch.equal(lower, full.to(torch.bfloat16))


def test_matmul_input_norms_leave_a_training_pass_unchanged_bit_for_bit():
    """The network's LayerNorms read only by a linear layer return autocast's dtype: the
    output, the loss and every parameter's gradient of a bf16 training pass are the
    ones of float32 norms whose results the linear layers cast."""
    from s4fusion import S4Fusion, S4FusionConfig

    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1))
    norms = [m for m in model.modules() if isinstance(m, LayerNorm) and m.matmul_input]
    # the 9 VSS blocks' norm and out_norm, the 3 CMSA blocks' out_norm, the 2 encoders' 2 mergings
    assert len(norms) == 2 * 9 + 3 + 2 * 2
    ir, vi = torch.rand(2, 1, 24, 30), torch.rand(2, 1, 24, 30)
    results = []
    for matmul_input in (True, False):
        for m in norms:
            m.matmul_input = matmul_input
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ir, vi)
        out.float().square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append([out] + grads)
    assert len(results[0]) == len(results[1]) > 100
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_cuda
@pytest.mark.gpu
def test_matmul_input_kernel_rounds_the_float32_result_once():
    from s4fusion.ops.triton_norm import layer_norm_triton

    ins = _inputs((2, 7, 9), 72, True, True, torch.bfloat16, "cuda")
    gout = torch.randn(2, 7, 9, 72, device="cuda").bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = layer_norm_triton(*ins[:3], 1e-5, ins[3])
        lower = layer_norm_triton(*ins[:3], 1e-5, ins[3], matmul_input=True)
    assert full.dtype == torch.float32 and lower.dtype == torch.bfloat16
    assert torch.equal(lower, full.to(torch.bfloat16))
    grads_full = torch.autograd.grad(full, ins, gout.float())
    grads_lower = torch.autograd.grad(lower, ins, gout)
    # dL/dx and dL/dgate equal; dL/dweight and dL/dbias are sums the programs add atomically,
    # in an order that varies from run to run
    assert torch.equal(grads_full[0], grads_lower[0]) and torch.equal(grads_full[3], grads_lower[3])
    for a, b in zip(grads_full[1:3], grads_lower[1:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


INTERPRETER_CHECK = """
from s4fusion.ops import triton_norm as tn
from s4fusion.ops.reference import layer_norm_ref
tn.TILE = 64  # several programs, and several tiles per backward program
worst = 0.0
for lead, C, gated, strided in [((3, 5), 7, False, False), ((2, 9), 12, True, True), ((37,), 48, True, False),
                                ((4, 3), 5, False, True)]:
    g = torch.Generator().manual_seed(C)
    x = torch.randn(*lead, 2 * C if strided else C, generator=g) * 2 + 0.5
    x = x[..., 1::2] if strided else x
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    z = torch.randn(*lead, 2 * C, generator=g)[..., :C] if gated else None
    ins = [t.requires_grad_() for t in [x, w, b] + ([z] if gated else [])]
    out = tn.layer_norm_triton(*ins[:3], 1e-5, ins[3] if gated else None)
    gout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, ins, gout)
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    ref = layer_norm_ref(*ref_in[:3], 1e-5, ref_in[3] if gated else None)
    ref_grads = torch.autograd.grad(ref, ref_in, gout.double())
    for a, r in zip([out, *grads], [ref, *ref_grads]):
        worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
# constant tokens (zero-padded borders) normalise to exactly the bias, as in PyTorch
x = torch.full((5, 48), 0.7310586)
b = torch.randn(48)
if not torch.equal(tn.layer_norm_triton(x, torch.randn(48), b, 1e-5), b.expand(5, 48)):
    worst = float("inf")
print("WORST", worst)
"""


def test_kernels_in_the_triton_interpreter_match_the_reference():
    assert worst_in_interpreter(INTERPRETER_CHECK) < 1e-6
