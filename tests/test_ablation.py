"""Ablation variants of the paper's Table 3: config switches, each fusion module
against an independent straightforward implementation written here, parameter
counts against the authors' classes (RELEASED-MODEL-FACTS.md section 8), and
every variant building, training a few steps and round-tripping its weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion import ops
from s4fusion.models import CMSABlock
from s4fusion.models.ablation import (
    ABLATION_PRESETS,
    AddFusion,
    CNNFusion,
    CrossAttentionFusion,
    CrossAttentionLayer,
    FSSMBlock,
    FSSMFusion,
    ablation_config,
    parameter_table,
)

S4FUSION_PARAMS = 3_562_957  # 3,562,981 released minus the never-applied final_up.norm (24, kept as buffers)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def reference_backend():
    ops.set_backend("reference")
    yield
    ops.set_backend(None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than several on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- config
def test_defaults_are_the_released_network():
    cfg = S4FusionConfig()
    assert cfg.fusion == "cmsa" and cfg.patch_mark is True
    model = S4Fusion(cfg)
    assert n_params(model) == S4FUSION_PARAMS
    assert sum(k.endswith("patch_mark.mark_proj") for k in model.state_dict()) == 9  # 3 scales x 3 blocks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fusion": "sum"}, "fusion must be one of"),
        ({"patch_mark": "no"}, "patch_mark must be true or false"),
        ({"fusion": "add", "patch_mark": False}, "applies to fusion='cmsa' only"),
        ({"fusion": "cross_attention", "dims": (12, 24, 48)}, "divisible by its 8 heads"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S4FusionConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = S4FusionConfig(fusion="fssm", cmsa_d_state=32, dims=(8, 16, 32))
    assert S4FusionConfig.from_dict(cfg.to_dict()) == cfg
    cfg = S4FusionConfig(patch_mark=False)
    assert S4FusionConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------- parameter counts
def test_module_sizes_match_the_authors_classes():
    # facts section 8: CNNs(2C) 93,412 / 378,079 / 1,510,754; CrossAttentionLayer 4C^2;
    # FSSMBlock 57,312 / 163,008 / 519,552 at N = 18 and 81,504 / 211,392 / 616,320 at
    # N = 32, both including an unused mark_proj (d x 2d) that we do not create.
    for c, cnn in zip((48, 96, 192), (93_412, 378_079, 1_510_754)):
        assert n_params(CNNFusion(c)) == cnn
        assert n_params(CrossAttentionLayer(c, 8)) == 4 * c * c
    for N, sizes in ((18, (57_312, 163_008, 519_552)), (32, (81_504, 211_392, 616_320))):
        for c, size in zip((48, 96, 192), sizes):
            d = int(1.5 * c)
            assert n_params(FSSMBlock(c, N, 1.5, math.ceil(c / 16), 3, 1e-5)) == size - 2 * d * d
    # CMSA block 50,688 / 148,032 / 482,688 (facts 2.7); without Patch Mark: minus d x 2d.
    for c, size in zip((48, 96, 192), (50_688, 148_032, 482_688)):
        d = int(1.5 * c)
        assert n_params(CMSABlock(c, 18, 1.5, math.ceil(c / 16), 3, 1e-5)) == size
        assert n_params(CMSABlock(c, 18, 1.5, math.ceil(c / 16), 3, 1e-5, patch_mark=False)) == size - 2 * d * d


def test_presets_match_the_s4fusion_parameter_count():
    table = {row.name: row for row in parameter_table()}
    assert set(table) == set(ABLATION_PRESETS)
    assert table["s4fusion"].total == S4FUSION_PARAMS
    assert table["s4fusion"].fusion == 2_044_224  # facts section 7: fusion layers total
    assert table["add"].fusion == 0
    for name in ("add", "cnn", "cross_attention", "fssm"):
        assert abs(table[name].relative) < 0.03, (name, table[name])
    # Exp. 5 removes the 9 marks and nothing else (the paper does not resize it).
    assert table["s4fusion"].total - table["no_patch_mark"].total == 3 * (72 * 144 + 144 * 288 + 288 * 576)


# ------------------------------------------------- modules vs straightforward versions
def test_add_fusion():
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert torch.equal(AddFusion()(x, y), x + y)


def test_cnn_fusion_matches_explicit_convolutions():
    torch.manual_seed(0)
    c = 8
    m = CNNFusion(c)
    for bn in (m.block.conv1[1], m.block.conv2[1]):  # non-trivial BatchNorm statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    m.eval()
    x, y = torch.randn(2, 5, 6, c, dtype=torch.float64), torch.randn(2, 5, 6, c, dtype=torch.float64)
    m.double()
    k = int(16 // 1.4)
    assert k == 11 and m.reduce.out_channels == k

    def bn(v, mod):
        return (v - mod.running_mean[None, :, None, None]) / torch.sqrt(
            mod.running_var[None, :, None, None] + mod.eps
        ) * mod.weight[None, :, None, None] + mod.bias[None, :, None, None]

    v = torch.cat([x, y], -1).permute(0, 3, 1, 2)
    h = F.conv2d(v, m.reduce.weight, m.reduce.bias)
    r = torch.relu(bn(F.conv2d(h, m.block.conv1[0].weight, padding=1), m.block.conv1[1]))
    r = bn(F.conv2d(r, m.block.conv2[0].weight, padding=1), m.block.conv2[1])
    h = torch.relu(r + h)
    expected = F.conv2d(h, m.project.weight, m.project.bias).permute(0, 2, 3, 1)
    with torch.no_grad():
        assert torch.allclose(m(x, y), expected, atol=1e-12)


def naive_cross_attention(x1, x2, kv1, kv2, heads):
    """Per batch element and head, with explicit index loops for the softmax."""
    b, n, c = x1.shape
    hd = c // heads
    out1, out2 = torch.zeros_like(x1), torch.zeros_like(x2)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            k1, v1 = (x1[bi] @ kv1.T)[:, :c][:, sl], (x1[bi] @ kv1.T)[:, c:][:, sl]
            k2, v2 = (x2[bi] @ kv2.T)[:, :c][:, sl], (x2[bi] @ kv2.T)[:, c:][:, sl]
            s1, s2 = k1.T @ v1 * hd**-0.5, k2.T @ v2 * hd**-0.5  # (hd, hd)
            ctx1 = torch.exp(s1) / torch.exp(s1).sum(0, keepdim=True)  # softmax over the key index
            ctx2 = torch.exp(s2) / torch.exp(s2).sum(0, keepdim=True)
            out1[bi, :, sl] = x1[bi, :, sl] @ ctx2
            out2[bi, :, sl] = x2[bi, :, sl] @ ctx1
    return out1, out2


def test_cross_attention_matches_naive_version():
    torch.manual_seed(1)
    c, depth = 16, 2
    m = CrossAttentionFusion(c, depth, 8).double()
    x, y = torch.randn(2, 3, 4, c, dtype=torch.float64), torch.randn(2, 3, 4, c, dtype=torch.float64)
    a, b = x.reshape(2, 12, c), y.reshape(2, 12, c)
    for layer in m.layers:
        a, b = naive_cross_attention(a, b, layer.kv1.weight, layer.kv2.weight, 8)
    with torch.no_grad():
        assert torch.allclose(m(x, y), (a + b).reshape(2, 3, 4, c), atol=1e-12)


def naive_ss2d_scan(u, delta_raw, A, B, C, D, bias):
    """Four-direction scan of one modality with an explicit loop per token.
    u, delta_raw (d, H, W); B, C (K, N, H, W); A (K*d, N); D, bias (K*d,). -> (d, H, W)."""
    d, H, W = u.shape
    out = torch.zeros_like(u)
    for k in range(4):
        coords = [(r, c) for r in range(H) for c in range(W)] if k % 2 == 0 else [(r, c) for c in range(W) for r in range(H)]
        if k >= 2:
            coords = coords[::-1]
        rows = slice(k * d, (k + 1) * d)
        h = torch.zeros(d, A.shape[1], dtype=u.dtype)
        for r, c in coords:
            dt = F.softplus(delta_raw[k, :, r, c] + bias[rows])
            h = torch.exp(dt[:, None] * A[rows]) * h + (dt * u[:, r, c])[:, None] * B[k, :, r, c][None]
            out[:, r, c] += h @ C[k, :, r, c] + D[rows] * u[:, r, c]
    return out


def test_fssm_block_matches_naive_cross_modal_scan():
    torch.manual_seed(2)
    c, N, H, W = 8, 4, 3, 4
    blk = FSSMBlock(c, N, 1.5, 1, 3, 1e-5).double()
    for p in blk.parameters():  # make every parameter matter
        p.data.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(1, H, W, c, dtype=torch.float64), torch.randn(1, H, W, c, dtype=torch.float64)
    d = blk.out_norm.normalized_shape[0]

    def branch(v):
        a, z = (v @ blk.in_proj.weight.T).chunk(2, -1)
        a = F.silu(F.conv2d(a.permute(0, 3, 1, 2), blk.conv2d.weight, blk.conv2d.bias, padding=1, groups=d))
        return a[0], z[0]

    def params(p, a):  # a (d, H, W) -> delta_raw (K, d, H, W), B, C (K, N, H, W)
        P = torch.einsum("krd,dhw->krhw", p.x_proj_weight, a)
        R = p.dt_rank
        delta = torch.einsum("kdr,krhw->kdhw", p.dt_projs_weight, P[:, :R])
        return delta, P[:, R : R + N], P[:, R + N :]

    def out(o, z):
        o = o.permute(1, 2, 0)
        return F.layer_norm(o, (d,), blk.out_norm.weight, blk.out_norm.bias, 1e-5) * F.silu(z) @ blk.out_proj.weight.T

    (a_x, z_x), (a_y, z_y) = branch(x), branch(y)
    dx, Bx, Cx = params(blk.ir, a_x)
    dy, By, Cy = params(blk.vi, a_y)

    def run(u, delta, Bm, Cm, p):
        return naive_ss2d_scan(
            u, delta, -torch.exp(p.A_logs), Bm, Cm, p.Ds, p.dt_projs_bias.reshape(-1)
        )

    # infrared driven by the visible parameters, visible by the infrared ones
    exp_x = out(run(a_x, dy, By, Cy, blk.vi), z_x)
    exp_y = out(run(a_y, dx, Bx, Cx, blk.ir), z_y)
    with torch.no_grad():
        got_x, got_y = blk(x, y)
    assert torch.allclose(got_x[0], exp_x, atol=1e-10)
    assert torch.allclose(got_y[0], exp_y, atol=1e-10)


def test_fssm_scans_through_the_dispatcher_one_modality_at_a_time(monkeypatch):
    calls = []
    real = ops.cross_scan

    def spy(u, *args, **kwargs):
        calls.append(tuple(u.shape))
        return real(u, *args, **kwargs)

    monkeypatch.setattr(ops, "cross_scan", spy)
    m = FSSMFusion(8, 2, 4, 1.5, 1, 3, 1e-5)
    with torch.no_grad():
        m(torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    assert calls == [(1, 1, 12, 9)] * 4  # 2 blocks x 2 modalities, M = 1


def test_no_patch_mark_equals_a_zero_mark():
    torch.manual_seed(3)
    with_mark = CMSABlock(8, 4, 1.5, 1, 3, 1e-5)
    without = CMSABlock(8, 4, 1.5, 1, 3, 1e-5, patch_mark=False)
    state = {k: v for k, v in with_mark.state_dict().items() if "mark" not in k}
    without.load_state_dict(state, strict=True)
    assert not any("mark" in k for k in without.state_dict())
    x, y = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        a = without(x, y)
        with_mark.patch_mark.mark_proj.zero_()
        b = with_mark(x, y)
        with_mark.patch_mark.mark_proj.normal_()
        c = with_mark(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


# -------------------------------------------------------- every variant trains and loads
SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1, topology="paper")
VARIANTS = {
    "s4fusion": {},
    "add": {"fusion": "add"},
    "cnn": {"fusion": "cnn"},
    "cross_attention": {"fusion": "cross_attention", "cmsa_depth": 2},
    "fssm": {"fusion": "fssm", "cmsa_d_state": 6},
    "no_patch_mark": {"patch_mark": False},
}


def test_variants_cover_every_preset():
    assert set(VARIANTS) == set(ABLATION_PRESETS)
    for name in ABLATION_PRESETS:
        cfg = ablation_config(name, SMALL)
        assert cfg.dims == (SMALL.dims if name != "add" else ABLATION_PRESETS["add"]["dims"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_and_round_trips(name, tmp_path):
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = replace(SMALL, **VARIANTS[name])
    model = S4Fusion(cfg)
    g = torch.Generator().manual_seed(0)
    ir, vi = torch.rand(2, 1, 24, 30, generator=g), torch.rand(2, 1, 24, 30, generator=g)
    target = torch.maximum(ir, vi)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.l1_loss(model(ir, vi), target)
        loss.backward()
        if _ == 0:  # topology "paper": every parameter is used and gets a gradient
            assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    changed = [k for k, v in model.state_dict().items() if k.startswith("cmsa.") and not torch.equal(v, before[k])]
    assert bool(changed) == (name != "add")

    path = model.save_pretrained(tmp_path / f"{name}.safetensors")
    loaded = S4Fusion.from_pretrained(path)
    assert loaded.config == cfg
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ir, vi), model(ir, vi))


# ------------------------------------------------- every variant through the trainer
TRAINER_VARIANTS = {
    "s4fusion": [],
    "add": ["model.fusion=add"],
    "cnn": ["model.fusion=cnn"],
    "cross_attention": ["model.fusion=cross_attention", "model.cmsa_depth=2"],
    "fssm": ["model.fusion=fssm", "model.cmsa_d_state=6"],
    "no_patch_mark": ["model.patch_mark=false"],
    "no_perception_loss": ["loss.w_per=0"],
}


@pytest.mark.parametrize("name", sorted(TRAINER_VARIANTS))
def test_variant_trains_with_the_trainer(name, tmp_path):
    """Two optimizer steps of `s4fusion train`'s trainer on the tiny pairs (24x24
    crops, the full loss with the ResNet-50 perception term), then the final
    weights load with the variant's configuration."""
    import json

    from s4fusion.training import load_config, train

    shared = Path(__file__).resolve().parents[1].parent / "shared"
    resnet = shared / "weights" / "resnet50_imagenet_v1.safetensors"
    if not resnet.is_file():
        pytest.fail(f"reference material missing: {resnet}")
    overrides = [
        f"run_dir={json.dumps(str(tmp_path / 'run'))}",
        f"data.train={json.dumps([str(shared / 'data' / 'tiny')])}",
        "data.crop=24",
        "data.workers=0",
        "batch_size=2",
        "epochs=1",
        "max_steps=2",
        'device="cpu"',
        'precision="fp32"',
        "model.dims=[8, 16, 32]",
        "model.depths=[1, 1, 1]",
        "model.decoder_depths=[1, 1, 1]",
        "model.cmsa_depth=1",
        f"loss.resnet_weights={json.dumps(str(resnet))}",
        "progress=false",
        "log_every=1",
        "image_every=0",
        "val_every=0",
        "checkpoint_every=0",
        "val_metrics=[]",
    ] + TRAINER_VARIANTS[name]
    config = load_config(None, overrides)
    result = train(config)
    assert result.step == 2
    losses = [r for r in result.history if r.get("kind") == "train"]
    assert len(losses) == 2 and all(math.isfinite(r["loss"]) for r in losses)
    if name == "no_perception_loss":
        assert config.loss.w_per == 0.0
        # the entropy is still reported, but the total is the other three terms
        r = losses[0]
        cfg = config.loss
        assert r["loss"] == pytest.approx(cfg.w_l1 * r["l1"] + cfg.w_ssim * r["ssim"] + cfg.w_grad * r["grad"], rel=1e-5)
    loaded = S4Fusion.from_pretrained(result.final_weights)
    assert loaded.config == config.model
    expected = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)
    assert (loaded.config.fusion, loaded.config.patch_mark) == (
        {"add": "add", "cnn": "cnn", "cross_attention": "cross_attention", "fssm": "fssm"}.get(name, "cmsa"),
        name != "no_patch_mark",
    )
    assert loaded.config.dims == expected.dims
