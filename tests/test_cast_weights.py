"""CastWeights: low-precision copies of the matrix-product weights give autocast's output exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from s4fusion import S4Fusion, S4FusionConfig, api, ops
from s4fusion.cast_weights import CastWeights, matmul_parameter_names
from s4fusion.models.ablation import ABLATION_PRESETS

SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1, ss2d_d_state=4)
FLOAT32_PARAMETERS = ("A_logs", "Ds", "dt_projs_weight", "dt_projs_bias", "norm.weight", "norm.bias", "conv2d.bias")


def _pair(seed: int, h: int = 24, w: int = 30, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(1, 1, h, w, generator=g).to(device) for _ in range(2))


def test_names_are_the_matrix_product_weights_of_the_default_network():
    model = S4Fusion()
    names = matmul_parameter_names(model)
    params = dict(model.named_parameters())
    assert len(names) == len(set(names)) == 115
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(f"{n}.weight" in names for n in linear)
    # the depthwise convolutions' biases go to the bias + SiLU op in float32
    assert sum(n.endswith("conv2d.bias") for n in params) == 21
    assert sum(n.endswith(("x_proj_weight", "y_proj_weight", "mark_proj")) for n in names) == sum(
        n.endswith(("x_proj_weight", "y_proj_weight", "mark_proj")) for n in params
    )
    assert not [n for n in names if n.endswith(FLOAT32_PARAMETERS)]


def _intermediates(model, run, ir, vi, monkeypatch) -> list[torch.Tensor]:
    """Every tensor that every submodule of ``model`` returns during ``run(ir, vi)``, and
    every tensor argument of the scan (of the low-rank delta and of the delta),
    LayerNorm and up-projection ops, in call order.
    The ops' arguments show a float32 parameter given rounded (A, D, the delta bias,
    the norms' weights), which the bf16 values after the ops may round away."""
    seen: list[torch.Tensor] = []

    def keep(values) -> None:
        seen.extend(t.clone() for t in torch.utils._pytree.tree_leaves(values) if isinstance(t, torch.Tensor))

    for name in ("cross_scan_lowrank", "cross_scan", "layer_norm", "dt_project"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op, **kwargs: keep((args, kwargs)) or _op(*args, **kwargs))
    hooks = [m.register_forward_hook(lambda module, args, out: keep(out)) for m in model.modules()]
    try:
        run(ir, vi)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.undo()
    return seen


@pytest.mark.parametrize("topology", ["released", "paper"])
@pytest.mark.parametrize("name", sorted(ABLATION_PRESETS))
def test_cpu_bf16_output_is_autocasts_bit_for_bit(name, topology, monkeypatch):
    torch.manual_seed(0)
    preset = {k: v for k, v in ABLATION_PRESETS[name].items() if k not in ("dims", "cmsa_depth")}
    model = S4Fusion(replace(SMALL, topology=topology, **preset)).eval()
    ir, vi = _pair(1)
    cast = CastWeights(model, torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _intermediates(model, model, ir, vi, monkeypatch)
        got = _intermediates(model, cast, ir, vi, monkeypatch)
    assert expected[-1].dtype == torch.bfloat16 and len(got) == len(expected) > 20
    assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, expected))


def test_copies_follow_in_place_changes_and_leave_the_parameters_alone():
    torch.manual_seed(0)
    model = S4Fusion(SMALL).eval()
    ir, vi = _pair(2)
    cast = CastWeights(model, torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = cast(ir, vi)
        assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)  # in place: the next call sees it
        second, expected = cast(ir, vi), model(ir, vi)
    assert not torch.equal(first, second)
    assert torch.equal(second, expected)


def test_rejects_a_dtype_autocast_does_not_lower_to():
    with pytest.raises(ValueError, match="bfloat16 or torch.float16, got torch.float32"):
        CastWeights(S4Fusion(SMALL), torch.float32)


