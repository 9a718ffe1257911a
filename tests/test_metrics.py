"""Fusion metrics against independent references (../shared/reference/METRICS.md).

Reference values come from three places, named at each use:

* straightforward re-implementations written here from the METRICS.md text
  (pixel loops, ``collections.Counter`` histograms, explicit 2-D windows via
  ``sliding_window_view``), sharing no code with ``s4fusion.metrics``;
* values printed by CDDFuse's own ``utils/Evaluator.py`` (commit 40de058, the
  file METRICS.md pins; scikit-image 0.26 ``structural_similarity`` called with
  ``data_range=2.0`` as METRICS.md prescribes for versions after 0.19, scikit-learn
  1.9.1, scipy 1.17.1, numpy 2.4.6) on the same arrays, run once outside this
  project and pasted below;
* the properties the issue lists (MI of an image with itself, SSIM of identical
  images, Qabf of F = A = B, symmetry in the sources).

The fused image is made here from real MSRS test pairs in ../shared/data.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from s4fusion.metrics import DEFINED, METRIC_NAMES, evaluate_pair, grey_levels, read_grey
from s4fusion.metrics.edges import nabf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MSRS = SHARED / "data" / "test" / "MSRS"
EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------- test data


def load_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 infrared (H, W) and uint8 visible RGB (H, W, 3) of an MSRS test pair."""
    ir_path, vi_path = MSRS / "ir" / f"{name}.png", MSRS / "vi" / f"{name}.png"
    if not ir_path.is_file() or not vi_path.is_file():
        pytest.fail(f"test data missing: {ir_path} / {vi_path} (the tests need ../shared beside the checkout)")
    ir = np.asarray(Image.open(ir_path).convert("L"))
    vi = np.asarray(Image.open(vi_path).convert("RGB"))
    return ir, vi


