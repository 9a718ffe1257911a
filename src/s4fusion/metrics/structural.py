"""Structural similarity metrics (METRICS.md section 3): MATLAB ``ssim``,
scikit-image 0.19 ``structural_similarity`` (CDDFuse), and the multi-scale
MEF-SSIM of Ma, Zeng & Wang (2015) that the MATLAB toolbox reports as MS-SSIM.

Images are ``(H, W)`` arrays on the 0..255 scale.
"""

from __future__ import annotations

import math

import numpy as np

from ._filters import box_sum_valid, correlate_replicate, correlate_valid, gaussian_1d, uniform_filter_float32

_SSIM_WINDOW = gaussian_1d(11, 1.5)


def ssim_matlab_many(x: np.ndarray, others: tuple[np.ndarray, ...]) -> list[float]:
    """MATLAB IPT ``ssim(x, y)`` for each ``y`` in ``others`` (default options, double data).

    11x11 Gaussian (sigma 1.5) with edge-replicating padding, population moments,
    ``C1 = 0.01^2``, ``C2 = 0.03^2`` (``DynamicRange`` 1 for class double even though
    the data are 0..255, as the toolbox calls it), mean of the map over all pixels.
    The filtered moments of ``x`` are computed once.
    """
    x = np.asarray(x, dtype=np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mx = correlate_replicate(x, _SSIM_WINDOW)
    mx2 = mx * mx
    sx = correlate_replicate(x * x, _SSIM_WINDOW) - mx2
    values = []
    for y in others:
        y = np.asarray(y, dtype=np.float64)
        my = correlate_replicate(y, _SSIM_WINDOW)
        my2, mxy = my * my, mx * my
        sy = correlate_replicate(y * y, _SSIM_WINDOW) - my2
        sxy = correlate_replicate(x * y, _SSIM_WINDOW) - mxy
        num = (2 * mxy + c1) * (2 * sxy + c2)
        den = (mx2 + my2 + c1) * (sx + sy + c2)
        values.append(float(np.mean(num / den)))
    return values


def ssim_matlab(x: np.ndarray, y: np.ndarray) -> float:
    """MATLAB ``ssim(x, y)`` of two ``(H, W)`` images (see :func:`ssim_matlab_many`)."""
    return ssim_matlab_many(x, (y,))[0]


def ssim_skimage(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image 0.19.2 ``structural_similarity(x, y)`` on float32 0..255 data (CDDFuse).

    7x7 box window, sample covariance (49/48), ``data_range = 2`` inferred from the
    float dtype (``C1 = 4e-4``, ``C2 = 3.6e-3``), map in float32, mean over the
    interior that excludes a 3-pixel border, accumulated in float64. (The border
    windows are cropped, but scipy's running sum starts in the reflected border,
    so the filter reproduces that too.)
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    size, pad = 7, 3
    cov_norm = size * size / (size * size - 1.0)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    ux, uy = uniform_filter_float32(x, size), uniform_filter_float32(y, size)
    uxx = uniform_filter_float32(x * x, size)
    uyy = uniform_filter_float32(y * y, size)
    uxy = uniform_filter_float32(x * y, size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    a1, a2 = 2 * ux * uy + c1, 2 * vxy + c2
    b1, b2 = ux**2 + uy**2 + c1, vx + vy + c2
    s = (a1 * a2) / (b1 * b2)
    return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


# ---- MEF-SSIM (analysis_ms_ssim.m + mef_ssim.m) ------------------------------------

MEF_LEVELS = 3
_RAW_WEIGHTS = (0.0448, 0.2856, 0.3001)
MEF_WEIGHTS = tuple(w / sum(_RAW_WEIGHTS) for w in _RAW_WEIGHTS)
_MEF_WSIZE = 11
_MEF_C = (0.03 * 255) ** 2
_EPS = float(np.finfo(np.float64).eps)
# Grey levels are shifted by this constant before the Gaussian moments are taken:
# the moments are shift invariant, and centring the data reduces cancellation.
_SHIFT = 128.0


def _mef_ssim_level(x1: np.ndarray, x2: np.ndarray, f: np.ndarray) -> float:
    """Single-scale MEF-SSIM of ``f`` for the two-image "exposure sequence" ``(x1, x2)``.

    Vectorised form of ``mef_ssim.m``: every quantity of the per-pixel loop (patch
    norms, the synthesised structure ``r``, its Gaussian-weighted moments with the
    patch of ``f``) is written with box sums and Gaussian-filtered products, which
    are exact re-arrangements of the per-patch sums. Box sums of the (integer or
    dyadic) grey levels are exact, so flat patches give exact zeros.
    """
    n = _MEF_WSIZE
    area = float(n * n)
    x1 = x1 - _SHIFT
    x2 = x2 - _SHIFT
    f = f - _SHIFT
    s1, s2 = box_sum_valid(x1, n), box_sum_valid(x2, n)
    q11 = (area * box_sum_valid(x1 * x1, n) - s1 * s1) / area  # sum over the patch of (x1 - mu1)^2
    q22 = (area * box_sum_valid(x2 * x2, n) - s2 * s2) / area
    q12 = (area * box_sum_valid(x1 * x2, n) - s1 * s2) / area
    q11 = np.maximum(q11, 0.0)
    q22 = np.maximum(q22, 0.0)
    ed1 = np.sqrt(q11) + 0.001  # sqrt(max(121 * sigma^2, 0)) + 0.001
    ed2 = np.sqrt(q22) + 0.001

    den = np.sqrt(q11) + np.sqrt(q22)
    num = np.sqrt(np.maximum(q11 + q22 + 2 * q12, 0.0))
    ratio = (num + _EPS) / (den + _EPS)
    ratio[ratio > 1] = 1 - _EPS
    ratio[ratio < 0] = _EPS
    p = np.minimum(np.tan(math.pi / 2 * ratio), 10.0)
    w1 = (ed1 / n) ** p + _EPS
    w2 = (ed2 / n) ** p + _EPS
    total = w1 + w2
    w1, w2 = w1 / total, w2 / total
    max_ed = np.maximum(ed1, ed2)

    # r = c1 (x1 - mu1) + c2 (x2 - mu2) on each patch, rescaled to norm max_ed; the patch
    # means mu_k cancel in every centred moment below.
    c1, c2 = w1 / ed1, w2 / ed2
    r_norm2 = c1 * c1 * q11 + c2 * c2 * q22 + 2 * c1 * c2 * q12
    scale = np.ones_like(r_norm2)
    positive = r_norm2 > 0
    scale[positive] = max_ed[positive] / np.sqrt(r_norm2[positive])
    c1, c2 = c1 * scale, c2 * scale

    k = _SSIM_WINDOW
    g1, g2, gf = correlate_valid(x1, k), correlate_valid(x2, k), correlate_valid(f, k)
    v11 = correlate_valid(x1 * x1, k) - g1 * g1
    v22 = correlate_valid(x2 * x2, k) - g2 * g2
    v12 = correlate_valid(x1 * x2, k) - g1 * g2
    vff = correlate_valid(f * f, k) - gf * gf
    v1f = correlate_valid(x1 * f, k) - g1 * gf
    v2f = correlate_valid(x2 * f, k) - g2 * gf

    var_r = c1 * c1 * v11 + c2 * c2 * v22 + 2 * c1 * c2 * v12
    cov_rf = c1 * v1f + c2 * v2f
    q = (2 * cov_rf + _MEF_C) / (var_r + vff + _MEF_C)
    return float(np.mean(q))


def _downsample(x: np.ndarray) -> np.ndarray:
    """``imfilter(x, ones(2)/4, 'symmetric', 'same')`` then ``x(1:2:end, 1:2:end)``."""
    p = np.pad(x, ((0, 1), (0, 1)), mode="symmetric")
    mean = (p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4
    return mean[::2, ::2]


def mef_ssim_multiscale(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """``analysis_ms_ssim(cat(3, A, B), F)``: 3-scale MEF-SSIM, the toolbox's "MS-SSIM".

    Returns ``-inf`` when ``min(H, W) / 4 < 11`` (too small for three scales), as
    the toolbox does; NaN if a scale's score is negative (MATLAB would return a
    complex number there).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if min(a.shape) / 2 ** (MEF_LEVELS - 1) < _MEF_WSIZE:
        return -math.inf
    scores = []
    for level in range(MEF_LEVELS):
        scores.append(_mef_ssim_level(a, b, f))
        if level < MEF_LEVELS - 1:
            a, b, f = _downsample(a), _downsample(b), _downsample(f)
    with np.errstate(invalid="ignore"):
        return float(np.prod(np.power(np.array(scores), np.array(MEF_WEIGHTS))))
