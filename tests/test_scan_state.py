"""The state op (one scan direction from a given state, returning the final state):
the reference against ``cross_scan_ref``, strip-wise scans with the state carried
across strips against the whole map, the numba backend against the reference,
the refusal of gradients, shape errors and the dispatcher."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import cross_scan_ref, cross_scan_state, cross_scan_state_ref, resolve_backend
from scan_helpers import FWD_TOL, make_inputs, rel

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")

pytestmark = pytest.mark.usefixtures("single_threaded_scan")


def direction_args(inputs, k):
    """(u, delta, A, B, C, delta_bias) of direction k out of cross_scan inputs."""
    u, delta, A, B, C, _, bias = inputs
    d = u.shape[2]
    return u, delta[:, :, k], A[k * d : (k + 1) * d], B[:, :, k], C[:, :, k], bias[k * d : (k + 1) * d]


def state_inputs(b, M, d, N, H, W, dtype, seed):
    """One direction's inputs and a nonzero h0 (float32 unless float64)."""
    inputs = make_inputs(b, M, d, N, H, W, dtype, seed=seed, K=1)
    h0 = torch.randn(b, d, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return direction_args(inputs, 0), h0


@pytest.mark.parametrize("M", [1, 2])
def test_four_directions_from_zero_plus_skip_are_cross_scan_ref(M):
    H, W, d, N = 5, 7, 3, 4
    inputs = make_inputs(2, M, d, N, H, W, seed=M)
    u, D = inputs[0], inputs[5]
    total = D.view(4, d).sum(0).view(1, 1, d, 1) * u
    for k in range(4):
        y, h_last = cross_scan_state_ref(*direction_args(inputs, k), H, W, k, torch.zeros(2, d, N))
        assert y.dtype == torch.float64 and h_last.dtype == torch.float64 and h_last.shape == (2, d, N)
        total = total + y
    torch.testing.assert_close(total, cross_scan_ref(*inputs, H, W), rtol=0, atol=1e-12)


def strips(size: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, size)) for i in range(0, size, step)]


def scan_in_strips(fn, args, H, W, k, h0, step):
    """Directions 0/2: bands of ``step`` rows, top to bottom / bottom to top;
    1/3: bands of ``step`` columns, left to right / right to left; each strip
    starts from the previous strip's final state."""
    u, delta, A, B, C, bias = args
    rows = k in (0, 2)
    bands = strips(H if rows else W, step)
    if k >= 2:
        bands.reverse()
    y = torch.empty_like(u)
    y_map = y.view(*u.shape[:3], H, W)
    h = h0
    for lo, hi in bands:

        def cut(x: torch.Tensor) -> torch.Tensor:  # (..., L) -> the strip's row-major positions
            x = x.reshape(*x.shape[:-1], H, W)
            x = x[..., lo:hi, :] if rows else x[..., lo:hi]
            return x.reshape(*x.shape[:-2], -1)

        sh, sw = (hi - lo, W) if rows else (H, hi - lo)
        ys, h = fn(cut(u), cut(delta), A, cut(B), cut(C), bias, sh, sw, k, h)
        ys = ys.view(*u.shape[:3], sh, sw)
        if rows:
            y_map[..., lo:hi, :] = ys
        else:
            y_map[..., lo:hi] = ys
    return y, h


