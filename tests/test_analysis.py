"""The paper's analyses (s4fusion.analysis, ``s4fusion analyze``): Cross SS2D delta
statistics checked against the golden scan inputs of the released code, feature
maps against the golden CMSA intermediates, the PNG grid against the input
pixels, and the command line on a small model."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from s4fusion import S4Fusion, S4FusionConfig, ops
from s4fusion.analysis import (
    DELTA_FIELDS,
    DeltaRow,
    block_delta_stats,
    capture_scan_inputs,
    cmsa_feature_maps,
    delta_statistics,
    delta_statistics_folder,
    feature_grid,
    format_delta_table,
)
from s4fusion.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
TINY = SHARED / "data" / "tiny"
SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread_reference_scan():
    """Tiny tensors: one intra-op thread is many times faster than several on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops.set_backend("reference")
    yield
    ops.set_backend(None)
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ golden checks
@pytest.fixture(scope="module")
def golden_run():
    """The released network (golden weights, float64) on golden pair 0: the
    captured scan inputs of every CMSA block and the feature maps, from one forward."""
    from safetensors.torch import load_file

    if not GOLDEN.is_dir():
        pytest.fail(f"reference material missing: {GOLDEN}")
    inputs = load_file(str(GOLDEN / "inputs.safetensors"))
    model = S4Fusion.from_released_checkpoint(GOLDEN / "released_format.pth").double().eval()
    captured = {}

    def record(i, j, block, hw, u, delta, B, C):
        captured[(i, j)] = (hw, delta.clone(), C.clone(), block.dt_projs_bias.detach().reshape(-1).clone())

    with capture_scan_inputs(model, record):
        layers, fused = cmsa_feature_maps(model, inputs["infrared"][0], inputs["visible"][0])
    with torch.no_grad():
        plain = model(inputs["infrared"][:1], inputs["visible"][:1])
    return model, captured, layers, fused, plain


def test_capture_leaves_the_forward_unchanged(golden_run):
    model, captured, layers, fused, plain = golden_run
    assert sorted(captured) == [(i, j) for i in range(3) for j in range(3)]  # every CMSA, the finest included
    assert torch.equal(fused, plain[0, 0].float())
    assert not any("scan_inputs" in vars(b) for c in model.cmsa for b in c.blocks)  # unwrapped afterwards


def test_block_stats_match_the_golden_interleaved_scan(golden_run):
    """The golden Cross SS2D scan inputs of CMSA block 0 at scale 2 are in scan
    order, interleaved (even steps infrared, odd visible), per direction: the
    statistics are computed here directly from that layout."""
    from safetensors.torch import load_file

    _, captured, *_ = golden_run
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    delta = expected["debug.fusion.2.block0.scan.delta"][0]  # (K*d, 2L)
    C = expected["debug.fusion.2.block0.scan.C"][0]  # (K, N, 2L)
    bias = expected["debug.fusion.2.block0.scan.delta_bias"]
    step = F.softplus(delta + bias[:, None])
    ref = {
        "raw_ir": delta[:, 0::2].mean(),
        "raw_vi": delta[:, 1::2].mean(),
        "step_spatial": step[:, 2::2].mean(),  # infrared steps after the first of each direction
        "step_cross": step[:, 1::2].mean(),
        "c_ir": C[:, :, 0::2].mean(),
        "c_vi": C[:, :, 1::2].mean(),
    }
    hw, d, c, b = captured[(2, 0)]
    stats = block_delta_stats(d, c, b, *hw)
    for k in DELTA_FIELDS:
        scale = max(abs(ref[k].item()), step.mean().item() if "step" in k else delta.abs().mean().item())
        assert abs(stats[k][0].item() - ref[k].item()) < 1e-10 * scale, k
    assert ref["step_spatial"] != step[:, 0::2].mean()  # the first step matters at this size


def test_feature_maps_match_the_golden_intermediates(golden_run):
    """Pair 0 is 50x67, padded by 5 rows on top and 3 columns on the left."""
    from safetensors.torch import load_file

    _, _, layers, _, _ = golden_run
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    assert [lf.layer for lf in layers] == [0, 1, 2]
    # layer i: token stride 3 * 2**i; rows top // s .. ceil((top + 50) / s), columns likewise
    windows = {0: (1, 19, 1, 24), 1: (0, 10, 0, 12), 2: (0, 5, 0, 6)}
    inputs = {0: ("embed.x", "embed.y"), 1: ("enc.x.0.out", "enc.y.0.out"), 2: ("enc.x.1.out", "enc.y.1.out")}
    for lf in layers:
        r0, r1, c0, c1 = windows[lf.layer]

        def ref(name):
            return expected[name][0, r0:r1, c0:c1].float()

        assert torch.allclose(lf.infrared_in, ref(inputs[lf.layer][0]), rtol=0, atol=1e-5)
        assert torch.allclose(lf.visible_in, ref(inputs[lf.layer][1]), rtol=0, atol=1e-5)
        out = ref(f"fusion.{lf.layer}.out")
        assert torch.allclose(lf.fused, out, rtol=0, atol=1e-5 * out.abs().max().item())
        assert torch.allclose(lf.infrared_out + lf.visible_out, lf.fused, atol=1e-5)
        if lf.layer > 0:
            x = ref(inputs[lf.layer][0]) + sum(ref(f"fusion.{lf.layer}.block{j}.out_x") for j in range(3))
            assert torch.allclose(lf.infrared_out, x, rtol=0, atol=1e-5 * x.abs().max().item())


