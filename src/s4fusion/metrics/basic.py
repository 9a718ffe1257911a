"""Pixel-statistics metrics: SD, SF, AG, SCD, CC, MSE, PSNR (METRICS.md section 3).

Images are ``(H, W)`` arrays on the 0..255 scale. The ``matlab`` functions take
float64 arrays; the ``cddfuse`` functions take float32 arrays and keep CDDFuse's
float32 arithmetic (numpy promotes nothing, exactly as ``Evaluator.py`` runs).
Functions that are the same formula in both conventions work in the dtype given.
"""

from __future__ import annotations

import math

import numpy as np


def standard_deviation(f: np.ndarray) -> float:
    """SD: population standard deviation ``sqrt(sum((F - mean F)^2) / N)``."""
    return float(np.std(f))


def spatial_frequency(f: np.ndarray) -> float:
    """SF: ``sqrt(mean of squared row differences + mean of squared column differences)``."""
    return float(np.sqrt(np.mean((f[:, 1:] - f[:, :-1]) ** 2) + np.mean((f[1:, :] - f[:-1, :]) ** 2)))


def _gradient_magnitude(f: np.ndarray) -> np.ndarray:
    """``sqrt((gx^2 + gy^2) / 2)`` with MATLAB ``gradient`` (central inside, one-sided at edges)."""
    gx = np.zeros_like(f)
    gy = np.zeros_like(f)
    gx[:, 0] = f[:, 1] - f[:, 0]
    gx[:, -1] = f[:, -1] - f[:, -2]
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    gy[0, :] = f[1, :] - f[0, :]
    gy[-1, :] = f[-1, :] - f[-2, :]
    gy[1:-1, :] = (f[2:, :] - f[:-2, :]) / 2
    return np.sqrt((gx**2 + gy**2) / 2)


def average_gradient_matlab(f: np.ndarray) -> float:
    """AG as ``AG_evaluation.m``: sum of the gradient magnitudes over ``(H-1)(W-1)``."""
    h, w = f.shape
    return float(np.sum(_gradient_magnitude(f)) / ((h - 1) * (w - 1)))


def average_gradient_cddfuse(f: np.ndarray) -> float:
    """AG as CDDFuse: mean of the gradient magnitudes over all ``H W`` pixels."""
    return float(np.mean(_gradient_magnitude(f)))


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation over all pixels (MATLAB ``corr2``), in the input dtype."""
    dx = x - np.mean(x)
    dy = y - np.mean(y)
    return np.sum(dx * dy) / np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))


def scd_matlab(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SCD as ``analysis_SCD.m``: ``corr2(F - B, A) + corr2(F - A, B)``."""
    return float(_corr(f - b, a) + _corr(f - a, b))


def scd_cddfuse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SCD as CDDFuse: ``corr(A, F - B) + corr(B, F - A)`` written out in float32."""
    fa = f - a
    fb = f - b
    da, db = a - np.mean(a), b - np.mean(b)
    dfb, dfa = fb - np.mean(fb), fa - np.mean(fa)
    c1 = np.sum(da * dfb) / np.sqrt(np.sum(da**2) * np.sum(dfb**2))
    c2 = np.sum(db * dfa) / np.sqrt(np.sum(db**2) * np.sum(dfa**2))
    return float(c1 + c2)


def cc_matlab(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """CC as ``CC_evaluation.m``: ``mean(r_AF, r_BF)``.

    Keeps the toolbox's quirk: the numerator of ``r_BF`` centres ``B`` with
    ``mean(A)``. As ``sum(F - mean F) = 0`` this changes only rounding.
    """
    df = f - np.mean(f)
    sff = np.sum(df**2)
    da = a - np.mean(a)
    r_af = np.sum(da * df) / np.sqrt(np.sum(da**2) * sff)
    r_bf = np.sum((b - np.mean(a)) * df) / np.sqrt(np.sum((b - np.mean(b)) ** 2) * sff)
    return float((r_af + r_bf) / 2)


def cc_cddfuse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """CC as CDDFuse: ``(corr(A, F) + corr(B, F)) / 2`` in float32."""
    df = f - np.mean(f)
    da, db = a - np.mean(a), b - np.mean(b)
    r_af = np.sum(da * df) / np.sqrt(np.sum(da**2) * np.sum(df**2))
    r_bf = np.sum(db * df) / np.sqrt(np.sum(db**2) * np.sum(df**2))
    return float((r_af + r_bf) / 2)


def mse_matlab(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """MSE as ``MSE_evaluation.m``: images divided by 255 first, the two MSEs averaged."""
    f1, a1, b1 = f / 255.0, a / 255.0, b / 255.0
    return float(0.5 * np.mean((f1 - a1) ** 2) + 0.5 * np.mean((f1 - b1) ** 2))


def psnr_matlab(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """PSNR as ``PSNR_evaluation.m``: ``20 log10(255 / sqrt(MSE))`` with the [0, 1]-scale MSE.

    This is the textbook PSNR plus ``20 log10(255)`` = 48.13 dB; ``inf`` when MSE is 0.
    """
    mse = mse_matlab(f, a, b)
    return math.inf if mse == 0 else float(20.0 * np.log10(255.0 / np.sqrt(mse)))


def _mse_cddfuse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.floating:
    return (np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2


def mse_cddfuse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """MSE as CDDFuse: average of the two MSEs on the 0..255 scale (float32)."""
    return float(_mse_cddfuse(f, a, b))


def psnr_cddfuse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """PSNR as CDDFuse: ``10 log10(max(F)^2 / MSE)`` with the 0..255 MSE; ``inf`` when MSE is 0."""
    mse = _mse_cddfuse(f, a, b)
    if mse == 0:
        return math.inf
    return float(10 * np.log10(np.max(f) ** 2 / mse))
