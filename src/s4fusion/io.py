"""Image files in and out for fusing: decoding, normalisation, colour, saving.

Reading (PNG, JPEG, BMP, WebP with Pillow; TIFF with tifffile, Pillow as a
fallback) gives float32 arrays in [0, 1]:

* **infrared** -> (H, W). 8-bit files are read exactly as the released
  ``dataset.py`` does: ``PIL.Image.convert('L')`` (ITU-R 601-2 luma with PIL's
  integer rounding for colour files, grey files unchanged), divided by 255.
  Deeper data (16-bit PNG/TIFF, radiometric 14-bit counts stored in 16 bits,
  32-bit integer or float TIFFs such as temperatures) is first reduced to one
  channel (``0.299 R + 0.587 G + 0.114 B`` in float64 for a colour file), then
  normalised by the ``norm`` rule (:data:`IR_NORMS`):

  - ``"auto"`` (default): 8-bit data ``/ 255`` as released; float data already
    inside [0, 1] is kept; everything else (16-bit, other integers, floats outside
    [0, 1]) is min-max stretched.
  - ``"minmax"``: ``(v - min) / (max - min)`` over the whole image; a constant
    image becomes 0.
  - ``"percentile"``: ``lo, hi`` = the ``percentiles`` (default 1 and 99) of the
    image; ``clip((v - lo) / (hi - lo), 0, 1)``. Robust to a few hot or dead
    pixels. Falls back to min-max when ``hi == lo``.
  - ``"scale"``: divide by the type's full range (255 for 8-bit, 65535 for
    16-bit); float data must already be in [0, 1]. Keeps the sensor's absolute
    scale, so frames of one camera stay comparable.

* **visible** -> (H, W, 3) RGB, or (H, W) for a grey file: 8-bit ``/ 255``
  (``convert('RGB')`` for colour and palette files, ``convert('L')`` for grey
  ones), 16-bit ``/ 65535``, float data must be in [0, 1]. The network sees its
  Y channel; colour output reuses its Cr and Cb.

Pillow decodes 16-bit *colour* PNGs at 8 bits only, so those are refused with a
message (save them as 16-bit TIFF); 16-bit grey PNGs are read in full.

Colour (RELEASED-MODEL-FACTS.md section 5, the released ``RGB2YCrCb`` and
``YCrCb2RGB``): :func:`rgb_to_ycrcb`, :func:`ycrcb_to_rgb` (and
:func:`ycrcb_to_rgb_image`, the same values written into one RGB image).

Saving (:func:`write_image`): values are clamped to [0, 1] and rounded half up,
``floor(clamp(v * (2**bits - 1) + 0.5, 0, 2**bits - 1))`` (for 8 bits exactly the
released ``torchvision.utils.save_image``); PNG and TIFF at 8 or 16 bits, JPEG
and BMP at 8 bits. Every write goes to a temporary file in the target folder
that is then renamed over the target (:func:`atomic_write`), so a crash never
leaves a half-written image under the final name.

Every failure is an :class:`ImageError` whose message names the file.
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar, Union

import numpy as np
from PIL import Image

__all__ = [
    "ImageError",
    "READ_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "IR_NORMS",
    "DEFAULT_PERCENTILES",
    "decode_image",
    "read_infrared",
    "read_visible",
    "infrared_from_array",
    "infrared_from_pil",
    "visible_from_array",
    "visible_from_pil",
    "normalize_infrared",
    "check_percentiles",
    "rgb_to_ycrcb",
    "ycrcb_to_rgb",
    "ycrcb_to_rgb_image",
    "quantize",
    "encode_png16",
    "atomic_write",
    "write_image",
]

PathLike = Union[str, os.PathLike]
Array = TypeVar("Array")  # numpy array or torch tensor (same arithmetic)

READ_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# extension -> (Pillow format name or "TIFF", bit depths that can be written)
_WRITERS: dict[str, tuple[str, tuple[int, ...]]] = {
    ".png": ("PNG", (8, 16)),
    ".tif": ("TIFF", (8, 16)),
    ".tiff": ("TIFF", (8, 16)),
    ".jpg": ("JPEG", (8,)),
    ".jpeg": ("JPEG", (8,)),
    ".bmp": ("BMP", (8,)),
}
WRITE_EXTENSIONS = tuple(_WRITERS)
IR_NORMS = ("auto", "minmax", "percentile", "scale")
DEFAULT_PERCENTILES = (1.0, 99.0)
_TIFF = (".tif", ".tiff")
_GREY_PIL_MODES = ("1", "L", "LA", "La")
HIGH_BIT_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(ValueError):
    """An image cannot be read, converted or written; the message names the file
    (or the argument) and says what to do."""


# ------------------------------------------------------------------ decoding
def _png_header(path: Path) -> Optional[tuple[int, int]]:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def check_png16_colour(path: PathLike) -> None:
    """Refuse a 16-bit colour PNG (Pillow reads it at 8 bits only); raises ImageError."""
    header = _png_header(Path(path))
    if header is not None and header[0] == 16 and header[1] in (2, 6):
        raise ImageError(
            f"{path}: 16-bit colour PNG is not supported: Pillow reads it at 8 bits only, which would lose "
            "data; save it as a 16-bit TIFF (or as an 8-bit image)"
        )


def _tiff_array(path: Path) -> np.ndarray:
    """First image of a TIFF as (H, W) or (H, W, C) in its stored dtype."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            raise ImageError(f"{path}: palette TIFF")  # handled by Pillow (see decode_image)
        array = page.asarray()
        axes = page.axes
    if axes.startswith("S") and array.ndim == 3:  # planar (C, H, W)
        array = np.moveaxis(array, 0, -1)
    return array


