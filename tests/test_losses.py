"""The training losses (s4fusion.losses): the authors' own loss values
(golden loss unit, produced by their compiled loss.py), hand-computed values on
tiny tensors, independent loop implementations written here, kornia's SSIM, and
the behaviour of the combined FusionLoss with the real frozen ResNet-50."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from s4fusion.losses import (
    FusionLoss,
    LossConfig,
    MaxGradientLoss,
    PerceptionLoss,
    WeightedL1Loss,
    WeightedSSIMLoss,
    information_measure,
    information_weights,
    max_gradient_loss,
    perception_entropy,
    sobel_gradient,
    ssim_loss_map,
    ssim_map,
    weighted_l1_loss,
    weighted_ssim_loss,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "resnet50_imagenet_v1.safetensors"
TINY = SHARED / "data" / "tiny"

KX = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
KY = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)


# ----------------------------------------------------------------- independent references


def sobel_np(img: np.ndarray) -> np.ndarray:
    """|img * kx| + |img * ky| of a 2-D array, cross-correlation, zero padding, by loops."""
    h, w = img.shape
    p = np.pad(img, 1)
    out = np.zeros_like(img, dtype=float)
    for i in range(h):
        for j in range(w):
            win = p[i : i + 3, j : j + 3]
            out[i, j] = abs((win * KX).sum()) + abs((win * KY).sum())
    return out


def ssim_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM map of two 2-D arrays: full 11x11 Gaussian window (sigma 1.5) summed by loops
    over the reflect-padded image."""
    r = 5
    t = np.arange(-r, r + 1, dtype=float)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    px, py = np.pad(x, r, mode="reflect"), np.pad(y, r, mode="reflect")
    h, w = x.shape
    out = np.zeros((h, w))
    c1, c2 = 0.01**2, 0.03**2
    for i in range(h):
        for j in range(w):
            a, b = px[i : i + 11, j : j + 11], py[i : i + 11, j : j + 11]
            mx, my = (win * a).sum(), (win * b).sum()
            vx = (win * a * a).sum() - mx * mx
            vy = (win * b * b).sum() - my * my
            cxy = (win * a * b).sum() - mx * my
            out[i, j] = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2) + 1e-12)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------- golden (authors' bytecode)


@pytest.fixture(scope="module")
def loss_unit(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "loss_unit.safetensors"))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_golden_loss_unit(loss_unit, dtype, tol):
    """The four terms, the information measures and weights of the authors' own
    loss_fun_perception (c = 3)."""
    g = {k: v.to(dtype) for k, v in loss_unit.items()}
    feats_ir = [g[f"features_ir.{i}"] for i in range(4)]
    feats_vi = [g[f"features_vi.{i}"] for i in range(4)]
    c = float(g["c"])
    assert rel(information_measure(feats_ir), loss_unit["g_ir"]) < tol
    assert rel(information_measure(feats_vi), loss_unit["g_vi"]) < tol
    w_ir, w_vi = information_weights(feats_ir, feats_vi, c)
    assert rel(w_ir, loss_unit["w_ir"]) < tol and rel(w_vi, loss_unit["w_vi"]) < tol
    f, ir, vi = g["fused"], g["ir"], g["vi"]
    got = {
        "L_l1": weighted_l1_loss(f, ir, vi, w_ir, w_vi),
        "L_ssim": weighted_ssim_loss(f, ir, vi, w_ir, w_vi),
        "L_grad": max_gradient_loss(f, ir, vi),
        "L_per": perception_entropy(g["fuse_logits"]),
    }
    for name, value in got.items():
        assert value.dim() == 0
        assert abs(value.item() - loss_unit[name].item()) <= tol * abs(loss_unit[name].item()), name


def test_golden_weights_saturate_at_small_c(loss_unit):
    """Same features: a larger temperature moves the weights towards 0.5."""
    feats_ir = [loss_unit[f"features_ir.{i}"] for i in range(4)]
    feats_vi = [loss_unit[f"features_vi.{i}"] for i in range(4)]
    spread = [(information_weights(feats_ir, feats_vi, c)[1] - 0.5).abs().mean().item() for c in (3.0, 30.0, 300.0)]
    assert spread[0] > spread[1] > spread[2] > 0


# ----------------------------------------------------------------- hand-computed values


