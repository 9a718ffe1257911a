"""The frozen ImageNet ResNet-50 of the perception loss (s4fusion.perception):
loading both weight conventions, the check photos of ../shared/weights, freezing,
gradient flow and clear errors."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from s4fusion.perception import PerceptionNet, PerceptionWeightsError, load_resnet50

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "resnet50_imagenet_v1.safetensors"
CHECK = SHARED / "weights" / "resnet50_check.safetensors"


@pytest.fixture(scope="module")
def net() -> PerceptionNet:
    if not WEIGHTS.is_file():
        pytest.fail(f"reference weights missing: {WEIGHTS} (the tests need ../shared beside the checkout)")
    return load_resnet50(WEIGHTS)


@pytest.fixture(scope="module")
def shared_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(WEIGHTS)).items()}


def test_check_photos_logits_and_labels(net):
    """Loaded with v1 strides and caffe preprocessing, the shipped file reproduces the
    logits stored beside it and predicts the four labels (tench, airliner, garbage
    truck, volcano)."""
    from safetensors.torch import load_file

    check = load_file(str(CHECK))
    assert net.convention == "caffe" and net.v1_strides
    with torch.no_grad():
        logits, features = net(check["rgb_uint8"].float() / 255.0)
    ref = check["logits"]
    assert ((logits - ref).norm() / ref.norm()).item() < 1e-4
    assert logits.argmax(1).tolist() == check["labels"].tolist()
    assert [tuple(f.shape) for f in features] == [(4, 256, 56, 56), (4, 512, 28, 28), (4, 1024, 14, 14), (4, 2048, 7, 7)]


def test_caffe_preprocessing_of_grey(net):
    """A grey value v becomes R = G = B, then BGR on 0..255 minus the BGR mean."""
    v = torch.tensor([0.0, 0.25, 1.0]).view(3, 1, 1, 1)
    x = net.preprocess(v)
    expected = torch.stack([255.0 * v[:, 0] - m for m in (103.939, 116.779, 123.68)], dim=1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-4)


def test_grey_equals_replicated_rgb(net):
    gray = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, fa = net(gray)
        b, fb = net(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y)


def test_frozen_and_passes_gradient_to_input(net):
    assert all(not p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not net.net.training
    assert all(not m.training for m in net.modules())
    gray = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    logits, features = net(gray)
    assert all(not f.requires_grad for f in features)
    logits.logsumexp(1).sum().backward()
    assert gray.grad is not None and gray.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_batch_equals_single_images(net):
    """Eval-mode BatchNorm: a sample's result does not depend on its batch."""
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch, _ = net(x)
        single = torch.cat([net(x[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-4)


def _stages(net, x):
    """torchvision ResNet forward -> [logits, layer1..layer4 outputs]."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return [net.fc(torch.flatten(net.avgpool(x), 1))] + out


def test_folded_batch_norms_equal_torchvision_resnet(shared_state):
    """Folding the eval-mode BatchNorms into their convolutions is exact in float64;
    PerceptionNet (folded in float32, channels-last) stays within float32 rounding of
    torchvision's ResNet-50 with its BatchNorms."""
    import copy

    from torchvision.models import resnet50

    from s4fusion.perception import _fold_batch_norms

    ref = resnet50(weights=None)
    ref.load_state_dict(shared_state)
    ref = ref.double().eval()
    folded = copy.deepcopy(ref)
    _fold_batch_norms(folded)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 67, 45, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = PerceptionNet(shared_state, "torchvision", v1_strides=False).double()
    with torch.no_grad():
        expected = _stages(ref, x)
        exact = _stages(folded, x)
        logits, features = net(x)
        expected_net = _stages(ref, net.preprocess(x))
    for got, want in zip(exact, expected):
        assert ((got - want).norm() / want.norm()).item() < 1e-12
    for got, want in zip([logits, *features], expected_net):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")
def test_on_the_gpu_convolutions_run_channels_last_with_the_same_results(monkeypatch):
    import copy

    from torchvision.models import resnet50

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    net = PerceptionNet(resnet50(weights=None).state_dict(), "caffe", v1_strides=True)
    gpu = copy.deepcopy(net).cuda()
    convs = [m for m in gpu.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 53 and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    x = torch.rand(2, 1, 64, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, _ = net(x)
        got, _ = gpu(x.cuda())
    assert ((got.cpu() - want).norm() / want.norm()).item() < 1e-5
    back = gpu.cpu()
    assert all(m.weight.is_contiguous() for m in back.net.modules() if isinstance(m, torch.nn.Conv2d))


def test_torchvision_state_dict_file(tmp_path, shared_state):
    """A .pth state dict is read with torchvision's convention: v1.5 strides and
    (x - mean) / std on RGB in [0, 1]."""
    path = tmp_path / "resnet50.pth"
    torch.save(shared_state, path)
    tv = load_resnet50(path)
    assert tv.convention == "torchvision" and not tv.v1_strides
    assert tv.net.layer2[0].conv1.stride == (1, 1) and tv.net.layer2[0].conv2.stride == (2, 2)
    v = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = torch.stack([(v[:, 0] - m) / s for m, s in zip(mean, std)], dim=1)
    torch.testing.assert_close(tv.preprocess(v), expected)
    torch.testing.assert_close(tv.net.fc.weight, shared_state["fc.weight"])


def test_none_uses_torchvision_download(monkeypatch, shared_state):
    """weights=None asks torchvision for IMAGENET1K_V1 (its own downloader is replaced
    here: tests never download)."""
    import torchvision.models._api as api

    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return shared_state

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    tv = load_resnet50(None)
    assert len(urls) == 1 and "resnet50" in urls[0]
    assert tv.convention == "torchvision" and not tv.v1_strides


def test_none_unreachable_says_pass_a_file(monkeypatch):
    import torchvision.models._api as api

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(api, "load_state_dict_from_url", unreachable)
    with pytest.raises(PerceptionWeightsError, match="could not be downloaded.*pass the weights file"):
        load_resnet50(None)


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PerceptionWeightsError, match="not found: .*nope.safetensors"):
        load_resnet50(missing)


def test_corrupt_files_named(tmp_path):
    for name in ("bad.safetensors", "bad.pth"):
        path = tmp_path / name
        path.write_bytes(b"not a weights file")
        with pytest.raises(PerceptionWeightsError, match=f"cannot read ResNet-50 weights .*{name}"):
            load_resnet50(path)


def test_wrong_network_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(PerceptionWeightsError, match="other.pth does not hold torchvision resnet50 weights"):
        load_resnet50(path)
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, nested)
    with pytest.raises(PerceptionWeightsError, match="nested.pth is not a plain state dict"):
        load_resnet50(nested)


def test_rejects_bad_input_shape(net):
    with pytest.raises(ValueError, match="grey or .* RGB"):
        net(torch.zeros(1, 2, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")
def test_on_the_gpu_bias_relu_passes_equal_the_modules():
    """On a GPU every bottleneck runs its biases, ReLUs and residual adds as
    ops.bias_relu passes after bias-free convolutions: the logits, the features and
    the input's gradient equal those of torchvision's blocks on the same GPU."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    net = PerceptionNet(resnet50(weights=None).state_dict(), "caffe", v1_strides=True).cuda()
    x = torch.rand(3, 1, 61, 75, generator=torch.Generator().manual_seed(5)).cuda().requires_grad_()
    logits, features = net(x)
    (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    expected = _stages(net.net, net.preprocess(x2).contiguous(memory_format=torch.channels_last))
    (expected_grad,) = torch.autograd.grad(expected[0].logsumexp(1).sum(), x2)
    for got, want in zip([logits, *features], expected):
        assert ((got - want).norm() / want.norm()).item() < 1e-6
    assert ((grad - expected_grad).norm() / expected_grad.norm()).item() < 1e-5
