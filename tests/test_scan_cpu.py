"""The fast CPU scan backend (``cpu``, numba) against the specification
``cross_scan_ref``: forward and the gradients of every input at odd sizes, one
and two modalities, each dtype; the golden selective-scan unit test; the whole
released network on the golden inputs; backend selection."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os

import pytest
import torch
from safetensors.torch import load_file

from s4fusion import S4Fusion, ops
from s4fusion.ops import BackendUnavailableError, cross_scan, cross_scan_ref, resolve_backend, set_backend
from scan_helpers import FWD_TOL, make_inputs, rel

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed"),
    pytest.mark.usefixtures("single_threaded_scan"),
]

GRAD_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@pytest.fixture(scope="module")
def cross_scan_cpu():
    from s4fusion.ops.cpu_scan import cross_scan_cpu

    return cross_scan_cpu


def grads(fn, inputs, H, W, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, H, W)
    (out * grad_out).sum().backward()
    return out, [x.grad for x in leaves]


# (H, W): odd shapes; 9 x 17 = 153 positions spans three chunks of 64 positions
SIZES = [(3, 5), (7, 4), (1, 6), (9, 17)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("H,W", SIZES)
def test_forward_and_gradients_match_reference(cross_scan_cpu, dtype, M, H, W):
    inputs = make_inputs(2, M, 12, 5, H, W, dtype, seed=H * 100 + W * 10 + M)
    grad_out = torch.randn(2, M, 12, H * W, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out, g = grads(cross_scan_cpu, inputs, H, W, grad_out)
    ref, g_ref = grads(cross_scan_ref, inputs, H, W, grad_out)
    assert out.dtype == dtype
    assert rel(out, ref) < FWD_TOL[dtype]
    for name, a, r, x in zip(NAMES, g, g_ref, inputs):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert rel(a, r) < GRAD_TOL[dtype], f"gradient of {name}: rel. error {rel(a, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_with_positive_entries(cross_scan_cpu, dtype):
    """A state matrix that is not everywhere <= 0 takes the general exponential (the
    decay factors' one would be wrong for positive arguments): still the reference's
    forward and gradients; NaN in A selects it too."""
    from s4fusion.ops import cpu_scan

    H, W = 5, 7
    inputs = make_inputs(2, 2, 12, 5, H, W, dtype, seed=7)
    inputs[2][::3] = 0.02 * inputs[2][::3].abs()  # growth, but no float32 overflow
    assert cpu_scan._exps(inputs[2]) is cpu_scan._EXPS_ANY
    assert cpu_scan._exps(-inputs[2].abs()) is cpu_scan._EXPS_DECAY
    assert cpu_scan._exps(torch.tensor([[-1.0, float("nan")]])) is cpu_scan._EXPS_ANY
    grad_out = torch.randn(2, 2, 12, H * W, generator=torch.Generator().manual_seed(2), dtype=dtype)
    out, g = grads(cross_scan_cpu, inputs, H, W, grad_out)
    ref, g_ref = grads(cross_scan_ref, inputs, H, W, grad_out)
    assert rel(out, ref) < FWD_TOL[dtype]
    for name, a, r in zip(NAMES, g, g_ref):
        assert rel(a, r) < GRAD_TOL[dtype], f"gradient of {name}: rel. error {rel(a, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(cross_scan_cpu, dtype):
    """bf16/fp16 inputs: float32 state, result and gradients in the input dtype, close
    to the reference evaluated in float32 on the same (rounded) values."""
    H, W = 5, 7
    inputs = make_inputs(1, 2, 16, 6, H, W, dtype, seed=3)
    grad_out = torch.randn(1, 2, 16, H * W, generator=torch.Generator().manual_seed(4)).to(dtype)
    out, g = grads(cross_scan_cpu, inputs, H, W, grad_out)
    ref, g_ref = grads(cross_scan_ref, [x.float() for x in inputs], H, W, grad_out.float())
    assert out.dtype == dtype
    assert rel(out, ref) < FWD_TOL[dtype]
    for name, a, r, x in zip(NAMES, g, g_ref, inputs):
        assert a.dtype == dtype, name
        assert rel(a, r) < GRAD_TOL[dtype], f"gradient of {name}: rel. error {rel(a, r):.2e}"


def test_non_contiguous_and_mixed_dtype_inputs(cross_scan_cpu):
    """B, C as the model makes them (slices of one projection), u transposed in
    memory, float32 activations with float64 parameters."""
    H, W, N = 4, 9, 5
    u, delta, A, B, C, D, bias = make_inputs(1, 2, 12, N, H, W, torch.float32, seed=5)
    P = torch.cat([B, C, torch.randn_like(B)], dim=3)  # (b, M, K, 3N, L)
    B_view, C_view = P[:, :, :, :N], P[:, :, :, N : 2 * N]
    u_t = u.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (B_view.is_contiguous() or u_t.is_contiguous())
    out = cross_scan_cpu(u_t, delta, A.double(), B_view, C_view, D.double(), bias.double(), H, W)
    assert out.dtype == torch.float32
    assert rel(out, cross_scan_ref(u, delta, A, B, C, D, bias, H, W)) < FWD_TOL[torch.float32]


def test_channels_innermost_inputs_as_the_network_passes_them(cross_scan_cpu):
    """u and delta with their channels innermost in memory (the network's layout),
    read in place: output and every gradient equal those of contiguous copies (up
    to the summation order of the reductions over positions)."""
    H, W = 5, 7
    inputs = make_inputs(1, 2, 10, 4, H, W, torch.float32, seed=8)
    last = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2) if i < 2 else t.detach()
            for i, t in enumerate(inputs)]  # fmt: skip
    dense = [t.detach().contiguous() for t in inputs]
    assert not (last[0].is_contiguous() or last[1].is_contiguous())
    grad_out = torch.randn(1, 2, 10, H * W, generator=torch.Generator().manual_seed(9))
    results = []
    for xs in (last, dense):
        xs = [t.requires_grad_() for t in xs]
        out = cross_scan_cpu(*xs, H, W)
        results.append([out, *torch.autograd.grad(out, xs, grad_out)])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-6


def test_results_do_not_depend_on_the_thread_count(cross_scan_cpu):
    """40 channels, 78 positions (two chunks): with 1 thread one unit per direction
    holds two channel blocks (the second partial), with 8 threads the work is split
    into smaller blocks and the backward into groups that sum their dB, dC. Each
    channel's recurrence is computed the same way, so the forward is bitwise
    identical; both match the reference."""
    H, W = 6, 13
    inputs = make_inputs(1, 2, 40, 5, H, W, torch.float32, seed=6)
    grad_out = torch.randn(1, 2, 40, H * W, generator=torch.Generator().manual_seed(7))
    ref, g_ref = grads(cross_scan_ref, [x.double() for x in inputs], H, W, grad_out.double())
    results = []
    for threads in (1, 8):
        torch.set_num_threads(threads)
        results.append(grads(cross_scan_cpu, inputs, H, W, grad_out))
    (out1, g1), (out8, g8) = results
    assert torch.equal(out1, out8)
    for out, g in results:
        assert rel(out, ref) < FWD_TOL[torch.float32]
        for name, a, r in zip(NAMES, g, g_ref):
            assert rel(a, r) < GRAD_TOL[torch.float32], f"gradient of {name}: rel. error {rel(a, r):.2e}"


def _scan_in_child(inputs: list, expected: torch.Tensor) -> None:
    from s4fusion.ops.cpu_scan import cross_scan_cpu

    torch.set_num_threads(2)  # the scan's own two workers (the tensors are too small for torch's)
    raise SystemExit(0 if torch.equal(cross_scan_cpu(*inputs, 4, 6), expected) else 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_works_in_a_forked_child_after_use_in_the_parent(cross_scan_cpu):
    """The worker threads of the parent do not exist in a fork (e.g. data-loader
    workers); the child must start its own instead of waiting on them forever."""
    torch.set_num_threads(2)
    inputs = make_inputs(1, 2, 40, 5, 4, 6, torch.float32, seed=9)
    expected = cross_scan_cpu(*inputs, 4, 6)  # the parent's worker threads exist now
    child = multiprocessing.get_context("fork").Process(target=_scan_in_child, args=(inputs, expected))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the scan hung in a forked child")
    assert child.exitcode == 0, "the forked child's scan differs from the parent's" if child.exitcode == 3 else child.exitcode


def test_empty_inputs(cross_scan_cpu):
    for b, d, H, W in ((0, 8, 3, 5), (1, 0, 3, 5), (1, 8, 0, 5)):
        inputs = make_inputs(b, 2, d, 4, H, W, torch.float32)
        assert cross_scan_cpu(*inputs, H, W).shape == (b, 2, d, H * W)


def test_inference_stores_no_state(cross_scan_cpu):
    H, W = 3, 4
    inputs = [x.requires_grad_() for x in make_inputs(1, 1, 8, 4, H, W, torch.float32)]
    with torch.no_grad():
        out = cross_scan_cpu(*inputs, H, W)
    assert out.grad_fn is None and not out.requires_grad
    out = cross_scan_cpu(*[x.detach() for x in inputs], H, W)
    assert out.grad_fn is None


def test_bad_shapes_are_reported(cross_scan_cpu):
    u, delta, A, B, C, D, bias = make_inputs(1, 2, 8, 4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match=r"height\*width = 4\*4 = 16 does not match L = 15"):
        cross_scan_cpu(u, delta, A, B, C, D, bias, 4, 4)
    with pytest.raises(ValueError, match=r"B must be \(b, M, K, N, L\)"):
        cross_scan_cpu(u, delta, A, B[:, :, :, :3], C, D, bias, 3, 5)


def test_float32_exp_and_softplus_helpers():
    """The vectorisable float32 polynomials against float64 library values."""
    import numpy as np

    from s4fusion.ops import cpu_scan

    x = np.linspace(-87.3, 88.7, 20001).astype(np.float32)
    exp = np.array([cpu_scan._expf(v) for v in x], dtype=np.float64)
    assert np.max(np.abs(exp / np.exp(x.astype(np.float64)) - 1)) < 1.2e-7  # 1 ulp
    special = [cpu_scan._expf(np.float32(v)) for v in (-100.0, 100.0, np.nan)]
    assert special[0] == 0.0 and special[1] == np.inf and np.isnan(special[2])
    # the decay factors' variant: bitwise _expf wherever x <= 0 (and NaN)
    x = np.concatenate([np.linspace(-90.0, 0.0, 20001), [-np.inf, -1e30, -87.33654, -1e-30, -0.0, 0.0]])
    x = x.astype(np.float32)
    decay = np.array([cpu_scan._expf_decay(v) for v in x], dtype=np.float32)
    assert np.array_equal(decay, np.array([cpu_scan._expf(v) for v in x], dtype=np.float32))
    assert np.isnan(cpu_scan._expf_decay(np.float32(np.nan)))
    # the kernels' choice by the marker's dtype: only the general one overflows to inf
    from numba import njit

    state_exp = njit(lambda x, exps: cpu_scan._state_exp(x, exps))
    big, small = np.float32(100.0), np.float32(-3.0)
    assert state_exp(big, cpu_scan._EXPS_ANY) == np.inf and state_exp(big, cpu_scan._EXPS_DECAY) != np.inf
    assert state_exp(small, cpu_scan._EXPS_DECAY) == state_exp(small, cpu_scan._EXPS_ANY) == cpu_scan._expf(small)
    assert state_exp(-3.0, cpu_scan._EXPS_DECAY) == np.exp(-3.0)  # float64: libm
    x = np.linspace(-80.0, 30.0, 20001).astype(np.float32)
    sp = np.array([cpu_scan._softplusf(v) for v in x], dtype=np.float64)
    ref = torch.nn.functional.softplus(torch.from_numpy(x).double()).numpy()
    assert np.max(np.abs(sp / ref - 1)) < 3.6e-7  # 3 ulp


def test_golden_selective_scan_unit(cross_scan_cpu, golden_dir):
    """The golden stand-alone selective scan (2 B/C groups of 4 channels, 33 steps,
    float64) is one row-major direction (K = 1) over a 1 x 33 map per group."""
    t = load_file(str(golden_dir / "scan_unit.safetensors"))
    u, delta, A, B, C, D, bias, expected = (t[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias", "out"))
    b, ch, T = u.shape
    groups = B.shape[1]
    per = ch // groups
    for g in range(groups):
        c = slice(g * per, (g + 1) * per)
        out = cross_scan_cpu(
            u[:, None, c], delta[:, None, None, c], A[c], B[:, None, g : g + 1], C[:, None, g : g + 1], D[c], bias[c], 1, T
        )
        assert rel(out[:, 0], expected[:, c]) < 1e-13


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_whole_network_reproduces_golden_output(released_path, golden_inputs, golden_expected, dtype, tol):
    model = S4Fusion.from_released_checkpoint(released_path).to(dtype).eval()
    set_backend("cpu")
    with torch.no_grad():
        fused = model(golden_inputs["infrared"].to(dtype), golden_inputs["visible"].to(dtype))
    assert fused.dtype == dtype
    assert rel(fused, golden_expected["fused"]) < tol


def test_auto_picks_the_cpu_backend_on_the_cpu():
    assert resolve_backend(torch.device("cpu")) == "cpu"
    assert ops.available_backends("cpu")[0] == "cpu"


def test_cross_scan_dispatches_to_it(cross_scan_cpu):
    inputs = make_inputs(1, 2, 8, 4, 3, 5, torch.float32, seed=8)
    assert torch.equal(cross_scan(*inputs, 3, 5, backend="cpu"), cross_scan_cpu(*inputs, 3, 5))


def test_missing_numba_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    assert resolve_backend(torch.device("cpu")) == "reference"
    with pytest.raises(BackendUnavailableError, match=r"'cpu' is not available: numba is not installed\. pip install numba"):
        resolve_backend(torch.device("cpu"), "cpu")