def make_fused(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """A fused image for the tests: 0.6 max + 0.2 sum of infrared and visible luma, 8-bit."""
    y = vi.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    a = ir.astype(np.float64)
    return np.floor(np.clip(0.6 * np.maximum(a, y) + 0.2 * (a + y), 0, 255) + 0.5).astype(np.uint8)


CROPS = {  # name -> (row, col, height, width): textured 96x128 windows of two test pairs
    "00107D": (160, 0, 96, 128),
    "01016N": (224, 224, 96, 128),
}


@pytest.fixture(scope="module", params=sorted(CROPS))
def crop(request):
    """(name, F uint8, IR uint8, VI RGB uint8) on a 96x128 crop."""
    name = request.param
    r, c, h, w = CROPS[name]
    ir, vi = load_pair(name)
    ir, vi = ir[r : r + h, c : c + w], vi[r : r + h, c : c + w]
    return name, make_fused(ir, vi), ir, vi


def matlab_grey(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2gray per METRICS.md section 1: float64 weights, round half away from zero."""
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for i in range(rgb.shape[0]):
        for j in range(rgb.shape[1]):
            r, g, b = (float(v) for v in rgb[i, j])
            y = 0.298936021293775 * r + 0.587043074451121 * g + 0.114020904255103 * b
            out[i, j] = min(255, int(math.floor(y + 0.5)))
    return out


def cddfuse_grey(rgb: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_BGR2GRAY on float32 then np.round (METRICS.md section 1)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    return np.round(b * np.float32(0.114) + g * np.float32(0.587) + r * np.float32(0.299))


# ------------------------------------------------- independent references


def ref_entropy(u: np.ndarray) -> float:
    n = u.size
    return -sum(c / n * math.log2(c / n) for c in Counter(u.ravel().tolist()).values())


def ref_mi_matlab(f: np.ndarray, x: np.ndarray) -> float:
    """H(X) + H(F) - Hj(F, X), bits, joint histogram with 254 and 255 merged."""
    n = f.size
    joint = Counter((min(a, 254), min(b, 254)) for a, b in zip(f.ravel().tolist(), x.ravel().tolist()))
    hj = -sum(c / n * math.log2(c / n) for c in joint.values())
    return ref_entropy(x) + ref_entropy(f) - hj


def ref_mi_nats(f: np.ndarray, x: np.ndarray) -> float:
    """Textbook mutual information in nats of the exact grey levels."""
    fl, xl = f.ravel().astype(int).tolist(), x.ravel().astype(int).tolist()
    n = len(fl)
    pf, px, joint = Counter(fl), Counter(xl), Counter(zip(fl, xl))
    return sum(c / n * math.log(c * n / (pf[a] * px[b])) for (a, b), c in joint.items())


def ref_sd(f: np.ndarray) -> float:
    return statistics.pstdev(f.ravel().astype(float).tolist())


def ref_sf(f: np.ndarray) -> float:
    x = f.astype(float).tolist()
    h, w = len(x), len(x[0])
    rf = math.fsum((x[i + 1][j] - x[i][j]) ** 2 for i in range(h - 1) for j in range(w)) / ((h - 1) * w)
    cf = math.fsum((x[i][j + 1] - x[i][j]) ** 2 for i in range(h) for j in range(w - 1)) / (h * (w - 1))
    return math.sqrt(rf + cf)


def ref_ag_sum(f: np.ndarray) -> float:
    """Sum over all pixels of sqrt((gx^2 + gy^2) / 2), MATLAB gradient."""
    x = f.astype(float).tolist()
    h, w = len(x), len(x[0])
    total = []
    for i in range(h):
        for j in range(w):
            if j == 0:
                gx = x[i][1] - x[i][0]
            elif j == w - 1:
                gx = x[i][w - 1] - x[i][w - 2]
            else:
                gx = (x[i][j + 1] - x[i][j - 1]) / 2
            if i == 0:
                gy = x[1][j] - x[0][j]
            elif i == h - 1:
                gy = x[h - 1][j] - x[h - 2][j]
            else:
                gy = (x[i + 1][j] - x[i - 1][j]) / 2
            total.append(math.sqrt((gx * gx + gy * gy) / 2))
    return math.fsum(total)


def ref_corr(x: np.ndarray, y: np.ndarray) -> float:
    xs, ys = x.ravel().astype(float).tolist(), y.ravel().astype(float).tolist()
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx = math.fsum((a - mx) ** 2 for a in xs)
    syy = math.fsum((b - my) ** 2 for b in ys)
    return sxy / math.sqrt(sxx * syy)


def ref_mse(x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference on the given scale."""
    return math.fsum(((x.astype(float) - y.astype(float)) ** 2).ravel().tolist()) / x.size


def fspecial_gaussian(n: int, sigma: float) -> np.ndarray:
    h = np.array(
        [
            [math.exp(-((i - (n - 1) / 2) ** 2 + (j - (n - 1) / 2) ** 2) / (2 * sigma * sigma)) for j in range(n)]
            for i in range(n)
        ]
    )
    h[h < EPS * h.max()] = 0
    return h / h.sum()


def filter2_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """MATLAB filter2(w, x, 'valid'): every full window, weights not flipped."""
    return np.einsum("ijkl,kl->ij", sliding_window_view(x.astype(float), w.shape), w)


def ref_vifp(ref: np.ndarray, dist: np.ndarray) -> float:
    """vifp_mscale as written in METRICS.md section 3 (VIF)."""
    r, d = ref.astype(float), dist.astype(float)
    num = den = 0.0
    for s in range(1, 5):
        n = 2 ** (5 - s) + 1
        w = fspecial_gaussian(n, n / 5)
        if s > 1:
            r, d = filter2_valid(r, w)[::2, ::2], filter2_valid(d, w)[::2, ::2]
        mu1, mu2 = filter2_valid(r, w), filter2_valid(d, w)
        s1 = filter2_valid(r * r, w) - mu1**2
        s2 = filter2_valid(d * d, w) - mu2**2
        s12 = filter2_valid(r * d, w) - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        m = s1 < 1e-10
        g[m], sv[m], s1[m] = 0, s2[m], 0
        m = s2 < 1e-10
        g[m], sv[m] = 0, 0
        m = g < 0
        sv[m], g[m] = s2[m], 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g**2 * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    return num / den


def conv2_same_zero(x: np.ndarray, h: list[list[float]]) -> np.ndarray:
    """MATLAB conv2(x, h, 'same') for a 3x3 kernel: out[i,j] = sum h[u][v] x[i+1-u, j+1-v], zeros outside."""
    hgt, wid = x.shape
    out = np.zeros((hgt, wid))
    xf = x.astype(float)
    for u in range(3):
        for v in range(3):
            di, dj = 1 - u, 1 - v
            src = np.zeros((hgt, wid))
            i0, i1 = max(0, -di), min(hgt, hgt - di)
            j0, j1 = max(0, -dj), min(wid, wid - dj)
            src[i0:i1, j0:j1] = xf[i0 + di : i1 + di, j0 + dj : j1 + dj]
            out += h[u][v] * src
    return out


def ref_qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """analysis_Qabf per METRICS.md section 3, with a per-pixel loop for the edge model."""
    hx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    hy = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]

    def edges(x):
        sx, sy = conv2_same_zero(x, hx), conv2_same_zero(x, hy)
        g = np.sqrt(sx**2 + sy**2)
        ang = np.empty_like(g)
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                ang[i, j] = math.atan(sy[i, j] / sx[i, j]) if sx[i, j] != 0 else math.pi / 2
        return g, ang

    (g_a, a_a), (g_b, a_b), (g_f, a_f) = edges(a), edges(b), edges(f)
    num, den = [], []
    for i in range(f.shape[0]):
        for j in range(f.shape[1]):
            q = []
            for gx, ax in ((g_a[i, j], a_a[i, j]), (g_b[i, j], a_b[i, j])):
                gf = g_f[i, j]
                big = gf / gx if gx > gf else (gf if gx == gf else gx / gf)
                al = 1 - abs(ax - a_f[i, j]) / (math.pi / 2)
                q.append(0.9994 / (1 + math.exp(-15 * (big - 0.5))) * 0.9879 / (1 + math.exp(-22 * (al - 0.8))))
            num.append(q[0] * g_a[i, j] + q[1] * g_b[i, j])
            den.append(g_a[i, j] + g_b[i, j])
    return math.fsum(num) / math.fsum(den)


def ref_nabf(f: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> float:
    """analysis_nabf(f, x1, x2) per METRICS.md section 3, per-pixel loop, mirror padding."""

    def edges(x):
        x = x.astype(float)
        hgt, wid = x.shape

        def px(i, j):
            i = -i if i < 0 else (2 * (hgt - 1) - i if i > hgt - 1 else i)
            j = -j if j < 0 else (2 * (wid - 1) - j if j > wid - 1 else j)
            return x[i, j]

        kv = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
        kh = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
        g = np.empty((hgt, wid))
        ang = np.empty((hgt, wid))
        for i in range(hgt):
            for j in range(wid):
                gv = sum(kv[u][v] * px(i + u - 1, j + v - 1) for u in range(3) for v in range(3)) / 8
                gh = sum(kh[u][v] * px(i + u - 1, j + v - 1) for u in range(3) for v in range(3)) / 8
                g[i, j] = math.hypot(gh, gv)
                if gv == 0 and gh == 0:
                    ang[i, j] = 0.0
                elif gh == 0:
                    ang[i, j] = math.copysign(math.pi / 2, gv)
                else:
                    ang[i, j] = math.atan(gv / gh)
        return g, ang

    (g_f, a_f), (g_1, a_1), (g_2, a_2) = edges(f), edges(x1), edges(x2)
    num, den = [], []
    for i in range(g_f.shape[0]):
        for j in range(g_f.shape[1]):
            loss, wsum = 0.0, 0.0
            for gx, ax in ((g_1[i, j], a_1[i, j]), (g_2[i, j], a_2[i, j])):
                gf = g_f[i, j]
                big = 0.0 if (gx == 0 or gf == 0) else (gf / gx if gx > gf else gx / gf)
                al = abs(abs(ax - a_f[i, j]) - math.pi / 2) * 2 / math.pi
                q = math.sqrt(0.9999 / (1 + math.exp(-19 * (big - 0.5))) * 0.9995 / (1 + math.exp(-22 * (al - 0.5))))
                w = gx**1.5 if gx >= 2 else 0.001
                loss += (1 - q) * w
                wsum += w
            num.append(loss if (g_f[i, j] > g_1[i, j] and g_f[i, j] > g_2[i, j]) else 0.0)
            den.append(wsum)
    return math.fsum(num) / math.fsum(den)


def ref_ssim_matlab(x: np.ndarray, y: np.ndarray) -> float:
    """MATLAB ssim(x, y): 11x11 Gaussian 1.5, replicate borders, C1 = 1e-4, C2 = 9e-4."""
    w = fspecial_gaussian(11, 1.5)
    hgt, wid = x.shape
    rows = np.clip(np.arange(-5, hgt + 5), 0, hgt - 1)
    cols = np.clip(np.arange(-5, wid + 5), 0, wid - 1)

    def filt(z):
        return filter2_valid(z[np.ix_(rows, cols)], w)

    x, y = x.astype(float), y.astype(float)
    mx, my = filt(x), filt(y)
    sx, sy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 1e-4, 9e-4
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2))))


