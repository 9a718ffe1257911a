"""Branches: the network's independent chains on CUDA streams of their own."""

from __future__ import annotations

import pytest
import torch

from s4fusion import S4Fusion, api
from s4fusion.models.branches import MAIN, Branches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")


def test_branches_off_the_gpu_are_plain_calls_in_order():
    calls = []

    def f(tag, t):
        calls.append((tag, torch.cuda.is_available() and torch.cuda.current_stream()))
        return t + 1

    x = torch.zeros(3)
    branches = Branches(x, ("a", "b"), enabled=True)  # (a CPU tensor: disabled)
    assert not branches.enabled
    assert branches.on("a", f) is f  # (no wrapper: under torch.compile the calls stay as they were)
    y = branches.on("a", f)("a", x)
    z = branches.on("b", f)("b", y)
    branches.join()
    assert [c[0] for c in calls] == ["a", "b"] and torch.equal(z, torch.full((3,), 2.0))


@pytest.mark.gpu
@needs_cuda
def test_a_branch_waits_for_the_tensors_another_branch_makes():
    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()
    branches = Branches(x, ("slow", "reader"), enabled=True)

    def slow_fill(t):
        torch.cuda._sleep(200_000_000)  # (about 0.1 s of GPU cycles before the fill)
        return t.fill_(1.0)

    filled = branches.on("slow", slow_fill)(x)
    doubled = branches.on("reader", torch.mul)(filled, 2.0)
    total = branches.on(MAIN, torch.add)(doubled, filled)
    branches.join()
    assert branches.streams["slow"] != branches.streams["reader"] != torch.cuda.current_stream()
    assert torch.equal(total, torch.full_like(x, 3.0))


def _streams_of(model: S4Fusion) -> dict[str, torch.cuda.Stream]:
    seen: dict[str, torch.cuda.Stream] = {}
    for name in ("encoder_ir.0", "encoder_vi.0", "cmsa.1", "cmsa.2", "decoder.0"):
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, torch.cuda.current_stream()))
    return seen


@pytest.mark.gpu
@needs_cuda
def test_the_network_on_branch_streams_gives_the_one_stream_output():
    torch.manual_seed(0)
    model = S4Fusion().cuda().eval()
    seen = _streams_of(model)
    g = torch.Generator().manual_seed(1)
    ir, vi = (torch.rand(2, 1, 97, 131, generator=g).cuda() for _ in range(2))
    main = torch.cuda.current_stream()
    try:
        with torch.inference_mode():
            S4Fusion.branch_streams = False
            one = model(ir, vi)
            assert set(seen.values()) == {main}
            S4Fusion.branch_streams = True
            seen.clear()
            eager = model(ir, vi)
            streams = [seen[n] for n in ("encoder_ir.0", "encoder_vi.0", "cmsa.1", "cmsa.2")]
            assert len(set(streams)) == 4 and main not in streams and seen["decoder.0"] == main
            graphed = api.graphed(model)(ir, vi)
        seen.clear()
        with torch.no_grad():
            model(ir, vi)
        assert len(set(seen.values())) == 5
        seen.clear()
        model(ir, vi)  # (autograd records: one stream)
        assert set(seen.values()) == {main}
    finally:
        S4Fusion.branch_streams = True
    # the same kernels on the same inputs; the scan's float32 atomic adds make runs differ
    # in the last bits
    assert (eager - one).abs().max() < 1e-5
    assert (graphed - one).abs().max() < 1e-5
