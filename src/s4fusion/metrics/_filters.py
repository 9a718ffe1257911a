"""Small 2-D filtering kernels used by the metrics, in plain numpy.

Every function takes and returns 2-D arrays laid out ``(H, W)`` (rows, columns).
The Gaussian windows of the reference toolboxes (MATLAB ``fspecial``) are
separable for every size/sigma the metrics use, so filtering is done as two 1-D
passes of shifted-slice multiply-adds; box sums use cumulative sums, which are
exact for the integer (or dyadic) grey levels the metrics work on.
"""

from __future__ import annotations

import numpy as np


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """1-D factor of MATLAB ``fspecial('gaussian', size, sigma)``.

    ``fspecial`` builds ``exp(-(x^2 + y^2) / (2 sigma^2))`` on a ``size x size``
    grid, zeroes entries below ``eps * max`` and normalises to sum 1. For the
    windows used here no entry falls below that threshold (checked below), so the
    2-D window is exactly the outer product of this normalised 1-D kernel.

    Returns:
        float64 array of shape ``(size,)`` summing to 1.
    """
    half = (size - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - half
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    corner = g[0] * g[0]
    if corner < np.finfo(np.float64).eps:
        raise ValueError(f"gaussian window {size}x{size}, sigma {sigma} is truncated by fspecial; not separable")
    return g / g.sum()


def gaussian_2d(size: int, sigma: float) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)`` as a ``(size, size)`` float64 array."""
    half = (size - 1) / 2.0
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0.0
    return h / h.sum()


def uniform_filter_float32(x: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.uniform_filter(x, size)`` for float32 ``x`` (mode 'reflect').

    Reproduces scipy's arithmetic (scipy >= 1.0): one 1-D pass per axis (axis 0
    first), each line padded by mirror reflection (edge repeated) and converted to
    float64; a running sum starts with the first window summed in order and is
    updated with ``(entering - leaving)``; each output is that sum divided by
    ``size``; each pass is stored as float32. Input and output ``(H, W)``.
    """
    out = np.asarray(x, dtype=np.float32)
    before = size // 2
    after = size - 1 - before
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, after)
        line = np.moveaxis(np.pad(out, pad, mode="symmetric").astype(np.float64), axis, 0)
        n = out.shape[axis]
        running = line[0:1].copy()
        for t in range(1, size):
            running += line[t : t + 1]
        steps = line[size : size + n - 1] - line[0 : n - 1]
        running = np.cumsum(np.concatenate([running, steps], axis=0), axis=0)
        out = np.moveaxis(running / size, 0, axis).astype(np.float32)
    return out


def correlate_valid(x: np.ndarray, kernel_1d: np.ndarray, block: int = 64) -> np.ndarray:
    """Separable 2-D 'valid' correlation with ``outer(kernel_1d, kernel_1d)``.

    Equals MATLAB ``filter2(w, x, 'valid')`` with ``w = outer(k, k)``. Input
    ``(H, W)``, output ``(H - k + 1, W - k + 1)`` in float64. Output rows are
    produced ``block`` at a time so that both 1-D passes run on cache-resident data;
    every output pixel is the same sum, in the same order, as a plain two-pass
    filter.
    """
    x = np.asarray(x, dtype=np.float64)
    k = len(kernel_1d)
    h, w = x.shape
    ho, wo = h - k + 1, w - k + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"image of size {x.shape} is smaller than the {k}x{k} window")
    out = np.empty((ho, wo))
    rows = np.empty((block, w))
    term = np.empty((block, w))
    for i0 in range(0, ho, block):
        b = min(block, ho - i0)
        r, t_r = rows[:b], term[:b]
        np.multiply(x[i0 : i0 + b], kernel_1d[0], out=r)
        for t in range(1, k):
            np.multiply(x[i0 + t : i0 + t + b], kernel_1d[t], out=t_r)
            r += t_r
        o, t_o = out[i0 : i0 + b], term[:b, :wo]
        np.multiply(r[:, 0:wo], kernel_1d[0], out=o)
        for t in range(1, k):
            np.multiply(r[:, t : t + wo], kernel_1d[t], out=t_o)
            o += t_o
    return out


def correlate_valid_decimate(x: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """``correlate_valid(x, kernel_1d)[::2, ::2]`` without computing the dropped pixels.

    Each kept pixel is the same sum, in the same order, as in :func:`correlate_valid`.
    """
    x = np.asarray(x, dtype=np.float64)
    k = len(kernel_1d)
    h, w = x.shape
    if h < k or w < k:
        raise ValueError(f"image of size {x.shape} is smaller than the {k}x{k} window")
    ho, wo = (h - k) // 2 + 1, (w - k) // 2 + 1
    rows = kernel_1d[0] * x[0 : 2 * ho - 1 : 2]
    for t in range(1, k):
        rows += kernel_1d[t] * x[t : t + 2 * ho - 1 : 2]
    out = kernel_1d[0] * rows[:, 0 : 2 * wo - 1 : 2]
    for t in range(1, k):
        out += kernel_1d[t] * rows[:, t : t + 2 * wo - 1 : 2]
    return out


def correlate_replicate(x: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with edge-replicating padding, output ``(H, W)``.

    Equals MATLAB ``imfilter(x, w, 'replicate')`` for a symmetric odd window
    ``w = outer(k, k)`` (correlation and convolution coincide).
    """
    r = len(kernel_1d) // 2
    return correlate_valid(np.pad(x, r, mode="edge"), kernel_1d)


def box_sum_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Sum over every ``size x size`` window that fits inside ``x`` (float64).

    Uses cumulative sums: exact when the values and their partial sums are exactly
    representable (integer or dyadic data below 2**53), as for 8-bit images, their
    squares and products. Output ``(H - size + 1, W - size + 1)``.
    """
    c = np.cumsum(np.cumsum(np.asarray(x, dtype=np.float64), axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