# ----------------------------------------------------------------- small model
def small_model(cfg: S4FusionConfig = SMALL, seed: int = 0) -> S4Fusion:
    torch.manual_seed(seed)
    model = S4Fusion(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "x_proj_weight" in name or "y_proj_weight" in name:
                p.mul_(4.0)  # larger deltas than at initialisation, so the statistics differ between modalities
    return model.eval()


def tiny_pair(name: str, h: int = 24, w: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    from s4fusion.data import load_infrared, load_visible

    return load_infrared(TINY / "ir" / name)[:, :h, :w], load_visible(TINY / "vi" / name)[:, :h, :w]


def test_layer_rows_average_blocks_and_images():
    model = small_model()
    pairs = [("a", *tiny_pair("MSRS_00633D.png")), ("b", *tiny_pair("M3FD_00004.png", 30, 24))]
    per_call = []

    def record(i, j, block, hw, u, delta, B, C):
        per_call.append((i, block_delta_stats(delta, C, block.dt_projs_bias.detach().reshape(-1), *hw)))

    report = delta_statistics(model, pairs)
    with capture_scan_inputs(model, record), torch.no_grad():
        for _, ir, vi in pairs:
            top, bottom, left, right = model.padding_for(*ir.shape[-2:])
            model.forward_padded(F.pad(ir[None], (left, right, top, bottom)), F.pad(vi[None], (left, right, top, bottom)), {})
    assert report.images == ["a", "b"]
    assert [(r.layer, r.blocks, r.images) for r in report.rows] == [(0, 2, 2), (1, 2, 2), (2, 2, 2)]
    for row in report.rows:
        calls = [s for i, s in per_call if i == row.layer]
        assert len(calls) == 4
        for k in DELTA_FIELDS:
            assert getattr(row, k) == pytest.approx(sum(s[k].item() for s in calls) / 4, rel=1e-12, abs=1e-15)
    assert report.rows[0].raw_ir != report.rows[0].raw_vi


def test_delta_needs_cmsa():
    model = small_model(replace(SMALL, fusion="add"))
    with pytest.raises(ValueError, match="needs CMSA fusion"):
        delta_statistics(model, [("a", *tiny_pair("MSRS_00633D.png"))])


def test_table_formats():
    rows = [DeltaRow(0, 3, 2, 0.5, -1.25, 0.1, 0.2, 1e-3, -2e-3), DeltaRow(1, 3, 2, -4.0, -5.5, 0.01, 0.02, 0.0, 1.0)]
    parsed = list(csv.DictReader(io.StringIO(format_delta_table(rows, "csv"))))
    assert [float(r["raw_vi"]) for r in parsed] == [-1.25, -5.5]
    assert [int(r["layer"]) for r in parsed] == [0, 1]
    md = format_delta_table(rows, "markdown").splitlines()
    assert len(md) == 4 and md[0].startswith("| layer |") and md[3].startswith("| 1 | 3 | 2 | -4 | -5.5 |")
    text = format_delta_table(rows, "text").splitlines()
    assert len(text) == 3 and "raw delta ir" in text[0]
    with pytest.raises(ValueError, match="unknown table format"):
        format_delta_table(rows, "xlsx")


def test_feature_maps_of_variants():
    ir, vi = tiny_pair("LLVIP_010023.png")
    for fusion, streams in (("fssm", True), ("cross_attention", True), ("add", False)):
        model = small_model(replace(SMALL, fusion=fusion, topology="paper"))
        layers, fused = cmsa_feature_maps(model, ir, vi)
        assert fused.shape == (24, 30)
        for lf in layers:
            assert (lf.infrared_out is not None) == streams
            if streams:
                assert torch.allclose(lf.infrared_out + lf.visible_out, lf.fused, atol=1e-5)
            else:
                assert torch.allclose(lf.infrared_in + lf.visible_in, lf.fused, atol=1e-6)


def test_feature_grid_pixels():
    """A 24x24 pair and 24-pixel panels: the image row holds the input pixels
    exactly and layer 0 (8x8 tokens) is each channel-mean map scaled by 3."""
    model = small_model()
    ir, vi = tiny_pair("RoadScene_FLIR_09376.png", 24, 24)
    layers, fused = cmsa_feature_maps(model, ir, vi)
    grid = np.asarray(feature_grid(layers, ir, vi, fused, reduce="mean", panel=24))
    label_w, title_h, gap = 150, 18, 4
    assert grid.shape == (title_h + 4 * (24 + gap), label_w + 5 * (24 + gap))
    raw_ir = np.asarray(Image.open(TINY / "ir" / "RoadScene_FLIR_09376.png").convert("L"))[:24, :24]
    assert np.array_equal(grid[title_h : title_h + 24, label_w : label_w + 24], raw_ir)
    lf = layers[0]
    assert lf.fused.shape[:2] == (8, 8)
    for col, t in enumerate([lf.infrared_in, lf.visible_in, lf.infrared_out, lf.visible_out, lf.fused]):
        m = t.double().mean(-1).numpy()
        expected = np.floor((m - m.min()) / (m.max() - m.min()) * 255 + 0.5).astype(np.uint8)
        expected = np.repeat(np.repeat(expected, 3, 0), 3, 1)
        y0, x0 = title_h + 24 + gap, label_w + col * (24 + gap)
        assert np.array_equal(grid[y0 : y0 + 24, x0 : x0 + 24], expected), col


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    small_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two 24x30 pairs and one unreadable pair."""
    root = tmp_path_factory.mktemp("data")
    for sub in ("ir", "vi"):
        (root / sub).mkdir()
        for name in ("MSRS_00633D.png", "M3FD_00004.png"):
            Image.open(TINY / sub / name).crop((0, 0, 30, 24)).save(root / sub / name)
        (root / sub / "broken.png").write_bytes(b"not an image")
    return root


def test_cli_delta(small_weights, dataset, tmp_path, capsys):
    out = tmp_path / "table.csv"
    assert main(["analyze", "delta", "--weights", str(small_weights), "--data", str(dataset), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err
    assert "2 pairs" in captured.out and "raw delta ir" in captured.out
    rows = list(csv.DictReader(out.open()))
    assert [r["layer"] for r in rows] == ["0", "1", "2"] and all(r["images"] == "2" for r in rows)
    # the same numbers through the Python API
    report = delta_statistics_folder(S4Fusion.from_pretrained(small_weights), dataset)
    assert float(rows[1]["raw_vi"]) == pytest.approx(report.rows[1].raw_vi, rel=1e-5)
    md = tmp_path / "table.md"
    assert main(["analyze", "delta", "--weights", str(small_weights), "--data", str(dataset), "--out", str(md), "--limit", "1"]) == 0
    assert md.read_text().count("\n") == 5


def test_cli_features(small_weights, tmp_path, capsys):
    out = tmp_path / "figs" / "grid.png"
    ir, vi = TINY / "ir" / "M3FD_00004.png", TINY / "vi" / "M3FD_00004.png"
    args = ["analyze", "features", "--weights", str(small_weights), "--ir", str(ir), "--vi", str(vi)]
    assert main(args + ["--out", str(out), "--panel", "64", "--reduce", "norm"]) == 0
    img = Image.open(out)
    assert img.size == (150 + 5 * 68, 18 + 4 * 68)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_cli_errors(small_weights, dataset, tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    assert main(["analyze", "delta", "--weights", str(missing), "--data", str(dataset)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(["analyze", "delta", "--weights", str(small_weights), "--data", str(tmp_path / "nodata")]) == 1
    assert "nodata" in capsys.readouterr().err
    assert main(["analyze", "delta", "--weights", str(small_weights), "--data", str(dataset), "--out", "t.xlsx"]) == 1
    assert ".csv or .md" in capsys.readouterr().err
    ir = dataset / "ir" / "MSRS_00633D.png"
    args = ["analyze", "features", "--weights", str(small_weights), "--ir", str(ir), "--vi", str(ir)]
    assert main(args + ["--out", str(tmp_path / "g.jpg")]) == 1
    assert "PNG" in capsys.readouterr().err
    assert main(args + ["--out", str(ir)]) == 1  # never overwrite an input
    assert "one of the input images" in capsys.readouterr().err
    add = tmp_path / "add.safetensors"
    small_model(replace(SMALL, fusion="add")).save_pretrained(add)
    assert main(["analyze", "delta", "--weights", str(add), "--data", str(dataset)]) == 1
    assert "needs CMSA fusion" in capsys.readouterr().err


def test_cli_params(capsys):
    assert main(["analyze", "params"]) == 0
    out = capsys.readouterr().out
    assert "3,562,957" in out and "fssm" in out and "no_patch_mark" in out


def test_cli_default_weights_are_the_bundled_ones(dataset, capsys):
    from s4fusion.api import default_weights

    code = main(["analyze", "delta", "--data", str(dataset), "--limit", "1"])
    try:
        default_weights()
    except FileNotFoundError:
        assert code == 1 and "no bundled S4Fusion weights" in capsys.readouterr().err
    else:
        assert code == 0 and "weights bundled with the package" in capsys.readouterr().out
