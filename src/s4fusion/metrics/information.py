"""Histogram metrics: entropy (EN) and mutual information (MI), METRICS.md section 3.

All inputs are grey images ``(H, W)`` of integer grey levels 0..255 (``uint8``,
or float arrays holding integers).
"""

from __future__ import annotations

import numpy as np

LEVELS = 256


def _levels(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.int64, copy=False).ravel()


def entropy_bits(image: np.ndarray) -> float:
    """EN: ``-sum p log2 p`` of the 256-bin grey-level histogram (both conventions)."""
    h = np.bincount(_levels(image), minlength=LEVELS).astype(np.float64)
    p = h[h > 0] / h.sum()
    return float(-np.sum(p * np.log2(p)))


def _joint_entropy_bits(joint: np.ndarray) -> float:
    p = joint[joint > 0] / joint.sum()
    return float(-np.sum(p * np.log2(p)))


def mutual_information_matlab(fused: np.ndarray, source: np.ndarray) -> float:
    """MI(F, X) in bits as ``MI_evaluation.m`` computes it.

    ``H(X) + H(F) - Hj(F, X)`` where the marginal entropies use all 256 levels but
    the joint histogram puts grey levels 254 and 255 into one bin (the toolbox adds
    1 to a ``uint8`` array, which saturates at 255).
    """
    f, x = _levels(fused), _levels(source)
    fj, xj = np.minimum(f, 254), np.minimum(x, 254)
    joint = np.bincount(fj * LEVELS + xj, minlength=LEVELS * LEVELS).astype(np.float64)
    return entropy_bits(x) + entropy_bits(f) - _joint_entropy_bits(joint)


def mutual_information_nats(fused: np.ndarray, source: np.ndarray) -> float:
    """MI(F, X) in nats as ``sklearn.metrics.mutual_info_score`` computes it.

    Plain 256 x 256 contingency table of the exact grey levels,
    ``sum p_ij ln(p_ij / (p_i p_j))`` over non-empty cells written in scikit-learn's
    arithmetic form (terms below float64 eps set to 0), clipped at 0.
    """
    f, x = _levels(fused), _levels(source)
    counts = np.bincount(f * LEVELS + x, minlength=LEVELS * LEVELS).reshape(LEVELS, LEVELS)
    rows, cols = np.nonzero(counts)
    nz = counts[rows, cols].astype(np.float64)
    total = nz.sum()
    pi = counts.sum(axis=1)
    pj = counts.sum(axis=0)
    outer = pi[rows].astype(np.int64) * pj[cols].astype(np.int64)
    log_outer = -np.log(outer.astype(np.float64)) + np.log(float(pi.sum())) + np.log(float(pj.sum()))
    p = nz / total
    terms = p * (np.log(nz) - np.log(total)) + p * log_outer
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    return float(max(terms.sum(), 0.0))
