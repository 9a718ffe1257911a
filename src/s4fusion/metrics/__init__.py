"""No-reference fusion metrics of the infrared-visible fusion literature, in the two
conventions that circulate (``../shared/reference/METRICS.md`` is the specification).

* ``matlab`` (default): the MATLAB toolbox of Linfeng-Tang/Evaluation-for-Image-Fusion
  (2023 revision), which the S4Fusion paper's tables match: MI in bits, SSIM the
  *average* of two MATLAB ``ssim`` values, PSNR/MSE on the [0, 1]-scaled MSE, Nabf
  with the toolbox's argument order, MS-SSIM = multi-scale MEF-SSIM.
* ``cddfuse``: CDDFuse's ``utils/Evaluator.py`` (also EMMA, DDFM): MI in nats, SSIM the
  *sum* of two scikit-image SSIMs, PSNR with ``max(F)`` as peak, MSE on 0..255,
  float32 arithmetic; Nabf and MS-SSIM are not defined there and are returned as NaN.

Example::

    from s4fusion.metrics import evaluate_pair
    scores = evaluate_pair(fused, infrared, visible)            # matlab convention
    scores = evaluate_pair("f.png", "ir.png", "vi.png", convention="cddfuse")

Inputs may be files or in-memory images (see :mod:`s4fusion.metrics.inputs`): the
infrared image is always the second argument, the visible one the third.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import basic, edges, information, structural, vif
from .inputs import CONVENTIONS, check_convention, grey_levels, read_grey, rgb_to_grey

METRIC_NAMES: tuple[str, ...] = (
    "EN", "SD", "SF", "AG", "MI", "SCD", "CC", "PSNR", "MSE", "VIF", "Qabf", "Nabf", "SSIM", "MS_SSIM",
)  # fmt: skip

# Metrics each convention defines (the others are NaN in that convention).
DEFINED: dict[str, tuple[str, ...]] = {
    "matlab": METRIC_NAMES,
    "cddfuse": tuple(m for m in METRIC_NAMES if m not in ("Nabf", "MS_SSIM")),
}

# Whether a larger value is better (for table annotations); MSE and Nabf: lower is better.
HIGHER_IS_BETTER: dict[str, bool] = {m: m not in ("MSE", "Nabf") for m in METRIC_NAMES}

# Smallest image side every metric accepts: VIF's four scales need 41 pixels. MS-SSIM
# needs 44; below that the toolbox returns -inf, which is passed through.
MIN_SIZE = 41

_Grey = tuple[np.ndarray, np.ndarray, np.ndarray]  # (F, A, B) in a convention's dtype


def _matlab_metrics() -> dict[str, Callable[[_Grey, _Grey], float]]:
    """Metric name -> function of (uint8 images, float64 0..255 images), each ``(F, A, B)``."""

    return {
        "EN": lambda u, d: information.entropy_bits(u[0]),
        "SD": lambda u, d: basic.standard_deviation(d[0]),
        "SF": lambda u, d: basic.spatial_frequency(d[0]),
        "AG": lambda u, d: basic.average_gradient_matlab(d[0]),
        "MI": lambda u, d: (
            information.mutual_information_matlab(u[0], u[1]) + information.mutual_information_matlab(u[0], u[2])
        ),
        "SCD": lambda u, d: basic.scd_matlab(*d),
        "CC": lambda u, d: basic.cc_matlab(*d),
        "PSNR": lambda u, d: basic.psnr_matlab(*d),
        "MSE": lambda u, d: basic.mse_matlab(*d),
        "VIF": lambda u, d: sum(vif.vifp_many((d[1], d[2]), d[0])),
        "Qabf": lambda u, d: edges.qabf(*d),
        # Toolbox quirk: analysis_nabf(img1, img2, img_f), i.e. infrared in the fused slot.
        "Nabf": lambda u, d: edges.nabf(d[1], d[2], d[0]),
        "SSIM": lambda u, d: _mean_of_two(structural.ssim_matlab_many(d[0], (d[1], d[2]))),
        "MS_SSIM": lambda u, d: structural.mef_ssim_multiscale(d[1], d[2], d[0]),
    }


def _mean_of_two(values: list[float]) -> float:
    """``0.5 * v1 + 0.5 * v2``, as ``analysis_Reference.m`` averages the two SSIMs."""
    return 0.5 * values[0] + 0.5 * values[1]


def _cddfuse_vif(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """CDDFuse's VIFF: sum of the two VIFPs, a NaN VIFP replaced by 1.0."""
    return sum(1.0 if math.isnan(v) else v for v in vif.vifp_many((a, b), f))