def ref_ssim_skimage(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image 0.19 defaults on float data: 7x7 windows, sample moments, data range 2, 3-px crop."""
    xs, ys = x.astype(float), y.astype(float)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    vals = []
    for i in range(3, x.shape[0] - 3):
        for j in range(3, x.shape[1] - 3):
            p, q = xs[i - 3 : i + 4, j - 3 : j + 4].ravel(), ys[i - 3 : i + 4, j - 3 : j + 4].ravel()
            ux, uy = p.mean(), q.mean()
            vx, vy = p.var(ddof=1), q.var(ddof=1)
            vxy = np.sum((p - ux) * (q - uy)) / 48
            vals.append((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def ref_mef_ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """analysis_ms_ssim + mef_ssim.m per METRICS.md section 3, one loop iteration per pixel."""
    weights = np.array([0.0448, 0.2856, 0.3001])
    weights = weights / weights.sum()
    window = fspecial_gaussian(11, 1.5)
    box = np.full((11, 11), 1 / 121)
    c = (0.03 * 255) ** 2

    def mef(seq, fi):
        mus = [filter2_valid(x, box) for x in seq]
        eds = [np.sqrt(np.maximum(121 * (filter2_valid(x * x, box) - mu**2), 0)) + 0.001 for x, mu in zip(seq, mus)]
        qs = []
        for i in range(5, fi.shape[0] - 5):
            for j in range(5, fi.shape[1] - 5):
                pat = [x[i - 5 : i + 6, j - 5 : j + 6].ravel() for x in seq]
                mu = [m[i - 5, j - 5] for m in mus]
                ed = [e[i - 5, j - 5] for e in eds]
                den = sum(np.linalg.norm(p - m) for p, m in zip(pat, mu))
                s = pat[0] + pat[1]
                num = np.linalg.norm(s - s.mean())
                r = (num + EPS) / (den + EPS)
                r = 1 - EPS if r > 1 else (EPS if r < 0 else r)
                p_exp = min(math.tan(math.pi / 2 * r), 10)
                wt = [(e / 11) ** p_exp + EPS for e in ed]
                wt = [v / sum(wt) for v in wt]
                rb = sum(wk * (p - m) / e for wk, p, m, e in zip(wt, pat, mu, ed))
                nr = np.linalg.norm(rb)
                if nr > 0:
                    rb = rb / nr * max(ed)
                fb = fi[i - 5 : i + 6, j - 5 : j + 6]
                rb = rb.reshape(11, 11)
                m1, m2 = np.sum(window * rb), np.sum(window * fb)
                v1, v2 = np.sum(window * (rb - m1) ** 2), np.sum(window * (fb - m2) ** 2)
                v12 = np.sum(window * (rb - m1) * (fb - m2))
                qs.append((2 * v12 + c) / (v1 + v2 + c))
        return float(np.mean(qs))

    def down(x):
        xp = np.vstack([x, x[-1:]])
        xp = np.hstack([xp, xp[:, -1:]])
        return ((xp[:-1, :-1] + xp[1:, :-1] + xp[:-1, 1:] + xp[1:, 1:]) / 4)[::2, ::2]

    seq, fi = [a.astype(float), b.astype(float)], f.astype(float)
    q = []
    for level in range(3):
        q.append(mef(seq, fi))
        if level < 2:
            seq, fi = [down(x) for x in seq], down(fi)
    return float(np.prod(np.array(q) ** weights))


# ------------------------------------------------------------------ tests


def assert_close(got: dict, want: dict, rel: float, abs_: float = 0.0) -> None:
    bad = {k: (got[k], v) for k, v in want.items() if not math.isclose(got[k], v, rel_tol=rel, abs_tol=abs_)}
    assert not bad, f"metric: (got, reference) beyond rel {rel}: {bad}"


def test_grey_conversion_follows_each_toolbox(crop):
    _, _, _, vi = crop
    m = grey_levels(vi, "matlab")
    c = grey_levels(vi, "cddfuse")
    assert m.dtype == np.uint8 and c.dtype == np.float32
    np.testing.assert_array_equal(m, matlab_grey(vi))
    np.testing.assert_array_equal(c, cddfuse_grey(vi))
    differ = np.abs(m.astype(int) - c.astype(int))
    assert differ.max() <= 1 and (differ > 0).mean() < 0.01  # METRICS.md: a handful of pixels, one level


def test_matlab_convention_matches_reference_implementations(crop):
    _, f, ir, vi = crop
    b = matlab_grey(vi)
    got = evaluate_pair(f, ir, vi, convention="matlab")
    assert list(got) == list(METRIC_NAMES)
    h, w = f.shape
    F, A, B = (x.astype(float) for x in (f, ir, b))
    want = {
        "EN": ref_entropy(f),
        "SD": ref_sd(f),
        "SF": ref_sf(f),
        "AG": ref_ag_sum(f) / ((h - 1) * (w - 1)),
        "MI": ref_mi_matlab(f, ir) + ref_mi_matlab(f, b),
        "SCD": ref_corr(F - B, A) + ref_corr(F - A, B),
        "CC": (ref_corr(A, F) + ref_corr(B, F)) / 2,
        "MSE": (ref_mse(F / 255, A / 255) + ref_mse(F / 255, B / 255)) / 2,
        "VIF": ref_vifp(A, F) + ref_vifp(B, F),
        "Qabf": ref_qabf(F, A, B),
        "Nabf": ref_nabf(A, B, F),  # the toolbox's order: infrared in the fused slot
        "SSIM": (ref_ssim_matlab(F, A) + ref_ssim_matlab(F, B)) / 2,
    }
    want["PSNR"] = 20 * math.log10(255 / math.sqrt(want["MSE"]))
    assert_close(got, want, rel=1e-9)


def test_cddfuse_convention_matches_reference_implementations(crop):
    _, f, ir, vi = crop
    b = cddfuse_grey(vi)
    got = evaluate_pair(f, ir, vi, convention="cddfuse")
    F, A, B = (x.astype(float) for x in (f, ir, b))
    mse = (ref_mse(A, F) + ref_mse(B, F)) / 2
    want = {
        "EN": ref_entropy(f),
        "SD": ref_sd(f),
        "SF": ref_sf(f),
        "AG": ref_ag_sum(f) / f.size,
        "MI": ref_mi_nats(f, ir) + ref_mi_nats(f, b.astype(int)),
        "SCD": ref_corr(F - B, A) + ref_corr(F - A, B),
        "CC": (ref_corr(A, F) + ref_corr(B, F)) / 2,
        "MSE": mse,
        "PSNR": 10 * math.log10(float(F.max()) ** 2 / mse),
        "VIF": ref_vifp(A, F) + ref_vifp(B, F),
        "Qabf": ref_qabf(F, A, B),
        "SSIM": ref_ssim_skimage(F, A) + ref_ssim_skimage(F, B),
    }
    # cddfuse accumulates in float32 (METRICS.md: about 1e-7 relative against float64);
    # its SSIM takes variances as E[x^2] - E[x]^2 in float32, which cancels in flat dark
    # areas (1.3e-5 on the night crop). The exact float32 values are pinned in
    # test_cddfuse_convention_reproduces_cddfuse_evaluator.
    ssim_ref = want.pop("SSIM")
    assert_close(got, want, rel=2e-6)
    assert math.isclose(got["SSIM"], ssim_ref, rel_tol=5e-5)
    assert math.isnan(got["Nabf"]) and math.isnan(got["MS_SSIM"])


# Values printed by CDDFuse's utils/Evaluator.py on exactly these arrays (see the module
# docstring): F = make_fused(...) and A = infrared as float32, B = cddfuse_grey(visible).
CDDFUSE_EVALUATOR = {
    "00107D": {
        "EN": 7.089461795849855, "SD": 49.7987060546875, "SF": 19.24260139465332, "AG": 7.359626770019531,
        "MI": 3.9473158811174947, "SCD": 1.277034878730774, "CC": 0.8641414046287537, "PSNR": 18.846424102783203,
        "MSE": 782.8701171875, "VIF": 0.5757195722898539, "Qabf": 0.6227080821990967, "SSIM": 1.1342087859618908,
    },
    "01016N": {
        "EN": 6.529672021110009, "SD": 78.7395248413086, "SF": 9.574982643127441, "AG": 3.317972183227539,
        "MI": 4.297147611484151, "SCD": 0.5368446111679077, "CC": 0.9602828025817871, "PSNR": 16.548419952392578,
        "MSE": 1140.801025390625, "VIF": 0.9070317768065916, "Qabf": 0.6648639440536499, "SSIM": 1.122284306431902,
    },
    "00107D_full": {
        "EN": 6.80316590408348, "SD": 40.543540954589844, "SF": 12.611602783203125, "AG": 4.020431995391846,
        "MI": 2.6181875833469435, "SCD": 1.4768586158752441, "CC": 0.6052846908569336, "PSNR": 15.812283515930176,
        "MSE": 1574.359619140625, "VIF": 0.7621588583635078, "Qabf": 0.6249485015869141, "SSIM": 1.0496396225903097,
    },
}  # fmt: skip


def assert_cddfuse_evaluator(got: dict, want: dict) -> None:
    """Same float32 arithmetic as CDDFuse's evaluator: equal to the last bits (VIF sums its
    filters in another order, within the 1e-10), except PSNR: numpy's float32 log10 is not
    the same on every CPU (numpy dispatches by SIMD level). On a 2-core machine with AVX2 and
    no AVX-512 (numpy 2.4.5 and 2.4.6 alike) PSNR came out one float32 ulp (1.2e-7 relative)
    below the evaluator's value, which earlier CI machines reproduced exactly."""
    assert_close(got, {k: v for k, v in want.items() if k != "PSNR"}, rel=1e-10)
    assert_close(got, {"PSNR": want["PSNR"]}, rel=1e-6)


