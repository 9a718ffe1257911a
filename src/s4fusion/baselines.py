"""Reference fusions that give every comparison table a baseline.

All functions take the infrared and the visible grey images as float arrays
``(H, W)`` of the same size (any scale; [0, 1] in this package) and return the
fused ``(H, W)`` float64 array on the same scale:

* :func:`average_fusion`: the pixel mean ``(A + B) / 2``;
* :func:`max_fusion`: the pixel maximum;
* :func:`laplacian_pyramid_fusion`: Burt & Adelson Laplacian pyramids (5-tap
  binomial kernel, mirror borders), detail coefficients chosen by larger
  magnitude, the coarsest (low-pass) level averaged, then collapsed.

:data:`BASELINES` maps the method names used by ``s4fusion evaluate --baseline``
and ``s4fusion compare --baseline`` to these functions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Burt & Adelson generating kernel with a = 0.375: [1, 4, 6, 4, 1] / 16.
_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
_MIN_LEVEL_SIDE = 8  # the coarsest pyramid level keeps at least this many pixels per side
DEFAULT_LEVELS = 4


def _check_pair(infrared: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(infrared, dtype=np.float64)
    b = np.asarray(visible, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"baseline fusion needs two grey (H, W) images of the same size, got {a.shape} and {b.shape}")
    return a, b


def average_fusion(infrared: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Pixel-wise mean of the two ``(H, W)`` images."""
    a, b = _check_pair(infrared, visible)
    return (a + b) / 2


def max_fusion(infrared: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Pixel-wise maximum of the two ``(H, W)`` images."""
    a, b = _check_pair(infrared, visible)
    return np.maximum(a, b)


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable 5-tap binomial blur, mirror padding (edge not repeated), same size."""
    p = np.pad(x, 2, mode="reflect")
    h, w = x.shape
    rows = sum(k * p[t : t + h, :] for t, k in enumerate(_KERNEL))
    return sum(k * rows[:, t : t + w] for t, k in enumerate(_KERNEL))


def _reduce(x: np.ndarray) -> np.ndarray:
    """One pyramid step down: blur, keep every second row and column."""
    return _blur(x)[::2, ::2]


def _expand(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One pyramid step up to ``shape``: zero-insertion then 4 x blur."""
    up = np.zeros(shape)
    up[::2, ::2] = x
    return 4.0 * _blur(up)


def laplacian_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """Laplacian pyramid of ``x`` ``(H, W)``: ``levels - 1`` band-pass images, then the low-pass residue.

    :func:`collapse_pyramid` inverts it exactly (up to rounding) for any size.
    """
    pyramid = []
    current = np.asarray(x, dtype=np.float64)
    for _ in range(levels - 1):
        low = _reduce(current)
        pyramid.append(current - _expand(low, current.shape))
        current = low
    pyramid.append(current)
    return pyramid


def collapse_pyramid(pyramid: list[np.ndarray]) -> np.ndarray:
    """Rebuild the image from :func:`laplacian_pyramid` output."""
    current = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        current = band + _expand(current, band.shape)
    return current


def pyramid_levels(shape: tuple[int, ...], levels: int = DEFAULT_LEVELS) -> int:
    """``levels`` reduced so that the coarsest level keeps at least 8 pixels per side."""
    side = min(shape)
    n = 1
    while n < levels and (side + 1) // 2 >= _MIN_LEVEL_SIDE:
        side = (side + 1) // 2
        n += 1
    return n


def laplacian_pyramid_fusion(infrared: np.ndarray, visible: np.ndarray, levels: int = DEFAULT_LEVELS) -> np.ndarray:
    """Laplacian-pyramid fusion of two ``(H, W)`` images.

    Band-pass coefficients: the one of larger magnitude (infrared on ties); low-pass
    residue: the mean. ``levels`` counts the low-pass level and is reduced for small
    images (see :func:`pyramid_levels`).
    """
    a, b = _check_pair(infrared, visible)
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    n = pyramid_levels(a.shape, levels)
    pa, pb = laplacian_pyramid(a, n), laplacian_pyramid(b, n)
    fused = [np.where(np.abs(la) >= np.abs(lb), la, lb) for la, lb in zip(pa[:-1], pb[:-1])]
    fused.append((pa[-1] + pb[-1]) / 2)
    return collapse_pyramid(fused)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "average": average_fusion,
    "max": max_fusion,
    "laplacian": laplacian_pyramid_fusion,
}


def fuse_baseline(name: str, infrared: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Run the baseline ``name`` (a key of :data:`BASELINES`) on two ``(H, W)`` images."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[name](infrared, visible)
