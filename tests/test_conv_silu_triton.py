"""The depthwise convolution + bias + SiLU op (``ops.depthwise_conv_silu``) and its
Triton kernel (fusing, no gradients) against the reference in float64 on the same
inputs; where gradients are wanted, the Triton backend's convolution and bias + SiLU op.

The network hands the op a strided slice of its input projection's output (channels
innermost, every token's row twice as wide as the slice), so the cases here do too.
GPU tests skip without CUDA; one test runs the kernel on the CPU in Triton's interpreter
(in a subprocess), so CI without a GPU checks its indexing and masking.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4fusion import ops
from s4fusion.ops import depthwise_conv_silu_ref
from scan_helpers import bf16_network_with_and_without, rel
from triton_interpreter import worst_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error of the output against float64 on the same inputs: float32 sums, the
# convolution's sum rounded once to the dtype, then the bias + SiLU rounded once
TOLERANCES = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (b, C, H, W, k): the network's widths (72, 144, 288), a width that does not fill a
# channel block, odd sizes, one-token maps, a 5x5 kernel
CASES = [(2, 72, 13, 17, 3), (1, 144, 9, 31, 3), (3, 288, 5, 6, 3), (2, 130, 3, 11, 3), (1, 7, 1, 1, 3),
         (1, 40, 6, 9, 5)]  # fmt: skip


def _inputs(b, C, H, W, k, dtype, device, seed=0):
    """x (b, C, H, W) as the network's slice: the first C channels of a (b, H, W, 2C)
    projection, permuted; weight (C, 1, k, k) channels-last as the module keeps it;
    bias float32."""
    g = torch.Generator().manual_seed(seed + C + k)
    xz = torch.randn(b, H, W, 2 * C, generator=g).to(device, dtype)
    weight = (torch.randn(C, 1, k, k, generator=g) / k).to(device, dtype)
    bias = torch.randn(C, generator=g).to(device)
    return xz[..., :C].permute(0, 3, 1, 2), weight.contiguous(memory_format=torch.channels_last), bias


def _float64(fn, x, weight, bias):
    return fn(x.double(), weight.double(), bias.double())


def test_reference_is_the_convolution_with_bias_then_silu_in_any_layout():
    x, weight, bias = _inputs(2, 12, 9, 11, 3, torch.float64, "cpu")
    conv = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12).double()
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    with torch.no_grad():
        out = depthwise_conv_silu_ref(x, weight, bias)
        torch.testing.assert_close(out, F.silu(conv(x.contiguous())), rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_shapes_are_checked():
    x, weight, bias = _inputs(1, 8, 3, 3, 3, torch.float32, "cpu")
    expected = r"weight must be \(8, 1, k, k\) with k odd for x \(1, 8, 3, 3\), got \(8, 1, 2, 2\)"
    with pytest.raises(ValueError, match=expected):
        ops.depthwise_conv_silu(x, weight[..., :2, :2], bias)
    with pytest.raises(ValueError, match=r"weight must be \(8, 1, k, k\)"):
        ops.depthwise_conv_silu(x, weight[:, :, :, :1], bias)
    with pytest.raises(ValueError, match=r"bias must be \(8,\) for x \(1, 8, 3, 3\), got \(7,\)"):
        ops.depthwise_conv_silu(x, weight, bias[:7])


def test_cpu_backend_uses_the_reference():
    assert ops._load("cpu", "conv_silu") is depthwise_conv_silu_ref


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}C{}H{}W{}k{}".format(*c))
def test_kernel_matches_the_reference_without_gradients(case, dtype):
    from s4fusion.ops.triton_act import depthwise_conv_silu_triton

    x, weight, bias = _inputs(*case, dtype, "cuda")
    with torch.no_grad():
        out = depthwise_conv_silu_triton(x, weight, bias)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out, _float64(depthwise_conv_silu_ref, x, weight, bias)) < TOLERANCES[dtype]


@needs_cuda
@pytest.mark.gpu
def test_under_autocast_and_with_gradients():
    from s4fusion.ops.triton_act import depthwise_conv_silu_triton

    x, weight, bias = _inputs(2, 72, 13, 17, 3, torch.float32, "cuda")
    exact = _float64(depthwise_conv_silu_ref, x, weight, bias)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # x and weight cast, as a conv's
        out = depthwise_conv_silu_triton(x, weight, bias)
    assert out.dtype == torch.bfloat16 and rel(out, exact) < TOLERANCES[torch.bfloat16]
    # with gradients: the convolution and the bias + SiLU op, differentiable in every input
    ins = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv_silu_triton(*ins)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, gout)
    ref_in = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref_grads = torch.autograd.grad(depthwise_conv_silu_ref(*ref_in), ref_in, gout.double())
    assert rel(out, exact) < 1e-6
    assert max(rel(a, r) for a, r in zip(grads, ref_grads)) < 1e-5
    assert ops._load(ops.resolve_backend(torch.device("cuda")), "conv_silu") is depthwise_conv_silu_triton


@needs_cuda
@pytest.mark.gpu
def test_network_in_bf16_with_the_kernel_matches_the_reference_op(monkeypatch):
    """The default network fusing under bf16 autocast: with the kernel as with cuDNN's
    convolution and PyTorch's add and SiLU, both close to float32."""
    exact, kernel, torch_ops = bf16_network_with_and_without(monkeypatch, "conv_silu", depthwise_conv_silu_ref)
    assert (kernel - torch_ops).abs().max() < 2e-2
    assert (kernel - exact).abs().max() < 5e-2 and (torch_ops - exact).abs().max() < 5e-2


INTERPRETER_CHECK = """
from s4fusion.ops import triton_act as ta
from s4fusion.ops.reference import depthwise_conv_silu_ref
ta.CONV_TILE = 256  # tiles of 2 to 8 tokens: several tiles per row and tiles across rows
worst = 0.0
for dtype in (torch.float32, torch.float16):
    for b, C, H, W, k in [(2, 72, 5, 7, 3), (1, 130, 3, 5, 3), (2, 7, 1, 3, 3), (1, 40, 4, 6, 5), (1, 288, 2, 3, 3)]:
        g = torch.Generator().manual_seed(C + k)
        xz = torch.randn(b, H, W, 2 * C, generator=g).to(dtype)
        x = xz[..., :C].permute(0, 3, 1, 2)
        weight = (torch.randn(C, 1, k, k, generator=g) / k).to(dtype).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(C, generator=g)
        with torch.no_grad():
            out = ta.depthwise_conv_silu_triton(x, weight, bias)
            ref = depthwise_conv_silu_ref(x.double(), weight.double(), bias.double())
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
        if out.dtype != dtype or not out.is_contiguous(memory_format=torch.channels_last):
            worst = float("inf")
print("WORST", worst)
"""


def test_kernel_in_the_triton_interpreter_matches_the_reference():
    pytest.importorskip("triton", reason="the convolution kernel needs the triton package")
    assert worst_in_interpreter(INTERPRETER_CHECK) < TOLERANCES[torch.float16]