def check_strips(fn, dtype, M, k, H, W, step, seed):
    args, h0 = state_inputs(2, M, 6, 4, H, W, dtype, seed)
    y, h_last = fn(*args, H, W, k, h0)
    ys, hs = scan_in_strips(fn, args, H, W, k, h0, step)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(ys, y, rtol=tol, atol=tol)
    torch.testing.assert_close(hs, h_last, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("k", range(4))
def test_reference_in_strips_reproduces_the_whole_map(dtype, M, k):
    """7 x 9 map in strips of 3 rows / 4 columns: the last strip is ragged."""
    check_strips(cross_scan_state_ref, dtype, M, k, 7, 9, step=3 if k in (0, 2) else 4, seed=10 * k + M)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("k", range(4))
def test_cpu_backend_in_strips_reproduces_the_whole_map(dtype, M, k):
    """11 x 13 map: strips of 5 rows / 6 columns (ragged last strip, chunks of 64
    positions cut across strip boundaries)."""
    from s4fusion.ops.cpu_scan import cross_scan_state_cpu

    check_strips(cross_scan_state_cpu, dtype, M, k, 11, 13, step=5 if k in (0, 2) else 6, seed=20 * k + M)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("H,W", [(7, 9), (9, 17)])
def test_cpu_backend_matches_reference(dtype, M, H, W):
    """d = 19 (not a multiple of the 8 SIMD lanes), 9 x 17 = 153 positions spans
    three chunks; every direction from a nonzero state."""
    from s4fusion.ops.cpu_scan import cross_scan_state_cpu

    args, h0 = state_inputs(2, M, 19, 5, H, W, dtype, seed=H * 10 + M)
    for k in range(4):
        y, h = cross_scan_state_cpu(*args, H, W, k, h0)
        y_ref, h_ref = cross_scan_state_ref(*args, H, W, k, h0)
        assert y.dtype == dtype and h.dtype == dtype and h.shape == h_ref.shape
        assert rel(y, y_ref) < FWD_TOL[dtype], f"direction {k}: y rel. error {rel(y, y_ref):.2e}"
        assert rel(h, h_ref) < FWD_TOL[dtype], f"direction {k}: h_last rel. error {rel(h, h_ref):.2e}"


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_half_precision_inputs_compute_in_float32(dtype):
    """bf16/fp16 inputs (h0 too): float32 state, y in the input dtype, close to the
    reference evaluated in float32 on the same (rounded) values."""
    from s4fusion.ops.cpu_scan import cross_scan_state_cpu

    H, W = 5, 7
    args, h0 = state_inputs(1, 2, 16, 6, H, W, dtype, seed=3)
    h0 = h0.to(dtype)
    for k in range(4):
        y, h = cross_scan_state_cpu(*args, H, W, k, h0)
        y_ref, h_ref = cross_scan_state_ref(*[x.float() for x in args], H, W, k, h0.float())
        assert y.dtype == dtype and h.dtype == torch.float32
        assert rel(y, y_ref) < FWD_TOL[dtype] and rel(h, h_ref) < FWD_TOL[dtype]


@needs_numba
def test_cpu_backend_threads_and_mixed_dtypes():
    """Results do not depend on the thread count; float32 activations with float64
    parameters and state are computed in float32."""
    from s4fusion.ops.cpu_scan import cross_scan_state_cpu

    H, W = 6, 13
    args, h0 = state_inputs(1, 2, 40, 5, H, W, torch.float32, seed=6)
    u, delta, A, B, C, bias = args
    y1, h1 = cross_scan_state_cpu(u, delta, A.double(), B, C, bias.double(), H, W, 1, h0)
    torch.set_num_threads(8)
    y8, h8 = cross_scan_state_cpu(*args, H, W, 1, h0)
    assert torch.equal(y1, y8) and torch.equal(h1, h8) and h1.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_numba)])
