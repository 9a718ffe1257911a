"""The bias + ReLU op (``ops.bias_relu``: a convolution's bias, an optional residual and
the ReLU, as the loss's ResNet-50 runs them on a GPU) and its Triton kernel against the
reference, which is PyTorch's own add, add and ReLU: in the same dtype the kernel gives
the reference's output and gradients bit for bit.

GPU tests skip without CUDA; one test runs the kernel on the CPU in Triton's interpreter
(in a subprocess), so CI without a GPU checks its indexing and masking too.
"""

from __future__ import annotations

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import bias_relu_ref
from triton_interpreter import worst_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (b, C, H, W): ResNet-50's widths (64 to 2048), odd sizes, a width that does not fill a
# channel block, one token
CASES = [(2, 64, 13, 17), (1, 256, 9, 31), (3, 2048, 2, 3), (1, 130, 3, 11), (1, 7, 1, 1)]


def _inputs(b, C, H, W, dtype, device, residual=True, seed=0):
    """x (and the residual) channels-last, as a convolution returns them; bias float32."""
    g = torch.Generator().manual_seed(seed + C)
    x, r = (torch.randn(b, C, H, W, generator=g).to(device, dtype) for _ in range(2))
    x, r = (t.contiguous(memory_format=torch.channels_last).requires_grad_() for t in (x, r))
    bias = torch.randn(C, generator=g).to(device).requires_grad_()
    return [x, bias, r] if residual else [x, bias]


def test_reference_is_relu_of_the_biased_input_plus_residual():
    x, bias, r = _inputs(2, 5, 3, 4, torch.float64, "cpu")
    torch.testing.assert_close(bias_relu_ref(x, bias, r), torch.relu(x + bias[:, None, None] + r), rtol=0, atol=0)
    torch.testing.assert_close(bias_relu_ref(x, bias), torch.relu(x + bias[:, None, None]), rtol=0, atol=0)
    assert bias_relu_ref(x, bias, r).is_contiguous(memory_format=torch.channels_last)
    assert bias_relu_ref(x.detach().bfloat16(), bias).dtype == torch.bfloat16  # the bias joins x's dtype


def test_arguments_are_checked():
    x, bias, r = _inputs(1, 8, 3, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"bias_relu: bias must be \(8,\) for x \(1, 8, 3, 3\), got \(7,\)"):
        ops.bias_relu(x, bias[:7])
    with pytest.raises(ValueError, match=r"bias_relu: x must be \(b, C, H, W\)"):
        ops.bias_relu(x[0], bias)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(1, 8, 3, 3\), got \(1, 8, 3, 2\)"):
        ops.bias_relu(x, bias, r[..., :2])
    with pytest.raises(ValueError, match=r"residual is torch.float64 on cpu but x is torch.float32 on cpu"):
        ops.bias_relu(x, bias, r.double())


def test_cpu_backend_uses_the_reference():
    assert ops._load("cpu", "bias_relu") is bias_relu_ref


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}C{}H{}W{}".format(*c))
def test_kernel_equals_the_reference_forward_and_gradients(case, dtype, residual):
    from s4fusion.ops.triton_act import bias_relu_triton

    ins = _inputs(*case, dtype, "cuda", residual)
    ins[0].data[0, 0] = 0.0  # ReLU's kink: y = bias there; and a NaN, which stays NaN
    ins[0].data[-1, -1, -1, -1] = float("nan")
    out = bias_relu_triton(*ins)
    ref = bias_relu_ref(*ins)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.nan_to_num(), ref.nan_to_num()) and out[-1, -1, -1, -1].isnan()
    gout = torch.randn(*case, device="cuda").to(dtype)  # NCHW: the backward takes any layout
    grads = torch.autograd.grad(out, ins, gout)
    ref_grads = torch.autograd.grad(ref, ins, gout)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(grads[0], ref_grads[0])  # the ReLU backward itself: exact


@needs_cuda
@pytest.mark.gpu
def test_other_layouts_run_the_reference_and_the_dispatcher_picks_the_kernel():
    from s4fusion.ops.triton_act import bias_relu_triton

    x, bias, r = _inputs(2, 64, 13, 17, torch.float32, "cuda")
    assert torch.equal(bias_relu_triton(x, bias, r.contiguous()), bias_relu_ref(x, bias, r.contiguous()))
    assert ops._load(ops.resolve_backend(torch.device("cuda")), "bias_relu") is bias_relu_triton
    assert torch.equal(ops.bias_relu(x, bias, r), bias_relu_ref(x, bias, r))


INTERPRETER_CHECK = """
from s4fusion.ops import triton_act as ta
from s4fusion.ops.reference import bias_relu_ref
ta.TILE = 256  # tiles of 2 to 8 tokens: several tiles per map
worst = 0.0
for dtype in (torch.float32, torch.float16):
    for b, C, H, W in [(2, 64, 5, 7), (1, 256, 3, 5), (2, 130, 3, 2), (1, 7, 1, 3)]:
        for residual in (True, False):
            g = torch.Generator().manual_seed(C)
            x, r = (torch.randn(b, C, H, W, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
                    for _ in range(2))
            bias = torch.randn(C, generator=g)
            ins = [t.requires_grad_() for t in ((x, bias, r) if residual else (x, bias))]
            out = ta.bias_relu_triton(*ins)
            ref = bias_relu_ref(*ins)
            gout = torch.randn(b, C, H, W, generator=g).to(dtype)
            grads = torch.autograd.grad(out, ins, gout)
            ref_grads = torch.autograd.grad(ref, ins, gout)
            worst = max(worst, (out.double() - ref.double()).abs().max().item())
            for a, e in zip(grads, ref_grads):
                worst = max(worst, ((a.double() - e.double()).norm() / e.double().norm()).item())
            if out.dtype != dtype or not out.is_contiguous(memory_format=torch.channels_last):
                worst = float("inf")
print("WORST", worst)
"""


def test_kernel_in_the_triton_interpreter_equals_the_reference():
    pytest.importorskip("triton", reason="the bias + ReLU kernel needs the triton package")
    assert worst_in_interpreter(INTERPRETER_CHECK) < 1e-6