def test_cddfuse_convention_reproduces_cddfuse_evaluator(crop):
    name, f, ir, vi = crop
    assert_cddfuse_evaluator(evaluate_pair(f, ir, vi, convention="cddfuse"), CDDFUSE_EVALUATOR[name])


def test_full_size_pair_reproduces_cddfuse_evaluator():
    ir, vi = load_pair("00107D")
    got = evaluate_pair(make_fused(ir, vi), ir, vi, convention="cddfuse")
    assert_cddfuse_evaluator(got, CDDFUSE_EVALUATOR["00107D_full"])


def test_ms_ssim_is_the_toolbox_mef_ssim():
    ir, vi = load_pair("00107D")
    r, c = 160, 0
    ir, vi = ir[r : r + 48, c : c + 60], vi[r : r + 48, c : c + 60]
    f = make_fused(ir, vi)
    b = matlab_grey(vi)
    got = evaluate_pair(f, ir, vi, metrics=["MS_SSIM"])["MS_SSIM"]
    want = ref_mef_ssim(ir, b, f)
    assert 0.5 < want < 1
    assert math.isclose(got, want, rel_tol=1e-9), (got, want)


def test_ms_ssim_too_small_for_three_scales_is_minus_inf():
    ir, vi = load_pair("00107D")
    ir, vi = ir[:43, :60], vi[:43, :60]  # 43 / 4 < 11
    assert evaluate_pair(make_fused(ir, vi), ir, vi, metrics=["MS_SSIM"])["MS_SSIM"] == -math.inf


