"""The bias + SiLU op (``ops.bias_silu``) and its Triton kernels against the reference
(float64, same inputs): forward and both gradients; the depthwise conv module built on it.

GPU tests skip without CUDA; one test runs the same kernels on the CPU in Triton's
interpreter (in a subprocess, so that interpreter mode cannot leak into other tests),
so CI without a GPU checks their indexing, masking and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4fusion import ops
from s4fusion.models.layers import DepthwiseConvSiLU
from s4fusion.ops import bias_silu_ref
from s4fusion.ops.reference import depthwise_conv
from scan_helpers import assert_errors_within, bf16_network_with_and_without, errors_against_float64
from triton_interpreter import worst_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error of (output, dL/dx, dL/dbias) against a float64 reference on the same
# inputs: float32 arithmetic, the output and dL/dx rounded once to the input's dtype,
# the bias rounded to it first (as the reference does in that dtype)
TOLERANCES = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.5e-2, 2e-2)}

# (b, C, H, W): the network's widths (72, 144, 288 at the three scales; 48 and 192
# for other widths), odd sizes, one that does not fill a channel block, one token
CASES = [(2, 72, 13, 17), (1, 144, 9, 31), (3, 288, 5, 6), (1, 48, 7, 7), (2, 130, 3, 11), (1, 7, 1, 1)]


def _inputs(b, C, H, W, dtype, device, seed=0):
    """x channels-last, as the network's convolution returns it; bias float32."""
    g = torch.Generator().manual_seed(seed + C)
    x = (2 * torch.randn(b, C, H, W, generator=g)).to(device, dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(C, generator=g).to(device)
    return [x.requires_grad_(), bias.requires_grad_()]


def test_reference_is_silu_of_the_biased_input():
    x, bias = _inputs(2, 5, 3, 4, torch.float64, "cpu")
    expected = (x + bias[:, None, None]) * torch.sigmoid(x + bias[:, None, None])
    torch.testing.assert_close(bias_silu_ref(x, bias), expected, rtol=1e-12, atol=1e-12)
    assert bias_silu_ref(x, bias).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bias joins x's dtype, as a convolution's would
        assert bias_silu_ref(x.detach().bfloat16(), bias).dtype == torch.bfloat16


def test_depthwise_conv_silu_is_the_conv_with_bias_then_silu():
    torch.manual_seed(0)
    conv = DepthwiseConvSiLU(12, 3).double()
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12).double()
    plain.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), F.silu(plain(x)), rtol=1e-12, atol=1e-12)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert sorted(conv.state_dict()) == ["bias", "weight"]


def test_shapes_are_checked():
    x, bias = _inputs(1, 8, 3, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"bias must be \(8,\) for x \(1, 8, 3, 3\), got \(7,\)"):
        ops.bias_silu(x, bias[:7])
    with pytest.raises(ValueError, match=r"x must be \(b, C, H, W\)"):
        ops.bias_silu(x[0], bias)


def test_cpu_backend_uses_the_reference():
    assert ops._load("cpu", "bias_silu") is bias_silu_ref


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}C{}H{}W{}".format(*c))
def test_matches_reference_forward_and_both_gradients(case, dtype):
    from s4fusion.ops.triton_act import bias_silu_triton

    ins = _inputs(*case, dtype, "cuda")
    gout = torch.randn(*case, device="cuda")  # NCHW: the backward takes any layout
    out, grads, rel = errors_against_float64(bias_silu_triton, bias_silu_ref, ins, gout)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert_errors_within(rel, TOLERANCES[dtype])


@needs_cuda
@pytest.mark.gpu
def test_other_layouts_run_the_reference_and_the_dispatcher_picks_the_kernel():
    from s4fusion.ops.triton_act import bias_silu_triton

    x, bias = _inputs(2, 72, 13, 17, torch.float32, "cuda")
    nchw = x.detach().contiguous()
    assert torch.equal(bias_silu_triton(nchw, bias), bias_silu_ref(nchw, bias))
    assert ops._load(ops.resolve_backend(torch.device("cuda")), "bias_silu") is bias_silu_triton
    torch.testing.assert_close(ops.bias_silu(x, bias), bias_silu_ref(x, bias), rtol=1e-6, atol=1e-6)


@needs_cuda
@pytest.mark.gpu
def test_network_in_bf16_with_the_kernel_matches_the_reference_op(monkeypatch):
    """The default network fusing under bf16 autocast, its depthwise convolutions composed
    of the convolution and the bias + SiLU op (as with gradients; without, one kernel does
    both): with the kernel as with PyTorch's add and SiLU (which round the sum to bfloat16
    first), both close to float32."""

    def conv_then_bias_silu(x, weight, bias):
        return ops.bias_silu(depthwise_conv(x, weight), bias)

    monkeypatch.setitem(ops._loaded, ("triton", "conv_silu"), conv_then_bias_silu)
    exact, kernel, torch_ops = bf16_network_with_and_without(monkeypatch, "bias_silu", bias_silu_ref)
    assert (kernel - torch_ops).abs().max() < 2e-2
    assert (kernel - exact).abs().max() < 5e-2 and (torch_ops - exact).abs().max() < 5e-2


INTERPRETER_CHECK = """
from s4fusion.ops import triton_act as ta
from s4fusion.ops.reference import bias_silu_ref
ta.TILE = 256  # tiles of 2 to 8 tokens: several forward tiles, backward tiles and programs
ta.BWD_PROGRAMS_PER_SM = 3
worst = 0.0
for dtype in (torch.float32, torch.float16):
    for b, C, H, W in [(2, 72, 5, 7), (1, 144, 3, 5), (1, 48, 4, 9), (2, 130, 3, 2), (1, 7, 1, 3), (1, 288, 2, 3)]:
        g = torch.Generator().manual_seed(C)
        x = (2 * torch.randn(b, C, H, W, generator=g)).to(dtype).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(C, generator=g)
        x.requires_grad_(), bias.requires_grad_()
        out = ta.bias_silu_triton(x, bias)
        gout = torch.randn(b, C, H, W, generator=g)
        grads = torch.autograd.grad(out, (x, bias), gout.to(dtype))
        ref_in = [t.detach().double().requires_grad_() for t in (x, bias)]
        ref = bias_silu_ref(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, gout.to(dtype).double())
        for a, r in zip([out, *grads], [ref, *ref_grads]):
            worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
        if out.dtype != dtype or grads[0].dtype != dtype or not out.is_contiguous(memory_format=torch.channels_last):
            worst = float("inf")
print("WORST", worst)
"""


def test_kernels_in_the_triton_interpreter_match_the_reference():
    pytest.importorskip("triton", reason="the bias + SiLU kernels need the triton package")
    assert worst_in_interpreter(INTERPRETER_CHECK) < TOLERANCES[torch.float16][1]
