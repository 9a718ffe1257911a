"""Training and validation data: paired infrared/visible folders.

Layout: a dataset folder holds ``ir/`` and ``vi/``; a pair is one file in each
with the same name stem (``ir/0001.png`` pairs with ``vi/0001.png`` or
``vi/0001.jpg``). Several dataset folders can be combined. Every file that
cannot be used (no partner, two candidates for one stem, not an image,
unreadable, different sizes in ``ir`` and ``vi``, 16-bit colour PNG) is
*reported* with its path and the reason in a :class:`ScanReport`; nothing is
dropped silently, and a folder without a single usable pair is an error.

Pixel values (RELEASED-MODEL-FACTS.md section 5, the released ``dataset.py``):

* infrared, 8-bit: ``PIL.Image.convert('L')`` (ITU-R 601-2 luma with PIL's
  integer rounding for RGB files; 1-channel files unchanged), divided by 255;
* visible, 8-bit: ``convert('RGB')`` divided by 255, reduced to the Y channel of
  the released ``RGB2YCrCb``: ``Y = 0.299 R + 0.587 G + 0.114 B`` (float32,
  clamped to [0, 1]);
* 16-bit inputs (1-channel PNG, or TIFF with 1 to 4 channels; every file is read
  by :func:`s4fusion.io.decode_image`, as for fusing): reduced to one channel by
  the same formula in float64 (``0.299 R + 0.587 G + 0.114 B`` for a colour image,
  infrared as ``s4fusion fuse`` reduces it, visible as Y), then mapped to
  [0, 1] by the ``high_bit_depth`` rule: ``"scale"`` divides by 65535 (keeps the
  sensor's absolute scale; right for images that use the full 16-bit range) and
  ``"minmax"`` stretches each image's own minimum..maximum to 0..1 (right for raw
  radiometric thermal counts that occupy a narrow band, e.g. 14-bit data; a
  constant image becomes 0). The rule is applied to the whole image before
  cropping. Pillow reads 16-bit *colour* PNG at 8 bits, so such files are
  reported as unsupported (store them as 16-bit TIFF instead).

Training samples (:class:`TrainPairs`): a random ``crop x crop`` window taken at
the same place in both images, then a vertical flip and a horizontal flip, each
with probability 0.5, in that order (the released ``RandomCrop`` +
``RandomVerticalFlip`` + ``RandomHorizontalFlip`` on the 4-channel stack). The
randomness of a sample depends only on ``(seed, epoch, position in the epoch)``,
never on the worker process, so a run is reproducible with any number of loader
workers and resumes exactly. A pair smaller than the crop is handled as the
released loader does by default (``small="next"``: the next pair in the list
that is large enough is used instead, wrapping around) or, with
``small="pad"``, zero-padded (evenly, the extra pixel at the bottom/right, as the
network's own padding) up to the crop size.

Order and sharding (:class:`EpochBatchSampler`): each epoch is a seeded
permutation cut into *global* batches; under ``torchrun`` every process takes its
contiguous share of each global batch. The samples of a step are therefore the
same whatever the number of processes, and the number of steps per epoch is
``len(pairs) // global_batch`` (the incomplete last batch is dropped).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .io import (
    HIGH_BIT_PIL_MODES,
    ImageError,
    atomic_write_text,
    channels,
    check_png16_colour,
    decode_image,
    luma,
    pil_high_bit,
)

__all__ = [
    "DataError",
    "Pair",
    "ScanReport",
    "IMAGE_EXTENSIONS",
    "HIGH_BIT_DEPTH_RULES",
    "SMALL_IMAGE_RULES",
    "rgb_to_y",
    "load_infrared",
    "load_visible",
    "scan_pairs",
    "scan_datasets",
    "split_pairs",
    "write_splits",
    "read_splits",
    "TrainPairs",
    "EvalPairs",
    "EpochBatchSampler",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HIGH_BIT_DEPTH_RULES = ("scale", "minmax")
SMALL_IMAGE_RULES = ("next", "pad")
_TIFF = (".tif", ".tiff")
SPLITS_VERSION = 1


class DataError(ValueError):
    """A dataset folder, image file or split file cannot be used."""


@dataclass(frozen=True)
class Pair:
    """One infrared/visible pair: file paths (as found under the dataset folder
    given by the user) and the common size in pixels."""

    infrared: str
    visible: str
    height: int
    width: int

    @property
    def name(self) -> str:
        """Dataset folder name and file stem, e.g. ``train/MSRS_00556D``."""
        p = Path(self.infrared)
        return f"{p.parent.parent.name}/{p.stem}"


@dataclass
class ScanReport:
    """Result of scanning one or more dataset folders."""

    pairs: list[Pair] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    roots: list[str] = field(default_factory=list)

    def small(self, crop: int) -> list[Pair]:
        """Pairs with a side shorter than ``crop``."""
        return [p for p in self.pairs if p.height < crop or p.width < crop]

    def summary(self, crop: Optional[int] = None, small_rule: str = "next", limit: int = 20) -> str:
        """Human-readable report: counts, then every problem (up to ``limit``)."""
        lines = [f"{', '.join(self.roots)}: {len(self.pairs)} usable pairs, {len(self.problems)} files not used"]
        for path, reason in self.problems[:limit]:
            lines.append(f"  not used: {path}: {reason}")
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more files not used")
        if crop:
            small = self.small(crop)
            if small:
                how = (
                    "each is replaced by the next large-enough pair, as the released loader does"
                    if small_rule == "next"
                    else "each is zero-padded to the crop size"
                )
                names = " ".join(p.name for p in small[:limit]) + (" ..." if len(small) > limit else "")
                lines.append(f"  {len(small)} pairs are smaller than the {crop}x{crop} crop ({how}): {names}")
        return "\n".join(lines)


# --------------------------------------------------------------------- pixels
def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Y of the released ``RGB2YCrCb``: (H, W, 3) float32 in [0, 1] -> (H, W) float32,
    ``0.299 R + 0.587 G + 0.114 B`` clamped to [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.clip(0.299 * r + 0.587 * g + 0.114 * b, 0.0, 1.0).astype(np.float32, copy=False)


def _check_png16_colour(path: Path) -> None:
    try:
        check_png16_colour(path)
    except ImageError as e:
        raise DataError(str(e)) from None


def _normalise_high_bit(values: np.ndarray, rule: str, path: Path) -> np.ndarray:
    if rule == "scale":
        return values / 65535.0
    if rule == "minmax":
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            return np.zeros_like(values)
        return (values - lo) / (hi - lo)
    raise DataError(f"{path}: unknown high_bit_depth rule {rule!r}; use one of {HIGH_BIT_DEPTH_RULES}")


def _tiff_to_hwc(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: TIFF of shape {array.shape} is not a single 2-D image")
    return array


def _load(path: Path, role: str, high_bit_depth: str) -> np.ndarray:
    """Decode one image without the final per-pixel conversion, so that it can be
    cropped first: 8-bit infrared -> uint8 (H, W) (``convert('L')``); 8-bit visible
    -> uint8 (H, W, 3) (``convert('RGB')``); 16-bit -> float32 (H, W) in [0, 1].
    :func:`_to_unit` finishes the conversion. The file is read by
    :func:`s4fusion.io.decode_image`, the reader of ``s4fusion fuse``; every failure
    is a DataError naming the file."""
    try:
        decoded = decode_image(path)
        if isinstance(decoded, Image.Image):
            if decoded.mode not in HIGH_BIT_PIL_MODES:
                return _decode_8bit(decoded, role)
            array = pil_high_bit(decoded)
        else:  # TIFF samples, (H, W) or (H, W, C)
            array = channels(decoded, str(path))
            if array.dtype == np.uint8:
                return _decode_8bit(Image.fromarray(np.ascontiguousarray(array)), role)
    except ImageError as e:
        raise DataError(str(e)) from None
    if array.dtype != np.uint16:
        raise DataError(
            f"{path}: pixel type {array.dtype} is not supported; use 8-bit or 16-bit images (integers 0..65535)"
        )
    return _finish_high_bit(array, high_bit_depth, path)


def _decode_8bit(img: Image.Image, role: str) -> np.ndarray:
    return np.asarray(img.convert("L" if role == "infrared" else "RGB"))


def _to_unit(raw: np.ndarray) -> np.ndarray:
    """Output of :func:`_load` (possibly cropped) -> float32 (H, W) in [0, 1]."""
    if raw.dtype == np.uint8:
        values = raw.astype(np.float32) / np.float32(255.0)
        return rgb_to_y(values) if values.ndim == 3 else values
    return raw


def _finish_high_bit(values: np.ndarray, rule: str, path: Path) -> np.ndarray:
    """16-bit samples (H, W) or (H, W, 3) -> float32 (H, W) in [0, 1]: one channel first
    (``0.299 R + 0.587 G + 0.114 B`` in float64, as ``s4fusion fuse`` reduces a colour
    infrared image), then the ``high_bit_depth`` rule."""
    values = luma(values) if values.ndim == 3 else values.astype(np.float64)
    values = np.clip(_normalise_high_bit(values, rule, path), 0.0, 1.0)
    return np.ascontiguousarray(values, dtype=np.float32)


def load_infrared(path: str | os.PathLike, high_bit_depth: str = "scale") -> torch.Tensor:
    """Infrared image -> (1, H, W) float32 in [0, 1]. Raises :class:`DataError` naming the file."""
    return torch.from_numpy(_to_unit(_load(Path(path), "infrared", high_bit_depth)))[None]


def load_visible(path: str | os.PathLike, high_bit_depth: str = "scale") -> torch.Tensor:
    """Visible image -> its Y channel, (1, H, W) float32 in [0, 1]. Raises :class:`DataError`."""
    return torch.from_numpy(_to_unit(_load(Path(path), "visible", high_bit_depth)))[None]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, raising DataError for unreadable files."""
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                shape = _tiff_to_hwc(np.empty(tif.pages[0].shape, dtype=np.uint8), path).shape
            return int(shape[0]), int(shape[1])
        _check_png16_colour(path)
        with Image.open(path) as img:
            width, height = img.size
        return int(height), int(width)
    except DataError:
        raise
    except Exception as e:  # PIL / tifffile raise many types for broken files
        raise DataError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------- pairing
