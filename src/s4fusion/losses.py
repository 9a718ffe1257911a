"""The S4Fusion training losses (paper section 3.4, RELEASED-MODEL-FACTS.md section 6.2).

Each term is a function and a module; :class:`FusionLoss` combines them:

``L = w_l1 * L_l1 + w_ssim * L_ssim + w_grad * L_grad + w_per * L_per``

* ``L_l1``  (:func:`weighted_l1_loss`): ``mean_b(w_ir |ir - f|) + mean_b(w_vi |vi - f|)``,
  the absolute difference averaged over (C,H,W) per sample;
* ``L_ssim`` (:func:`weighted_ssim_loss`): the same weighting of the per-sample mean of
  the SSIM loss map ``clamp((1 - SSIM)/2, 0, 1)`` (Gaussian window 11, sigma 1.5,
  reflect border, as kornia's ``ssim_loss``);
* ``L_grad`` (:func:`max_gradient_loss`): ``mean |max(G(vi), G(ir)) - G(f)|`` with the
  Sobel magnitude ``G = |Gx| + |Gy|`` (zero padding);
* ``L_per`` (:func:`perception_entropy`): the entropy of ResNet-50's softmax over the
  1000 ImageNet classes for the fused image, ``mean_b sum_i -(p_i + 1e-9) ln(p_i + 1e-9)``.

The per-sample information weights ``(w_ir, w_vi) = softmax(g_ir / c, g_vi / c)``
(:func:`information_weights`) come from the mean squared Sobel response of the four
ResNet-50 stage outputs of each source (:func:`information_measure`), without gradient.
All formulas are those of the authors' compiled ``loss.py`` and reproduce its values
(``../shared/reference/golden/loss_unit.safetensors``); the weights, ``c`` and the way
images reach ResNet-50 are our choices, measured and explained in ``docs/LOSSES.md``.

Layouts: images are (B,1,H,W) float tensors in [0, 1] (the fused image unclamped);
feature maps (B,C,h,w); weights (B,); losses are 0-dim tensors.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .perception import PerceptionNet, load_resnet50

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
ENTROPY_EPS = 1e-9


# --------------------------------------------------------------------------- helpers


def _at_least_float32(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (differentiable); wider types unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_images(**images: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in images.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[1] != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected (B,1,H,W) images of one shape, got {shapes}")


@functools.lru_cache(maxsize=None)
def _sobel_kernels(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2,1,3,3): the x and y Sobel kernels of the released loss (cross-correlation).
    Made once per dtype and device (a host-to-device copy, which a CUDA graph cannot
    record) and never modified."""
    kx = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    ky = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]
    with torch.inference_mode(False):  # a normal tensor even if first made under inference mode
        return torch.tensor([[kx], [ky]], dtype=dtype, device=device)


def sobel_gradient(image: Tensor) -> Tensor:
    """Sobel magnitude ``|image * kx| + |image * ky|`` of every channel.

    image (B,C,H,W) -> (B,C,H,W); 3x3 cross-correlation, zero padding 1, each
    channel filtered on its own (the released ``Sobelxy``). Half-precision input is
    computed in float32, outside any autocast region."""
    image = _at_least_float32(image)
    b, c, h, w = image.shape
    # every image channel as a channel of one depthwise convolution (as ssim_map's filter)
    x = image.reshape(1, b * c, h, w)
    kernels = _sobel_kernels(image.dtype, image.device).repeat(b * c, 1, 1, 1)  # (2bc, 1, 3, 3)
    with torch.autocast(device_type=image.device.type, enabled=False):
        g = F.conv2d(x, kernels, padding=1, groups=b * c).view(b * c, 2, h, w)
    return (g[:, 0].abs() + g[:, 1].abs()).reshape(b, c, h, w)