def test_cross_convention_relations(crop):
    _, f, ir, vi = crop
    m = evaluate_pair(f, ir, vi, convention="matlab")
    c = evaluate_pair(f, ir, vi, convention="cddfuse")
    h, w = f.shape
    assert math.isclose(m["AG"] / c["AG"], h * w / ((h - 1) * (w - 1)), rel_tol=1e-6)
    assert math.isclose(c["MSE"] / m["MSE"], 255**2, rel_tol=1e-6)
    f_max = float(f.max())
    assert math.isclose(m["PSNR"], c["PSNR"] + 20 * math.log10(255) + 20 * math.log10(255 / f_max), rel_tol=1e-6)
    for k in ("EN", "SD", "SF"):
        assert math.isclose(m[k], c[k], rel_tol=1e-6), k


def test_mi_of_an_image_with_itself_is_twice_its_entropy():
    ir, _ = load_pair("01016N")
    x = np.minimum(ir[:96, :128], 253)  # no 254/255, where the matlab joint histogram merges levels
    m = evaluate_pair(x, x, x, convention="matlab")
    c = evaluate_pair(x, x, x, convention="cddfuse")
    assert math.isclose(m["MI"], 2 * m["EN"], rel_tol=1e-12)
    assert math.isclose(c["MI"], 2 * c["EN"] * math.log(2), rel_tol=1e-12)  # nats