def decode_image(path: PathLike) -> Union[Image.Image, np.ndarray]:
    """Open one image file: a loaded PIL image, or (TIFF) a numpy array of the
    stored samples, (H, W) or (H, W, C). Raises :class:`ImageError` naming the file
    for a missing, unreadable, truncated or unsupported file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    tiff_error: Optional[BaseException] = None
    try:
        if path.suffix.lower() in _TIFF:
            try:
                return _tiff_array(path)
            except Exception as e:  # compression tifffile cannot decode, palette, ...: try Pillow
                tiff_error = e
        check_png16_colour(path)
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except ImageError:
        raise
    except Exception as e:  # Pillow and tifffile raise many types for broken files
        detail = f"{type(e).__name__}: {e}"
        if tiff_error is not None:
            detail = f"tifffile: {type(tiff_error).__name__}: {tiff_error}; Pillow: {detail}"
        raise ImageError(
            f"{path}: cannot read the image ({detail}); the file is truncated, corrupt or not an image - "
            "replace it or remove it from the input"
        ) from e


def channels(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, 1..4) -> (H, W) or (H, W, 3): alpha dropped, grey kept."""
    if array.ndim == 3:
        c = array.shape[2]
        if c in (1, 2):  # grey, grey + alpha
            return array[..., 0]
        if c in (3, 4):  # RGB, RGBA
            return array[..., :3]
        raise ImageError(f"{name}: {c} channels; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)")
    if array.ndim != 2:
        raise ImageError(f"{name}: array of shape {tuple(array.shape)} is not one 2-D image (H, W) or (H, W, C)")
    return array


def _finite(values: np.ndarray, name: str) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ImageError(f"{name}: {bad} pixels are NaN or infinite; fix or mask them before fusing")


# ------------------------------------------------------------------ infrared
def normalize_infrared(
    values: np.ndarray,
    norm: str = "auto",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    name: str = "infrared",
) -> np.ndarray:
    """One-channel infrared samples (H, W) of any dtype -> float32 (H, W) in [0, 1]
    by the rule ``norm`` (see the module docstring)."""
    if norm not in IR_NORMS:
        raise ImageError(f"{name}: unknown infrared normalisation {norm!r}; use one of {IR_NORMS}")
    _finite(values, name)
    kind = values.dtype.kind
    if kind == "b":
        values = values.astype(np.uint8) * np.uint8(255)
        kind = "u"
    if kind not in "uif":
        raise ImageError(f"{name}: pixel type {values.dtype} is not an image type")
    if norm == "auto":
        if values.dtype == np.uint8:
            norm = "scale"
        elif kind == "f" and values.size and 0.0 <= values.min() and values.max() <= 1.0:
            return values.astype(np.float32)
        else:
            norm = "minmax"
    if norm == "scale":
        if values.dtype == np.uint8:
            return values.astype(np.float32) / np.float32(255.0)
        if values.dtype == np.uint16:
            return (values.astype(np.float64) / 65535.0).astype(np.float32)
        if kind == "f":
            lo, hi = float(values.min()), float(values.max())
            if lo < 0.0 or hi > 1.0:
                raise ImageError(
                    f"{name}: float values span {lo:g}..{hi:g}, outside [0, 1], so 'scale' cannot be used; "
                    "use 'minmax' or 'percentile'"
                )
            return values.astype(np.float32)
        raise ImageError(
            f"{name}: 'scale' needs 8- or 16-bit data, got {values.dtype}; use 'minmax' or 'percentile'"
        )
    v = values.astype(np.float64)
    if norm == "percentile":
        lo_p, hi_p = check_percentiles(percentiles, name)
        lo, hi = (float(x) for x in np.percentile(v, [lo_p, hi_p]))
        if hi > lo:
            return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