@functools.lru_cache(maxsize=None)
def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised Gaussian taps (size,), made once per arguments and never modified."""
    with torch.inference_mode(False):
        x = torch.arange(size, dtype=dtype, device=device) - (size // 2)
        g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
        return g / g.sum()


def ssim_map(
    x: Tensor, y: Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, max_val: float = 1.0
) -> Tensor:
    """Per-pixel SSIM of two (B,C,H,W) images -> (B,C,H,W).

    Local moments with a normalised ``window_size``-tap Gaussian (``sigma``) applied
    separably with a reflect border ("same" size); ``C1 = (0.01 max_val)^2``,
    ``C2 = (0.03 max_val)^2``; ``SSIM = (2 mx my + C1)(2 sxy + C2) /
    ((mx^2 + my^2 + C1)(sx^2 + sy^2 + C2) + 1e-12)`` (kornia's ``metrics.ssim``).
    Needs H and W larger than ``window_size // 2``. Half-precision input is computed
    in float32 and the filtering runs outside any autocast region (the variance
    ``E[x^2] - mu^2`` cancels badly in 16-bit arithmetic)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B,C,H,W) images of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd, got {window_size}")
    r = window_size // 2
    if min(x.shape[-2:]) <= r:
        raise ValueError(f"ssim with a {window_size}-pixel window needs H and W > {r}, got {tuple(x.shape[-2:])}")
    x, y = _at_least_float32(x), _at_least_float32(y)
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(dtype)
    g = _gaussian_window(window_size, sigma, x.dtype, x.device)
    # The five moment maps are filtered together, each channel on its own (a depthwise
    # convolution: on CUDA torch's own depthwise kernels; cuDNN's algorithms for a
    # one-channel 11-tap filter took milliseconds per backward pass).
    moments = torch.cat([x, y, x * x, y * y, x * y], 1)
    n = moments.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        t = F.conv2d(F.pad(moments, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
        t = F.conv2d(F.pad(t, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    mx, my, ex2, ey2, exy = t.chunk(5, 1)
    c1 = (0.01 * max_val) ** 2
    c2 = (0.03 * max_val) ** 2
    mx2, my2, mxy = mx * mx, my * my, mx * my
    sx2 = ex2 - mx2
    sy2 = ey2 - my2
    sxy = exy - mxy
    num = (2.0 * mxy + c1) * (2.0 * sxy + c2)
    den = (mx2 + my2 + c1) * (sx2 + sy2 + c2)
    return num / (den + 1e-12)


def ssim_loss_map(x: Tensor, y: Tensor) -> Tensor:
    """Per-pixel SSIM loss ``clamp((1 - SSIM(x, y)) / 2, 0, 1)``, (B,C,H,W) -> (B,C,H,W)
    (kornia's ``ssim_loss(x, y, 11, reduction='none')``)."""
    return ((1.0 - ssim_map(x, y)) / 2.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- information weights


@torch.no_grad()
def information_measure(features: Sequence[Tensor]) -> Tensor:
    """Amount of information of each sample: for every feature map f (B,C,h,w) the
    mean over (C,h,w) of ``sobel_gradient(f)**2``, averaged over the maps -> (B,).
    No gradient (the released ``get_features_grad``)."""
    if len(features) == 0:
        raise ValueError("information_measure needs at least one feature map")
    total = None
    for f in features:
        g = sobel_gradient(f)
        m = g.pow(2).flatten(1).mean(1)
        total = m if total is None else total + m
    return total / len(features)


@torch.no_grad()
def information_weights(
    features_ir: Sequence[Tensor], features_vi: Sequence[Tensor], c: float
) -> tuple[Tensor, Tensor]:
    """Per-sample weights ``(w_ir, w_vi) = softmax([g_ir / c, g_vi / c])`` over the two
    sources, g from :func:`information_measure`; each (B,), summing to 1, no gradient.
    ``c`` > 0 is a temperature: small c -> the more informative source takes all,
    large c -> both 0.5."""
    if not c > 0:
        raise ValueError(f"the information-weight temperature c must be > 0, got {c}")
    g = torch.stack([information_measure(features_ir), information_measure(features_vi)])
    w = torch.softmax(g / c, dim=0)
    return w[0], w[1]


# --------------------------------------------------------------------------- loss terms


def _weighted_sum(per_ir: Tensor, per_vi: Tensor, w_ir: Tensor, w_vi: Tensor) -> Tensor:
    """mean_b(w_ir * per_ir) + mean_b(w_vi * per_vi) for per-pixel maps (B,1,H,W)."""
    return (w_ir * per_ir.flatten(1).mean(1)).mean() + (w_vi * per_vi.flatten(1).mean(1)).mean()


def weighted_l1_loss(fused: Tensor, infrared: Tensor, visible: Tensor, w_ir: Tensor, w_vi: Tensor) -> Tensor:
    """Weighted intensity loss ``mean_b(w_ir |ir - f|) + mean_b(w_vi |vi - f|)`` (per-sample
    mean over (C,H,W)); images (B,1,H,W), weights (B,) -> scalar."""
    _check_images(fused=fused, infrared=infrared, visible=visible)
    return _weighted_sum((infrared - fused).abs(), (visible - fused).abs(), w_ir, w_vi)


def weighted_ssim_loss(fused: Tensor, infrared: Tensor, visible: Tensor, w_ir: Tensor, w_vi: Tensor) -> Tensor:
    """Weighted SSIM loss ``mean_b(w_ir S(ir, f)) + mean_b(w_vi S(vi, f))`` with S the
    per-sample mean of :func:`ssim_loss_map`; images (B,1,H,W), weights (B,) -> scalar."""
    _check_images(fused=fused, infrared=infrared, visible=visible)
    return _weighted_sum(ssim_loss_map(infrared, fused), ssim_loss_map(visible, fused), w_ir, w_vi)


def max_gradient_loss(fused: Tensor, infrared: Tensor, visible: Tensor) -> Tensor:
    """Max-gradient loss ``mean |max(G(vi), G(ir)) - G(f)|`` over all elements, G the
    Sobel magnitude (:func:`sobel_gradient`); images (B,1,H,W) -> scalar."""
    _check_images(fused=fused, infrared=infrared, visible=visible)
    target = torch.maximum(sobel_gradient(visible), sobel_gradient(infrared))
    return F.l1_loss(sobel_gradient(fused), target)


def perception_entropy(logits: Tensor) -> Tensor:
    """Perception-enhanced loss: mean over the batch of the entropy of
    ``p = softmax(logits)``, ``sum_i -(p_i + 1e-9) ln(p_i + 1e-9)``; logits (B,K) -> scalar
    in nats (0 = certain, ln K = uniform). Computed in at least float32."""
    if logits.dim() != 2:
        raise ValueError(f"expected (B, classes) logits, got shape {tuple(logits.shape)}")
    p = torch.softmax(_at_least_float32(logits), dim=1) + ENTROPY_EPS
    return (-(p * torch.log(p))).sum(1).mean()


class WeightedL1Loss(nn.Module):
    """Module form of :func:`weighted_l1_loss`: forward(fused, infrared, visible, w_ir, w_vi)."""

    def forward(self, fused: Tensor, infrared: Tensor, visible: Tensor, w_ir: Tensor, w_vi: Tensor) -> Tensor:
        return weighted_l1_loss(fused, infrared, visible, w_ir, w_vi)


class WeightedSSIMLoss(nn.Module):
    """Module form of :func:`weighted_ssim_loss`: forward(fused, infrared, visible, w_ir, w_vi)."""

    def forward(self, fused: Tensor, infrared: Tensor, visible: Tensor, w_ir: Tensor, w_vi: Tensor) -> Tensor:
        return weighted_ssim_loss(fused, infrared, visible, w_ir, w_vi)


class MaxGradientLoss(nn.Module):
    """Module form of :func:`max_gradient_loss`: forward(fused, infrared, visible)."""

    def forward(self, fused: Tensor, infrared: Tensor, visible: Tensor) -> Tensor:
        return max_gradient_loss(fused, infrared, visible)


class _HoldsPerception(nn.Module):
    """Keeps a :class:`PerceptionNet` outside the module tree (so it is in no
    ``state_dict`` and no ``parameters()``) while ``.to()``/``.cuda()``/``.float()``
    still move it with the module."""

    def _set_perception(self, perception: PerceptionNet) -> None:
        object.__setattr__(self, "_perception", perception)

    @property
    def perception(self) -> PerceptionNet:
        """The frozen ResNet-50 (not a submodule)."""
        return self.__dict__["_perception"]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's internal signature
        self.__dict__["_perception"]._apply(fn)
        return super()._apply(fn, recurse)


class PerceptionLoss(_HoldsPerception):
    """Module form of the perception-enhanced loss: forward(fused) -> entropy of the
    frozen ResNet-50's decision on ``fused.clamp(0, 1)`` (scalar). The ResNet is not
    a submodule: it is never saved and gets no gradient; the fused image does."""

    def __init__(self, perception: PerceptionNet) -> None:
        super().__init__()
        self._set_perception(perception)

    def forward(self, fused: Tensor) -> Tensor:
        logits, _ = self.perception(fused.clamp(0.0, 1.0))
        return perception_entropy(logits)


# --------------------------------------------------------------------------- total loss


@dataclass
class LossConfig:
    """Weights and constants of the S4Fusion training loss (choices in docs/LOSSES.md).

    ``L = w_l1 L_l1 + w_ssim L_ssim + w_grad L_grad + w_per L_per``. The paper's text
    keeps only "We set the hyperparameters [three lost symbols] to 15", so three
    terms are weighted 15 here (L1, SSIM, gradient). The perception entropy gets
    0.1, chosen by experiment (docs/LOSSES.md, experiments 2 and 3). Its gradient
    with respect to the fused image is about 1000 times that of the other terms.
    In 300-step trainings of the full network (H200, batch 8, 229x229 crops),
    ``w_per = 1`` (the literal "15, 15, 15 and 1") lowered the entropy to 0.5 nats,
    but the SSIM term rose by 49 %, the gradient term by 35 %, and blocky
    artefacts appeared. ``w_per = 0.1`` lowered the entropy from 3.9..4.0 to
    1.6..2.6 nats and left each structural term at most 14 % above a run without
    it (between two runs without it the terms differ by up to 10 %). Half-way
    through and at the end it held 30..43 % of the parameter-gradient norm
    (``w_per = 0.03``: no measurable effect; ``0.3``: visibly blurred).

    ``c``: temperature of the information weights ``softmax(g / c)``. On 368 real
    229x229 training crops g (mean squared Sobel response of the ResNet-50 stage
    outputs) is 17..51 and the infrared-visible gap |g_ir - g_vi| has median 4.5;
    ``c = 5`` spreads w_ir over 0.12..0.92 (5th..95th percentile) with 0.8 % of the
    crops saturated (w < 0.02 or > 0.98), where c = 1 saturates 57 % and c = 30
    leaves 62 % within 0.05 of 0.5 (docs/LOSSES.md, experiment 1). ``c`` is tied to
    the feature scale of the weight file it was measured with
    (``resnet50_imagenet_v1.safetensors``).

    ResNet-50 input: the grey image in [0, 1] is replicated to three equal channels,
    then given the preprocessing its weights expect (caffe or torchvision, see
    :mod:`s4fusion.perception`); the fused image is clamped to [0, 1] first, as it
    is when saved.

    ``resnet_weights``: the weights file given to :func:`load_resnet50` (None: torchvision's
    download).
    """

    w_l1: float = 15.0
    w_ssim: float = 15.0
    w_grad: float = 15.0
    w_per: float = 0.1
    c: float = 5.0
    resnet_weights: str | None = None

    def __post_init__(self) -> None:
        for name in ("w_l1", "w_ssim", "w_grad", "w_per"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"the information-weight temperature c must be a finite number > 0, got {self.c!r}")
        self.c = float(self.c)
        if self.resnet_weights is not None:
            self.resnet_weights = os.fspath(self.resnet_weights)


class FusionLoss(_HoldsPerception):
    """The S4Fusion training loss (module docstring), with its frozen ResNet-50.

    ``perception`` None -> ``load_resnet50(config.resnet_weights)``. The ResNet is not
    a submodule (never in a state_dict), but ``FusionLoss.to(device)`` moves it.
    ``forward(fused, infrared, visible)``, all (B,1,H,W) in [0, 1] (fused unclamped)
    -> ``(total, {"l1", "ssim", "grad", "per"})``: the weighted total and the four
    unweighted terms (0-dim tensors; detach them for logging). Per step it runs the
    ResNet on the 2B sources without gradient (information weights) and on the B
    fused images with gradient (entropy); when ``w_per`` is 0 the entropy is still
    reported but computed without gradient. Half-precision inputs (e.g. a network
    output under bf16 autocast) are upcast: the terms are computed in float32."""

    def __init__(self, config: LossConfig, perception: PerceptionNet | None = None) -> None:
        super().__init__()
        self.config = config
        self._set_perception(perception if perception is not None else load_resnet50(config.resnet_weights))
        self.l1 = WeightedL1Loss()
        self.ssim = WeightedSSIMLoss()
        self.grad = MaxGradientLoss()

    def information_weights(self, infrared: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        """(w_ir, w_vi), each (B,), from ResNet-50 features of the two sources."""
        b = infrared.shape[0]
        with torch.no_grad():
            _, features = self.perception(torch.cat([infrared, visible]))
        return information_weights([f[:b] for f in features], [f[b:] for f in features], self.config.c)

    def forward(self, fused: Tensor, infrared: Tensor, visible: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _check_images(fused=fused, infrared=infrared, visible=visible)
        fused, infrared, visible = (_at_least_float32(t) for t in (fused, infrared, visible))
        cfg = self.config
        w_ir, w_vi = self.information_weights(infrared, visible)
        w_ir, w_vi = w_ir.to(fused.dtype), w_vi.to(fused.dtype)
        terms = {
            "l1": self.l1(fused, infrared, visible, w_ir, w_vi),
            "ssim": self.ssim(fused, infrared, visible, w_ir, w_vi),
            "grad": self.grad(fused, infrared, visible),
        }
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_per > 0):
            logits, _ = self.perception(fused.clamp(0.0, 1.0))
            terms["per"] = perception_entropy(logits)
        total = cfg.w_l1 * terms["l1"] + cfg.w_ssim * terms["ssim"] + cfg.w_grad * terms["grad"]
        total = total + cfg.w_per * terms["per"]
        return total, terms