def test_matlab_mi_merges_grey_levels_254_and_255():
    x = np.tile(np.array([[253, 254, 255, 10]], dtype=np.uint8), (50, 12))
    m = evaluate_pair(x, x, x, convention="matlab", metrics=["EN", "MI"])
    # H(X) = 2 bits; the merged joint entropy is 1.5 bits, so MI(X, X) = 2.5 bits per source.
    assert math.isclose(m["EN"], 2.0, rel_tol=1e-12)
    assert math.isclose(m["MI"], 5.0, rel_tol=1e-12)


def test_ssim_of_identical_images_is_one(crop):
    _, f, _, _ = crop
    assert math.isclose(evaluate_pair(f, f, f, convention="matlab")["SSIM"], 1.0, rel_tol=1e-12)
    assert math.isclose(evaluate_pair(f, f, f, convention="cddfuse")["SSIM"], 2.0, rel_tol=1e-6)  # a sum of two


def test_qabf_of_identical_images_is_close_to_one(crop):
    _, f, _, _ = crop
    q = evaluate_pair(f, f, f, metrics=["Qabf"])["Qabf"]
    # With F = A = B the angle term is Ta / (1 + exp(-22 * 0.2)) everywhere, and the
    # toolbox's "gA == gF -> G = gF" branch leaves the strength term at about Tg
    # wherever the (integer Sobel) gradient is at least 1, so Qabf is a little below 1.
    upper = 0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert 0.97 < q <= upper + 1e-12