def _trained(model, run, ir, vi) -> tuple[torch.Tensor, dict]:
    """The output of ``run(ir, vi)`` under CPU bf16 autocast and every parameter's
    gradient (None where it got none) after a backward of a weighted sum of it."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(ir, vi)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("topology", ["released", "paper"])
@pytest.mark.parametrize("name", ["s4fusion", "cnn"])
def test_cpu_bf16_training_pass_gives_autocasts_output_and_gradients_bit_for_bit(name, topology):
    torch.manual_seed(0)
    preset = {k: v for k, v in ABLATION_PRESETS[name].items() if k not in ("dims", "cmsa_depth")}
    model = S4Fusion(replace(SMALL, topology=topology, **preset)).train()
    ir, vi = (torch.cat(t) for t in zip(_pair(4), _pair(5)))
    out, grads = _trained(model, model, ir, vi)
    cast_out, cast_grads = _trained(model, CastWeights(model, torch.bfloat16), ir, vi)
    assert out.dtype == cast_out.dtype == torch.bfloat16 and torch.equal(out, cast_out)
    assert grads.keys() == cast_grads.keys()
    # an unused parameter (the released topology's) keeps no gradient either way
    assert [n for n, g in cast_grads.items() if g is None] == [n for n, g in grads.items() if g is None]
    assert (topology == "released") == any(g is None for g in grads.values())
    for n, g in grads.items():
        if g is not None:
            c = cast_grads[n]
            assert c.dtype == g.dtype == torch.float32 and c.stride() == g.stride() and torch.equal(c, g), n


def test_training_pass_leaves_parameters_without_grad_alone():
    torch.manual_seed(0)
    model = S4Fusion(replace(SMALL, topology="paper")).train()  # (every parameter used)
    frozen = model.head.expand.weight  # a matrix-product weight
    frozen.requires_grad_(False)
    _, grads = _trained(model, CastWeights(model, torch.bfloat16), *_pair(6))
    assert grads["head.expand.weight"] is None and frozen.grad is None
    others = [n for n in matmul_parameter_names(model) if n != "head.expand.weight"]
    assert all(grads[n] is not None for n in others)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")


def _kernels(fn) -> tuple[int, int]:
    """(all kernels, copy and conversion kernels) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower()]
    return len(names), sum("copy_kernel" in n for n in names)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_graph_of_cast_weights_drops_the_cast_kernels_and_keeps_the_output(dtype):
    torch.manual_seed(0)
    model = S4Fusion().cuda().eval()
    ir, vi = _pair(3, 96, 128, "cuda")
    cast = CastWeights(model, dtype)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        eager, through_copies = model(ir, vi), cast(ir, vi)
        plain, fewer, refresh = _kernels(lambda: model(ir, vi)), _kernels(lambda: cast(ir, vi)), _kernels(cast.refresh)
        graphed = api.graphed(model)(ir, vi)
    # the scan's float32 atomic adds make runs differ in the last bits
    assert (through_copies.float() - eager.float()).abs().max() < 2e-2
    assert (graphed.float() - eager.float()).abs().max() < 2e-2
    # 136 parameters; autocast casts them at 115 places (the CMSA blocks' stacked x/y
    # projections share a cast, the Patch Mark's halves have one each); the refresh is
    # a few multi-tensor kernels (H200: 211 copies and conversions, 96 with the copies)
    assert refresh[0] <= 4, refresh
    assert plain[1] - fewer[1] >= 110 and plain[0] - fewer[0] >= 110 - refresh[0], (plain, fewer)
    (recorded,) = vars(model)[api._GRAPHED_ATTR].passes.values()
    assert isinstance(recorded[1].run, CastWeights) and recorded[1].run.dtype == dtype


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_training_pass_through_cast_weights_drops_the_casts_both_ways():
    torch.manual_seed(0)
    model = S4Fusion().cuda().train()
    ir, vi = (torch.cat(t) for t in zip(_pair(7, 96, 128, "cuda"), _pair(8, 96, 128, "cuda")))
    cast = CastWeights(model, torch.bfloat16)

    def step(run) -> dict:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(ir, vi)
        (out.float() - ir).abs().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, fewer = _kernels(lambda: step(model)), _kernels(lambda: step(cast))
    grads, cast_grads = step(model), step(cast)
    # autocast casts 115 weights forward and widens the 97 used ones' gradients backward;
    # the copies are a few multi-tensor kernels each way (H200: 485 -> 291 copy and
    # conversion kernels; the training step's profile 1,881 -> 1,691 kernels)
    assert plain[1] - fewer[1] >= 180 and plain[0] - fewer[0] >= 160, (plain, fewer)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in cast_grads.items() if g is None]
    for n, g in grads.items():
        if g is not None:
            c = cast_grads[n]
            # the scan's float32 atomic adds make runs differ in the last bits
            assert c.dtype == g.dtype and c.stride() == g.stride(), n
            assert (c - g).abs().max() <= 2e-2 * g.abs().max() + 1e-6, n
