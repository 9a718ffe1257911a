"""Helpers shared by the backend tests: test_scan_cpu and test_scan_state; the Triton
LayerNorm's, up-projection's and bias + SiLU's (:func:`errors_against_float64`,
:func:`assert_errors_within`); the up-projection's and bias + SiLU's
(:func:`bf16_network_with_and_without`); the Triton scan's (:func:`projection_views`,
:func:`equal_and_error_of_scans`); the scan of the low-rank delta's and the
up-projection's (:func:`composed_lowrank_scan`)."""

from __future__ import annotations

import torch

from s4fusion.ops import cross_scan_ref, projection_rows

# relative error (Frobenius norm) allowed against the reference, by dtype
FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| (Frobenius), in float64."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def errors_against_float64(fn, ref_fn, inputs, gout):
    """``fn(*inputs)`` and its gradients for ``gout`` against ``ref_fn`` on float64
    copies of the inputs (``gout`` in float64). Returns (out, grads, the relative errors
    of [out, *grads])."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, gout.to(out.dtype))
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, gout.double())
    return out, grads, [rel(a, r) for a, r in zip([out, *grads], [ref, *ref_grads])]


def assert_errors_within(errors: list[float], tolerances: tuple[float, float]) -> None:
    """The relative errors of [out, *grads] (:func:`errors_against_float64`) are below
    (the output's tolerance, every gradient's tolerance)."""
    tol_out, tol_grad = tolerances
    assert errors[0] < tol_out, errors
    assert max(errors[1:]) < tol_grad, errors


def make_inputs(b, M, d, N, H, W, dtype=torch.float64, seed=0, K=4):
    """Random scan inputs with a mix of short and long memory: softplus(delta +
    bias) spans about 0.02 .. 3, A about -0.4 .. -3."""
    g = torch.Generator().manual_seed(seed)
    L = H * W
    return [
        torch.randn(b, M, d, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, M, K, d, L, generator=g, dtype=torch.float64).to(dtype),
        (-torch.exp(0.5 * torch.randn(K * d, N, generator=g, dtype=torch.float64))).to(dtype),
        torch.randn(b, M, K, N, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, M, K, N, L, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(K * d, generator=g, dtype=torch.float64).to(dtype),
        (2 * torch.randn(K * d, generator=g, dtype=torch.float64) - 1).to(dtype),
    ]


def bf16_network_with_and_without(monkeypatch, kind: str, reference, device: str = "cuda", backend: str = "triton"):
    """The default network (seeded) fusing a 61x50 pair on ``device``: in float32, under bf16
    autocast with ``backend``'s op of this ``kind`` (``proj``, ``bias_silu``), and under
    bf16 autocast with ``reference`` in its place. Returns the three outputs in float32.
    Each bf16 pass must call the op it compares (a pass that never reached it would compare
    nothing)."""
    from s4fusion import S4Fusion, ops

    def counted(fn, calls: list):
        def run(*args, **kwargs):
            calls.append(fn)
            return fn(*args, **kwargs)

        return run

    torch.manual_seed(0)
    model = S4Fusion().to(device).eval()
    ir, vi = torch.rand(1, 1, 61, 50, device=device), torch.rand(1, 1, 61, 50, device=device)
    own, replacement = [], []
    with torch.no_grad():
        exact = model(ir, vi)
        with torch.autocast(device, dtype=torch.bfloat16):
            monkeypatch.setitem(ops._loaded, (backend, kind), counted(ops._load(backend, kind), own))
            kernel = model(ir, vi).float()
            monkeypatch.setitem(ops._loaded, (backend, kind), counted(reference, replacement))
            replaced = model(ir, vi).float()
    assert own and replacement, f"the network did not call the {kind!r} op in both passes"
    return exact, kernel, replaced


def composed_lowrank_scan(u, low, dt_weight, A, B, C, D, delta_bias, height, width, out_dtype=None):
    """``ops.cross_scan_lowrank`` as the up-projection op, then the scan op (what the
    Triton backend runs where gradients are wanted), each the dispatcher's."""
    from s4fusion import ops

    out = ops.cross_scan(u, ops.dt_project(low, dt_weight), A, B, C, D, delta_bias, height, width)
    return out.to(out_dtype or u.dtype)


def projection_views(B: torch.Tensor, C: torch.Tensor, dt_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C (b, M, K, N, L) copied into a token-major projection laid out as the
    network's (``ops.projection_rows``), returned as its views."""
    b, M, K, N, L = B.shape
    rows, ob, oc, _ = projection_rows(dt_rank, N)
    P = torch.zeros(b, M, L, K, rows, dtype=B.dtype, device=B.device)
    P[..., ob : ob + N] = B.permute(0, 1, 4, 2, 3)
    P[..., oc : oc + N] = C.permute(0, 1, 4, 2, 3)
    return P[..., ob : ob + N].permute(0, 1, 3, 4, 2), P[..., oc : oc + N].permute(0, 1, 3, 4, 2)


def equal_and_error_of_scans(results: list[list[torch.Tensor]], x: list[torch.Tensor], gout: torch.Tensor, H: int,
                             W: int) -> float:  # fmt: skip
    """Two runs' results of one scan (output and the gradients of the inputs ``x`` for
    ``gout``), which must be equal bit for bit; returns the first's largest relative
    error against the float64 reference, scaled by 1e-3 for half-precision inputs (their
    outputs are off by about 1e-3)."""
    for a, e in zip(*results):
        assert torch.equal(a, e), (x[0].dtype, (a - e).abs().max())
    xr = [t.detach().double().requires_grad_() for t in x]
    ref = cross_scan_ref(*xr, H, W)
    refs = [ref, *torch.autograd.grad(ref, xr, gout.double())]
    scale = 1.0 if x[0].dtype == torch.float32 else 1e-3
    return max(scale * rel(a, r) for a, r in zip(results[0], refs))