def _cddfuse_metrics() -> dict[str, Callable[[_Grey], float]]:
    """Metric name -> function of the float32 0..255 images ``(F, A, B)``."""
    return {
        "EN": lambda d: information.entropy_bits(np.uint8(np.round(d[0]))),
        "SD": lambda d: basic.standard_deviation(d[0]),
        "SF": lambda d: basic.spatial_frequency(d[0]),
        "AG": lambda d: basic.average_gradient_cddfuse(d[0]),
        "MI": lambda d: (
            information.mutual_information_nats(d[0], d[1]) + information.mutual_information_nats(d[0], d[2])
        ),
        "SCD": lambda d: basic.scd_cddfuse(*d),
        "CC": lambda d: basic.cc_cddfuse(*d),
        "PSNR": lambda d: basic.psnr_cddfuse(*d),
        "MSE": lambda d: basic.mse_cddfuse(*d),
        "VIF": lambda d: _cddfuse_vif(*d),
        "Qabf": lambda d: edges.qabf(*d),
        "SSIM": lambda d: structural.ssim_skimage(d[0], d[1]) + structural.ssim_skimage(d[0], d[2]),
    }


_MATLAB = _matlab_metrics()
_CDDFUSE = _cddfuse_metrics()


def _select(metrics: Optional[Iterable[str]]) -> tuple[str, ...]:
    if metrics is None:
        return METRIC_NAMES
    chosen = tuple(metrics)
    unknown = [m for m in chosen if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    return chosen


def evaluate_pair(
    fused: Any,
    infrared: Any,
    visible: Any,
    convention: str = "matlab",
    metrics: Optional[Iterable[str]] = None,
) -> dict[str, float]:
    """Score one fused image against its infrared and visible sources.

    Args:
        fused, infrared, visible: images of the same size: file paths, numpy arrays
            / PIL images ``(H, W)`` or ``(H, W, 3)`` RGB, or torch tensors
            ``(H, W)``, ``(C, H, W)``, ``(1, C, H, W)``; ``uint8`` grey levels or
            floats on [0, 1] (quantised to 8 bits first, as a saved PNG would be).
            Colour is reduced to grey as the convention's toolbox does.
        convention: ``"matlab"`` (default) or ``"cddfuse"``.
        metrics: names to compute (default: all of :data:`METRIC_NAMES`).

    Returns:
        ``{name: value}`` in the order requested. Metrics the convention does not
        define (Nabf, MS_SSIM under ``cddfuse``) are NaN.
    """
    check_convention(convention)
    names = _select(metrics)
    f = grey_levels(fused, convention, "fused")
    a = grey_levels(infrared, convention, "infrared")
    b = grey_levels(visible, convention, "visible")
    if not f.shape == a.shape == b.shape:
        raise ValueError(
            f"image sizes differ: fused {f.shape}, infrared {a.shape}, visible {b.shape} (H, W); "
            "the metrics compare pixels one to one, so the three images must have the same size"
        )
    if min(f.shape) < MIN_SIZE:
        raise ValueError(f"image of size {f.shape} is too small: the metrics need at least {MIN_SIZE} pixels per side")
    # Degenerate inputs (e.g. F equal to a source, a flat image) give 0/0 in some
    # metrics; the toolboxes return NaN/inf there, and so do we, without warnings.
    with np.errstate(divide="ignore", invalid="ignore"):
        if convention == "matlab":
            u = (f, a, b)
            d = (f.astype(np.float64), a.astype(np.float64), b.astype(np.float64))
            return {m: float(_MATLAB[m](u, d)) for m in names}
        d32 = (f, a, b)
        return {m: float(_CDDFUSE[m](d32)) if m in _CDDFUSE else math.nan for m in names}


__all__ = [
    "CONVENTIONS",
    "DEFINED",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "MIN_SIZE",
    "evaluate_pair",
    "grey_levels",
    "read_grey",
    "rgb_to_grey",
]