def _list_images(folder: Path, problems: list[tuple[str, str]]) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file():
            problems.append((str(entry), "not a file (sub-folders are not searched)"))
            continue
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append((str(entry), f"not an image extension {IMAGE_EXTENSIONS}"))
            continue
        by_stem.setdefault(entry.stem, []).append(entry)
    out = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            for p in paths:
                problems.append((str(p), f"several files share the name {stem!r} in {folder}; keep one"))
        else:
            out[stem] = paths[0]
    return out


def scan_pairs(root: str | os.PathLike) -> ScanReport:
    """Pair ``root/ir`` with ``root/vi`` by file stem, reading each image header.

    Raises :class:`DataError` if the folder layout is wrong or no pair is usable;
    otherwise every file that is not used is listed in ``report.problems``."""
    root_s = os.fspath(root)
    base = Path(root_s)
    if not base.is_dir():
        raise DataError(f"dataset folder {root_s} does not exist (expected {root_s}/ir and {root_s}/vi)")
    for sub in ("ir", "vi"):
        if not (base / sub).is_dir():
            raise DataError(
                f"dataset folder {root_s} has no '{sub}' sub-folder: a dataset folder must hold ir/ and vi/ "
                "with the infrared and visible images under matching file names"
            )
    report = ScanReport(roots=[root_s])
    ir = _list_images(base / "ir", report.problems)
    vi = _list_images(base / "vi", report.problems)
    for stem in sorted(set(ir) - set(vi)):
        report.problems.append((str(ir[stem]), f"no visible image named {stem}.* in {base / 'vi'}"))
    for stem in sorted(set(vi) - set(ir)):
        report.problems.append((str(vi[stem]), f"no infrared image named {stem}.* in {base / 'ir'}"))
    for stem in sorted(set(ir) & set(vi)):
        sizes: dict[Path, tuple[int, int]] = {}
        for path in (ir[stem], vi[stem]):
            try:
                sizes[path] = _image_size(path)
            except DataError as e:
                report.problems.append((str(path), str(e).removeprefix(f"{path}: ")))
        if len(sizes) < 2:
            for path in sizes:
                report.problems.append((str(path), "its partner in the other folder is unreadable (see above)"))
            continue
        size_ir, size_vi = sizes[ir[stem]], sizes[vi[stem]]
        if size_ir != size_vi:
            report.problems.append(
                (
                    str(ir[stem]),
                    f"infrared is {size_ir[1]}x{size_ir[0]} but {vi[stem]} is {size_vi[1]}x{size_vi[0]} (W x H); "
                    "the pair must be registered and of the same size",
                )
            )
            continue
        if min(size_ir) < 2:
            report.problems.append((str(ir[stem]), f"image of {size_ir[1]}x{size_ir[0]} pixels is too small"))
            continue
        report.pairs.append(Pair(str(ir[stem]), str(vi[stem]), *size_ir))
    if not report.pairs:
        reasons = "; ".join(f"{p}: {r}" for p, r in report.problems[:5]) or "both folders are empty"
        raise DataError(f"dataset folder {root_s} has no usable image pair ({reasons})")
    return report