def check_percentiles(percentiles: Sequence[float], name: str = "percentiles") -> tuple[float, float]:
    """The (low, high) percentiles as floats; raises ImageError unless 0 <= low < high <= 100."""
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ImageError(f"{name}: percentiles must be two numbers (low, high), got {percentiles!r}") from None
    if not 0.0 <= lo < hi <= 100.0:
        raise ImageError(f"{name}: percentiles must satisfy 0 <= low < high <= 100, got ({lo:g}, {hi:g})")
    return lo, hi


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) samples of any type -> float64 (...) ``0.299 R + 0.587 G + 0.114 B``,
    unclamped: how deeper-than-8-bit colour is reduced to one channel."""
    v = rgb.astype(np.float64)
    return 0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]


def infrared_from_array(
    array: np.ndarray, norm: str = "auto", percentiles: Sequence[float] = DEFAULT_PERCENTILES, name: str = "infrared"
) -> np.ndarray:
    """Infrared samples (H, W) or (H, W, C) -> float32 (H, W) in [0, 1]. 8-bit colour
    goes through ``PIL convert('L')`` (as the release); deeper colour through
    ``0.299 R + 0.587 G + 0.114 B`` in float64."""
    array = channels(np.asarray(array), name)
    if array.ndim == 3:
        if array.dtype == np.uint8:
            array = np.asarray(Image.fromarray(np.ascontiguousarray(array), "RGB").convert("L"))
        else:
            _finite(array, name)
            if norm == "scale" and array.dtype == np.uint16:  # the type's range, as for grey 16-bit
                return (luma(array) / 65535.0).astype(np.float32)
            array = luma(array)
    return normalize_infrared(array, norm, percentiles, name)


def infrared_from_pil(
    img: Image.Image, norm: str = "auto", percentiles: Sequence[float] = DEFAULT_PERCENTILES, name: str = "infrared"
) -> np.ndarray:
    """PIL image -> float32 (H, W) in [0, 1]: ``convert('L')`` for 8-bit modes, the
    stored values for 16-bit, 32-bit integer and float modes."""
    if img.mode in HIGH_BIT_PIL_MODES:
        return normalize_infrared(pil_high_bit(img), norm, percentiles, name)
    return normalize_infrared(np.asarray(img.convert("L")), norm, percentiles, name)


def pil_high_bit(img: Image.Image) -> np.ndarray:
    """Samples of a 16-bit, 32-bit integer or float PIL image: uint16 where the values
    fit 0..65535 (16-bit modes, and mode 'I' as 16-bit grey PNGs often open), else
    the stored int32 / float32 array."""
    array = np.asarray(img)
    if img.mode.startswith("I;16"):
        return array.astype(np.uint16)  # native byte order
    if img.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        return array.astype(np.uint16)  # 16-bit grey PNGs may open as mode 'I'
    return array


def read_infrared(
    path: PathLike, norm: str = "auto", percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """Infrared image file -> float32 (H, W) in [0, 1] (see the module docstring)."""
    decoded = decode_image(path)
    if isinstance(decoded, Image.Image):
        return infrared_from_pil(decoded, norm, percentiles, os.fspath(path))
    return infrared_from_array(decoded, norm, percentiles, os.fspath(path))


# ------------------------------------------------------------------- visible
def visible_from_array(array: np.ndarray, name: str = "visible") -> np.ndarray:
    """Visible samples (H, W) or (H, W, C) -> float32 in [0, 1], (H, W, 3) RGB or
    (H, W) grey: uint8 / 255, uint16 / 65535, float kept (must be in [0, 1])."""
    array = channels(np.asarray(array), name)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 65535.0).astype(np.float32)
    if array.dtype.kind == "f":
        _finite(array, name)
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{name}: float visible values span {lo:g}..{hi:g}; they must be in [0, 1] "
                "(divide by the white level first)"
            )
        return array.astype(np.float32)
    raise ImageError(f"{name}: visible pixel type {array.dtype} is not supported; use 8-bit, 16-bit or float in [0, 1]")


def visible_from_pil(img: Image.Image, name: str = "visible") -> np.ndarray:
    """PIL image -> float32 (H, W, 3) or (H, W) in [0, 1]: ``convert('RGB')`` for
    colour modes (as the release), ``convert('L')`` for grey ones, 16-bit grey / 65535."""
    if img.mode in HIGH_BIT_PIL_MODES:
        array = pil_high_bit(img)
        if array.dtype.kind == "i":
            raise ImageError(f"{name}: 32-bit integer visible image with values outside 0..65535 is not supported")
        return visible_from_array(array, name)
    mode = "L" if img.mode in _GREY_PIL_MODES else "RGB"
    return visible_from_array(np.asarray(img.convert(mode)), name)


def read_visible(path: PathLike) -> np.ndarray:
    """Visible image file -> float32 (H, W, 3) RGB or (H, W) grey in [0, 1]."""
    decoded = decode_image(path)
    if isinstance(decoded, Image.Image):
        return visible_from_pil(decoded, os.fspath(path))
    return visible_from_array(decoded, os.fspath(path))


# -------------------------------------------------------------------- colour
def rgb_to_ycrcb(r: Array, g: Array, b: Array) -> tuple[Array, Array, Array]:
    """The released ``RGB2YCrCb`` on channel planes (numpy arrays or torch tensors of
    any equal shape, values in [0, 1]): ``Y = 0.299 R + 0.587 G + 0.114 B``,
    ``Cr = (R - Y) * 0.713 + 0.5``, ``Cb = (B - Y) * 0.564 + 0.5``, each clamped to
    [0, 1]. Returns (Y, Cr, Cb) in the input dtype."""
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = (r - y) * 0.713 + 0.5
    cb = (b - y) * 0.564 + 0.5
    return y.clip(0.0, 1.0), cr.clip(0.0, 1.0), cb.clip(0.0, 1.0)


# the released YCrCb2RGB's coefficients: R = Y + CR_R dCr, G = Y - CR_G dCr - CB_G dCb, B = Y + CB_B dCb
_CR_R, _CR_G, _CB_G, _CB_B = 1.403, 0.714, 0.344, 1.773


def ycrcb_to_rgb(y: Array, cr: Array, cb: Array) -> tuple[Array, Array, Array]:
    """The released ``YCrCb2RGB`` on channel planes: ``R = Y + 1.403 (Cr - 0.5)``,
    ``G = Y - 0.714 (Cr - 0.5) - 0.344 (Cb - 0.5)``, ``B = Y + 1.773 (Cb - 0.5)``,
    clamped to [0, 1]. ``Y`` is used unclamped (as for the golden ``fused_rgb``)."""
    dr, db = cr - 0.5, cb - 0.5
    r = y + _CR_R * dr
    g = y - _CR_G * dr - _CB_G * db
    b = y + _CB_B * db
    return r.clip(0.0, 1.0), g.clip(0.0, 1.0), b.clip(0.0, 1.0)


def ycrcb_to_rgb_image(y: np.ndarray, cr: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """:func:`ycrcb_to_rgb` of numpy planes (H, W) as one (H, W, 3) float32 image.

    For float32 planes (the fusing pipeline's) the channels are written straight into
    the image with the same float32 operations in the same order as
    :func:`ycrcb_to_rgb`, so the values are the same, through two scratch planes instead
    of a new array per operation and a stacking copy; other dtypes go through
    :func:`ycrcb_to_rgb` and a stack."""
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in (y, cr, cb)):
        return np.stack(ycrcb_to_rgb(y, cr, cb), axis=-1).astype(np.float32)
    out = np.empty(y.shape + (3,), np.float32)
    dr, db = np.subtract(cr, np.float32(0.5)), np.subtract(cb, np.float32(0.5))
    t = np.multiply(dr, np.float32(_CR_R))
    np.add(y, t, out=out[..., 0])
    np.multiply(dr, np.float32(_CR_G), out=t)
    np.subtract(y, t, out=t)
    np.multiply(db, np.float32(_CB_G), out=dr)
    np.subtract(t, dr, out=out[..., 1])
    np.multiply(db, np.float32(_CB_B), out=t)
    np.add(y, t, out=out[..., 2])
    return np.clip(out, 0.0, 1.0, out=out)


# -------------------------------------------------------------------- saving
def quantize(image: np.ndarray, bits: int = 8) -> np.ndarray:
    """float [0, 1] -> uint8 / uint16 by ``floor(clamp(v * max + 0.5, 0, max))``
    (round half up; for 8 bits computed in float32 like the released save_image)."""
    if bits not in (8, 16):
        raise ImageError(f"bit depth must be 8 or 16, got {bits}")
    image = np.asarray(image)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageError("the image to save holds NaN or infinite values")
    dtype, top = (np.float32, 255.0) if bits == 8 else (np.float64, 65535.0)
    # one working array, updated in place (the same operations, in the same order)
    v = np.multiply(image, dtype(top), dtype=dtype)
    v += dtype(0.5)
    np.clip(v, 0.0, top, out=v)
    np.floor(v, out=v)
    return v.astype(np.uint8 if bits == 8 else np.uint16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png16(image: np.ndarray, level: int = 6) -> bytes:
    """uint16 (H, W) grey or (H, W, 3) RGB -> PNG file bytes at 16 bits per sample
    (non-interlaced, every row with the 'Sub' filter)."""
    image = np.asarray(image)
    if image.dtype != np.uint16 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageError(f"16-bit PNG needs a uint16 (H, W) or (H, W, 3) array, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    colour_type, bpp = (2, 6) if image.ndim == 3 else (0, 2)
    rows = np.ascontiguousarray(image.astype(">u2")).view(np.uint8).reshape(h, w * bpp)
    filtered = rows.copy()
    filtered[:, bpp:] = rows[:, bpp:] - rows[:, :-bpp]  # Sub filter, arithmetic mod 256
    data = np.concatenate([np.ones((h, 1), np.uint8), filtered], axis=1).tobytes()
    idat = zlib.compress(data, level)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    chunk = 1 << 24
    parts = [_png_chunk(b"IDAT", idat[i : i + chunk]) for i in range(0, max(len(idat), 1), chunk)]
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(parts) + _png_chunk(b"IEND", b"")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` for a new file in ``path``'s folder, then rename
    it to ``path`` (atomic on one file system). The file gets the permissions of a new
    file under the umask, also when ``write`` recreates it (safetensors writes 0600).
    The temporary file is removed if anything fails, including an interrupt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb"):  # create it (mode from the umask), claim the name
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(os.fspath(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_image(path: PathLike, image: np.ndarray, bits: int = 8, overwrite: bool = False) -> Path:
    """Save a float image in [0, 1], (H, W) grey or (H, W, 3) RGB, atomically.

    The format follows the extension (:data:`WRITE_EXTENSIONS`); ``bits`` 16 needs
    PNG or TIFF. An existing file is replaced only with ``overwrite=True``."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _WRITERS:
        raise ImageError(f"{path}: cannot write '{ext or 'no extension'}' files; use one of {WRITE_EXTENSIONS}")
    fmt, depths = _WRITERS[ext]
    if bits not in depths:
        raise ImageError(f"{path}: {fmt} cannot hold {bits}-bit images; use .png or .tif for 16 bits")
    image = np.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageError(f"{path}: expected an (H, W) or (H, W, 3) image, got shape {tuple(image.shape)}")
    if path.exists() and not overwrite:
        raise ImageError(f"{path} already exists; it is not overwritten (allow it with overwrite / --overwrite)")
    pixels = quantize(image, bits)
    if fmt == "TIFF":
        import tifffile

        photometric = "rgb" if pixels.ndim == 3 else "minisblack"

        def write(tmp: str) -> None:
            tifffile.imwrite(tmp, pixels, photometric=photometric, compression="zlib")

    elif bits == 16:

        def write(tmp: str) -> None:
            Path(tmp).write_bytes(encode_png16(pixels))

    else:
        options = {"quality": 95} if fmt == "JPEG" else {}

        def write(tmp: str) -> None:
            Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L").save(tmp, format=fmt, **options)

    try:
        return atomic_write(path, write)
    except OSError as e:
        raise ImageError(f"{path}: cannot write the image ({type(e).__name__}: {e})") from e
