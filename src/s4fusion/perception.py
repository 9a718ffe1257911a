"""The frozen ImageNet ResNet-50 of the perception-enhanced loss.

The paper (section 3.4) measures the information in each source image with the
features of a pretrained ResNet-50 and the certainty of the fused image with its
class distribution. The authors' ``ResNet/resnet50.py`` is torchvision's
ResNet-50 returning ``(logits, [layer1..layer4 outputs, detached])``
(RELEASED-MODEL-FACTS.md section 6.4); :class:`PerceptionNet` does the same and
adds the input handling the authors did not release:

* a one-channel image in [0, 1] is replicated to three equal channels (a grey
  photograph is exactly an RGB image with R = G = B), then given the
  preprocessing its weights were trained with (below);
* the network is frozen: eval mode always (BatchNorm uses its running
  statistics, so a batch gives the same result as its images one by one) and no
  parameter requires a gradient. Gradients still flow through it to the input.
* being frozen, every BatchNorm is an affine map per channel: it is folded into
  the convolution before it (weight scaled, bias added), and on a GPU the network
  runs channels-last, the layout of cuDNN's tensor-core convolutions, with each
  convolution's bias, the ReLU and a block's residual add as one pass after it
  (:func:`s4fusion.ops.bias_relu`).

Two weight conventions exist (``../shared/weights/README.md``):

``"caffe"``
    Kaiming He's original ResNet-50 (the Keras/npm port shipped as
    ``resnet50_imagenet_v1.safetensors``): stride 2 on the first 1x1 conv of
    ``layer2..4`` ("v1"), input = RGB on 0..255 reordered to BGR minus the
    per-channel mean (103.939, 116.779, 123.68), no std. Recognised from the
    safetensors metadata (``preprocessing`` starts with ``caffe``).
``"torchvision"``
    torchvision's ``IMAGENET1K_V1`` (what the authors' ``resnet50(pretrained=True)``
    loads): stride on the 3x3 conv ("v1.5"), input = RGB in [0, 1] minus mean
    (0.485, 0.456, 0.406) divided by std (0.229, 0.224, 0.225). Used for
    ``.pth``/``.pt`` state dicts, for safetensors files without that metadata and
    for torchvision's own download.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .models.layers import conv2d_without_bias

Convention = Literal["caffe", "torchvision"]

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

_HINT = (
    "pass the weights file explicitly: resnet50_imagenet_v1.safetensors (shipped in the project's shared "
    "weights folder) or a torchvision resnet50 state dict (.pth) such as resnet50-0676ba61.pth"
)


class PerceptionWeightsError(ValueError):
    """The ResNet-50 weights cannot be found, read or loaded."""


class PerceptionNet(nn.Module):
    """Frozen ImageNet ResNet-50 returning its decision and its four stage outputs.

    Build it with :func:`load_resnet50`. ``convention`` is the preprocessing the
    weights expect (module docstring); ``v1_strides`` moves the stride-2 of the
    first block of ``layer2..4`` from the 3x3 conv to the first 1x1 conv.
    """

    def __init__(self, state_dict: dict[str, Tensor], convention: Convention, v1_strides: bool) -> None:
        super().__init__()
        from torchvision.models import resnet50

        if convention not in ("caffe", "torchvision"):
            raise ValueError(f"convention must be 'caffe' or 'torchvision', got {convention!r}")
        net = resnet50(weights=None)
        net.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        if v1_strides:
            for layer in (net.layer2, net.layer3, net.layer4):
                layer[0].conv1.stride = (2, 2)
                layer[0].conv2.stride = (1, 1)
        _fold_batch_norms(net)
        self.net = net
        self.convention: Convention = convention
        self.v1_strides = v1_strides
        if convention == "caffe":
            scale = 255.0
            mean_rgb = tuple(reversed(CAFFE_MEAN_BGR))  # per-channel mean after the BGR reorder, in RGB order
            std = (1.0, 1.0, 1.0)
        else:
            scale = 1.0
            mean_rgb = TORCHVISION_MEAN
            std = TORCHVISION_STD
        # Input x in [0, 1] -> (scale * x - mean) / std, channel-wise in RGB order.
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        self.register_buffer("mean", torch.tensor(mean_rgb).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "PerceptionNet":
        """Stays in eval mode whatever ``mode`` is: the network is frozen."""
        return super().train(False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """After a move (``.to``, ``.cuda``, ``.double``): convolution weights
        channels-last on a GPU (cuDNN's tensor-core kernels take NHWC; NCHW costs a layout
        conversion around every convolution), contiguous elsewhere (oneDNN's channels-last
        kernels on a CPU give results that depend on the batch at float rounding)."""
        super()._apply(fn, recurse)
        layout = torch.channels_last if self.mean.is_cuda else torch.contiguous_format
        for m in self.net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=layout)
        return self

    def preprocess(self, image: Tensor) -> Tensor:
        """(B,1,H,W) grey or (B,3,H,W) RGB in [0, 1] -> (B,3,H,W) network input.

        Grey is replicated to R = G = B. For "caffe" weights the channels are then
        reordered to BGR on the 0..255 scale minus the BGR mean."""
        if image.dim() != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B,1,H,W) grey or (B,3,H,W) RGB image, got shape {tuple(image.shape)}")
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        x = (image * self.scale - self.mean) / self.std
        if self.convention == "caffe":
            x = x.flip(1)
        return x

    def forward(self, gray: Tensor) -> tuple[Tensor, list[Tensor]]:
        """gray (B,1,H,W) in [0, 1] (or RGB (B,3,H,W)) -> (logits (B,1000),
        [layer1 (B,256,H/4,W/4), layer2 (B,512,H/8,W/8), layer3 (B,1024,H/16,W/16),
        layer4 (B,2048,H/32,W/32)]); the feature maps are detached (they are for the
        information measure), the logits carry the gradient to ``gray``."""
        net = self.net
        x = self.preprocess(gray)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            x = net.maxpool(ops.bias_relu(conv2d_without_bias(net.conv1, x), net.conv1.bias))
        else:
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        features = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x = _bottleneck_cuda(block, x) if x.is_cuda else block(x)
            features.append(x.detach())
        logits = net.fc(torch.flatten(net.avgpool(x), 1))
        return logits, features


def _bottleneck_cuda(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's folded Bottleneck, ``relu(conv3(relu(conv2(relu(conv1(x))))) + identity)``,
    with each convolution's bias and the ReLU (and the residual add) as one pass
    (:func:`s4fusion.ops.bias_relu`) after the bias-free convolution. On CUDA, PyTorch
    adds a convolution's bias in a pass of its own, then the residual and the ReLU in
    two more; the sums are the same, in the same order. (On a CPU, oneDNN adds the bias
    inside its convolution, and the module runs as it is.)"""
    out = ops.bias_relu(conv2d_without_bias(block.conv1, x), block.conv1.bias)
    out = ops.bias_relu(conv2d_without_bias(block.conv2, out), block.conv2.bias)
    identity = x if block.downsample is None else block.downsample(x)
    return ops.bias_relu(conv2d_without_bias(block.conv3, out), block.conv3.bias, identity)


