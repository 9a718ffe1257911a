"""Edge-based metrics: Qabf (Xydeas & Petrovic) and Nabf (Shreyamsha Kumar's
modified fusion-artefact measure), METRICS.md section 3.

Images are ``(H, W)`` arrays on the 0..255 scale.
"""

from __future__ import annotations

import math

import numpy as np

# Qabf constants (analysis_Qabf.m / CDDFuse).
_TG, _KG, _DG = 0.9994, -15.0, 0.5
_TA, _KA, _DA = 0.9879, -22.0, 0.8
# Nabf constants (analysis_nabf.m).
_N_TG, _N_KG, _N_DG = 0.9999, -19.0, 0.5
_N_TA, _N_KA, _N_DA = 0.9995, -22.0, 0.5
_N_TD, _N_WT_MIN, _N_LG = 2.0, 0.001, 1.5


def _sobel_same_conv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``conv2(x, hx, 'same')`` and ``conv2(x, hy, 'same')`` with zero padding.

    ``hx = [[-1,0,1],[-2,0,2],[-1,0,1]]``, ``hy = [[1,2,1],[0,0,0],[-1,-2,-1]]``
    (true convolution: the kernels are flipped), computed in the dtype of ``x``.
    """
    p = np.pad(x, 1)
    h, w = x.shape
    # Flipped hx = [[1,0,-1],[2,0,-2],[1,0,-1]] correlated: left column minus right column.
    left = p[0:h, 0:w] + 2 * p[1 : h + 1, 0:w] + p[2 : h + 2, 0:w]
    right = p[0:h, 2 : w + 2] + 2 * p[1 : h + 1, 2 : w + 2] + p[2 : h + 2, 2 : w + 2]
    # Flipped hy = [[-1,-2,-1],[0,0,0],[1,2,1]] correlated: bottom row minus top row.
    top = p[0:h, 0:w] + 2 * p[0:h, 1 : w + 1] + p[0:h, 2 : w + 2]
    bottom = p[2 : h + 2, 0:w] + 2 * p[2 : h + 2, 1 : w + 1] + p[2 : h + 2, 2 : w + 2]
    return left - right, bottom - top


def _qabf_edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude and ``atan(Sy / Sx)`` angle (``pi/2`` where ``Sx == 0``)."""
    sx, sy = _sobel_same_conv(x)
    g = np.sqrt(sx * sx + sy * sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(sx == 0, math.pi / 2, np.arctan(sy / sx))
    return g, a.astype(x.dtype, copy=False)


def _qabf_preservation(a_x: np.ndarray, g_x: np.ndarray, a_f: np.ndarray, g_f: np.ndarray) -> np.ndarray:
    """Edge preservation ``Q_XF`` per pixel, keeping the ``gX == gF -> G = gF`` quirk."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gq = np.where(g_x > g_f, g_f / g_x, np.where(g_x == g_f, g_f, g_x / g_f))
    al = 1 - np.abs(a_x - a_f) / (math.pi / 2)
    qg = _TG / (1 + np.exp(_KG * (gq - _DG)))
    qa = _TA / (1 + np.exp(_KA * (al - _DA)))
    return qg * qa


def qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Qabf: gradient-weighted edge preservation of ``a`` and ``b`` in ``f``.

    Computed in the dtype of the inputs (float64 for ``matlab``, float32 for
    ``cddfuse``); NaN when neither source has any gradient.
    """
    g_a, a_a = _qabf_edges(a)
    g_b, a_b = _qabf_edges(b)
    g_f, a_f = _qabf_edges(f)
    q_af = _qabf_preservation(a_a, g_a, a_f, g_f)
    q_bf = _qabf_preservation(a_b, g_b, a_f, g_f)
    den = np.sum(g_a + g_b)
    num = np.sum(q_af * g_a + q_bf * g_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(num / den)


def _nabf_edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel/8 on mirror-padded ``x`` (reflect, edge not repeated): magnitude and angle."""
    p = np.pad(np.asarray(x, dtype=np.float64), 1, mode="reflect")
    h, w = x.shape
    # gv: correlation with [[-1,0,1],[-2,0,2],[-1,0,1]] / 8 (right minus left).
    right = p[0:h, 2 : w + 2] + 2 * p[1 : h + 1, 2 : w + 2] + p[2 : h + 2, 2 : w + 2]
    left = p[0:h, 0:w] + 2 * p[1 : h + 1, 0:w] + p[2 : h + 2, 0:w]
    gv = (right - left) / 8
    # gh: correlation with [[-1,-2,-1],[0,0,0],[1,2,1]] / 8 (bottom minus top).
    bottom = p[2 : h + 2, 0:w] + 2 * p[2 : h + 2, 1 : w + 1] + p[2 : h + 2, 2 : w + 2]
    top = p[0:h, 0:w] + 2 * p[0:h, 1 : w + 1] + p[0:h, 2 : w + 2]
    gh = (bottom - top) / 8
    g = np.sqrt(gh * gh + gv * gv)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where((gv == 0) & (gh == 0), 0.0, np.arctan(gv / gh))
    return g, angle


def nabf(f: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> float:
    """``analysis_nabf(f, x1, x2)``: fusion artefacts of ``f`` relative to ``x1`` and ``x2``.

    This is the function with its own argument names; the matlab convention's
    reported Nabf is ``nabf(infrared, visible, fused)`` (the toolbox's argument
    order quirk, see :func:`s4fusion.metrics.evaluate_pair`). The intended
    fused-first metric is ``nabf(fused, infrared, visible)``.
    """
    g_f, a_f = _nabf_edges(f)
    g_max = np.zeros_like(g_f)
    weight_sum = np.zeros_like(g_f)
    loss = np.zeros_like(g_f)
    for x in (x1, x2):
        g_x, a_x = _nabf_edges(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            gq = np.where((g_x == 0) | (g_f == 0), 0.0, np.where(g_x > g_f, g_f / g_x, g_x / g_f))
        al = np.abs(np.abs(a_x - a_f) - math.pi / 2) * 2 / math.pi
        qg = _N_TG / (1 + np.exp(_N_KG * (gq - _N_DG)))
        qa = _N_TA / (1 + np.exp(_N_KA * (al - _N_DA)))
        q = np.sqrt(qg * qa)
        w = np.where(g_x >= _N_TD, g_x**_N_LG, _N_WT_MIN)
        loss += (1 - q) * w
        weight_sum += w
        g_max = np.maximum(g_max, g_x)
    artefact = g_f > g_max
    return float(np.sum(np.where(artefact, loss, 0.0)) / np.sum(weight_sum))
