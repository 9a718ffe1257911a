"""The scan dispatcher: backend choice, forcing, and errors that say what to do."""

from __future__ import annotations

import pytest
import torch

from s4fusion import ops
from s4fusion.ops import BackendUnavailableError, cross_scan, cross_scan_ref, resolve_backend, set_backend
from s4fusion.ops.grad_buffers import completable, sibling_gradients


@pytest.fixture(autouse=True)
def reset():
    yield
    set_backend(None)


def _inputs(M=2, d=3, N=4, H=3, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, K = H * W, 4
    return (
        torch.randn(1, M, d, L, generator=g),
        torch.randn(1, M, K, d, L, generator=g),
        -torch.rand(K * d, N, generator=g) - 0.5,
        torch.randn(1, M, K, N, L, generator=g),
        torch.randn(1, M, K, N, L, generator=g),
        torch.randn(K * d, generator=g),
        torch.randn(K * d, generator=g),
        H,
        W,
    )


def test_reference_is_always_available():
    assert "reference" in ops.available_backends("cpu")
    args = _inputs()
    torch.testing.assert_close(cross_scan(*args, backend="reference"), cross_scan_ref(*args))


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendUnavailableError, match=r"unknown scan backend 'fastest'.*reference"):
        set_backend("fastest")


def test_forced_backend_on_the_wrong_device_says_what_to_use():
    with pytest.raises(BackendUnavailableError, match=r"'reference' runs on|not on 'meta'"):
        resolve_backend(torch.device("meta"), "reference")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("S4FUSION_SCAN_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("S4FUSION_SCAN_BACKEND", "nope")
    with pytest.raises(BackendUnavailableError, match="unknown scan backend 'nope'"):
        cross_scan(*_inputs())


def test_missing_backend_says_how_to_get_it():
    ops.register_backend(
        "test-missing", lambda: None, devices=("cpu",), probe=lambda: "library xyz is not installed",
        priority=-1, how_to_get="pip install xyz",
    )  # fmt: skip
    try:
        message = r"not available: library xyz is not installed\. pip install xyz"
        with pytest.raises(BackendUnavailableError, match=message):
            cross_scan(*_inputs(), backend="test-missing")
        assert "test-missing" not in ops.available_backends()
    finally:
        ops._BACKENDS.pop("test-missing")


def test_reference_scan_of_one_token_is_the_closed_form():
    """With one position, each direction sees one step: y = C.(delta*u*B) + D*u with
    delta = softplus(raw + bias); the four directions add up."""
    u, delta, A, B, C, D, bias, _, _ = _inputs(M=1, H=1, W=1)
    y = cross_scan_ref(u, delta, A, B, C, D, bias, 1, 1)
    d = u.shape[2]
    expected = torch.zeros_like(u)
    for k in range(4):
        dt = torch.nn.functional.softplus(delta[0, 0, k, :, 0] + bias[k * d : (k + 1) * d])
        bc = (B[0, 0, k, :, 0] * C[0, 0, k, :, 0]).sum()
        expected[0, 0, :, 0] += dt * u[0, 0, :, 0] * bc + D[k * d : (k + 1) * d] * u[0, 0, :, 0]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dt_rank,d_state", [(3, 12), (6, 12), (6, 18), (1, 1), (2, 8)])
@pytest.mark.parametrize("used", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_split_projection_is_the_slices_and_their_gradient(dt_rank, d_state, used):
    """The views of ``ops.split_projection`` are P's rows of ``ops.projection_rows``, and
    its one-concatenation backward gives exactly autograd's gradient of the slices, also
    where some of the three views get no gradient (their rows then read 0)."""
    rows, ob, oc, ol = ops.projection_rows(dt_rank, d_state)
    torch.manual_seed(0)
    P = torch.randn(2, 1, 5, 4, rows, dtype=torch.float64, requires_grad=True)
    views = ops.split_projection(P, dt_rank, d_state)
    slices = (P[..., ol : ol + dt_rank], P[..., ob : ob + d_state], P[..., oc : oc + d_state])
    for v, s in zip(views, slices):
        assert v.shape == s.shape and torch.equal(v, s)
    weights = [torch.randn_like(s) for s in slices]
    got = torch.autograd.grad(sum((v * w).sum() for v, w, u in zip(views, weights, used) if u), P)[0]
    want = torch.autograd.grad(sum((s * w).sum() for s, w, u in zip(slices, weights, used) if u), P)[0]
    assert torch.equal(got, want)
    assert got.is_contiguous()


def test_split_projection_checks_the_rows():
    with pytest.raises(ValueError, match="rows"):
        ops.split_projection(torch.zeros(1, 1, 2, 4, 30), 3, 12)  # projection_rows(3, 12) has 32


def _scan_views(P, dt_rank, d_state):
    """The low-rank delta, and B and C as ``SS2D.project`` hands them to the scan: (b, M, K, N, L)."""
    low, B, C = ops.split_projection(P, dt_rank, d_state)
    return low, B.permute(0, 1, 3, 4, 2), C.permute(0, 1, 3, 4, 2)


class _SiblingScan(torch.autograd.Function):
    """Stands in for a scan backend that writes dL/dB and dL/dC with grad_buffers (the
    triton one; this runs on the CPU): its backward returns the given gradients, written
    into sibling buffers when ``shared``."""

    @staticmethod
    def forward(ctx, low, B, C, grads, shared):
        ctx.grads, ctx.shared, ctx.like = grads, shared, (B, C)
        return low.sum() + B.sum() + C.sum()

    @staticmethod
    def backward(ctx, _):
        g_low, g_B, g_C = ctx.grads
        if not ctx.shared:
            return g_low, g_B, g_C, None, None
        out_B, out_C = sibling_gradients(*ctx.like)
        out_B.copy_(g_B)
        out_C.copy_(g_C)
        return g_low, out_B, out_C, None, None


@pytest.mark.parametrize("dt_rank,d_state", [(3, 12), (6, 18), (1, 4)])
def test_projection_gradient_is_completed_in_the_scans_buffer(dt_rank, d_state):
    """Where the scan writes dL/dB and dL/dC into sibling buffers (grad_buffers), dL/dP is that
    buffer completed in place (no new tensor), and equals exactly the concatenation's."""
    rows = ops.projection_rows(dt_rank, d_state)[0]
    torch.manual_seed(0)
    P = torch.randn(2, 1, 7, 4, rows, dtype=torch.bfloat16, requires_grad=True)
    low, B, C = _scan_views(P, dt_rank, d_state)
    grads = tuple(torch.randn_like(t) for t in (low, B, C))
    for g_low in (grads[0], None):  # (a low-rank delta without gradient: its rows are zeros)
        given = (g_low, *grads[1:])
        got, want = (
            torch.autograd.grad(_SiblingScan.apply(low, B, C, given, shared), P)[0] for shared in (True, False)
        )
        assert torch.equal(got, want)
        assert got._base is not None and completable(got) is got._base  # (the scan's buffer, completed)
        assert want._base is None or completable(want) is None


def test_sibling_gradients_only_for_disjoint_views_of_one_storage():
    rows = ops.projection_rows(3, 12)[0]
    P = torch.randn(2, 1, 5, 4, rows, dtype=torch.bfloat16)
    _, B, C = _scan_views(P, 3, 12)
    out_B, out_C = sibling_gradients(B, C)
    assert (out_B.stride(), out_B.storage_offset()) == (B.stride(), B.storage_offset())
    assert (out_C.stride(), out_C.storage_offset()) == (C.stride(), C.storage_offset())
    out_B.fill_(1.0)
    out_C.fill_(2.0)
    assert (out_B == 1).all() and (out_C == 2).all()  # disjoint
    assert completable(out_B.permute(0, 1, 4, 2, 3), out_C) is out_B._base
    assert completable(out_B, torch.zeros_like(out_C)) is None
    assert completable(P[..., :12], P[..., 16:28]) is None  # views of a tensor made elsewhere: never written
    overlapping = C.as_strided(C.shape, C.stride(), B.storage_offset() + 1)
    assert sibling_gradients(B, overlapping) is None and sibling_gradients(B, B) is None
    repeats = B[..., :1].expand(B.shape)  # (stride 0: the gradient must not be a view of it)
    assert sibling_gradients(repeats, C[..., :1].expand(C.shape)) is None
    assert sibling_gradients(B, C.contiguous()) is None  # (another storage)
    wide = torch.randn(2, 1, 5, 4, 4 * rows, dtype=torch.bfloat16)  # B and C a small part of their storage
    assert sibling_gradients(wide[..., :12], wide[..., 16:28]) is None
    assert sibling_gradients(B.float(), C.float()) is None  # (copies: two storages)
