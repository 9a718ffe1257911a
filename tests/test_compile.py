"""torch.compile of S4Fusion: every scan is a graph break (an opaque call of the scan
backend) and the compiled network equals the eager one, fusing and training.

CPU inductor compiles each graph with a C++ compiler (about 1.5 s a graph, cold
cache): the default and paper networks are compiled with ``aot_eager`` (dynamo's
graph capture and graph breaks, AOTAutograd's forward and backward graphs, no code
generation), and inductor itself (:func:`s4fusion.api.compiled`, what
``fuse_images(compile=True)`` runs) on a one-scale network. The GPU test compiles
the default network with inductor and the triton scan backend.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from s4fusion import S4Fusion, S4FusionConfig, api, ops
from s4fusion.losses import weighted_l1_loss
from s4fusion.ops import set_backend

HEIGHT, WIDTH = 37, 49  # sides of the 12k+1 form: no padding
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
ONE_SCALE = dict(dims=(8,), depths=(1,), decoder_depths=(1,), cmsa_depth=1, topology="paper")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")


@pytest.fixture(scope="module", autouse=True)
def dynamo():
    """Dynamo's caches are emptied before and after this module, and hitting its
    recompile limit (torch's fallback to eager, with a mere warning) fails a test."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches and counters; the forced scan backend is restored after."""
    torch._dynamo.reset()
    counters.clear()
    yield
    set_backend(None)


@pytest.fixture
def scan_backend():
    """Restores the forced scan backend after the test."""
    yield
    set_backend(None)


def pair(batch: int = 1, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ir, vi = torch.rand(2, batch, 1, HEIGHT, WIDTH, generator=g)
    return ir.to(device), vi.to(device)


def network(seed: int = 0, **config) -> S4Fusion:
    torch.manual_seed(seed)
    return S4Fusion(S4FusionConfig(**config))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(params=["prepared", "unprepared"])
def scan_wrapping(request, monkeypatch):
    """The scan calls wrapped in ``torch.compiler.disable`` before tracing
    (:func:`s4fusion.ops.prepare_for_compile`, what :func:`s4fusion.api.compiled` does)
    or while tracing (a plain ``torch.compile``). Dynamo's caches are emptied first:
    compiled code guards on the wrapped calls."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(ops, "_opaque", {})
    if request.param == "prepared":
        ops.prepare_for_compile()
    return request.param


def assert_breaks_only_at_scans(wrapping: str = "prepared") -> None:
    """Dynamo compiled graphs, and its graph breaks were the calls of the wrapped scans
    only (the dispatcher's ``torch.compiler.disable``, the package's only one; the
    reason names the wrapped function). Wrapped while tracing, each scan call also
    breaks the graph at the ``torch.compiler.disable`` call itself: dynamo's reason
    names that call in torch 2.14, and in torch 2.11 says that the function
    ``disable`` is marked as skipped."""
    assert counters["stats"]["unique_graphs"] > 1
    reasons = list(counters["graph_break"])
    at_scan = ["torch.compiler.disable" in r and "_cross_scan" in r for r in reasons]
    if wrapping == "unprepared":
        at_call = ["torch.compiler.disable" in r or ("marked as skipped" in r and "disable" in r) for r in reasons]
        assert not all(at_scan), "no break at the disable call: were the scans wrapped before tracing?"
        at_scan = [a or b for a, b in zip(at_scan, at_call)]
    assert reasons and all(at_scan), reasons


@pytest.mark.parametrize("topology", ["released", "paper"])
def test_compiled_forward_equals_eager_with_cpu_and_reference_scans(scan_backend, scan_wrapping, topology):
    """One compilation serves both backends: the backend is chosen at every scan call.
    (The paper network reuses most of the released one's graphs: the same shapes.)"""
    model = network(topology=topology).eval()
    net = torch.compile(model, backend="aot_eager", dynamic=False)
    ir, vi = pair()
    graphs = None
    with torch.no_grad():
        for backend in ("cpu", "reference"):
            set_backend(backend)
            expected = model(ir, vi)
            assert max_diff(net(ir, vi), expected) <= FWD_TOL, backend
            if graphs is None:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "switching the scan backend recompiled"
    assert_breaks_only_at_scans(scan_wrapping)


def train_step_grads(net, model: S4Fusion, ir: torch.Tensor, vi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter gradients of one step of the intensity loss, then one AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt.zero_grad(set_to_none=True)
    w = torch.full((ir.shape[0],), 0.5, device=ir.device)
    weighted_l1_loss(net(ir, vi), ir, vi, w, w).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return grads


def test_compiled_training_step_gradients_equal_eager(fresh_dynamo, scan_wrapping):
    set_backend("cpu")
    ir, vi = pair(batch=2)
    eager_model = network().train()
    compiled_model = copy.deepcopy(eager_model)
    expected = train_step_grads(eager_model, eager_model, ir, vi)
    net = torch.compile(compiled_model, backend="aot_eager", dynamic=False)
    got = train_step_grads(net, compiled_model, ir, vi)
    assert got.keys() == expected.keys() and len(got) > 200  # the released topology's finest CMSA gets none
    for name, g in expected.items():
        assert max_diff(got[name], g) <= GRAD_TOL * max(1.0, g.abs().max().item()), name
    assert_breaks_only_at_scans(scan_wrapping)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):  # the AdamW step, from equal grads
        assert max_diff(a, b) <= 1e-6


# ------------------------------------------------- inductor, through the fusing API


@pytest.fixture(scope="module")
def one_scale() -> S4Fusion:
    return network(**ONE_SCALE).eval()


@pytest.fixture(scope="module")
def images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    irs = [rng.random((HEIGHT, WIDTH), dtype=np.float32) for _ in range(2)]
    vis = [rng.random((HEIGHT, WIDTH, 3), dtype=np.float32) for _ in range(2)]
    return irs, vis


@pytest.fixture(scope="module")
def fused_compiled(one_scale, images):
    """fuse_images(compile=True) (inductor) on two pairs of one size, then the
    number of graphs dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    set_backend("cpu")
    try:
        out = api.fuse_images(*images, one_scale, tile=0, compile=True)
    finally:
        set_backend(None)
    return out, counters["stats"]["unique_graphs"]


def test_fuse_images_compiled_equals_eager(one_scale, images, fused_compiled):
    out, graphs = fused_compiled
    assert graphs > 1 and all("torch.compiler.disable" in r for r in counters["graph_break"])
    expected = api.fuse_images(*images, one_scale, tile=0)
    for a, b in zip(out, expected):
        assert a.shape == b.shape == (HEIGHT, WIDTH, 3) and np.abs(a - b).max() <= FWD_TOL


def test_band_wise_runs_eager_and_leaves_the_compiled_model_intact(one_scale, images, fused_compiled):
    """compile applies to whole-image passes only: a band-wise pass with compile=True
    compiles nothing and equals the eager band-wise pass; the whole-image pass after
    it reuses the compiled code."""
    _, graphs = fused_compiled
    ir = torch.from_numpy(np.stack(images[0]))[:, None]
    vi = torch.from_numpy(np.stack([v.mean(-1) for v in images[1]]))[:, None]
    set_backend("cpu")
    try:
        banded = api.fuse_luma(one_scale, ir, vi, tile=13, compile=True)
        assert counters["stats"]["unique_graphs"] == graphs, "a band-wise pass was compiled"
        assert torch.equal(banded, api.fuse_luma(one_scale, ir, vi, tile=13))
        whole = api.fuse_luma(one_scale, ir, vi, tile=0, compile=True)
        assert counters["stats"]["unique_graphs"] == graphs, "the whole-image pass recompiled"
        assert max_diff(whole, api.fuse_luma(one_scale, ir, vi, tile=0)) <= FWD_TOL
        assert max_diff(whole, banded) <= FWD_TOL
    finally:
        set_backend(None)


def test_compiled_model_is_kept_on_the_model_and_not_copied(one_scale, fused_compiled):
    forward = api.compiled(one_scale)
    # the scan calls were wrapped before tracing (dynamo breaks the graph at a
    # torch.compiler.disable call made while tracing)
    assert set(ops._opaque) == {"scan", "state"}
    assert api.compiled(one_scale) is forward
    copied = copy.deepcopy(one_scale)
    assert api.compiled(copied) is not forward
    restored = pickle.loads(pickle.dumps(one_scale))
    assert api.compiled(restored) is not forward
    assert set(one_scale.state_dict()) == set(restored.state_dict())


def test_failed_compilation_says_to_fuse_without_compile(monkeypatch, one_scale):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*args):
        raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(api, "compiled", lambda model: broken)
    with pytest.raises(api.FusionError, match=r"(?s)batch of 1 49x37 .*no C\+\+ compiler.*compile=False"):
        api.fuse_luma(one_scale, *pair(), tile=0, compile=True)


def test_cli_compile_flag_reaches_the_fusing_call(monkeypatch, tmp_path, one_scale, capsys):
    """``s4fusion fuse --compile`` runs fuse_prepared with compile=True (here recorded,
    and run uncompiled: the API's compile path is tested above)."""
    from s4fusion.cli import fuse as fuse_cli
    from s4fusion.cli import main

    weights = tmp_path / "one_scale.safetensors"
    one_scale.save_pretrained(weights)
    seen = []

    def recording(model, pairs, **options):
        seen.append(options["compile"])
        return api.fuse_prepared(model, pairs, **{**options, "compile": False})

    monkeypatch.setattr(fuse_cli, "fuse_prepared", recording)
    for flags, expected in (([], False), (["--compile"], True)):
        out = tmp_path / f"fused{len(seen)}.png"
        assert main(["fuse", "--example", "--out", str(out), "--weights", str(weights), *flags]) == 0
        assert out.is_file() and seen[-1] is expected
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    assert "--compile" in capsys.readouterr().out


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.slow  # 3.5 min on an H200: inductor compiles the forward, then forward and backward
@needs_cuda
def test_compiled_network_with_triton_scans_equals_eager_on_gpu(fresh_dynamo):
    pytest.importorskip("triton", reason="the triton scan backend needs the triton package")
    set_backend("triton")
    model = network().cuda().eval()
    ir, vi = pair(device="cuda")
    with torch.no_grad():
        assert max_diff(api.compiled(model)(ir, vi), model(ir, vi)) <= FWD_TOL
    assert_breaks_only_at_scans()

    model.train()
    eager_model = copy.deepcopy(model)
    ir, vi = pair(batch=2, device="cuda", seed=1)
    expected = train_step_grads(eager_model, eager_model, ir, vi)
    got = train_step_grads(api.compiled(model), model, ir, vi)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert max_diff(got[name], g) <= GRAD_TOL * max(1.0, g.abs().max().item()), name