def test_swapping_the_sources_leaves_symmetric_metrics_unchanged(crop):
    _, f, ir, vi = crop
    vi_grey = matlab_grey(vi)
    for convention in ("matlab", "cddfuse"):
        forward = evaluate_pair(f, ir, vi_grey, convention=convention)
        swapped = evaluate_pair(f, vi_grey, ir, convention=convention)
        symmetric = [m for m in DEFINED[convention] if m != "Nabf"]
        for m in symmetric:
            assert math.isclose(forward[m], swapped[m], rel_tol=1e-6), (convention, m, forward[m], swapped[m])
    # The toolbox's Nabf puts the infrared image in the fused slot: not symmetric.
    m_fwd = evaluate_pair(f, ir, vi_grey, metrics=["Nabf"])["Nabf"]
    m_swp = evaluate_pair(f, vi_grey, ir, metrics=["Nabf"])["Nabf"]
    assert not math.isclose(m_fwd, m_swp, rel_tol=1e-3)
    assert math.isclose(m_fwd, nabf(ir.astype(float), vi_grey.astype(float), f.astype(float)), rel_tol=1e-12)


def test_vif_of_a_flat_reference_is_nan_in_matlab_and_one_in_cddfuse(crop):
    _, f, ir, _ = crop
    flat = np.full_like(ir, 90)
    m = evaluate_pair(f, flat, ir, metrics=["VIF"], convention="matlab")["VIF"]
    c = evaluate_pair(f, flat, ir, metrics=["VIF"], convention="cddfuse")["VIF"]
    assert math.isnan(m)
    assert math.isclose(c, 1.0 + ref_vifp(ir.astype(float), f.astype(float)), rel_tol=1e-9)