def test_sobel_single_pixel_by_hand():
    """A single 1 at the centre of a 3x3 map: |kx| + |ky| read back = 2 everywhere
    except 0 at the centre."""
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.0
    expected = torch.full((3, 3), 2.0, dtype=torch.float64)
    expected[1, 1] = 0.0
    torch.testing.assert_close(sobel_gradient(x)[0, 0], expected)


def test_sobel_against_loops():
    rng = np.random.default_rng(0)
    img = rng.random((2, 3, 5, 7))
    got = sobel_gradient(torch.from_numpy(img)).numpy()
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[b, c], sobel_np(img[b, c]), rtol=1e-12, atol=1e-12)


def test_information_measure_and_weights_by_hand():
    """Centre pixel map: mean of sobel^2 = 8 * 4 / 9 = 32/9; a zero map gives 0;
    two maps are averaged; weights = exp(g/c) normalised over the two sources."""
    centre = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    centre[0, 0, 1, 1] = 1.0
    zero = torch.zeros_like(centre)
    assert information_measure([centre]).item() == pytest.approx(32 / 9, rel=1e-14)
    assert information_measure([centre, zero]).item() == pytest.approx(16 / 9, rel=1e-14)
    # a feature map with two channels: the mean runs over channels too
    two = torch.cat([centre, 3 * centre], dim=1)
    assert information_measure([two]).item() == pytest.approx((32 / 9 + 9 * 32 / 9) / 2, rel=1e-14)
    for c in (0.5, 1.0, 7.0):
        w_ir, w_vi = information_weights([centre], [zero], c)
        e = math.exp(32 / 9 / c)
        assert w_ir.item() == pytest.approx(e / (e + 1.0), rel=1e-14)
        assert w_vi.item() == pytest.approx(1.0 / (e + 1.0), rel=1e-14)
    with pytest.raises(ValueError, match="temperature c must be > 0"):
        information_weights([centre], [zero], 0.0)


def test_information_measure_against_loops():
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 4, 3, 3))]
    expected = np.zeros(2)
    for f in feats:
        for b in range(2):
            expected[b] += np.mean([sobel_np(f[b, c]) ** 2 for c in range(f.shape[1])])
    expected /= len(feats)
    got = information_measure([torch.from_numpy(f) for f in feats]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_weighted_l1_by_hand():
    """B = 2 images of 1x2: sample 0 |ir - f| = (0.5, 0.5), |vi - f| = (1, 0);
    sample 1 |ir - f| = (0, 0), |vi - f| = (0.25, 0.75)."""
    f = torch.tensor([[[[0.5, 0.5]]], [[[0.5, 0.5]]]], dtype=torch.float64)
    ir = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]], dtype=torch.float64)
    vi = torch.tensor([[[[1.5, 0.5]]], [[[0.25, 1.25]]]], dtype=torch.float64)
    w_ir = torch.tensor([0.2, 0.6], dtype=torch.float64)
    w_vi = 1 - w_ir
    # mean_b(w_ir * [0.5, 0]) + mean_b(w_vi * [0.5, 0.5]) = (0.1 + 0) / 2 + (0.4 + 0.2) / 2
    expected = 0.05 + 0.3
    assert weighted_l1_loss(f, ir, vi, w_ir, w_vi).item() == pytest.approx(expected, rel=1e-14)
    assert WeightedL1Loss()(f, ir, vi, w_ir, w_vi).item() == pytest.approx(expected, rel=1e-14)


def test_ssim_constant_images_by_hand():
    """Flat images a, b: mu = a, b and sigma = 0, so SSIM = (2ab + C1) C2 /
    ((a^2 + b^2 + C1) C2 + 1e-12) everywhere; identical images give loss ~0."""
    a, b = 0.2, 0.7
    c1, c2 = 1e-4, 9e-4
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    expected = (2 * a * b + c1) * c2 / ((a * a + b * b + c1) * c2 + 1e-12)
    torch.testing.assert_close(ssim_map(x, y), torch.full_like(x, expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ssim_loss_map(x, y), torch.full_like(x, (1 - expected) / 2), rtol=1e-12, atol=1e-12)
    z = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert ssim_loss_map(z, z).max().item() < 1e-6


def test_ssim_against_loops_and_kornia():
    import kornia

    rng = np.random.default_rng(2)
    x, y = rng.random((2, 1, 13, 17)), rng.random((2, 1, 13, 17))
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b, 0], ssim_np(x[b, 0], y[b, 0]), rtol=1e-10, atol=1e-12)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    ref = kornia.losses.ssim_loss(tx, ty, 11, reduction="none")
    torch.testing.assert_close(ssim_loss_map(tx, ty), ref, rtol=1e-12, atol=1e-12)
    fx, fy = tx.float(), ty.float()
    torch.testing.assert_close(ssim_loss_map(fx, fy), kornia.losses.ssim_loss(fx, fy, 11, reduction="none"))


