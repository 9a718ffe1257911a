"""VIF: multi-scale pixel-domain visual information fidelity (Sheikh & Bovik),
LIVE's ``vifp_mscale.m`` as used by both conventions (METRICS.md section 3).
"""

from __future__ import annotations

import numpy as np

from ._filters import correlate_valid, correlate_valid_decimate, gaussian_1d

SIGMA_NSQ = 2.0
_EPS = 1e-10
_SCALES = 4


def _scale_sums(
    mu1: np.ndarray, rr: np.ndarray, mu2: np.ndarray, s2: np.ndarray, rd: np.ndarray
) -> tuple[float, float]:
    """Numerator and denominator sums of one scale from the filtered moments.

    ``rr`` and ``rd`` are the filtered ``R*R`` and ``R*D``; ``s2`` is the variance
    of the distorted image (already clipped at 0; not modified). Applies the
    reference's regularisation steps in its order.
    """
    s1 = rr - mu1 * mu1
    s12 = rd - mu1 * mu2
    s1[s1 < 0] = 0
    g = s12 / (s1 + _EPS)
    sv = s2 - g * s12
    m = s1 < _EPS
    g[m] = 0
    sv[m] = s2[m]
    s1[m] = 0
    m = s2 < _EPS
    g[m] = 0
    sv[m] = 0
    m = g < 0
    sv[m] = s2[m]
    g[m] = 0
    sv[sv <= _EPS] = _EPS
    num = float(np.sum(np.log10(1.0 + g * g * s1 / (sv + SIGMA_NSQ))))
    den = float(np.sum(np.log10(1.0 + s1 / SIGMA_NSQ)))
    return num, den


def vifp_many(references: tuple[np.ndarray, ...], distorted: np.ndarray) -> list[float]:
    """Pixel-domain multi-scale VIF of ``distorted`` against each reference.

    Same values as calling :func:`vifp` once per reference; the filtered moments of
    ``distorted`` are computed once.

    Args:
        references: ``(H, W)`` grey images on the 0..255 scale.
        distorted: ``(H, W)`` grey image on the same scale (``sigma_nsq = 2``
            assumes 0..255 data).

    Returns:
        One ``num / den`` per reference, summed over 4 scales (windows 17, 9, 5, 3
        with sigma = size/5); NaN where a reference has no variance anywhere.
    """
    refs = [np.asarray(r, dtype=np.float64) for r in references]
    d = np.asarray(distorted, dtype=np.float64)
    num = [0.0] * len(refs)
    den = [0.0] * len(refs)
    for scale in range(1, _SCALES + 1):
        n = 2 ** (_SCALES + 1 - scale) + 1
        k = gaussian_1d(n, n / 5.0)
        if scale > 1:
            refs = [correlate_valid_decimate(r, k) for r in refs]
            d = correlate_valid_decimate(d, k)
        mu2 = correlate_valid(d, k)
        s2 = correlate_valid(d * d, k) - mu2 * mu2
        s2[s2 < 0] = 0
        for i, r in enumerate(refs):
            mu1 = correlate_valid(r, k)
            part_num, part_den = _scale_sums(mu1, correlate_valid(r * r, k), mu2, s2, correlate_valid(r * d, k))
            num[i] += part_num
            den[i] += part_den
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(np.float64(a) / np.float64(b)) for a, b in zip(num, den)]


def vifp(reference: np.ndarray, distorted: np.ndarray) -> float:
    """``vifp_mscale(reference, distorted)`` for one pair of ``(H, W)`` 0..255 images."""
    return vifp_many((reference,), distorted)[0]
