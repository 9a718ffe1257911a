"""The head's patch fold (``ops.fold_patches``) and its Triton kernel (fusing, no
gradients) against the reference and against a direct sum over the patches, in float64.

GPU tests skip without CUDA; one test runs the kernel on the CPU in Triton's interpreter
(in a subprocess), so CI without a GPU checks its indexing and masking.
"""

from __future__ import annotations

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import fold_patches_ref
from scan_helpers import bf16_network_with_and_without, rel
from triton_interpreter import worst_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")

# relative L2 error against float64 on the same inputs: float32 sums rounded once to the dtype
TOLERANCES = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (b, h, w, C, O, p, stride): the network's head (48 channels, 4x4 patches, stride 3) on odd
# grids, several output channels, stride 1 (four patches per axis cover a pixel), patches
# that do not overlap, one token
CASES = [(1, 7, 9, 48, 1, 4, 3), (2, 5, 4, 48, 1, 4, 3), (1, 4, 6, 10, 2, 3, 1), (1, 3, 5, 7, 3, 5, 2),
         (2, 3, 2, 16, 1, 4, 4), (1, 1, 1, 48, 1, 4, 3)]  # fmt: skip


def _inputs(b, h, w, C, O, p, stride, dtype, device, seed=0):
    """x (b, h, w, C) channels-last as the decoder leaves it (a permuted NCHW tensor for
    odd seeds), weight (C, O, p, p), bias (O,)."""
    g = torch.Generator().manual_seed(seed + C + p)
    x = torch.randn(b, C, h, w, generator=g).permute(0, 2, 3, 1)
    if seed % 2 == 0:
        x = x.contiguous()
    weight = torch.randn(C, O, p, p, generator=g) / C**0.5
    return x.to(device, dtype), weight.to(device, dtype), torch.randn(O, generator=g).to(device)


def _direct(x, weight, bias, stride):
    """The fold as its definition: every token's patch (its channels times the weight)
    added at its place, plus the bias; float64."""
    x, weight = x.double(), weight.double()
    b, h, w, _ = x.shape
    O, p = weight.shape[1], weight.shape[2]
    out = bias.double().view(1, O, 1, 1).repeat(b, 1, (h - 1) * stride + p, (w - 1) * stride + p)
    for i in range(h):
        for j in range(w):
            out[:, :, i * stride : i * stride + p, j * stride : j * stride + p] += torch.einsum(
                "bc,coij->boij", x[:, i, j], weight
            )
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}C{}O{}p{}s{}".format(*c))
def test_reference_is_the_sum_of_the_patches(case):
    x, weight, bias = _inputs(*case, torch.float64, "cpu", seed=1)
    torch.testing.assert_close(fold_patches_ref(x, weight, bias, case[-1]), _direct(x, weight, bias, case[-1]))


def test_shapes_are_checked():
    x, weight, bias = _inputs(1, 3, 4, 8, 1, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight must be \(8, O, p, p\) for x \(1, 3, 4, 8\), got \(7, 1, 4, 4\)"):
        ops.fold_patches(x, weight[:7], bias, 3)
    with pytest.raises(ValueError, match=r"bias must be \(1,\), got \(2,\)"):
        ops.fold_patches(x, weight, torch.zeros(2), 3)
    with pytest.raises(ValueError, match=r"stride must be 1 \.\. 4 \(the patch size\), got 5"):
        ops.fold_patches(x, weight, bias, 5)
    with pytest.raises(ValueError, match=r"x must be \(b, h, w, C\)"):
        ops.fold_patches(x[0], weight, bias, 3)


def test_cpu_backend_uses_the_reference():
    assert ops._load("cpu", "fold") is fold_patches_ref


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}C{}O{}p{}s{}".format(*c))
def test_kernel_matches_the_sum_of_the_patches_without_gradients(case, dtype):
    """(float32 runs the reference: cuDNN's kernel was faster there.)"""
    from s4fusion.ops.triton_fold import fold_patches_triton

    for seed in (0, 1):  # a contiguous and a permuted x
        x, weight, bias = _inputs(*case, dtype, "cuda", seed)
        with torch.no_grad():
            out = fold_patches_triton(x, weight, bias, case[-1])
        assert out.dtype == dtype and out.is_contiguous()
        assert rel(out, _direct(x, weight, bias, case[-1])) < TOLERANCES[dtype]


@needs_cuda
@pytest.mark.gpu
def test_under_autocast_and_with_gradients():
    from s4fusion.ops.triton_fold import fold_patches_triton

    x, weight, bias = _inputs(1, 7, 9, 48, 1, 4, 3, torch.float32, "cuda")
    exact = _direct(x, weight, bias, 3)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # x and weight cast, as the convolution's
        out = fold_patches_triton(x, weight, bias, 3)
    assert out.dtype == torch.bfloat16 and rel(out, exact) < TOLERANCES[torch.bfloat16]
    ins = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = fold_patches_triton(*ins, 3)  # (the reference: PyTorch's transposed convolution)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, gout)
    ref_in = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref_grads = torch.autograd.grad(_direct(*ref_in, 3), ref_in, gout.double())
    assert rel(out, exact) < 1e-6 and max(rel(a, r) for a, r in zip(grads, ref_grads)) < 1e-5
    assert ops._load(ops.resolve_backend(torch.device("cuda")), "fold") is fold_patches_triton


@needs_cuda
@pytest.mark.gpu
def test_network_in_bf16_with_the_kernel_matches_the_reference_op(monkeypatch):
    """The default network fusing under bf16 autocast: with the kernel as with cuDNN's
    transposed convolution, both close to float32."""
    exact, kernel, torch_ops = bf16_network_with_and_without(monkeypatch, "fold", fold_patches_ref)
    assert (kernel - torch_ops).abs().max() < 2e-2
    assert (kernel - exact).abs().max() < 5e-2 and (torch_ops - exact).abs().max() < 5e-2


INTERPRETER_CHECK = """
from s4fusion.ops import triton_fold as tf
from s4fusion.ops.reference import fold_patches_ref
tf.PIXELS = 16  # several programs per image
worst = 0.0
for dtype in (torch.float16,):  # (float32 runs the reference)
    for b, h, w, C, O, p, s in [(1, 4, 5, 48, 1, 4, 3), (2, 3, 2, 10, 2, 3, 1), (1, 2, 3, 7, 3, 5, 2),
                                (1, 2, 2, 16, 1, 4, 4), (1, 1, 1, 20, 1, 4, 3)]:
        g = torch.Generator().manual_seed(C + p)
        x = torch.randn(b, C, h, w, generator=g).permute(0, 2, 3, 1).to(dtype)
        weight = (torch.randn(C, O, p, p, generator=g) / C**0.5).to(dtype)
        bias = torch.randn(O, generator=g)
        with torch.no_grad():
            out = tf.fold_patches_triton(x, weight, bias, s)
            ref = fold_patches_ref(x.double(), weight.double(), bias.double(), s)
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
        if out.dtype != dtype or not out.is_contiguous():
            worst = float("inf")
print("WORST", worst)
"""


def test_kernel_in_the_triton_interpreter_matches_the_reference():
    pytest.importorskip("triton", reason="the fold kernel needs the triton package")
    assert worst_in_interpreter(INTERPRETER_CHECK) < TOLERANCES[torch.float16]
