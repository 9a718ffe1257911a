"""Paired-folder data loading: pairing and reports, pixel conversions (8/16-bit),
joint crops and flips, splits, the sharded sampler, multi-process loading."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s4fusion.data import (
    DataError,
    EpochBatchSampler,
    EvalPairs,
    Pair,
    TrainPairs,
    load_infrared,
    load_visible,
    read_splits,
    scan_datasets,
    scan_pairs,
    split_pairs,
    write_splits,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"reference data missing: {DATA} (the tests need ../shared beside the checkout)")
    return DATA


def _y_reference(path: Path) -> torch.Tensor:
    """The released RGB2YCrCb Y channel, written with torch ops on ToTensor values."""
    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float().div(255)
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).clamp(0, 1)[None]


def _make_pair_folder(root: Path, names, size=(40, 50), rng=None) -> Path:
    rng = rng or np.random.default_rng(0)
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir(parents=True)
    for name in names:
        h, w = size
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / "ir" / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "vi" / f"{name}.png")
    return root


def _png16_rgb(path: Path, array: np.ndarray) -> None:
    """A minimal 16-bit RGB PNG writer (colour type 2, no filtering)."""
    h, w, _ = array.shape
    a = array.astype(">u2")

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------- pairing
def test_scan_real_folders(data_dir):
    rep = scan_pairs(data_dir / "train")
    assert len(rep.pairs) == 194 and rep.problems == []
    both = scan_datasets([data_dir / "train", data_dir / "val", data_dir / "tiny"])
    assert len(both.pairs) == 194 + 16 + 4
    small = both.small(229)
    # data/README.md lists the 10 RoadScene training pairs with a side below 229 px (and tiny is 64x64)
    assert len([p for p in small if "/train/" in p.infrared.replace("\\", "/")]) == 10
    assert "10 pairs" not in both.summary(229) and "14 pairs are smaller than the 229x229 crop" in both.summary(229)
    p = rep.pairs[0]
    with Image.open(p.infrared) as im:
        assert (p.width, p.height) == im.size


def test_unmatched_unreadable_and_mismatched_files_are_reported(tmp_path):
    root = _make_pair_folder(tmp_path / "set", ["a", "b", "c", "d"])
    (root / "ir" / "only_ir.png").write_bytes((root / "ir" / "a.png").read_bytes())
    (root / "vi" / "only_vi.jpg").write_bytes(b"")
    (root / "vi" / "b.png").write_bytes(b"this is not an image")
    Image.fromarray(np.zeros((41, 50), np.uint8)).save(root / "ir" / "c.png")  # size mismatch
    (root / "vi" / "notes.txt").write_text("x")
    (root / "ir" / "d.jpg").write_bytes((root / "ir" / "d.png").read_bytes())  # two files, one stem
    rep = scan_pairs(root)
    assert [Path(p.infrared).name for p in rep.pairs] == ["a.png"]
    problems = {"/".join(Path(path).parts[-2:]): reason for path, reason in rep.problems}
    assert "no visible image named only_ir" in problems["ir/only_ir.png"]
    assert "no infrared image named only_vi" in problems["vi/only_vi.jpg"]
    assert "cannot read the image header" in problems["vi/b.png"]
    assert "partner in the other folder is unreadable" in problems["ir/b.png"]
    assert "50x41" in problems["ir/c.png"] and "same size" in problems["ir/c.png"]
    assert "not an image" in problems["vi/notes.txt"]
    assert "several files share the name 'd'" in problems["ir/d.jpg"] and "ir/d.png" in problems
    text = rep.summary()
    for name in ("only_ir.png", "only_vi.jpg", "b.png", "c.png", "notes.txt", "d.jpg"):
        assert name in text
    assert "1 usable pairs" in text


def test_bad_dataset_folders_raise_errors_naming_them(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        scan_pairs(missing)
    (tmp_path / "novi" / "ir").mkdir(parents=True)
    with pytest.raises(DataError, match=r"novi has no 'vi' sub-folder"):
        scan_pairs(tmp_path / "novi")
    root = tmp_path / "broken"
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    (root / "ir" / "x.png").write_bytes(b"junk")
    (root / "vi" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"broken has no usable image pair .*x\.png"):
        scan_pairs(root)
    with pytest.raises(DataError, match="no dataset folder"):
        scan_datasets([])


# ------------------------------------------------------------- pixels
def test_8bit_conversions_match_the_released_pipeline(data_dir):
    names = {p.name for p in (data_dir / "tiny" / "ir").iterdir()}
    for name in sorted(names):  # L files (MSRS, RoadScene) and RGB files (LLVIP, M3FD)
        ir_path, vi_path = data_dir / "tiny" / "ir" / name, data_dir / "tiny" / "vi" / name
        ref_ir = torch.from_numpy(np.array(Image.open(ir_path).convert("L"))).float().div(255)[None]
        assert torch.equal(load_infrared(ir_path), ref_ir)
        assert torch.allclose(load_visible(vi_path), _y_reference(vi_path), rtol=0, atol=1e-7)


def test_visible_y_formula_on_known_pixel(tmp_path):
    path = tmp_path / "v.png"
    Image.new("RGB", (3, 2), (200, 100, 50)).save(path)
    y = load_visible(path)
    assert y.shape == (1, 2, 3)
    assert abs(float(y[0, 0, 0]) - (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255) < 1e-6


def test_16bit_inputs(tmp_path):
    import tifffile

    rng = np.random.default_rng(1)
    g16 = rng.integers(7000, 9000, (20, 30)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    scaled = load_infrared(tmp_path / "g16.png", "scale")
    assert torch.allclose(scaled, torch.from_numpy(g16.astype(np.float64) / 65535).float()[None], atol=1e-7)
    mm = load_infrared(tmp_path / "g16.png", "minmax")
    ref = (g16.astype(np.float64) - g16.min()) / (g16.max() - g16.min())
    assert torch.allclose(mm, torch.from_numpy(ref).float()[None], atol=1e-6)
    assert float(mm.min()) == 0.0 and float(mm.max()) == 1.0
    # the same values as a 16-bit grey visible image: Y of a grey image is the grey value
    assert torch.allclose(load_visible(tmp_path / "g16.png", "scale"), scaled, atol=1e-7)

    rgb16 = rng.integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", rgb16)
    f = rgb16.astype(np.float64) / 65535
    y_ref = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    assert torch.allclose(load_visible(tmp_path / "c16.tif"), torch.from_numpy(y_ref).float()[None], atol=1e-6)
    assert torch.allclose(load_infrared(tmp_path / "c16.tif"), torch.from_numpy(y_ref).float()[None], atol=1e-6)
    tifffile.imwrite(tmp_path / "g8.tif", (g16 // 256).astype(np.uint8))
    g8 = torch.from_numpy((g16 // 256).astype(np.float32) / 255)[None]
    assert torch.equal(load_infrared(tmp_path / "g8.tif"), g8)

    _png16_rgb(tmp_path / "c16.png", rgb16)
    with pytest.raises(DataError, match=r"c16\.png: 16-bit colour PNG is not supported"):
        load_visible(tmp_path / "c16.png")
    tifffile.imwrite(tmp_path / "f.tif", rng.random((5, 5)).astype(np.float32))
    with pytest.raises(DataError, match=r"f\.tif: pixel type float32"):
        load_infrared(tmp_path / "f.tif")


def test_training_and_fusing_read_files_alike(tmp_path, data_dir):
    """Training (s4fusion.data) and fusing (s4fusion.io) share one decoder: the same
    file gives the same values (planar 16-bit and RGBA 8-bit TIFFs, 8-bit JPEG/PNG)."""
    import tifffile

    from s4fusion import io

    rng = np.random.default_rng(5)
    rgb16 = rng.integers(0, 65536, (17, 23, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb16, -1, 0), photometric="rgb", planarconfig="separate")
    rgba8 = rng.integers(0, 256, (17, 23, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba8, photometric="rgb", extrasamples=["unassalpha"])
    files = [tmp_path / "planar.tif", tmp_path / "rgba.tif"]
    files += sorted((data_dir / "tiny" / "ir").iterdir())[:2] + sorted((data_dir / "train" / "vi").glob("*.jpg"))[:1]
    for path in files:
        for rule in ("scale", "minmax") if path.name == "planar.tif" else ("scale",):
            ir = io.read_infrared(path, norm=rule)
            assert torch.allclose(load_infrared(path, rule)[0], torch.from_numpy(ir), atol=1e-6), (path, rule)
        vi = io.read_visible(path)
        y = io.rgb_to_ycrcb(vi[..., 0], vi[..., 1], vi[..., 2])[0] if vi.ndim == 3 else vi
        assert torch.allclose(load_visible(path, "scale")[0], torch.from_numpy(np.clip(y, 0, 1)).float(), atol=1e-6), path


def test_16bit_pairs_scan_and_train(tmp_path):
    import tifffile

    root = tmp_path / "hb"
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    rng = np.random.default_rng(2)
    tifffile.imwrite(root / "ir" / "p.tiff", rng.integers(0, 65536, (33, 35)).astype(np.uint16))
    tifffile.imwrite(root / "vi" / "p.tiff", rng.integers(0, 65536, (33, 35, 3)).astype(np.uint16))
    _png16_rgb(root / "vi" / "q.png", rng.integers(0, 65536, (33, 35, 3)).astype(np.uint16))
    Image.fromarray(rng.integers(0, 65535, (33, 35)).astype(np.uint16)).save(root / "ir" / "q.png")
    rep = scan_pairs(root)
    assert [p.name for p in rep.pairs] == ["hb/p"]
    assert any(Path(path).name == "q.png" and "16-bit colour PNG" in r for path, r in rep.problems)
    ir, vi = TrainPairs(rep.pairs, crop=32)[(0, 0, 0, 0)]
    assert ir.shape == vi.shape == (1, 32, 32) and ir.dtype == torch.float32
    assert 0 <= float(ir.min()) and float(vi.max()) <= 1


# ---------------------------------------------------------- crops, flips
def _grey_pair_folder(root: Path, size=(37, 45), n=1, seed=3) -> Path:
    """ir = a random grey image; vi = the same image as RGB with R=G=B (its Y equals it)."""
    rng = np.random.default_rng(seed)
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    for i in range(n):
        g = rng.integers(0, 256, size, dtype=np.uint8)
        Image.fromarray(g).save(root / "ir" / f"{i}.png")
        Image.fromarray(np.repeat(g[..., None], 3, 2)).save(root / "vi" / f"{i}.png")
    return root


def test_joint_random_crops_and_flips(tmp_path):
    root = _grey_pair_folder(tmp_path / "g")
    pairs = scan_pairs(root).pairs
    full = torch.from_numpy(np.array(Image.open(pairs[0].infrared))).float().div(255)
    ds = TrainPairs(pairs, crop=16)
    seen_flips, seen_offsets = set(), set()
    for pos in range(64):
        ir, vi = ds[(0, 7, 0, pos)]
        assert ir.shape == vi.shape == (1, 16, 16)
        assert torch.allclose(ir, vi, atol=1e-6)  # same window, same flips in both images
        found = None
        for top in range(full.shape[0] - 15):
            for left in range(full.shape[1] - 15):
                win = full[top : top + 16, left : left + 16]
                for fv in (False, True):
                    for fh in (False, True):
                        w = win.flip(0) if fv else win
                        w = w.flip(1) if fh else w
                        if torch.equal(w, ir[0]):
                            found = (top, left, fv, fh)
        assert found is not None, "the crop is not a (flipped) window of the image"
        seen_offsets.add(found[:2])
        seen_flips.add(found[2:])
    assert seen_flips == {(False, False), (False, True), (True, False), (True, True)}
    assert len(seen_offsets) > 20
    a = ds[(0, 7, 0, 5)][0]
    assert torch.equal(a, ds[(0, 7, 0, 5)][0])  # a sample is a function of (seed, epoch, position)
    assert not torch.equal(a, ds[(0, 7, 1, 5)][0])
    noflip = TrainPairs(pairs, crop=37, flips=False)  # the image is 37 x 45: only the column offset varies
    for pos in range(8):
        ir, _ = noflip[(0, 0, 0, pos)]
        assert any(torch.equal(full[:, left : left + 37], ir[0]) for left in range(9))


def test_small_images_next_or_pad(tmp_path):
    root = tmp_path / "s"
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    Image.fromarray(np.full((10, 12), 50, np.uint8)).save(root / "ir" / "a.png")
    Image.fromarray(np.full((10, 12, 3), 50, np.uint8)).save(root / "vi" / "a.png")
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(root / "ir" / "b.png")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(root / "vi" / "b.png")
    rep = scan_pairs(root)
    ds = TrainPairs(rep.pairs, crop=16, small="next")
    ir, _ = ds[(0, 0, 0, 0)]  # pair a is too small: the next pair (b) is used, as the release does
    assert torch.all(ir == 200 / 255)
    pad = TrainPairs(rep.pairs, crop=16, small="pad")
    ir, vi = pad[(0, 0, 0, 0)]
    assert ir.shape == (1, 16, 16)
    assert torch.all(ir[0, 3:13, 2:14] == 50 / 255) and float(ir.sum()) == pytest.approx(120 * 50 / 255, rel=1e-5)
    assert torch.all(ir[0, :3] == 0) and torch.all(ir[0, 13:] == 0)
    assert "1 pairs are smaller than the 16x16 crop" in rep.summary(16)
    with pytest.raises(DataError, match="smaller than the 64x64 crop"):
        TrainPairs(rep.pairs, crop=64, small="next")


def test_undecodable_file_is_skipped_with_a_warning(tmp_path):
    root = _grey_pair_folder(tmp_path / "t", size=(24, 24), n=2)
    pairs = scan_pairs(root).pairs
    data = Path(pairs[0].visible).read_bytes()
    Path(pairs[0].visible).write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    ds = TrainPairs(pairs, crop=20)
    with pytest.warns(RuntimeWarning, match=r"0\.png"):
        ir, vi = ds[(0, 0, 0, 0)]
    ref = torch.from_numpy(np.array(Image.open(pairs[1].infrared))).float().div(255)
    windows = [ref[t : t + 20, left : left + 20] for t in range(5) for left in range(5)]
    assert any(torch.equal(w.flip(a) if a else w, ir[0]) for w in windows for a in ((), (0,), (1,), (0, 1)))
    with pytest.raises(DataError, match=r"0\.png"):
        EvalPairs(pairs)[0]


def test_cached_pairs_give_the_same_items(tmp_path, data_dir):
    """cache=True decodes every usable pair at construction: the same items as reading
    each time, a bad pair reported (once) right away and skipped, the memory counted."""
    pairs = scan_pairs(data_dir / "tiny").pairs
    plain, cached = TrainPairs(pairs, crop=32), TrainPairs(pairs, crop=32, cache=True)
    items = [(i, 5, e, p) for i in range(len(pairs)) for e, p in ((0, 0), (0, 3), (2, 1))]
    for item in items:
        assert all(torch.equal(a, b) for a, b in zip(plain[item], cached[item]))
    assert cached.cached_bytes == sum(p.height * p.width * 4 for p in pairs) and plain.cached_bytes == 0
    root = _grey_pair_folder(tmp_path / "t", size=(24, 24), n=2)
    bad = scan_pairs(root).pairs
    data = Path(bad[0].visible).read_bytes()
    Path(bad[0].visible).write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match=r"0\.png"):
        ds = TrainPairs(bad, crop=20, cache=True)
    assert torch.equal(ds[(0, 0, 0, 0)][0], TrainPairs(bad[1:], crop=20)[(0, 0, 0, 0)][0])  # the next pair


def test_eval_pairs_whole_and_centre_crop(data_dir):
    pairs = scan_pairs(data_dir / "tiny").pairs
    ir, vi, name = EvalPairs(pairs)[0]
    assert ir.shape == vi.shape == (1, 64, 64) and name == "tiny/" + Path(pairs[0].infrared).stem
    ir_c, vi_c, _ = EvalPairs(pairs, crop=30)[0]
    assert torch.equal(ir_c, ir[:, 17:47, 17:47]) and torch.equal(vi_c, vi[:, 17:47, 17:47])


# ------------------------------------------------------------ splits
def test_seeded_split_and_split_file(tmp_path, data_dir):
    rep = scan_datasets([data_dir / "train"])
    tr, va = split_pairs(rep.pairs, 0.1, seed=5)
    assert len(va) == 19 and len(tr) == 175 and not set(tr) & set(va)
    assert (tr, va) == split_pairs(list(reversed(rep.pairs)), 0.1, seed=5)
    assert split_pairs(rep.pairs, 0.1, seed=6)[1] != va
    assert split_pairs(rep.pairs, 0.0, seed=5) == (sorted(rep.pairs, key=lambda p: (p.infrared, p.visible)), [])
    f = tmp_path / "splits.json"
    write_splits(f, tr, va, {"seed": 5})
    tr2, va2, info = read_splits(f)
    assert (tr2, va2) == (tr, va) and info["seed"] == 5
    with pytest.raises(DataError, match="val_fraction"):
        split_pairs(rep.pairs, 1.0, seed=0)
    bad = Pair(str(tmp_path / "gone_ir.png"), str(tmp_path / "gone_vi.png"), 5, 5)
    write_splits(f, [bad], [], {})
    with pytest.raises(DataError, match="gone_ir.png"):
        read_splits(f)


# ------------------------------------------------------------ sampler
def test_sampler_sharding_and_resume():
    s = EpochBatchSampler(23, global_batch=4, seed=9)
    batches = list(s)
    assert len(batches) == len(s) == 5
    idx = [i for b in batches for (i, *_rest) in b]
    assert len(set(idx)) == 20 and all(0 <= i < 23 for i in idx)
    assert [item[3] for b in batches for item in b] == list(range(20))
    shards = [list(EpochBatchSampler(23, 4, 9, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == batches  # the same global batches on any number of processes
    s.set_epoch(0, start_batch=3)
    assert list(s) == batches[3:] and len(s) == 2
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != batches
    s.set_epoch(0, start_batch=3, epochs=2)  # one pass on through the next epoch: the same batches
    assert list(s) == batches[3:] + epoch1 and len(s) == 7
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        s.set_epoch(0, epochs=0)
    with pytest.raises(DataError, match="not divisible"):
        EpochBatchSampler(23, 5, 0, rank=0, world_size=2)
    with pytest.raises(DataError, match="only 3 training pairs"):
        EpochBatchSampler(3, 4, 0)


def test_multiprocess_loading_gives_the_same_batches(data_dir):
    pairs = scan_pairs(data_dir / "tiny").pairs
    ds = TrainPairs(pairs, crop=32)
    out = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=EpochBatchSampler(4, 2, 1), num_workers=workers)
        out.append([torch.cat(b) for b in loader])
    assert len(out[0]) == 2
    for a, b in zip(*out):
        assert torch.equal(a, b)