def test_input_kinds_give_the_same_scores(crop, tmp_path):
    import torch

    _, f, ir, vi = crop
    base = evaluate_pair(f, ir, vi, metrics=["EN", "MI", "Qabf"])
    as_float = evaluate_pair(f / 255.0, ir.astype(np.float32) / 255, vi / 255.0, metrics=["EN", "MI", "Qabf"])
    as_tensor = evaluate_pair(
        torch.from_numpy(f / 255.0)[None, None],
        torch.from_numpy(ir.astype(np.float32) / 255)[None],
        torch.from_numpy(vi.copy()).permute(2, 0, 1)[None],
        metrics=["EN", "MI", "Qabf"],
    )
    paths = []
    for name, arr, mode in (("f.png", f, "L"), ("ir.png", ir, "L"), ("vi.png", vi, "RGB")):
        Image.fromarray(arr, mode).save(tmp_path / name)
        paths.append(tmp_path / name)
    from_files = evaluate_pair(*paths, metrics=["EN", "MI", "Qabf"])
    # Grey levels held in floats (as CDDFuse's reader returns them) are taken as they are.
    as_levels = evaluate_pair(
        f.astype(np.float32), ir.astype(np.float64), vi.astype(np.float32), metrics=["EN", "MI", "Qabf"]
    )
    assert base == as_float == as_tensor == from_files == as_levels
    np.testing.assert_array_equal(read_grey(paths[2], "matlab"), matlab_grey(vi))
    np.testing.assert_array_equal(read_grey(paths[2], "cddfuse"), cddfuse_grey(vi))


def test_bad_inputs_raise_clear_errors(crop, tmp_path):
    _, f, ir, vi = crop
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate_pair(f[:-1], ir, vi)
    with pytest.raises(ValueError, match=r"\[0, 1\] scale"):
        evaluate_pair(f.astype(float) + 0.5, ir, vi)
    with pytest.raises(ValueError, match="unknown metric convention"):
        evaluate_pair(f, ir, vi, convention="octave")
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_pair(f, ir, vi, metrics=["QABF"])
    with pytest.raises(ValueError, match="too small"):
        evaluate_pair(f[:40, :40], ir[:40, :40], vi[:40, :40])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        evaluate_pair(bad, ir, vi)
    deep = tmp_path / "deep.png"
    Image.fromarray(ir.astype(np.uint16) * 256).save(deep)
    with pytest.raises(ValueError, match="8-bit"):
        evaluate_pair(deep, ir, vi)