def test_weighted_ssim_against_per_sample_loop():
    rng = np.random.default_rng(3)
    f, ir, vi = (torch.from_numpy(rng.random((3, 1, 12, 14))) for _ in range(3))
    w_ir = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    w_vi = 1 - w_ir
    expected = 0.0
    for b in range(3):
        s_ir = np.clip((1 - ssim_np(ir[b, 0].numpy(), f[b, 0].numpy())) / 2, 0, 1).mean()
        s_vi = np.clip((1 - ssim_np(vi[b, 0].numpy(), f[b, 0].numpy())) / 2, 0, 1).mean()
        expected += (w_ir[b].item() * s_ir + w_vi[b].item() * s_vi) / 3
    assert weighted_ssim_loss(f, ir, vi, w_ir, w_vi).item() == pytest.approx(expected, rel=1e-10)
    assert WeightedSSIMLoss()(f, ir, vi, w_ir, w_vi).item() == pytest.approx(expected, rel=1e-10)


def test_max_gradient_by_hand():
    """ir = centre pixel, vi = f = 0: target = G(ir) (2 on 8 pixels), G(f) = 0 -> 16/9."""
    ir = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    ir[0, 0, 1, 1] = 1.0
    zero = torch.zeros_like(ir)
    assert max_gradient_loss(zero, ir, zero).item() == pytest.approx(16 / 9, rel=1e-14)
    assert max_gradient_loss(zero, zero, ir).item() == pytest.approx(16 / 9, rel=1e-14)
    # the fused image reproducing the stronger edges costs nothing
    assert max_gradient_loss(ir, ir, 0.5 * ir).item() == 0.0
    assert MaxGradientLoss()(zero, ir, zero).item() == pytest.approx(16 / 9, rel=1e-14)


def test_max_gradient_against_loops():
    rng = np.random.default_rng(4)
    f, ir, vi = (rng.random((2, 1, 6, 8)) for _ in range(3))
    expected = np.mean(
        [np.abs(np.maximum(sobel_np(vi[b, 0]), sobel_np(ir[b, 0])) - sobel_np(f[b, 0])) for b in range(2)]
    )
    got = max_gradient_loss(*(torch.from_numpy(t) for t in (f, ir, vi)))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_entropy_by_hand():
    """Uniform logits over K classes: sum -(1/K + 1e-9) ln(1/K + 1e-9) ~ ln K; a one-hot
    decision: only the 1e-9 floor (~2e-5); a two-class 50/50 split among 1000: ~ln 2."""
    k = 1000
    p = 1 / k + 1e-9
    uniform = perception_entropy(torch.zeros(2, k, dtype=torch.float64)).item()
    assert uniform == pytest.approx(-k * p * math.log(p), rel=1e-14)
    assert uniform == pytest.approx(math.log(k), rel=1e-5)
    e = 1e-9
    sure = torch.full((1, k), -1e4, dtype=torch.float64)
    sure[0, 3] = 0.0
    expected_sure = -(1 + e) * math.log(1 + e) - (k - 1) * e * math.log(e)  # ~2.07e-5: the eps floor
    assert perception_entropy(sure).item() == pytest.approx(expected_sure, rel=1e-9)
    split = torch.full((1, k), -1e4, dtype=torch.float64)
    split[0, :2] = 0.0
    expected_split = -2 * (0.5 + e) * math.log(0.5 + e) - (k - 2) * e * math.log(e)
    assert perception_entropy(split).item() == pytest.approx(expected_split, rel=1e-9)
    assert expected_split == pytest.approx(math.log(2), rel=1e-4)
    # batch mean, and agreement with an explicit numpy formula
    logits = np.random.default_rng(5).standard_normal((3, 10)) * 3
    q = np.exp(logits - logits.max(1, keepdims=True))
    q = q / q.sum(1, keepdims=True) + 1e-9
    expected = np.mean(-(q * np.log(q)).sum(1))
    assert perception_entropy(torch.from_numpy(logits)).item() == pytest.approx(expected, rel=1e-12)


