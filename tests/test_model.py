"""Network behaviour beyond the golden set: sizes, batches, dtypes, gradients, counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion.ops import set_backend

SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)


@pytest.fixture(autouse=True)
def reference_backend():
    set_backend("reference")
    yield
    set_backend(None)


def _released_key_lines(golden_dir):
    lines = (golden_dir / "released_keys.txt").read_text().splitlines()
    return [ln.split("\t") for ln in lines if ln and not ln.startswith("#")]


@pytest.mark.parametrize(
    "side,before,after",
    [(50, 5, 6), (67, 3, 3), (229, 0, 0), (480, 0, 1), (640, 4, 5), (768, 0, 1), (1024, 4, 5), (2, 5, 6), (13, 0, 0)],
)
def test_padding_rule_matches_the_release(side, before, after):
    top, bottom, left, right = S4Fusion(SMALL).padding_for(side, side)
    assert (top, bottom) == (before, after) == (left, right)
    assert (side + before + after) % 12 == 1


def test_too_small_input_is_a_clear_error():
    model = S4Fusion(SMALL)
    with pytest.raises(ValueError, match="height 1 is too small"):
        model(torch.rand(1, 1, 1, 30), torch.rand(1, 1, 1, 30))


def test_bad_shapes_are_clear_errors():
    model = S4Fusion(SMALL)
    with pytest.raises(ValueError, match=r"same shape"):
        model(torch.rand(1, 1, 20, 30), torch.rand(1, 1, 20, 31))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 20, 30), torch.rand(1, 3, 20, 30))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 1, 20, 30, dtype=torch.uint8), torch.zeros(1, 1, 20, 30, dtype=torch.uint8))


@pytest.mark.parametrize("size", [(17, 29), (30, 14), (25, 25), (2, 40)])
def test_odd_and_non_square_sizes_pad_and_crop(size):
    torch.manual_seed(0)
    model = S4Fusion(SMALL).eval()
    ir, vi = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    with torch.no_grad():
        out = model(ir, vi)
        top, bottom, left, right = model.padding_for(*size)
        full = model.forward_padded(F.pad(ir, (left, right, top, bottom)), F.pad(vi, (left, right, top, bottom)))
    assert out.shape == (1, 1, *size)
    assert torch.equal(out, full[:, :, top : top + size[0], left : left + size[1]])


def test_batch_equals_single_images():
    torch.manual_seed(1)
    model = S4Fusion(SMALL).eval()
    ir, vi = torch.rand(3, 1, 22, 27), torch.rand(3, 1, 22, 27)
    with torch.no_grad():
        batched = model(ir, vi)
        single = torch.cat([model(ir[i : i + 1], vi[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_float64_run_matches_float32():
    torch.manual_seed(2)
    model = S4Fusion(SMALL).eval()
    ir, vi = torch.rand(2, 1, 19, 23), torch.rand(2, 1, 19, 23)
    with torch.no_grad():
        out32 = model(ir, vi)
        out64 = model.double()(ir.double(), vi.double())
    assert out64.dtype == torch.float64
    assert ((out32.double() - out64).norm() / out64.norm()).item() < 1e-5


def _grads(model: S4Fusion) -> dict[str, bool]:
    torch.manual_seed(3)
    ir, vi = torch.rand(1, 1, 25, 25), torch.rand(1, 1, 25, 25)
    model(ir, vi).square().mean().backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def test_paper_topology_gives_every_parameter_a_gradient():
    grads = _grads(S4Fusion(S4FusionConfig(topology="paper")))
    assert all(grads.values()), [n for n, g in grads.items() if not g]


def test_released_topology_leaves_exactly_the_unused_parameters(golden_dir):
    from s4fusion.checkpoint import released_to_ours

    model = S4Fusion()
    grads = _grads(model)
    without = {n for n, g in grads.items() if not g}
    unused = {released_to_ours(k) for k, _shape, _n, mark in _released_key_lines(golden_dir) if mark == "UNUSED"}
    # facts 1.3: 41 unused tensors; the two of final_up.norm are carried as buffers, not parameters
    assert len(unused) == 41
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters()}  # the saved ones
    assert unused - without == {"head.norm.weight", "head.norm.bias"} == buffers
    assert without == unused - buffers
    assert sum(p.numel() for n, p in model.named_parameters() if n in without) == 152_064


def test_parameter_counts_match_the_facts():
    model = S4Fusion()
    assert sum(t.numel() for t in model.state_dict().values()) == 3_562_981  # facts 1.1, all 304 state_dict tensors
    assert len(model.state_dict()) == 304

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert [count(model.encoder_ir[i].blocks[0]) for i in range(3)] == [24_000, 72_192, 241_152]
    assert [count(model.cmsa[i].blocks[0]) for i in range(3)] == [50_688, 148_032, 482_688]
    assert [count(model.encoder_ir[i].merge) for i in range(2)] == [18_816, 74_496]
    assert [count(model.decoder[i].expand) for i in (1, 2)] == [73_920, 18_528]
    assert count(model.embed_ir) == 912
    assert count(model.encoder_ir) == 502_848
    assert count(model.decoder) == 501_984


def test_initialisation_follows_the_release():
    model = S4Fusion()
    blk = model.cmsa[1].blocks[0]
    d, N = blk.d_inner, blk.d_state
    assert torch.equal(blk.A_logs[0], torch.log(torch.arange(1, N + 1, dtype=torch.float32)))
    assert torch.equal(blk.Ds, torch.ones(4 * d))
    dt = F.softplus(blk.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert abs(blk.in_proj.weight.std().item() - 0.02) < 0.002
    assert blk.x_proj_weight.abs().max() <= d**-0.5
    assert blk.patch_mark.mark_proj.abs().max() <= (2 * d) ** -0.5


@pytest.mark.parametrize("fold_chans,out_chans,patch,stride,grid", [(12, 1, 4, 3, (5, 7)), (5, 3, 3, 2, (4, 2))])
def test_fold_head_equals_expansion_fold_and_conv(fold_chans, out_chans, patch, stride, grid):
    """The head's one transposed convolution against its three steps as the release
    computes them (Linear, F.fold summing the overlaps, 1x1 conv), values and gradients."""
    from s4fusion.models.layers import FoldHead

    torch.manual_seed(0)
    head = FoldHead(6, fold_chans, out_chans, patch, stride).double()
    torch.nn.init.normal_(head.out_conv.bias)
    h, w = grid
    size = ((h - 1) * stride + patch, (w - 1) * stride + patch)
    x = torch.randn(2, h, w, 6, dtype=torch.float64, requires_grad=True)
    fast = head(x, size)
    steps = head.out_conv(head.fold(head.fold_input(x), size))
    assert fast.shape == steps.shape == (2, out_chans, *size)
    torch.testing.assert_close(fast, steps, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(fast)
    params = [x, head.expand.weight, head.out_conv.weight, head.out_conv.bias]
    for a, b in zip(torch.autograd.grad(fast, params, gout), torch.autograd.grad(steps, params, gout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"patch grid covers"):
        head(x, (size[0] + 1, size[1]))


@pytest.mark.parametrize("preset", ["s4fusion", "fssm"])
@pytest.mark.parametrize("topology", ["released", "paper"])
def test_every_scan_gets_its_output_gradient_with_channels_innermost(topology, preset, monkeypatch):
    """The GPU scan reads dL/dy over the channels of a line, as it reads u: the network
    hands every scan its output gradient with the channels innermost (stride 1), not the
    zero-filled contiguous gradient that autograd gives an indexed or unbound output."""
    from s4fusion import ops
    from s4fusion.models.ablation import ablation_config

    strides = []
    scan = ops.cross_scan_lowrank

    def recording_scan(*args, **kwargs):
        out = scan(*args, **kwargs)
        out.register_hook(lambda g: strides.append((tuple(g.shape), g.stride())))
        return out

    monkeypatch.setattr(ops, "cross_scan_lowrank", recording_scan)
    torch.manual_seed(0)
    model = S4Fusion(ablation_config(preset, S4FusionConfig(topology=topology)))
    model(torch.rand(1, 1, 28, 31), torch.rand(1, 1, 28, 31)).square().mean().backward()
    assert len(strides) >= 10
    assert all(stride[2] == 1 for _, stride in strides), strides
