"""Turning images (arrays, tensors, PIL images or files) into the grey 8-bit data
each convention scores (METRICS.md section 1).

* ``matlab``: ``uint8`` ``(H, W)``; colour reduced with MATLAB ``rgb2gray``
  (``0.298936021293775 R + 0.587043074451121 G + 0.114020904255103 B`` in float64,
  rounded half away from zero).
* ``cddfuse``: ``float32`` ``(H, W)`` holding integers 0..255; colour reduced as
  ``np.round(cv2.cvtColor(bgr.astype(float32), COLOR_BGR2GRAY))``
  (``0.114 B + 0.587 G + 0.299 R`` in float32, rounded half to even). A grey image
  stays unchanged.

Accepted in-memory layouts: numpy arrays / PIL images ``(H, W)``, ``(H, W, 1)`` or
``(H, W, 3)`` (RGB order); torch tensors ``(H, W)``, ``(C, H, W)`` or
``(1, C, H, W)`` with ``C`` in {1, 3}. Dtypes: ``uint8`` (used as is), other
integer types holding 0..255, or floats. Floats whose maximum is at most 2 are
taken on the [0, 1] scale (the network's output, possibly overshooting 1) and
quantised as an 8-bit file would be: ``floor(clip(255 v, 0, 255) + 0.5)``; floats
with a larger maximum are accepted only if they hold integer grey levels 0..255
(as ``read_grey(path, "cddfuse")`` and CDDFuse's reader return them). The metrics
are defined on 8-bit files, so a float image is never scored unquantised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

CONVENTIONS: tuple[str, ...] = ("matlab", "cddfuse")

# MATLAB rgb2gray coefficients (first row of inv(NTSC transform)), METRICS.md section 1.
_MATLAB_RGB2GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
# Float inputs with a maximum up to this are on the [0, 1] scale; above it they must be grey levels.
_FLOAT_SCALE_LIMIT = 2.0

PathLike = Union[str, os.PathLike]


def check_convention(convention: str) -> str:
    """Return ``convention`` if it is one of :data:`CONVENTIONS`, else raise ``ValueError``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    return convention


def _to_numpy(image: Any, name: str) -> tuple[np.ndarray, bool]:
    """Return ``(array, channels_first)`` for a numpy array, PIL image or torch tensor."""
    module = type(image).__module__
    if module.startswith("torch"):
        return np.asarray(image.detach().cpu().numpy()), True
    if module.startswith("PIL."):
        return np.asarray(image), False
    if isinstance(image, np.ndarray):
        return image, False
    raise TypeError(f"{name}: expected a numpy array, torch tensor, PIL image or file path, got {type(image).__name__}")


def _to_hwc(x: np.ndarray, channels_first: bool, name: str) -> np.ndarray:
    """Reshape to ``(H, W)`` or ``(H, W, 3)``."""
    shape = x.shape
    if channels_first:
        while x.ndim > 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 3:
            if x.shape[0] not in (1, 3):
                raise ValueError(
                    f"{name}: tensor of shape {tuple(shape)} is not (H,W), (C,H,W) or (1,C,H,W) with C in 1, 3"
                )
            x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3):
        return x
    raise ValueError(
        f"{name}: array of shape {tuple(shape)} is not a grey (H,W) or RGB (H,W,3) image"
        + (" (tensors are channels-first)" if channels_first else "")
    )


def _quantise(x: np.ndarray, name: str) -> np.ndarray:
    """8-bit values of an image array (see the module docstring)."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        raise ValueError(f"{name}: boolean image; pass uint8 (0..255) or float (0..1) grey levels")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name}: integer image with values {lo}..{hi}; the metrics need 8-bit data (0..255)")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: unsupported dtype {x.dtype}; pass uint8 or float (0..1) images")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: image contains NaN or infinite values")
    hi = float(x.max())
    if hi <= _FLOAT_SCALE_LIMIT:
        return np.floor(np.clip(x * 255.0, 0.0, 255.0) + 0.5).astype(np.uint8)
    if float(x.min()) >= 0 and hi <= 255 and np.array_equal(x, np.round(x)):
        return x.astype(np.uint8)  # integer grey levels held in floats, as CDDFuse's reader returns them
    raise ValueError(
        f"{name}: float image with maximum {hi:g} that is not made of integer grey levels 0..255; "
        "float images must be on the [0, 1] scale (divide by 255) or hold 8-bit grey levels"
    )


def rgb_to_grey(rgb: np.ndarray, convention: str) -> np.ndarray:
    """Reduce an ``(H, W, 3)`` RGB ``uint8`` image to grey as ``convention`` does.

    Returns ``uint8`` ``(H, W)`` for ``matlab``, integer-valued ``float32`` for ``cddfuse``.
    """
    check_convention(convention)
    if convention == "matlab":
        r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
        cr, cg, cb = _MATLAB_RGB2GRAY
        y = cr * r + cg * g + cb * b
        return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = b * np.float32(0.114) + g * np.float32(0.587) + r * np.float32(0.299)
    return np.round(y).astype(np.float32)


def grey_levels(image: Any, convention: str = "matlab", name: str = "image") -> np.ndarray:
    """The grey image a convention scores, from an in-memory image or a file path.

    Returns:
        ``matlab``: ``uint8`` ``(H, W)``; ``cddfuse``: ``float32`` ``(H, W)`` with
        integer values 0..255.
    """
    check_convention(convention)
    if isinstance(image, (str, os.PathLike)):
        return read_grey(image, convention)
    array, channels_first = _to_numpy(image, name)
    x = _quantise(_to_hwc(array, channels_first, name), name)
    if x.ndim == 3:
        return rgb_to_grey(x, convention)
    return x if convention == "matlab" else x.astype(np.float32)


def read_grey(path: PathLike, convention: str = "matlab") -> np.ndarray:
    """Read an 8-bit image file as ``convention`` reads it (``imread`` + ``rgb2gray`` or
    ``cv2.imread`` + ``COLOR_BGR2GRAY``).

    Grey files are used as they are; colour files are reduced with
    :func:`rgb_to_grey`; an alpha channel is dropped (as ``imread``/``cv2.imread``
    do); palette images are expanded to RGB. Raises ``ValueError`` naming the file
    for unreadable or non-8-bit images.

    Note: JPEG files are decoded by Pillow; OpenCV's decoder can differ from it by a
    grey level on some pixels, so ``cddfuse`` values of JPEG inputs may differ
    slightly from CDDFuse's own run.
    """
    from PIL import Image, UnidentifiedImageError

    check_convention(convention)
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif mode in ("P", "PA", "RGBA", "RGBX", "LA", "1"):
                target = "L" if mode in ("LA", "1") else "RGB"
                arr = np.asarray(im.convert(target))
            else:
                raise ValueError(
                    f"{path}: image mode {mode!r} is not 8-bit grey or RGB; the fusion metrics are defined on "
                    "8-bit files (save the image as 8-bit PNG)"
                )
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    if arr.ndim == 3:
        return rgb_to_grey(arr, convention)
    return arr if convention == "matlab" else arr.astype(np.float32)