def test_structural_terms_ignore_autocast_and_upcast_half():
    """Under bf16 autocast the SSIM and Sobel filtering still run in float32 (kornia
    does the same); bf16 inputs are computed in float32."""
    g = torch.Generator().manual_seed(6)
    f, ir, vi = (torch.rand(2, 1, 24, 24, generator=g) for _ in range(3))
    w = torch.tensor([0.3, 0.8])
    ref_ssim = weighted_ssim_loss(f, ir, vi, w, 1 - w)
    ref_grad = max_gradient_loss(f, ir, vi)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        ssim_ac = weighted_ssim_loss(f, ir, vi, w, 1 - w)
        grad_ac = max_gradient_loss(f, ir, vi)
    assert ssim_ac.dtype == torch.float32 and grad_ac.dtype == torch.float32
    assert ssim_ac.item() == pytest.approx(ref_ssim.item(), rel=1e-6)
    assert grad_ac.item() == pytest.approx(ref_grad.item(), rel=1e-6)
    half = [t.bfloat16() for t in (f, ir, vi)]
    exact = weighted_ssim_loss(*(t.float() for t in half), w, 1 - w)
    got = weighted_ssim_loss(*half, w, 1 - w)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(exact.item(), rel=1e-6)
    assert perception_entropy(torch.zeros(1, 10, dtype=torch.bfloat16)).dtype == torch.float32


def test_shape_errors():
    a = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="expected \\(B,1,H,W\\) images of one shape"):
        weighted_l1_loss(a, a, torch.zeros(1, 1, 8, 9), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="needs H and W > 5"):
        ssim_map(torch.zeros(1, 1, 4, 20), torch.zeros(1, 1, 4, 20))
    with pytest.raises(ValueError, match="logits"):
        perception_entropy(torch.zeros(10))


def test_loss_config_validation():
    cfg = LossConfig()
    assert cfg.w_per >= 0 and cfg.c > 0
    with pytest.raises(ValueError, match="w_grad"):
        LossConfig(w_grad=-1.0)
    with pytest.raises(ValueError, match="w_l1"):
        LossConfig(w_l1=float("nan"))
    with pytest.raises(ValueError, match="temperature c"):
        LossConfig(c=0.0)


# ----------------------------------------------------------------- with the real ResNet-50


@pytest.fixture(scope="module")
def perception():
    from s4fusion.perception import load_resnet50

    if not WEIGHTS.is_file():
        pytest.fail(f"reference weights missing: {WEIGHTS} (the tests need ../shared beside the checkout)")
    return load_resnet50(WEIGHTS)