def scan_datasets(roots: Sequence[str | os.PathLike]) -> ScanReport:
    """Scan several dataset folders and combine them (pairs in the order given)."""
    if not roots:
        raise DataError("no dataset folder given: name at least one folder holding ir/ and vi/")
    out = ScanReport()
    for root in roots:
        rep = scan_pairs(root)
        out.pairs += rep.pairs
        out.problems += rep.problems
        out.roots += rep.roots
    return out


# ----------------------------------------------------------------- splits
def split_pairs(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded random split: ``round(val_fraction * n)`` pairs for validation.

    ``random.Random(seed).sample`` over the pairs sorted by path, so the result
    does not depend on the order the folders were listed in."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(pairs, key=lambda p: (p.infrared, p.visible))
    n_val = int(round(val_fraction * len(ordered)))
    val_idx = set(random.Random(seed).sample(range(len(ordered)), n_val))
    train = [p for i, p in enumerate(ordered) if i not in val_idx]
    val = [p for i, p in enumerate(ordered) if i in val_idx]
    if not train:
        raise DataError(f"val_fraction {val_fraction} leaves no training pair out of {len(ordered)}")
    return train, val


def write_splits(path: str | os.PathLike, train: Sequence[Pair], val: Sequence[Pair], info: dict) -> None:
    """Write the pairs of each split to a JSON file, atomically."""
    path = Path(path)
    doc = {
        "version": SPLITS_VERSION,
        **info,
        "train": [asdict(p) for p in train],
        "val": [asdict(p) for p in val],
    }
    atomic_write_text(path, json.dumps(doc, indent=1))


def read_splits(path: str | os.PathLike) -> tuple[list[Pair], list[Pair], dict]:
    """Read a file written by :func:`write_splits`; checks that every file still exists."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        train = [Pair(**d) for d in doc["train"]]
        val = [Pair(**d) for d in doc["val"]]
    except FileNotFoundError as e:
        raise DataError(f"split file {path} not found") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"split file {path} is not a valid s4fusion split file: {e}") from e
    missing = [f for p in train + val for f in (p.infrared, p.visible) if not os.path.isfile(f)]
    if missing:
        raise DataError(
            f"split file {path} lists {len(missing)} files that no longer exist, e.g. {missing[:3]}; "
            "restore them or start a new run"
        )
    info = {k: v for k, v in doc.items() if k not in ("train", "val")}
    return train, val, info


# ---------------------------------------------------------------- datasets
def _pad_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    ph, pw = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if ph == 0 and pw == 0:
        return array
    return np.pad(array, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


class TrainPairs(Dataset):
    """Random joint crops with flips for training.

    Items are addressed by ``(index, seed, epoch, position)`` tuples (as yielded by
    :class:`EpochBatchSampler`); an item is ``(infrared, visible)``, each
    (1, crop, crop) float32 in [0, 1]. A pair that fails to decode is reported
    once (a warning naming the file) and replaced by the next pair.

    ``cache``: decode every pair that can be sampled once, now (in threads), and keep
    the decoded arrays (8-bit: 4 bytes per pixel; 16-bit: 8), so that an item costs a
    crop instead of decoding two whole images (15-30 ms each pair on a laptop core,
    which at GPU training rates takes several cores). Loader processes started by
    forking (Linux) share the arrays; elsewhere each process gets a copy. Items are
    the same with and without the cache."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        crop: int = 229,
        flips: bool = True,
        small: str = "next",
        high_bit_depth: str = "scale",
        cache: bool = False,
    ) -> None:
        if not pairs:
            raise DataError("no training pairs")
        if crop < 2:
            raise DataError(f"crop must be at least 2 pixels, got {crop}")
        if small not in SMALL_IMAGE_RULES:
            raise DataError(f"small must be one of {SMALL_IMAGE_RULES}, got {small!r}")
        if high_bit_depth not in HIGH_BIT_DEPTH_RULES:
            raise DataError(f"high_bit_depth must be one of {HIGH_BIT_DEPTH_RULES}, got {high_bit_depth!r}")
        self.pairs = list(pairs)
        self.crop = crop
        self.flips = flips
        self.small = small
        self.high_bit_depth = high_bit_depth
        big = [p.height >= crop and p.width >= crop for p in self.pairs]
        if small == "next" and not any(big):
            raise DataError(
                f"every training pair is smaller than the {crop}x{crop} crop: lower data.crop "
                "or set data.small = \"pad\""
            )
        # The released loader moves on to the next index when an image is too small.
        n = len(self.pairs)
        self._substitute = list(range(n))
        if small == "next":
            for i in range(n):
                j = i
                while not big[j]:
                    j = (j + 1) % n
                self._substitute[i] = j
        self._bad: set[int] = set()
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if cache:
            used = sorted(set(self._substitute))
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
                for j, loaded in zip(used, pool.map(self._read, used)):
                    if loaded is not None:
                        self._decoded[j] = loaded

    @property
    def cached_bytes(self) -> int:
        """Memory held by the decoded pairs (0 without ``cache``)."""
        return sum(ir.nbytes + vi.nbytes for ir, vi in self._decoded.values())

    def _read(self, j: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Pair j decoded (cropping-ready arrays of :func:`_load`), or None after a
        warning naming the file if it cannot be used; it is then skipped from now on."""
        pair = self.pairs[j]
        try:
            ir = _load(Path(pair.infrared), "infrared", self.high_bit_depth)
            vi = _load(Path(pair.visible), "visible", self.high_bit_depth)
        except DataError as e:
            self._bad.add(j)
            warnings.warn(f"skipping a training pair: {e}", RuntimeWarning, stacklevel=3)
            return None
        if ir.shape[:2] != vi.shape[:2]:
            self._bad.add(j)
            warnings.warn(
                f"skipping a training pair: {pair.infrared} {ir.shape} and {pair.visible} {vi.shape} "
                "decode to different sizes",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return ir, vi

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed, epoch, position = item
        rng = np.random.default_rng([seed, epoch, position])
        n = len(self.pairs)
        for attempt in range(n):
            j = self._substitute[(index + attempt) % n]
            if j in self._bad:
                continue
            loaded = self._decoded.get(j) or self._read(j)
            if loaded is not None:
                return self._augment(*loaded, rng)
        raise DataError(f"none of the {n} training pairs could be decoded; see the warnings above")

    def _augment(self, ir: np.ndarray, vi: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.crop
        h, w = ir.shape[:2]
        top = int(rng.integers(0, max(h, c) - c + 1))
        left = int(rng.integers(0, max(w, c) - c + 1))
        ir = _pad_to(_to_unit(ir[top : top + c, left : left + c]), c, c)
        vi = _pad_to(_to_unit(vi[top : top + c, left : left + c]), c, c)
        if self.flips:
            if rng.random() < 0.5:  # vertical flip first, as the released transforms
                ir, vi = ir[::-1], vi[::-1]
            if rng.random() < 0.5:
                ir, vi = ir[:, ::-1], vi[:, ::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(ir))[None],
            torch.from_numpy(np.ascontiguousarray(vi))[None],
        )


class EvalPairs(Dataset):
    """Whole images (``crop=0``) or their centred ``crop x crop`` window, for validation.

    Item ``i`` is ``(infrared, visible, name)``, tensors (1, h, w) float32 in [0, 1].
    Use batch size 1 for whole images of different sizes."""

    def __init__(self, pairs: Sequence[Pair], crop: int = 0, high_bit_depth: str = "scale") -> None:
        if crop < 0:
            raise DataError(f"validation crop must be >= 0 (0 = whole image), got {crop}")
        self.pairs = list(pairs)
        self.crop = crop
        self.high_bit_depth = high_bit_depth

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        pair = self.pairs[i]
        ir = _load(Path(pair.infrared), "infrared", self.high_bit_depth)
        vi = _load(Path(pair.visible), "visible", self.high_bit_depth)
        if ir.shape[:2] != vi.shape[:2]:
            raise DataError(f"{pair.infrared} {ir.shape[:2]} and {pair.visible} {vi.shape[:2]} differ in size")
        if self.crop:
            h, w = ir.shape[:2]
            ch, cw = min(self.crop, h), min(self.crop, w)
            top, left = (h - ch) // 2, (w - cw) // 2
            ir = ir[top : top + ch, left : left + cw]
            vi = vi[top : top + ch, left : left + cw]
        ir, vi = _to_unit(ir), _to_unit(vi)
        return (
            torch.from_numpy(np.ascontiguousarray(ir))[None],
            torch.from_numpy(np.ascontiguousarray(vi))[None],
            pair.name,
        )


# ---------------------------------------------------------------- sampler
class EpochBatchSampler(Sampler[list[tuple[int, int, int, int]]]):
    """Seeded, sharded batches for :class:`TrainPairs`.

    Epoch ``e`` uses ``torch.randperm(n)`` from a generator seeded with
    ``seed + e``; global batch ``b`` is positions ``[b*G, (b+1)*G)`` of it and
    this process (``rank`` of ``world_size``) takes the contiguous slice
    ``[rank*G/world, (rank+1)*G/world)``. Items carry the sample's own seed
    ``(seed, epoch, position)``. ``set_epoch(epoch, start_batch, epochs)`` selects the
    epoch, skips batches already consumed (exact resume) and lets one pass run on
    through the following epochs: a loader's workers then prefetch across an epoch's
    end instead of starting each epoch with an empty queue."""

    def __init__(self, num_pairs: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if num_pairs < global_batch:
            raise DataError(
                f"only {num_pairs} training pairs for a batch of {global_batch}: lower the batch size "
                "or add data"
            )
        self.num_pairs = num_pairs
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self.epochs = 1

    @property
    def batches_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0, epochs: int = 1) -> None:
        """Iterate from batch ``start_batch`` of ``epoch`` to the end of epoch ``epoch + epochs - 1``."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.epoch = epoch
        self.start_batch = start_batch
        self.epochs = epochs

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        lo = self.rank * self.local_batch
        for epoch in range(self.epoch, self.epoch + self.epochs):
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_pairs, generator=g).tolist()
            for b in range(self.start_batch if epoch == self.epoch else 0, self.batches_per_epoch):
                base = b * self.global_batch + lo
                yield [(order[p], self.seed, epoch, p) for p in range(base, base + self.local_batch)]

