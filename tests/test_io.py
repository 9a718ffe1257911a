"""Image I/O for fusing (s4fusion.io): decoding, normalisation, colour, saving.

References: the golden colour composition of the released code, PIL's documented
integer luma (``convert('L')``), torchvision's ``save_image`` (the release's
writer), an independent 16-bit PNG decoder and straightforward formulas written
here."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from s4fusion import io

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
MSRS = SHARED / "data" / "test" / "MSRS"
ROADSCENE = SHARED / "data" / "test" / "RoadScene"


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    if not GOLDEN.is_dir():
        pytest.fail(f"reference material missing: {GOLDEN}")
    return load_file(str(GOLDEN / "inputs.safetensors")), load_file(str(GOLDEN / "expected.safetensors"))


def ir8() -> np.ndarray:
    """A real 8-bit infrared crop (MSRS test 00123D), uint8 (H, W)."""
    return np.asarray(Image.open(MSRS / "ir" / "00123D.png"))[100:160, 150:230]


# -------------------------------------------------------------------- colour
def test_ycrcb_to_rgb_reproduces_golden_fused_rgb(golden):
    inputs, expected = golden
    y, cr, cb = expected["fused"], inputs["visible_cr"], inputs["visible_cb"]
    r, g, b = io.ycrcb_to_rgb(y, cr, cb)  # torch float64
    out = torch.cat([r, g, b], dim=1)
    assert (out - expected["fused_rgb"]).abs().max().item() < 1e-12
    rn, gn, bn = io.ycrcb_to_rgb(y.numpy(), cr.numpy(), cb.numpy())  # numpy float64
    assert np.abs(np.concatenate([rn, gn, bn], 1) - expected["fused_rgb"].numpy()).max() < 1e-12
    # Y unclamped before the conversion: the golden fused Y leaves [0, 1]
    assert y.min() < 0 or y.max() > 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ycrcb_to_rgb_image_equals_the_formulas_stacked(dtype):
    """The in-place (H, W, 3) composition gives exactly ycrcb_to_rgb's values."""
    rng = np.random.default_rng(0)
    y = rng.uniform(-0.3, 1.3, (41, 57)).astype(dtype)  # fused Y, unclamped
    cr, cb = (rng.uniform(0, 1, (41, 57)).astype(dtype) for _ in range(2))
    expected = np.stack(io.ycrcb_to_rgb(y, cr, cb), axis=-1).astype(np.float32)
    out = io.ycrcb_to_rgb_image(y, cr, cb)
    assert out.dtype == np.float32 and out.shape == (41, 57, 3) and out.flags.c_contiguous
    assert np.array_equal(out, expected)
    assert np.array_equal(io.ycrcb_to_rgb_image(y[:, ::2], cr[:, ::2], cb[:, ::2]), expected[:, ::2])


def test_rgb_to_ycrcb_reproduces_golden_inputs(golden):
    inputs, _ = golden
    rgb = inputs["visible_rgb"]
    y, cr, cb = io.rgb_to_ycrcb(rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3])
    assert (y - inputs["visible"]).abs().max().item() < 1e-12
    assert (cr - inputs["visible_cr"]).abs().max().item() < 1e-12
    assert (cb - inputs["visible_cb"]).abs().max().item() < 1e-12