@pytest.fixture(scope="module")
def tiny_pairs():
    """Two of the 64x64 real pairs of ../shared/data/tiny (MSRS, RoadScene): ir 'L',
    visible Y (BT.601)."""
    from PIL import Image

    names = ["MSRS_00633D.png", "RoadScene_FLIR_09376.png"]
    irs, vis = [], []
    for name in names:
        irs.append(np.asarray(Image.open(TINY / "ir" / name).convert("L"), np.float32) / 255)
        rgb = np.asarray(Image.open(TINY / "vi" / name).convert("RGB"), np.float32) / 255
        vis.append(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    ir = torch.from_numpy(np.stack(irs))[:, None]
    vi = torch.from_numpy(np.stack(vis))[:, None]
    return ir, vi


def test_fusion_loss_terms_and_total(perception, tiny_pairs):
    ir, vi = tiny_pairs
    cfg = LossConfig(w_l1=2.0, w_ssim=3.0, w_grad=5.0, w_per=0.5, c=1.0)
    loss = FusionLoss(cfg, perception)
    fused = (0.5 * (ir + vi)).requires_grad_(True)
    total, terms = loss(fused, ir, vi)
    assert set(terms) == {"l1", "ssim", "grad", "per"}
    # each term equals the stand-alone function with weights from separate ResNet calls
    with torch.no_grad():
        _, f_ir = perception(ir)
        _, f_vi = perception(vi)
        logits, _ = perception(fused.clamp(0, 1))
    w_ir, w_vi = information_weights(f_ir, f_vi, 1.0)
    w_ir_loss, w_vi_loss = loss.information_weights(ir, vi)
    torch.testing.assert_close(w_ir_loss, w_ir, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_vi_loss, w_vi, rtol=1e-4, atol=1e-5)
    expected = {
        "l1": weighted_l1_loss(fused, ir, vi, w_ir, w_vi),
        "ssim": weighted_ssim_loss(fused, ir, vi, w_ir, w_vi),
        "grad": max_gradient_loss(fused, ir, vi),
        "per": perception_entropy(logits),
    }
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-4), k
    weighted = 2.0 * terms["l1"] + 3.0 * terms["ssim"] + 5.0 * terms["grad"] + 0.5 * terms["per"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert 0 < terms["per"].item() < math.log(1000)


def test_fusion_loss_gradients_reach_fused_not_resnet(perception, tiny_pairs):
    ir, vi = tiny_pairs
    fused = torch.maximum(ir, vi).requires_grad_(True)
    total, _ = FusionLoss(LossConfig(), perception)(fused, ir, vi)
    total.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0
    assert all(p.grad is None for p in perception.parameters())


def test_perception_loss_sends_gradient_to_fused_only(perception, tiny_pairs):
    ir, vi = tiny_pairs
    fused = (0.5 * (ir + vi)).requires_grad_(True)
    module = PerceptionLoss(perception)
    value = module(fused)
    value.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0
    assert all(p.grad is None for p in perception.parameters())
    # a small step against the gradient lowers the entropy (the gradient is the real one)
    with torch.no_grad():
        step = fused - 1e-3 * fused.grad / fused.grad.abs().max()
        assert module(step).item() < value.item()


def test_resnet_is_not_part_of_the_loss_module(perception):
    loss = FusionLoss(LossConfig(), perception)
    assert len(loss.state_dict()) == 0
    assert len(list(loss.parameters())) == 0
    assert loss.perception is perception
    assert PerceptionLoss(perception).state_dict() == {}


def test_fusion_loss_to_moves_resnet(perception):
    loss = FusionLoss(LossConfig(), perception)
    loss.to(torch.float64)
    try:
        assert perception.net.fc.weight.dtype == torch.float64
        x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
        total, terms = loss(x, x, x)
        assert total.dtype == torch.float64
    finally:
        loss.to(torch.float32)
    assert perception.net.fc.weight.dtype == torch.float32


def test_fusion_loss_under_bf16_autocast(perception, tiny_pairs):
    """A bf16 network output under autocast: the terms come back in float32 and
    close to the float32 computation (the ResNet itself runs in bf16)."""
    ir, vi = tiny_pairs
    fused = (0.5 * (ir + vi)).requires_grad_(True)
    loss = FusionLoss(LossConfig(), perception)
    ref_total, ref = loss(fused, ir, vi)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, terms = loss(fused.bfloat16(), ir, vi)
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in terms.values())
    for k in ("l1", "ssim", "grad"):
        assert terms[k].item() == pytest.approx(ref[k].item(), rel=2e-2), k
    assert terms["per"].item() == pytest.approx(ref["per"].item(), rel=0.2)
    total.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()


def test_w_per_zero_reports_entropy_without_resnet_backward(perception, tiny_pairs):
    ir, vi = tiny_pairs
    fused = (0.5 * (ir + vi)).requires_grad_(True)
    cfg = LossConfig(w_l1=1.0, w_ssim=1.0, w_grad=1.0, w_per=0.0)
    total, terms = FusionLoss(cfg, perception)(fused, ir, vi)
    assert not terms["per"].requires_grad and terms["per"].item() > 0
    assert total.requires_grad


def test_fusion_loss_loads_resnet_from_config(monkeypatch, perception):
    """perception None -> load_resnet50(config.resnet_weights)."""
    import s4fusion.losses as losses

    asked = []

    def fake_load(weights=None, device=None):
        asked.append(weights)
        return perception

    monkeypatch.setattr(losses, "load_resnet50", fake_load)
    loss = FusionLoss(LossConfig(resnet_weights=str(WEIGHTS)))
    assert asked == [str(WEIGHTS)] and loss.perception is perception


def test_filters_first_used_under_inference_mode_still_train():
    """The Sobel and Gaussian filters are made once per dtype and device (a CUDA graph
    cannot record their host-to-device copy); made first under inference mode, they
    must still serve a differentiable call."""
    from s4fusion.losses import _gaussian_window, _sobel_kernels

    _gaussian_window.cache_clear()
    _sobel_kernels.cache_clear()
    with torch.inference_mode():
        ssim_map(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20))
        sobel_gradient(torch.rand(1, 1, 9, 9))
    x = torch.rand(1, 1, 20, 20, dtype=torch.float32, requires_grad=True)
    (ssim_map(x, torch.rand(1, 1, 20, 20)).sum() + sobel_gradient(x).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
