"""``s4fusion fuse`` and the Python fusing API on real pairs from ../shared/data.

The network is a small constructor-initialised S4Fusion saved with
``save_pretrained`` (fast on CPU); expected outputs are computed here
independently: the bare network on the released input handling, and the
released colour formulas written out in this file."""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from s4fusion import S4Fusion, S4FusionConfig, api, io
from s4fusion.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MSRS = SHARED / "data" / "test" / "MSRS"
ROADSCENE = SHARED / "data" / "test" / "RoadScene"
TINY = dict(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    S4Fusion(S4FusionConfig(**TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(weights) -> S4Fusion:
    return S4Fusion.from_pretrained(weights).eval()


def crop_pair(folder: Path, name: str, box: tuple[int, int, int, int], ir_dir: Path, vi_dir: Path,
              ir_ext: str = ".png", vi_ext: str = ".png") -> tuple[Path, Path]:
    """Crop a real test pair (``folder``/ir|vi/``name``) with PIL ``box`` and save it."""
    src_ir = next((folder / "ir").glob(name + ".*"))
    src_vi = next((folder / "vi").glob(name + ".*"))
    ir_dir.mkdir(parents=True, exist_ok=True)
    vi_dir.mkdir(parents=True, exist_ok=True)
    ir_path, vi_path = ir_dir / f"{name}{ir_ext}", vi_dir / f"{name}{vi_ext}"
    Image.open(src_ir).crop(box).save(ir_path)
    Image.open(src_vi).convert("RGB").crop(box).save(vi_path)
    return ir_path, vi_path


def expected_fused(model: S4Fusion, ir_path: Path, vi_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent reference: released input handling, the bare network, the
    visible chroma. Returns float64 (fused Y unclamped, Cr, Cb), (H, W) each."""
    ir = np.asarray(Image.open(ir_path).convert("L"), dtype=np.float32) / 255
    rgb = np.asarray(Image.open(vi_path).convert("RGB"), dtype=np.float32) / 255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = np.clip(0.299 * r + 0.587 * g + 0.114 * b, 0, 1)
    cr = np.clip((r - y) * 0.713 + 0.5, 0, 1)
    cb = np.clip((b - y) * 0.564 + 0.5, 0, 1)
    with torch.no_grad():
        fused = model(torch.from_numpy(ir)[None, None], torch.from_numpy(y.astype(np.float32))[None, None])
    return fused[0, 0].double().numpy(), cr.astype(np.float64), cb.astype(np.float64)


def colour(fused: np.ndarray, cr: np.ndarray, cb: np.ndarray) -> np.ndarray:
    r = fused + 1.403 * (cr - 0.5)
    g = fused - 0.714 * (cr - 0.5) - 0.344 * (cb - 0.5)
    b = fused + 1.773 * (cb - 0.5)
    return np.clip(np.stack([r, g, b], -1), 0, 1)


def to8(v: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(v * 255 + 0.5, 0, 255)).astype(np.uint8)


def assert_close_levels(out: np.ndarray, ref: np.ndarray) -> None:
    """Equal 8-bit images up to rare one-level rounding flips (float32 vs float64)."""
    assert out.shape == ref.shape
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.995, (diff.max(), (diff == 0).mean())


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def fuse_cli(*args: object) -> int:
    return main(["fuse", *map(str, args)])


# ------------------------------------------------------------ pair mode, colour
def test_pair_mode_colour_output(tmp_path, weights, model, capsys):
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    out = tmp_path / "out" / "fused.png"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights) == 0
    assert f"fused 1 of 1 pairs -> {out}" in capsys.readouterr().err
    result = np.asarray(Image.open(out))
    assert result.shape == (48, 64, 3)
    fused, cr, cb = expected_fused(model, ir, vi)
    assert_close_levels(result, to8(colour(fused, cr, cb)))

    # 16-bit output: the chroma of the output is the visible image's chroma
    out16 = tmp_path / "out" / "fused16.tif"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out16, "--weights", weights, "--bits", "16") == 0
    rgb = tifffile.imread(out16).astype(np.float64) / 65535
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y_out = 0.299 * r + 0.587 * g + 0.114 * b
    cr_out, cb_out = (r - y_out) * 0.713 + 0.5, (b - y_out) * 0.564 + 0.5
    inside = ((rgb > 0) & (rgb < 1)).all(-1)
    assert inside.mean() > 0.5
    assert np.abs(cr_out - cr)[inside].max() < 2e-3
    assert np.abs(cb_out - cb)[inside].max() < 2e-3
    assert np.abs(y_out - fused)[inside].max() < 2e-3  # and its luma is the fused Y
    assert np.abs(cr - 0.5).max() > 0.05 and np.abs(cb - 0.5).max() > 0.05


def test_gray_output(tmp_path, weights, model):
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    out = tmp_path / "grey.png"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--gray") == 0
    img = Image.open(out)
    assert img.mode == "L"
    fused, _, _ = expected_fused(model, ir, vi)
    assert_close_levels(np.asarray(img), to8(fused))


def test_example_pair(tmp_path, weights):
    out = tmp_path / "fused.png"
    assert fuse_cli("--example", "--out", out, "--weights", weights) == 0
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == (256, 192)
    ir, vi = api.example_pair()
    assert Image.open(ir).size == Image.open(vi).size == (256, 192)
    assert (ir.parent / "LICENSE.md").is_file()


# ------------------------------------------------------------------ folder mode
def make_folder(root: Path) -> tuple[Path, Path]:
    """Real pairs of several (odd) sizes, mixed formats, and files without a partner."""
    ir, vi = root / "ir", root / "vi"
    crop_pair(MSRS, "00123D", (150, 100, 214, 148), ir, vi)  # 64 x 48
    crop_pair(MSRS, "00020N", (300, 200, 364, 248), ir, vi, vi_ext=".jpg")  # 64 x 48, JPEG visible
    crop_pair(ROADSCENE, "FLIR_00060", (200, 150, 253, 187), ir, vi, ir_ext=".bmp")  # 53 x 37
    crop_pair(ROADSCENE, "FLIR_00122", (100, 100, 129, 113), ir, vi)  # 29 x 13
    Image.open(MSRS / "ir" / "00024N.png").crop((0, 0, 20, 20)).save(ir / "extra.png")
    Image.open(MSRS / "vi" / "00024N.png").crop((0, 0, 20, 20)).save(vi / "lonely.png")
    (ir / "notes.txt").write_text("not an image")
    return ir, vi


def test_folder_mode_sizes_unmatched_and_inputs_untouched(tmp_path, weights, model, capsys):
    ir, vi = make_folder(tmp_path)
    before = digest(tmp_path)
    out = tmp_path / "fused"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "fused 4 of 4 pairs" in err
    assert "extra.png: no visible image named extra.*" in err
    assert "lonely.png: no infrared image named lonely.*" in err
    assert "notes.txt: not an image extension" in err
    assert digest(tmp_path / "ir") == {k: v for k, v in before.items() if "/ir/" in k}
    assert digest(tmp_path / "vi") == {k: v for k, v in before.items() if "/vi/" in k}
    assert sorted(p.name for p in out.iterdir()) == ["00020N.png", "00123D.png", "FLIR_00060.png", "FLIR_00122.png"]
    for name, size in (("00123D", (48, 64)), ("00020N", (48, 64)), ("FLIR_00060", (37, 53)), ("FLIR_00122", (13, 29))):
        result = np.asarray(Image.open(out / f"{name}.png"))
        assert result.shape == (*size, 3)
        fused, cr, cb = expected_fused(model, next(ir.glob(name + ".*")), next(vi.glob(name + ".*")))
        assert_close_levels(result, to8(colour(fused, cr, cb)))


def fused_from_arrays(model: S4Fusion, ir: np.ndarray, vi_path: Path) -> np.ndarray:
    """Reference colour output (float64) for an already normalised infrared array."""
    rgb = np.asarray(Image.open(vi_path), dtype=np.float32) / 255
    y = np.clip(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], 0, 1)
    cr = np.clip((rgb[..., 0] - y) * 0.713 + 0.5, 0, 1)
    cb = np.clip((rgb[..., 2] - y) * 0.564 + 0.5, 0, 1)
    with torch.no_grad():
        fused = model(torch.from_numpy(ir.astype(np.float32))[None, None], torch.from_numpy(y)[None, None])
    return colour(fused[0, 0].double().numpy(), cr, cb)


def test_16bit_tiff_infrared(tmp_path, weights, model):
    ir8, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    raw = np.asarray(Image.open(ir8)).astype(np.uint16) * 20 + 7000  # 14-bit radiometric counts
    raw[5, 7] = 16000  # one hot pixel
    tif = tmp_path / "thermal.tif"
    tifffile.imwrite(tif, raw)
    out = tmp_path / "fused.tif"
    assert fuse_cli("--ir", tif, "--vi", vi, "--out", out, "--weights", weights, "--bits", "16") == 0
    result = tifffile.imread(out) / 65535.0
    minmax = (raw - raw.min()) / float(raw.max() - raw.min())  # documented default for 16-bit: min-max
    assert np.abs(result - fused_from_arrays(model, minmax, vi)).max() < 2e-5
    out_p = tmp_path / "fused_percentile.tif"
    args = ("--ir-norm", "percentile", "--ir-percentiles", "2", "98", "--bits", "16")
    assert fuse_cli("--ir", tif, "--vi", vi, "--out", out_p, "--weights", weights, *args) == 0
    lo, hi = np.percentile(raw.astype(np.float64), [2, 98])
    clipped = np.clip((raw - lo) / (hi - lo), 0, 1)
    result_p = tifffile.imread(out_p) / 65535.0
    assert np.abs(result_p - fused_from_arrays(model, clipped, vi)).max() < 2e-5
    assert np.abs(result_p - result).max() > 1e-3  # the option changes the result


def test_tiled_cli_matches_untiled(tmp_path):
    """--tile runs band-wise with the scan states carried across bands: with the
    bundled (trained) weights it gives the whole-image output to 16-bit rounding."""
    ir, vi = crop_pair(MSRS, "00123D", (100, 120, 200, 220), tmp_path / "ir", tmp_path / "vi")
    common = ("--ir", ir, "--vi", vi, "--gray", "--bits", "16", "--device", "cpu")
    assert fuse_cli(*common, "--out", tmp_path / "whole.png", "--tile", "0") == 0
    assert fuse_cli(*common, "--out", tmp_path / "tiled.png", "--tile", "25") == 0
    whole = np.asarray(Image.open(tmp_path / "whole.png")).astype(np.float64) / 65535
    tiled = np.asarray(Image.open(tmp_path / "tiled.png")).astype(np.float64) / 65535
    assert whole.shape == tiled.shape == (100, 100)
    assert np.abs(whole - tiled).max() < 2 / 65535


# ------------------------------------------------------------------- bad input
def test_size_mismatch_message_and_resize_option(tmp_path, weights, capsys):
    ir, _ = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    vi = tmp_path / "vi" / "wide.png"
    Image.open(MSRS / "vi" / "00123D.png").crop((0, 0, 60, 40)).save(vi)
    out = tmp_path / "fused.png"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights) == 1
    err = capsys.readouterr().err
    assert f"infrared {ir} is 64x48 (width x height) but visible {vi} is 60x40" in err
    assert "--resize-visible" in err and "FAILED (1)" in err
    assert not out.exists()
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--resize-visible") == 0
    assert Image.open(out).size == (64, 48)


def test_truncated_and_tiny_files_fail_alone(tmp_path, weights, capsys):
    ir, vi = make_folder(tmp_path)
    cut = ir / "00020N.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    Image.fromarray(np.zeros((1, 40), np.uint8)).save(ir / "thin.png")
    Image.fromarray(np.zeros((1, 40, 3), np.uint8)).save(vi / "thin.png")
    out = tmp_path / "fused"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights) == 1
    err = capsys.readouterr().err
    assert "fused 3 of 5 pairs" in err and "FAILED (2)" in err
    assert f"{cut}: cannot read the image" in err and "truncated" in err
    assert "40x1 (width x height) image: image height 1 is too small for S4Fusion" in err
    assert sorted(p.name for p in out.iterdir()) == ["00123D.png", "FLIR_00060.png", "FLIR_00122.png"]


def test_failures_are_listed_in_pair_order_while_reading_and_writing_overlap(tmp_path, weights, monkeypatch, capsys):
    """Pairs are read ahead and written behind the fusing (threads); a write that fails
    late and a read that fails early are still reported in the pairs' order, and the
    other pairs are written."""
    import time

    import s4fusion.cli.fuse as fuse_module

    ir, vi = make_folder(tmp_path)  # pairs in name order: 00020N, 00123D, FLIR_00060, FLIR_00122
    cut = ir / "FLIR_00122.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    real = fuse_module.io.write_image

    def slow_failing_write(path, *args, **kwargs):
        if Path(path).stem == "00020N":
            time.sleep(0.3)
            raise OSError("no space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fuse_module.io, "write_image", slow_failing_write)
    out = tmp_path / "fused"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--batch-size", "2") == 1
    err = capsys.readouterr().err
    assert "fused 2 of 4 pairs" in err and "FAILED (2)" in err
    write_failure, read_failure = err.index("no space left on device"), err.index(f"{cut}: cannot read the image")
    assert write_failure < read_failure
    assert sorted(p.name for p in out.iterdir()) == ["00123D.png", "FLIR_00060.png"]


def test_non_finite_weights(tmp_path, weights, capsys):
    torch.manual_seed(0)
    bad = S4Fusion(S4FusionConfig(**TINY))
    with torch.no_grad():
        bad.head.out_conv.weight[0, 3] = float("nan")
    bad.save_pretrained(tmp_path / "bad.safetensors")
    ir, vi = api.example_pair()
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", tmp_path / "f.png", "--weights", tmp_path / "bad.safetensors") == 2
    err = capsys.readouterr().err
    assert "bad.safetensors holds non-finite values (NaN or inf) in: ['head.out_conv.weight']" in err
    assert not (tmp_path / "f.png").exists()


def test_missing_weights_say_weights_is_required(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "WEIGHTS_FILE", "not-bundled.safetensors")
    assert fuse_cli("--example", "--out", tmp_path / "f.png") == 2
    err = capsys.readouterr().err
    assert "no bundled S4Fusion weights" in err and "--weights FILE" in err


def test_output_folder_not_writable(tmp_path, weights, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert fuse_cli("--example", "--out", blocker / "sub" / "f.png", "--weights", weights) == 2
    assert f"output folder {blocker / 'sub'} cannot be created" in capsys.readouterr().err

    import s4fusion.cli.fuse as fuse_module

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fuse_module.tempfile, "TemporaryFile", denied)
    assert fuse_cli("--example", "--out", tmp_path / "ro" / "f.png", "--weights", weights) == 2
    assert f"output folder {tmp_path / 'ro'} is not writable (Permission denied)" in capsys.readouterr().err


def test_inputs_are_never_outputs(tmp_path, weights, capsys):
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    before = digest(tmp_path)
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", vi, "--weights", weights, "--overwrite") == 2
    assert "is one of the inputs; inputs are never overwritten" in capsys.readouterr().err
    assert fuse_cli("--ir", ir.parent, "--vi", vi.parent, "--out", ir.parent, "--weights", weights) == 2
    assert "is an input folder" in capsys.readouterr().err
    assert digest(tmp_path) == before


def test_existing_output_needs_overwrite(tmp_path, weights, capsys):
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    out = tmp_path / "f.png"
    out.write_bytes(b"keep me")
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights) == 1
    assert f"output {out} already exists (use --overwrite or --skip-existing)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--overwrite") == 0
    assert Image.open(out).size == (64, 48)


def test_bad_options_stop_before_fusing(tmp_path, weights, capsys):
    base = ("--example", "--out", tmp_path / "f.png", "--weights", weights)
    assert fuse_cli(*base, "--tile", "5") == 2
    assert "tile size 5 is too small: tiles must be at least 13 pixels" in capsys.readouterr().err
    assert fuse_cli(*base, "--ir-percentiles", "90", "10") == 2
    assert "--ir-percentiles: percentiles must satisfy 0 <= low < high <= 100, got (90, 10)" in capsys.readouterr().err
    assert fuse_cli(*base, "--out", tmp_path / "f.gif") == 2
    assert "cannot write '.gif' files" in capsys.readouterr().err
    assert fuse_cli(*base, "--device", "cpu", "--cuda-graph", "on") == 2
    assert "--cuda-graph on needs a CUDA device, the device is cpu; use --cuda-graph auto or off" in capsys.readouterr().err
    assert fuse_cli(*base, "--device", "cpu", "--compile", "--cuda-graph", "on") == 2
    assert "choose one of --compile and --cuda-graph on, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fuse_cli(*base, "--cuda-graph", "yes")
    assert "invalid choice: 'yes'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_requested_without_cuda(tmp_path, weights, capsys):
    assert fuse_cli("--example", "--out", tmp_path / "f.png", "--weights", weights, "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ---------------------------------------------------------- interrupt, resume
def test_interrupted_run_resumes_with_skip_existing(tmp_path, weights, monkeypatch, capsys):
    ir, vi = make_folder(tmp_path)
    out = tmp_path / "fused"
    import s4fusion.cli.fuse as fuse_module

    real = fuse_module.fuse_prepared
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_prepared", interrupted)
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--batch-size", "1") == 130
    monkeypatch.undo()
    done = sorted(p.name for p in out.iterdir())
    assert done == ["00020N.png"]  # the first pair in name order; no temporary files left behind
    first = (out / "00020N.png").read_bytes(), (out / "00020N.png").stat().st_mtime_ns
    capsys.readouterr()

    assert fuse_cli("--ir", ir, "--vi", vi, "--out", out, "--weights", weights, "--skip-existing") == 0
    err = capsys.readouterr().err
    assert "fused 3 of 4 pairs" in err and "skipped 1 with an existing output" in err
    assert sorted(p.name for p in out.iterdir()) == ["00020N.png", "00123D.png", "FLIR_00060.png", "FLIR_00122.png"]
    assert ((out / "00020N.png").read_bytes(), (out / "00020N.png").stat().st_mtime_ns) == first
    clean = tmp_path / "clean"
    assert fuse_cli("--ir", ir, "--vi", vi, "--out", clean, "--weights", weights) == 0
    for p in clean.iterdir():  # same results as an uninterrupted run (batched differently)
        assert_close_levels(np.asarray(Image.open(p)), np.asarray(Image.open(out / p.name)))


# ------------------------------------------------------------------ Python API
def test_api_returns_the_kind_it_got(model):
    ir_path, vi_path = MSRS / "ir" / "00123D.png", MSRS / "vi" / "00123D.png"
    box = (150, 100, 214, 148)
    ir_pil, vi_pil = Image.open(ir_path).crop(box), Image.open(vi_path).crop(box)
    ir_np, vi_np = np.asarray(ir_pil), np.asarray(vi_pil)
    ref = api.fuse(ir_np.astype(np.float32) / 255, vi_np.astype(np.float32) / 255, model)
    assert ref.dtype == np.float32 and ref.shape == (48, 64, 3) and 0 <= ref.min() and ref.max() <= 1

    out_np = api.fuse(ir_np, vi_np, model)
    assert out_np.dtype == np.uint8 and np.array_equal(out_np, io.quantize(ref, 8))
    out_pil = api.fuse(ir_pil, vi_pil, model)
    assert isinstance(out_pil, Image.Image) and out_pil.mode == "RGB"
    assert np.array_equal(np.asarray(out_pil), out_np)
    t_ir = torch.from_numpy(ir_np.astype(np.float32) / 255)[None, None]
    t_vi = torch.from_numpy(vi_np.astype(np.float32) / 255).permute(2, 0, 1)[None]
    out_t = api.fuse(torch.cat([t_ir, t_ir]), torch.cat([t_vi, t_vi]), model)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (2, 3, 48, 64) and out_t.dtype == torch.float32
    assert np.abs(out_t[1].permute(1, 2, 0).numpy() - ref).max() < 1e-6
    grey_t = api.fuse(t_ir[0], t_vi[0], model, gray=True)
    assert grey_t.shape == (1, 48, 64)
    assert np.abs(grey_t[0].numpy() - api.fuse(ir_np, vi_np.astype(np.float32) / 255, model, gray=True)).max() < 1e-6


def test_api_paths_batches_and_precision(tmp_path, model):
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    ir2, vi2 = crop_pair(MSRS, "00020N", (300, 200, 364, 248), tmp_path / "ir", tmp_path / "vi")
    fused, cr, cb = expected_fused(model, ir, vi)
    one = api.fuse(ir, vi, model)  # paths -> float32 array in [0, 1]
    assert one.dtype == np.float32 and np.abs(one - colour(fused, cr, cb)).max() < 1e-5
    grey = api.fuse(str(ir), str(vi), model, gray=True)
    assert grey.shape == (48, 64) and np.abs(grey - np.clip(fused, 0, 1)).max() < 1e-5
    batch = api.fuse_images([ir, ir2, ir], [vi, vi2, vi], model, batch_size=2)
    assert np.abs(batch[0] - one).max() < 1e-5 and np.abs(batch[2] - one).max() < 1e-5
    bf16 = api.fuse(ir, vi, model, precision="bf16")
    diff = np.abs(bf16 - one).max()
    assert 0 < diff < 0.05, diff  # really computed in bfloat16, and still close
    with pytest.raises(api.FusionError, match="precision must be one of"):
        api.fuse(ir, vi, model, precision="fp8")


def test_cudnn_autotune_is_on_only_in_reduced_precision_on_cuda(monkeypatch):
    """The context only reads the device's type, so it is checked here without a GPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for device, precision, inside in ((cuda, "bf16", True), (cuda, "fp16", True), (cuda, "fp32", False),
                                      (cpu, "bf16", False)):  # fmt: skip
        with api.cudnn_autotune(device, precision):
            assert torch.backends.cudnn.benchmark is inside, (device, precision)
        assert torch.backends.cudnn.benchmark is False
    with pytest.raises(KeyError), api.cudnn_autotune(cuda, "bf16"):
        raise KeyError("the caller's setting comes back after an error too")
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with api.cudnn_autotune(cuda, "fp32"):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is True


def _benchmark_flag_during_fuse(model, ir, vi, **kwargs) -> list:
    seen = []
    handle = model.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
    try:
        api.fuse(ir, vi, model, **kwargs)
    finally:
        handle.remove()
    return seen


def test_cpu_fusing_leaves_cudnn_alone(model, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    rng = np.random.default_rng(2)
    ir, vi = rng.random((20, 24), dtype=np.float32), rng.random((20, 24, 3), dtype=np.float32)
    assert _benchmark_flag_during_fuse(model, ir, vi, precision="bf16") == [False]
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")
def test_cuda_fusing_autotunes_cudnn_in_bf16_only(weights, monkeypatch):
    gpu = S4Fusion.from_pretrained(weights, map_location="cuda").eval()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    rng = np.random.default_rng(3)
    ir, vi = rng.random((20, 24), dtype=np.float32), rng.random((20, 24, 3), dtype=np.float32)
    assert _benchmark_flag_during_fuse(gpu, ir, vi, precision="bf16", cuda_graph=False) == [True]
    assert _benchmark_flag_during_fuse(gpu, ir, vi, precision="fp32", cuda_graph=False) == [False]
    assert torch.backends.cudnn.benchmark is False


def test_api_prepares_pairs_in_threads_and_raises_the_first_bad_pair(tmp_path, model):
    """fuse_images prepares its pairs in threads: results keep the pairs' order, and of
    several bad pairs the first one (in order) is the error, even when a later one
    fails sooner."""
    from s4fusion import io

    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    ir2, vi2 = crop_pair(ROADSCENE, "FLIR_00060", (200, 150, 253, 187), tmp_path / "ir", tmp_path / "vi")
    out = api.fuse_images([ir, ir2, ir, ir2, ir], [vi, vi2, vi, vi2, vi], model, gray=True)
    assert [o.shape for o in out] == [(48, 64), (37, 53), (48, 64), (37, 53), (48, 64)]
    assert np.array_equal(out[0], out[4]) and np.array_equal(out[1], out[3])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(ir).read_bytes()[:200])
    missing = tmp_path / "missing.png"
    with pytest.raises(io.ImageError, match="truncated.png"):
        api.fuse_images([ir, truncated, missing], [vi, vi, vi], model)


def test_api_prepares_one_window_ahead_of_the_network(tmp_path, model, monkeypatch):
    """fuse_images holds at most two windows of prepared pairs: no pair of window w + 2 is
    prepared before window w is fused, and windowed results equal one window's."""
    ir, vi = crop_pair(MSRS, "00123D", (150, 100, 214, 148), tmp_path / "ir", tmp_path / "vi")
    ir2, vi2 = crop_pair(ROADSCENE, "FLIR_00060", (200, 150, 253, 187), tmp_path / "ir", tmp_path / "vi")
    irs, vis = [ir, ir2] * 4, [vi, vi2] * 4
    whole = api.fuse_images(irs, vis, model, gray=True, batch_size=1)
    events = []
    prepare, fuse_prepared = api.prepare_pair, api.fuse_prepared
    monkeypatch.setattr(api, "prepare_pair", lambda *a, **k: events.append("prepare") or prepare(*a, **k))
    monkeypatch.setattr(api, "fuse_prepared", lambda *a, **k: events.append("fuse") or fuse_prepared(*a, **k))
    monkeypatch.setattr(api, "PREPARE_WINDOW", 2)
    windowed = api.fuse_images(irs, vis, model, gray=True, batch_size=1)
    assert all(np.array_equal(a, b) for a, b in zip(whole, windowed))
    fused = 0
    for i, event in enumerate(events):
        fused += event == "fuse"
        assert events[: i + 1].count("prepare") <= 2 * (fused // 2 + 2)  # windows fused, plus two
    assert events.count("prepare") == events.count("fuse") == 8
    assert api.fuse_images([], [], model) == []


def test_api_cuda_graph_options_are_checked(model):
    ir = np.random.default_rng(0).random((48, 64), dtype=np.float32)
    with pytest.raises(api.FusionError, match="cuda_graph needs the model on a CUDA device, it is on cpu"):
        api.fuse(ir, ir, model, cuda_graph=True)
    with pytest.raises(api.FusionError, match="choose one of compile and cuda_graph"):
        api.fuse(ir, ir, model, cuda_graph=True, compile=True)
    with pytest.raises(api.FusionError, match="cuda_graph must be 'auto', True or False, got 'on'"):
        api.fuse(ir, ir, model, cuda_graph="on")
    # the default, "auto", runs the CPU model as usual and records nothing
    assert np.array_equal(api.fuse(ir, ir, model), api.fuse(ir, ir, model, cuda_graph=False))
    assert api._GRAPHED_ATTR not in vars(model)


class _FakeGraph:
    """Stands in for a recorded pass: counts its replays (recording needs CUDA)."""

    made: list[tuple] = []

    def __init__(self, model, infrared, visible_y):
        self.replays = 0
        _FakeGraph.made.append(tuple(infrared.shape))

    def __call__(self, infrared, visible_y):
        self.replays += 1
        return torch.full_like(infrared, -1.0)


def test_graphed_records_at_the_requested_pass_and_keeps_the_newest(monkeypatch):
    monkeypatch.setattr(api, "_GraphedPass", _FakeGraph)
    monkeypatch.setattr(api, "_SEEN_LIMIT", 3)
    _FakeGraph.made = []
    calls = []
    net = torch.nn.Module()
    net.weight = torch.nn.Parameter(torch.ones(1))
    net.forward = lambda ir, vi: calls.append(tuple(ir.shape)) or ir + vi
    x = {n: torch.ones(1, 1, 4, n) for n in range(1, 8)}
    run = api.graphed(net, record_at=2)
    assert torch.equal(run(x[1], x[1]), 2 * x[1]) and _FakeGraph.made == []  # first pass: the model
    assert torch.equal(run(x[1], x[1]), -x[1]) and _FakeGraph.made == [(1, 1, 4, 1)]  # second: recorded
    assert torch.equal(run(x[1], x[1]), -x[1]) and calls == [(1, 1, 4, 1)]  # third: replayed
    slot = vars(net)[api._GRAPHED_ATTR]
    assert list(slot.passes) and not slot.seen
    assert api.graphed(net) is not run and vars(net)[api._GRAPHED_ATTR] is slot  # one slot per model
    for n in (2, 3, 4, 5):  # one pass each: counted, the oldest counts dropped past _SEEN_LIMIT
        run(x[n], x[n])
    assert [k[0][3] for k in slot.seen] == [3, 4, 5]
    for n in (3, 4, 5, 6, 2):  # 3, 4, 5 record; 6 is counted; 2 was forgotten and is counted again
        run(x[n], x[n])
    assert _FakeGraph.made[1:] == [(1, 1, 4, n) for n in (3, 4, 5)]
    assert [k[0][3] for k in slot.seen] == [6, 2]
    for n in (6, 6):
        run(x[n], x[n])
    assert [k[0][3] for k in slot.passes] == [3, 4, 5, 6]  # GRAPH_LIMIT: width 1 went first
    assert len(_FakeGraph.made) == 5 and list(slot.passes.values())[-1][1].replays == 2
    with torch.no_grad():
        net.weight.mul_(2)  # changed in place: the graph replays it
    run(x[6], x[6])
    assert len(_FakeGraph.made) == 5
    net.weight = torch.nn.Parameter(torch.ones(1))  # replaced: recorded again
    run(x[6], x[6])
    assert len(_FakeGraph.made) == 6 and len(slot.passes) == api.GRAPH_LIMIT
    with pytest.raises(ValueError, match="record_at must be >= 1, got 0"):
        api.graphed(net, record_at=0)


def test_the_replay_check_sees_every_parameter_and_buffer(weights):
    """graphed() compares these addresses before every replay: they are those of
    parameters() and buffers(), and change when a tensor's storage or a submodule is
    replaced."""
    model = S4Fusion.from_pretrained(weights)
    addresses = api._tensor_addresses(model)
    expected = [t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())]
    assert sorted(addresses) == sorted(expected)
    assert api._tensor_addresses(model) == addresses
    first = next(model.parameters())
    first.data = first.data.clone()
    assert api._tensor_addresses(model) != addresses
    addresses = api._tensor_addresses(model)
    name, child = next(iter(model.named_children()))
    setattr(model, name, copy.deepcopy(child))
    assert api._tensor_addresses(model) != addresses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")
def test_api_cuda_graph_equals_eager_and_reuses_its_graphs(tmp_path, weights):
    gpu = S4Fusion.from_pretrained(weights, map_location="cuda").eval()
    rng = np.random.default_rng(0)
    pairs = [(rng.random((h, w), dtype=np.float32), rng.random((h, w, 3), dtype=np.float32)) for h, w in
             ((48, 64), (61, 50), (48, 64))]
    for precision, tol in (("fp32", 1e-5), ("bf16", 1e-2)):
        eager = [api.fuse(i, v, gpu, precision=precision) for i, v in pairs]
        graph = [api.fuse(i, v, gpu, precision=precision, cuda_graph=True) for i, v in pairs]
        for e, g in zip(eager, graph):
            assert np.abs(e - g).max() < tol
    # one graph per (size, precision): the third pair replayed the first pair's graph
    assert len(vars(gpu)[api._GRAPHED_ATTR].passes) == 4
    batch = api.fuse_images([p[0] for p in pairs], [p[1] for p in pairs], gpu, batch_size=2, cuda_graph=True)
    assert all(np.abs(b - e).max() < 1e-5 for b, e in zip(batch, [api.fuse(i, v, gpu) for i, v in pairs]))
    assert len(vars(gpu)[api._GRAPHED_ATTR].passes) == api.GRAPH_LIMIT  # the oldest went first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")
def test_api_auto_cuda_graph_records_at_the_second_pass_of_a_size(weights):
    gpu = S4Fusion.from_pretrained(weights, map_location="cuda").eval()
    rng = np.random.default_rng(1)
    ir, vi = rng.random((48, 64), dtype=np.float32), rng.random((48, 64, 3), dtype=np.float32)
    eager = api.fuse(ir, vi, gpu, cuda_graph=False)
    assert api._GRAPHED_ATTR not in vars(gpu)
    outs = [api.fuse(ir, vi, gpu) for _ in range(3)]  # "auto": run, record, replay
    slot = vars(gpu)[api._GRAPHED_ATTR]
    assert len(slot.passes) == 1 and not slot.seen
    assert all(np.abs(o - eager).max() < 1e-5 for o in outs)
    # a pass over 1/GRAPH_LIMIT of the budget is never recorded (tile=0: it still runs whole)
    api.fuse(ir[:45], vi[:45], gpu, tile=0, memory_budget=1)
    api.fuse(ir[:45], vi[:45], gpu, tile=0, memory_budget=1)
    assert len(slot.passes) == 1 and not slot.seen


def test_default_weights_error_and_bundled_path(monkeypatch):
    monkeypatch.setattr(api, "WEIGHTS_FILE", "not-bundled.safetensors")
    with pytest.raises(FileNotFoundError, match="no bundled S4Fusion weights"):
        api.default_weights()
    with pytest.raises(FileNotFoundError):
        api.fuse(np.zeros((20, 20), np.float32), np.zeros((20, 20), np.float32))
    assert os.fspath(api.example_pair()[0]).endswith(os.path.join("s4fusion", "examples", "ir.png"))