def test_colour_round_trip_keeps_chroma_on_real_image():
    rgb = io.read_visible(MSRS / "vi" / "00123D.png").astype(np.float64)
    y, cr, cb = io.rgb_to_ycrcb(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    r, g, b = io.ycrcb_to_rgb(y, cr, cb)
    y2, cr2, cb2 = io.rgb_to_ycrcb(r, g, b)
    inside = (np.stack([r, g, b]) > 0).all(0) & (np.stack([r, g, b]) < 1).all(0)
    assert inside.mean() > 0.9
    # the released constants are not exact inverses (0.713 vs 1/1.403): about 1e-3 of |Cr - 0.5|
    assert np.abs(cr2 - cr)[inside].max() < 2e-3 and np.abs(cb2 - cb)[inside].max() < 2e-3
    assert np.abs(y2 - y)[inside].max() < 1e-3


# ------------------------------------------------------------------ infrared
def test_infrared_8bit_grey_is_bytes_over_255():
    path = MSRS / "ir" / "00123D.png"
    raw = np.asarray(Image.open(path))
    assert raw.dtype == np.uint8 and raw.ndim == 2
    out = io.read_infrared(path)
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert np.array_equal(out, raw.astype(np.float32) / np.float32(255))


def test_infrared_8bit_colour_matches_pil_integer_luma(tmp_path):
    # a colour file used as infrared: PIL 'L' = (19595 R + 38470 G + 7471 B + 2^15) >> 16
    rgb = np.asarray(Image.open(ROADSCENE / "vi" / "FLIR_00060.jpg").convert("RGB"))[:50, :70]
    path = tmp_path / "colour_ir.png"
    Image.fromarray(rgb).save(path)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    luma = ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.float32) / np.float32(255)
    assert np.array_equal(io.read_infrared(path), luma)
    assert np.array_equal(io.infrared_from_array(rgb), luma)
    assert np.array_equal(io.infrared_from_pil(Image.fromarray(rgb)), luma)


def radiometric(raw8: np.ndarray) -> np.ndarray:
    """A 14-bit radiometric-like frame made from real data: counts 7000..12100."""
    return (7000 + raw8.astype(np.uint16) * 20).astype(np.uint16)


def test_16bit_tiff_infrared_minmax_default(tmp_path):
    raw = radiometric(ir8())
    path = tmp_path / "thermal.tif"
    tifffile.imwrite(path, raw)
    out = io.read_infrared(path)
    v = raw.astype(np.float64)
    ref = (v - v.min()) / (v.max() - v.min())
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert np.abs(out - ref).max() < 1e-7
    assert out.min() == 0.0 and out.max() == 1.0


def test_16bit_infrared_percentile_and_scale(tmp_path):
    raw = radiometric(ir8())
    raw[0, 0] = 65000  # a hot pixel that min-max would let dominate
    path = tmp_path / "thermal.tif"
    tifffile.imwrite(path, raw)
    flat = np.sort(raw.astype(np.float64).ravel())

    def pct(p):  # linear interpolation between order statistics
        pos = p / 100 * (flat.size - 1)
        i = int(np.floor(pos))
        return flat[i] + (flat[min(i + 1, flat.size - 1)] - flat[i]) * (pos - i)

    lo, hi = pct(2.0), pct(98.0)
    ref = np.clip((raw - lo) / (hi - lo), 0, 1)
    out = io.read_infrared(path, norm="percentile", percentiles=(2, 98))
    assert np.abs(out - ref).max() < 1e-6
    assert np.abs(io.read_infrared(path, norm="scale") - raw / 65535.0).max() < 1e-7
    with pytest.raises(io.ImageError, match="percentiles"):
        io.read_infrared(path, norm="percentile", percentiles=(50, 10))


def test_16bit_grey_png_equals_tiff(tmp_path):
    raw = radiometric(ir8())
    Image.fromarray(raw).save(tmp_path / "t.png")  # mode I;16
    tifffile.imwrite(tmp_path / "t.tif", raw)
    a, b = io.read_infrared(tmp_path / "t.png"), io.read_infrared(tmp_path / "t.tif")
    assert np.array_equal(a, b)
    assert np.array_equal(io.read_visible(tmp_path / "t.png"), (raw / 65535.0).astype(np.float32))