def _fold_batch_norms(net: nn.Module) -> None:
    """Replace every (Conv2d, eval-mode BatchNorm2d) pair of torchvision's ResNet
    (``conv``/``bn`` attributes of the stem and blocks, ``downsample[0]``/``[1]``) by
    one Conv2d: ``bn(conv(x)) = s * conv(x) + (beta - s * mean)`` with
    ``s = gamma / sqrt(var + eps)``, computed in float64."""

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = bn.bias.double() - s * bn.running_mean.double()
        if conv.bias is not None:
            bias = bias + s * conv.bias.double()
        conv.weight.data = (conv.weight.double() * s.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)

    pairs = [(net, "conv1", "bn1")]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for owner, conv, bn in pairs:
        fold(getattr(owner, conv), getattr(owner, bn))
        setattr(owner, bn, nn.Identity())


def _read_weights(path: Path) -> tuple[dict[str, Tensor], Convention, bool]:
    """State dict and convention of a weights file (module docstring)."""
    if not path.is_file():
        raise PerceptionWeightsError(f"ResNet-50 weights file not found: {path}; {_HINT}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise PerceptionWeightsError(f"cannot read ResNet-50 weights {path}: {e}; {_HINT}") from e
        if metadata.get("preprocessing", "").lower().startswith("caffe"):
            architecture = metadata.get("architecture", "")
            return state, "caffe", "ResNet-50 v1 " in architecture
        return state, "torchvision", False
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        raise PerceptionWeightsError(f"cannot read ResNet-50 weights {path}: {e}; {_HINT}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PerceptionWeightsError(
            f"{path} is not a plain state dict (name -> tensor) of torchvision's resnet50; {_HINT}"
        )
    return state, "torchvision", False


def _download_torchvision() -> dict[str, Tensor]:
    """torchvision's IMAGENET1K_V1 weights (its cache, else a download)."""
    from torchvision.models import ResNet50_Weights

    try:
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise PerceptionWeightsError(
            f"torchvision's ResNet-50 IMAGENET1K_V1 weights could not be downloaded ({e}); {_HINT}"
        ) from e


def load_resnet50(
    weights: str | os.PathLike | None = None, device: torch.device | str | None = None
) -> PerceptionNet:
    """Frozen ImageNet ResNet-50 (eval mode, ``requires_grad`` False).

    ``weights``: a file the user names, either our ``.safetensors`` (its metadata
    selects the "caffe" convention and v1 strides, see ``../shared/weights/README.md``)
    or a torchvision ``resnet50`` state dict (``.pth``/``.pt``/plain ``.safetensors``,
    "torchvision" convention); ``None`` -> torchvision's own ``IMAGENET1K_V1``
    from its cache or a download, else :class:`PerceptionWeightsError` saying to
    pass a file. Raises :class:`PerceptionWeightsError` naming the file when it is
    missing, unreadable or not a ResNet-50."""
    if weights is None:
        state, convention, v1 = _download_torchvision(), "torchvision", False
        source = "torchvision IMAGENET1K_V1"
    else:
        path = Path(weights).expanduser()
        state, convention, v1 = _read_weights(path)
        source = str(path)
    try:
        net = PerceptionNet(state, convention, v1)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or wrong shapes
        raise PerceptionWeightsError(f"{source} does not hold torchvision resnet50 weights: {e}") from e
    if device is not None:
        net = net.to(device)
    return net