def test_gradients_are_refused(backend):
    args, h0 = state_inputs(1, 1, 8, 4, 3, 5, torch.float32, seed=0)
    u = args[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"inference-only \(it has no backward\), but inputs require grad \(u\)"):
        cross_scan_state(*args, 3, 5, 0, h0, backend=backend)
    with torch.no_grad():
        y, h = cross_scan_state(*args, 3, 5, 0, h0, backend=backend)
    assert not y.requires_grad and not h.requires_grad
    assert u.requires_grad


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_numba)])
def test_bad_arguments_are_reported(backend):
    (u, delta, A, B, C, bias), h0 = state_inputs(1, 2, 8, 4, 3, 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"h0 must be \(b, d, N\) = \(1, 8, 4\), got \(1, 4, 8\)"):
        cross_scan_state(u, delta, A, B, C, bias, 3, 5, 0, h0.transpose(1, 2), backend=backend)
    with pytest.raises(ValueError, match=r"B must be \(b, M, N, L\) = \(1, 2, 4, 15\), got \(1, 2, 3, 15\)"):
        cross_scan_state(u, delta, A, B[:, :, :3], C, bias, 3, 5, 0, h0, backend=backend)
    with pytest.raises(ValueError, match=r"height\*width = 4\*4 = 16 does not match L = 15"):
        cross_scan_state(u, delta, A, B, C, bias, 4, 4, 0, h0, backend=backend)
    with pytest.raises(ValueError, match=r"direction must be 0..3, got 4"):
        cross_scan_state(u, delta, A, B, C, bias, 3, 5, 4, h0, backend=backend)


@needs_numba
def test_dispatch_picks_the_cpu_state_op():
    from s4fusion.ops.cpu_scan import cross_scan_state_cpu

    assert resolve_backend(torch.device("cpu")) == "cpu"
    args, h0 = state_inputs(1, 2, 8, 4, 3, 5, torch.float32, seed=8)
    out, expected = cross_scan_state(*args, 3, 5, 2, h0), cross_scan_state_cpu(*args, 3, 5, 2, h0)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_backend_without_state_op_falls_back_to_the_fastest_state_op(monkeypatch):
    """Like triton: registered without a state op, chosen automatically or forced:
    the fastest state op that can run here takes over (the numba one if installed)."""
    monkeypatch.setattr(ops, "_BACKENDS", dict(ops._BACKENDS))
    ops.register_backend("test-nostate", lambda: None, devices=("cpu",), probe=lambda: None, priority=100)
    fallback = "cpu" if "cpu" in ops.available_backends("cpu") else "reference"
    args, h0 = state_inputs(1, 2, 8, 4, 3, 5, torch.float64, seed=9)
    expected = cross_scan_state_ref(*args, 3, 5, 3, h0)
    for backend in ("test-nostate", None):
        assert resolve_backend(torch.device("cpu"), backend) == "test-nostate"
        assert ops.resolve_state_backend(torch.device("cpu"), backend) == fallback
        y, h = cross_scan_state(*args, 3, 5, 3, h0, backend=backend)
        assert torch.allclose(y, expected[0], atol=1e-10) and torch.allclose(h, expected[1], atol=1e-10)


def test_gpu_without_state_op_uses_the_cpu_kernel_on_host_copies(monkeypatch):
    """On a GPU whose backend has no state op (triton), band-wise inference runs the
    CPU kernel on host copies rather than the reference's launch-per-step loop."""
    monkeypatch.setattr(ops, "_BACKENDS", dict(ops._BACKENDS))
    ops.register_backend("test-gpu", lambda: None, devices=("cuda",), probe=lambda: None, priority=100)
    fallback = "cpu" if "cpu" in ops.available_backends("cpu") else "reference"
    assert ops.resolve_state_backend(torch.device("cuda"), "test-gpu") == fallback
    if not torch.cuda.is_available():
        pytest.skip("the run on a CUDA tensor needs a CUDA GPU (torch.cuda.is_available() is False)")
    args, h0 = state_inputs(1, 2, 8, 4, 3, 5, torch.float32, seed=10)
    expected = cross_scan_state_ref(*args, 3, 5, 1, h0)
    y, h = cross_scan_state(*[a.cuda() for a in args], 3, 5, 1, h0.cuda(), backend="test-gpu")
    assert y.device.type == h.device.type == "cuda"
    assert torch.allclose(y.cpu(), expected[0], atol=1e-5) and torch.allclose(h.cpu(), expected[1], atol=1e-5)
