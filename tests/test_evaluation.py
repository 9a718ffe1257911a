"""Baselines, folder evaluation (matching, CSV/Markdown/JSON, failures) and the
``evaluate`` / ``compare`` subcommands, on small crops of real MSRS test pairs."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from s4fusion.baselines import (
    average_fusion,
    collapse_pyramid,
    laplacian_pyramid,
    laplacian_pyramid_fusion,
    max_fusion,
)
from s4fusion.cli import main
from s4fusion.evaluation import (
    EvaluationError,
    baseline_image,
    baseline_method,
    evaluate,
    markdown_table,
    parse_fused,
    per_image_csv,
    summary_json,
    write_outputs,
)
from s4fusion.figures import ZOOM_COLOURS, ZoomBox, make_grid
from s4fusion.metrics import DEFINED, evaluate_pair

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MSRS = SHARED / "data" / "test" / "MSRS"
NAMES = ("00107D", "01016N", "00659D")
CROP = (slice(200, 248), slice(260, 324))  # 48 x 64: large enough for every metric (MS-SSIM needs 44)


def _source(kind: str, name: str) -> Image.Image:
    path = MSRS / kind / f"{name}.png"
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (the tests need ../shared beside the checkout)")
    return Image.open(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """``root/ir`` and ``root/vi`` holding 48x64 crops of three MSRS test pairs."""
    root = tmp_path_factory.mktemp("pairs")
    for kind in ("ir", "vi"):
        (root / kind).mkdir()
        for name in NAMES:
            arr = np.asarray(_source(kind, name))[CROP]
            Image.fromarray(arr).save(root / kind / f"{name}.png")
    return root


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ baselines


def _reference_pyramid_fusion(a: np.ndarray, b: np.ndarray, levels: int) -> np.ndarray:
    """Independent Laplacian-pyramid fusion: explicit 5x5 binomial window, mirror borders."""
    w1 = np.array([1, 4, 6, 4, 1]) / 16
    w = np.outer(w1, w1)

    def blur(x):
        return np.einsum("ijkl,kl->ij", sliding_window_view(np.pad(x, 2, mode="reflect"), (5, 5)), w)

    def expand(x, shape):
        up = np.zeros(shape)
        up[::2, ::2] = x
        return 4 * blur(up)

    def pyramid(x):
        out = []
        for _ in range(levels - 1):
            low = blur(x)[::2, ::2]
            out.append(x - expand(low, x.shape))
            x = low
        return out + [x]

    pa, pb = pyramid(a), pyramid(b)
    x = (pa[-1] + pb[-1]) / 2
    for la, lb in zip(reversed(pa[:-1]), reversed(pb[:-1])):
        x = np.where(np.abs(la) >= np.abs(lb), la, lb) + expand(x, la.shape)
    return x


def test_baselines_on_a_real_pair():
    ir = np.asarray(_source("ir", "00107D").convert("L"), dtype=np.float64)[:97, :131] / 255
    vi = _luma(np.asarray(_source("vi", "00107D").convert("RGB"), dtype=np.float64)[:97, :131])
    np.testing.assert_array_equal(average_fusion(ir, vi), (ir + vi) / 2)
    np.testing.assert_array_equal(max_fusion(ir, vi), np.maximum(ir, vi))
    np.testing.assert_allclose(laplacian_pyramid_fusion(ir, vi), _reference_pyramid_fusion(ir, vi, 4), atol=1e-12)
    # The pyramid is invertible at odd sizes, and fusing an image with itself returns it.
    np.testing.assert_allclose(collapse_pyramid(laplacian_pyramid(ir, 4)), ir, atol=1e-12)
    np.testing.assert_allclose(laplacian_pyramid_fusion(vi, vi), vi, atol=1e-12)
    with pytest.raises(ValueError, match="same size"):
        average_fusion(ir, vi[:-1])


def test_small_images_use_fewer_pyramid_levels():
    x = np.linspace(0, 1, 20 * 12).reshape(20, 12)
    y = x[::-1].copy()
    # 12 px: one reduction leaves 6 < 8 pixels, so only the low-pass level remains (= mean).
    np.testing.assert_allclose(laplacian_pyramid_fusion(x, y), (x + y) / 2, atol=1e-12)


# ----------------------------------------------------------------- evaluation


def test_folder_evaluation_matches_evaluate_pair(pairs, tmp_path):
    fused = tmp_path / "avg"
    fused.mkdir()
    for name in NAMES:
        Image.fromarray(baseline_image("average", pairs / "ir" / f"{name}.png", pairs / "vi" / f"{name}.png")).save(
            fused / f"{name}.png"
        )
    methods = [parse_fused(f"saved={fused}"), baseline_method("average"), baseline_method("laplacian")]
    result = evaluate(pairs / "ir", pairs / "vi", methods)
    assert result.failures == [] and result.problems == [] and result.images == sorted(NAMES)
    for name in NAMES:
        want = evaluate_pair(fused / f"{name}.png", pairs / "ir" / f"{name}.png", pairs / "vi" / f"{name}.png")
        assert result.scores["saved"][name] == want
        # The on-the-fly baseline is the same 8-bit image as the saved one.
        assert result.scores["average"][name] == want
    summary = result.summary()
    for k in DEFINED["matlab"]:
        values = [result.scores["laplacian"][n][k] for n in NAMES]
        assert math.isclose(summary["laplacian"]["mean"][k], float(np.mean(values)), rel_tol=1e-12)

    rows = list(csv.DictReader(per_image_csv(result).splitlines()))
    assert len(rows) == 3 * len(NAMES)
    row = next(r for r in rows if r["method"] == "laplacian" and r["image"] == "01016N")
    assert float(row["Qabf"]) == result.scores["laplacian"]["01016N"]["Qabf"]

    doc = json.loads(summary_json(result))
    assert doc["convention"] == "matlab" and doc["images"] == sorted(NAMES)
    assert [m["name"] for m in doc["methods"]] == ["saved", "average", "laplacian"]
    assert doc["methods"][1]["source"] == "baseline:average"
    assert math.isclose(doc["methods"][2]["mean"]["VIF"], summary["laplacian"]["mean"]["VIF"], rel_tol=1e-15)

    md = markdown_table(result)
    assert md.splitlines()[0].startswith("| Method | EN ↑ |") and "MSE ↓" in md and "Nabf ↓" in md
    lap_line = next(line for line in md.splitlines() if line.startswith("| laplacian |"))
    assert f"{summary['laplacian']['mean']['SF']:.4f}" in lap_line


def test_cddfuse_convention_has_no_nabf_or_ms_ssim_columns(pairs):
    result = evaluate(pairs / "ir", pairs / "vi", [baseline_method("max")], convention="cddfuse")
    assert result.metrics == DEFINED["cddfuse"]
    assert "Nabf" not in markdown_table(result) and "MS_SSIM" not in per_image_csv(result)
    with pytest.raises(EvaluationError, match="Nabf not defined in the cddfuse convention"):
        evaluate(pairs / "ir", pairs / "vi", [baseline_method("max")], convention="cddfuse", metrics=["Nabf"])


def test_parallel_workers_give_identical_scores(pairs):
    methods = [baseline_method("max")]
    one = evaluate(pairs / "ir", pairs / "vi", methods, metrics=["EN", "Qabf", "SSIM"], workers=1)
    two = evaluate(pairs / "ir", pairs / "vi", methods, metrics=["EN", "Qabf", "SSIM"], workers=2)
    assert one.scores == two.scores


def _copy_pairs(pairs: Path, dst: Path) -> Path:
    for kind in ("ir", "vi"):
        (dst / kind).mkdir(parents=True)
        for p in (pairs / kind).iterdir():
            (dst / kind / p.name).write_bytes(p.read_bytes())
    return dst


def test_unmatched_files_are_listed_and_fail_unless_skipped(pairs, tmp_path):
    root = _copy_pairs(pairs, tmp_path / "data")
    (root / "vi" / "00659D.png").unlink()  # infrared without visible
    fused = tmp_path / "m"
    fused.mkdir()
    for name in ("00107D", "stray"):
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(fused / f"{name}.png")
    methods = [parse_fused(str(fused)), baseline_method("average")]
    with pytest.raises(EvaluationError) as e:
        evaluate(root / "ir", root / "vi", methods)
    message = str(e.value)
    assert "00659D.png has no visible image" in message
    assert "fused 'm': no image for 01016N" in message
    assert "fused 'm': stray.png has no infrared/visible pair" in message
    assert "--skip-missing" in message
    result = evaluate(root / "ir", root / "vi", methods, skip_missing=True, metrics=["EN"])
    assert result.images == ["00107D"] and result.dropped == ["01016N"]
    assert len(result.problems) == 3


def test_one_bad_file_does_not_stop_the_batch(pairs, tmp_path):
    fused = tmp_path / "m"
    fused.mkdir()
    for name in NAMES:
        Image.fromarray(np.full((48, 64), 100, np.uint8)).save(fused / f"{name}.png")
    (fused / "01016N.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(fused / "00659D.png")  # wrong size
    result = evaluate(pairs / "ir", pairs / "vi", [parse_fused(f"m={fused}"), baseline_method("max")], metrics=["SD"])
    failed = {(m, i): r for m, i, r in result.failures}
    assert set(failed) == {("m", "01016N"), ("m", "00659D")}
    assert "01016N.png: cannot read image" in failed[("m", "01016N")]
    assert "sizes differ" in failed[("m", "00659D")]
    assert result.common_images == ["00107D"]
    assert set(result.scores["max"]) == set(NAMES)  # the other method was scored everywhere
    summary = result.summary()
    assert summary["max"]["mean"]["SD"] == result.scores["max"]["00107D"]["SD"]


def test_bad_method_names(pairs, tmp_path):
    with pytest.raises(EvaluationError, match="unknown baseline 'median'"):
        baseline_method("median")
    with pytest.raises(EvaluationError, match="two methods are named 'max'"):
        evaluate(pairs / "ir", pairs / "vi", [baseline_method("max"), parse_fused(f"max={pairs / 'ir'}")])
    with pytest.raises(EvaluationError, match="at least one"):
        evaluate(pairs / "ir", pairs / "vi", [])
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate(tmp_path / "nowhere", pairs / "vi", [baseline_method("max")])
    with pytest.raises(EvaluationError, match="unknown metric"):
        evaluate(pairs / "ir", pairs / "vi", [baseline_method("max")], metrics=["PSNR", "FMI"])


# ------------------------------------------------------------------------ CLI


def test_evaluate_cli_writes_outputs_and_leaves_inputs_alone(pairs, tmp_path, capsys):
    before = _digest(pairs)
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"), "--baseline", "average", "--baseline", "max",
         "--convention", "cddfuse", "--out", str(out), "--workers", "1", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "average" in printed and "mean over 3 image(s), cddfuse convention" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["metrics_cddfuse.json", "metrics_cddfuse.md", "metrics_cddfuse_per_image.csv"]
    doc = json.loads((out / "metrics_cddfuse.json").read_text())
    assert [m["name"] for m in doc["methods"]] == ["average", "max"]
    assert _digest(pairs) == before


def test_evaluate_cli_exit_codes(pairs, tmp_path, capsys):
    fused = tmp_path / "m"
    fused.mkdir()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(fused / "00107D.png")
    args = ["evaluate", "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"), "--fused", str(fused),
            "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1", "--metrics", "EN,SF"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fused 'm': no image for 00659D" in err and "fused 'm': no image for 01016N" in err
    assert main(args + ["--skip-missing"]) == 0
    assert "skipped: fused 'm': no image for 00659D" in capsys.readouterr().err
    (fused / "00107D.png").write_bytes(b"broken")
    assert main(args + ["--skip-missing"]) == 1
    assert "m / 00107D:" in capsys.readouterr().err


def test_evaluate_cli_single_files(pairs, tmp_path, capsys):
    code = main(
        ["evaluate", "--ir", str(pairs / "ir" / "00107D.png"), "--vi", str(pairs / "vi" / "00107D.png"),
         "--fused", f"same={pairs / 'ir' / '00107D.png'}", "--metrics", "SSIM", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((tmp_path / "metrics_matlab.json").read_text())
    # F = infrared: SSIM(F, A) = 1, so the matlab SSIM is (1 + ssim(A, B)) / 2, which is
    # also the score of F = visible (ssim is symmetric).
    ir, vi = pairs / "ir" / "00107D.png", pairs / "vi" / "00107D.png"
    want = evaluate_pair(vi, ir, vi)["SSIM"]
    assert math.isclose(doc["methods"][0]["mean"]["SSIM"], want, rel_tol=1e-12)
    assert doc["methods"][0]["name"] == "same" and doc["images"] == ["00107D"]


# ------------------------------------------------------------------- figures


def test_grid_layout_and_zoom_boxes():
    a = Image.fromarray(np.full((30, 40), 50, np.uint8))
    b = Image.fromarray(np.full((30, 40, 3), (10, 200, 30), np.uint8))
    box = ZoomBox.parse("4,6,10,8")
    grid = make_grid([[a, b]], ["Infrared", "Visible"], zoom=[box], panel_width=40, font_size=10)
    px = np.asarray(grid)
    # Panel 2 is found by its colour; the panel width equals the image width, so no scaling.
    ys, xs = np.nonzero(np.all(px == (10, 200, 30), axis=-1))
    top, left = ys.min(), xs.min()
    assert tuple(px[top + 6, left + 4]) == ZOOM_COLOURS[0]  # box outline at the box corner (x=4, y=6)
    assert tuple(px[top + 20, left + 30]) == (10, 200, 30)
    # Panel 1, one panel width and a 6-pixel gap to the left, is the infrared image (grey 50).
    assert tuple(px[top + 20, left - 46 + 30]) == (50, 50, 50)
    assert tuple(px[top + 6, left - 46 + 4]) == ZOOM_COLOURS[0]
    # Under each panel, the magnified box (10 px -> 40 px wide) framed in the box colour.
    strip = px[top + 30 + 6 :, left : left + 40]
    assert tuple(strip[0, 0]) == ZOOM_COLOURS[0] and tuple(strip[10, 20]) == (10, 200, 30)
    with pytest.raises(ValueError, match="leaves"):
        make_grid([[a, b]], ["I", "V"], zoom=[ZoomBox(35, 0, 10, 10)], panel_width=40)
    with pytest.raises(ValueError, match="X,Y,W,H"):
        ZoomBox.parse("1,2,3")


def test_compare_cli(pairs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    before = _digest(pairs)
    code = main(
        ["compare", "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"), "--image", "00107D", "--image", "01016N",
         "--baseline", "max", "--fused", f"mine={pairs / 'ir'}", "--zoom", "0,0,16,12", "--panel-width", "64",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    grid = Image.open(out)
    assert grid.mode == "RGB" and grid.width > 4 * 64 and grid.height > 2 * 48
    assert _digest(pairs) == before
    bad = ["compare", "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"), "--baseline", "max"]
    assert main(bad + ["--out", str(tmp_path / "g.png")]) == 2
    assert "--image NAME" in capsys.readouterr().err
    assert main(bad + ["--image", "nope", "--out", str(tmp_path / "g.png")]) == 2
    assert "nope: no infrared image" in capsys.readouterr().err
    assert main(bad + ["--image", "00107D", "--zoom", "60,0,10,10", "--out", str(tmp_path / "g.png")]) == 2
    assert "leaves" in capsys.readouterr().err
    assert main(bad + ["--image", "00107D", "--out", str(pairs / "ir" / "g.png")]) == 2
    assert "inside an input folder" in capsys.readouterr().err
    assert not (pairs / "ir" / "g.png").exists()


def test_write_outputs_is_atomic_and_replaces_previous_results(pairs, tmp_path):
    result = evaluate(pairs / "ir", pairs / "vi", [baseline_method("average")], metrics=["EN"])
    paths = write_outputs(result, tmp_path)
    first = paths["json"].read_text()
    paths = write_outputs(result, tmp_path)
    assert paths["json"].read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left