def test_float_tiff_temperatures_are_min_max_stretched(tmp_path):
    temps = (20.0 + ir8().astype(np.float32) / 255 * 17.5).astype(np.float32)  # degrees C
    tifffile.imwrite(tmp_path / "celsius.tif", temps)
    out = io.read_infrared(tmp_path / "celsius.tif")
    ref = (temps.astype(np.float64) - temps.min()) / (temps.max() - temps.min())
    assert np.abs(out - ref).max() < 1e-6
    temps[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", temps)
    with pytest.raises(io.ImageError, match=r"nan\.tif.*NaN"):
        io.read_infrared(tmp_path / "nan.tif")


def test_auto_keeps_unit_floats_and_constant_image_is_zero():
    x = np.linspace(0.2, 0.7, 12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(io.infrared_from_array(x), x)
    assert np.array_equal(io.infrared_from_array(np.full((5, 5), 7000, np.uint16)), np.zeros((5, 5), np.float32))


def test_16bit_colour_png_is_refused(tmp_path):
    path = tmp_path / "rgb16.png"
    path.write_bytes(io.encode_png16(np.zeros((4, 5, 3), np.uint16)))
    with pytest.raises(io.ImageError, match=r"rgb16\.png.*16-bit colour PNG.*TIFF"):
        io.read_visible(path)


# ------------------------------------------------------------------- visible
def test_visible_rgb_grey_and_16bit(tmp_path):
    rgb = np.asarray(Image.open(MSRS / "vi" / "00123D.png"))
    assert np.array_equal(io.read_visible(MSRS / "vi" / "00123D.png"), rgb.astype(np.float32) / np.float32(255))
    grey = io.read_visible(MSRS / "ir" / "00123D.png")
    assert grey.ndim == 2
    rgb16 = (rgb[:40, :50].astype(np.uint16) * 257 + 3).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    assert np.abs(io.read_visible(tmp_path / "rgb16.tif") - rgb16 / 65535.0).max() < 1e-7
    with pytest.raises(io.ImageError, match=r"must be in \[0, 1\]"):
        io.visible_from_array(np.full((4, 4, 3), 2.0, np.float32), "vis.npy")


# -------------------------------------------------------------- bad files
def test_truncated_and_bad_files_name_the_file(tmp_path):
    cases = {
        "cut.png": (MSRS / "vi" / "00123D.png").read_bytes()[:60000],
        "cut.jpg": (ROADSCENE / "vi" / "FLIR_00060.jpg").read_bytes()[:9000],
        "notes.png": b"this is not an image",
    }
    raw = radiometric(ir8())
    tifffile.imwrite(tmp_path / "full.tif", raw)
    cases["cut.tif"] = (tmp_path / "full.tif").read_bytes()[:4000]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for reader in (io.read_infrared, io.read_visible):
            with pytest.raises(io.ImageError, match=rf"{name}.*cannot read the image"):
                reader(tmp_path / name)
    with pytest.raises(io.ImageError, match="missing.png: file not found"):
        io.read_infrared(tmp_path / "missing.png")


# -------------------------------------------------------------------- saving
def test_quantize_8bit_equals_torchvision_save_image(tmp_path):
    from torchvision.utils import save_image

    values = np.concatenate(
        [
            np.arange(256) / 255.0,
            (np.arange(256) + 0.5) / 255.0,  # exact halves round up
            np.array([-0.3, -1e-9, 1.0 + 1e-9, 1.7, 0.49999 / 255, 254.5 / 255]),
            np.random.default_rng(0).uniform(-0.1, 1.1, 500),
        ]
    ).astype(np.float32)
    image = values.reshape(1, -1)
    ref_path = tmp_path / "ref.png"
    save_image(torch.from_numpy(image)[None], ref_path)  # the released writer
    ref = np.asarray(Image.open(ref_path))[..., 0]
    assert np.array_equal(io.quantize(image, 8), ref)
    io.write_image(tmp_path / "ours.png", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), ref)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_is_its_formula_in_every_input_dtype(bits, dtype):
    """floor(clip(v * max + 0.5, 0, max)), computed in float32 for 8 bits (as the
    released writer) and in float64 for 16, written out step by step."""
    rng = np.random.default_rng(bits)
    image = rng.uniform(-0.2, 1.2, (37, 53, 3)).astype(dtype)
    image[0, :4, 0] = [0.5 / 255, 0.5 / 65535, 1.0, 0.0]
    work, top = (np.float32, 255.0) if bits == 8 else (np.float64, 65535.0)
    v = image.astype(work) * work(top) + work(0.5)
    expected = np.floor(np.clip(v, 0.0, top)).astype(np.uint8 if bits == 8 else np.uint16)
    out = io.quantize(image, bits)
    assert out.dtype == expected.dtype and np.array_equal(out, expected)
    assert np.array_equal(io.quantize(image[:, ::2], bits), expected[:, ::2])  # strided input


def decode_png16(data: bytes) -> np.ndarray:
    """Independent minimal decoder: 16-bit grey/RGB, non-interlaced, filters None/Sub/Up."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, colour, _, _, interlace = header
    assert depth == 16 and interlace == 0
    channels = {0: 1, 2: 3}[colour]
    bpp, stride = 2 * channels, 2 * channels * w
    raw = zlib.decompress(idat)
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            if f == 1:
                line[i] = (line[i] + (line[i - bpp] if i >= bpp else 0)) & 0xFF
            elif f == 2:
                line[i] = (line[i] + prev[i]) & 0xFF
            else:
                assert f == 0
        rows.append(bytes(line))
        prev = line
    out = np.frombuffer(b"".join(rows), ">u2").reshape(h, w, channels).astype(np.uint16)
    return out[..., 0] if channels == 1 else out


def test_16bit_png_writer_colour_and_grey(tmp_path):
    rgb = io.read_visible(MSRS / "vi" / "00123D.png")[:30, :41]
    io.write_image(tmp_path / "c.png", rgb, bits=16)
    expected = np.floor(np.clip(rgb.astype(np.float64) * 65535 + 0.5, 0, 65535)).astype(np.uint16)
    assert np.array_equal(decode_png16((tmp_path / "c.png").read_bytes()), expected)
    # Pillow reads 16-bit colour PNG at 8 bits: the high bytes
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), (expected >> 8).astype(np.uint8))
    grey = rgb[..., 1]
    io.write_image(tmp_path / "g.png", grey, bits=16)
    exp_g = np.floor(np.clip(grey.astype(np.float64) * 65535 + 0.5, 0, 65535)).astype(np.uint16)
    assert np.array_equal(decode_png16((tmp_path / "g.png").read_bytes()), exp_g)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), exp_g)  # Pillow: mode I;16
    io.write_image(tmp_path / "c.tif", rgb, bits=16)
    assert np.array_equal(tifffile.imread(tmp_path / "c.tif"), expected)
    with pytest.raises(io.ImageError, match="JPEG cannot hold 16-bit"):
        io.write_image(tmp_path / "c.jpg", rgb, bits=16)


def test_write_is_atomic_and_never_overwrites_silently(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    img = np.full((8, 9), 0.25, np.float32)
    with pytest.raises(io.ImageError, match="out.png already exists"):
        io.write_image(target, img)
    assert target.read_bytes() == b"precious"

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(io.ImageError, match="out.png: cannot write the image.*disk full"):
        io.write_image(target, img, overwrite=True)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left
    monkeypatch.undo()
    io.write_image(target, img, overwrite=True)
    assert np.array_equal(np.asarray(Image.open(target)), np.full((8, 9), 64, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]



def test_atomic_write_gives_the_umask_mode_even_if_the_writer_recreates_the_file(tmp_path):
    """safetensors' save_file recreates its file with mode 0600; outputs and saved weights
    must still get the usual permissions of a new file (0666 minus the umask)."""
    from s4fusion.io import atomic_write

    def recreate_private(tmp: str) -> None:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"data")
        os.close(fd)

    old = os.umask(0o022)
    try:
        out = atomic_write(tmp_path / "w.bin", recreate_private)
    finally:
        os.umask(old)
    assert out.read_bytes() == b"data"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
