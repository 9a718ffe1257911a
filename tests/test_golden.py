"""The released network's golden set (../shared/reference/golden, produced by the
authors' code): our modules loaded through ``from_released_checkpoint`` must
reproduce the output and every intermediate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion.ops import selective_scan_ref, set_backend

F32_TOL = 1e-5  # golden README section 5
F64_TOL = 1e-10


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def reference_backend():
    set_backend("reference")
    yield
    set_backend(None)


@pytest.fixture(scope="module")
def traced(released_path, golden_inputs):
    """float32 and float64 runs of the bare network with every intermediate."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        model = S4Fusion.from_released_checkpoint(released_path).to(dtype).eval()
        trace: dict = {}
        with torch.no_grad():
            model.forward_padded(
                golden_inputs["infrared_padded"].to(dtype), golden_inputs["visible_padded"].to(dtype), trace
            )
        out[dtype] = trace
    return out


def test_fused_float32_through_padding_wrapper(released_path, golden_inputs, golden_expected):
    model = S4Fusion.from_released_checkpoint(released_path).eval()
    with torch.no_grad():
        fused = model(golden_inputs["infrared"].float(), golden_inputs["visible"].float())
    assert fused.dtype == torch.float32
    assert rel(fused, golden_expected["fused"]) < F32_TOL


def test_fused_float64(released_path, golden_inputs, golden_expected):
    model = S4Fusion.from_released_checkpoint(released_path).double().eval()
    with torch.no_grad():
        fused = model(golden_inputs["infrared"], golden_inputs["visible"])
    assert fused.dtype == torch.float64
    assert rel(fused, golden_expected["fused"]) < F64_TOL


def test_padded_inputs_match_the_released_padding(golden_inputs):
    model = S4Fusion()
    top, bottom, left, right = model.padding_for(50, 67)
    assert (top, bottom, left, right) == (5, 6, 3, 3)
    padded = F.pad(golden_inputs["infrared"], (left, right, top, bottom))
    assert torch.equal(padded, golden_inputs["infrared_padded"])


GOLDEN_INTERMEDIATES = [
    "embed.x", "embed.y",
    "enc.x.0.block0.out", "enc.y.0.block0.out", "enc.x.0.out", "enc.y.0.out",
    "enc.x.1.block0.out", "enc.x.1.block1.out", "enc.y.1.block0.out", "enc.y.1.block1.out",
    "enc.x.1.out", "enc.y.1.out", "enc.x.2.out", "enc.y.2.out",
    "fusion.0.out",
    *[f"fusion.{i}.block{j}.out_{m}" for i in (1, 2) for j in range(3) for m in "xy"],
    "fusion.1.out", "fusion.2.out",
    "dec.in", "dec.0.out", "dec.1.upsample_out", "dec.1.block0.out", "dec.1.out",
    "dec.2.upsample_out", "dec.2.out", "fold.in", "fold.out", "fused.padded",
]  # fmt: skip


@pytest.mark.parametrize("name", GOLDEN_INTERMEDIATES)
def test_intermediate(traced, golden_expected, name):
    assert rel(traced[torch.float32][name], golden_expected[name]) < F32_TOL
    assert rel(traced[torch.float64][name], golden_expected[name]) < F64_TOL


def test_every_golden_network_tensor_is_checked(golden_expected):
    network = {k for k in golden_expected if not k.startswith(("debug.", "paper.")) and k not in ("fused", "fused_rgb")}
    assert network == set(GOLDEN_INTERMEDIATES)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.float64, F64_TOL)])
def test_paper_topology(released_path, golden_inputs, golden_expected, dtype, tol):
    model = S4Fusion.from_released_checkpoint(released_path, topology="paper").to(dtype).eval()
    assert model.config.topology == "paper"
    with torch.no_grad():
        fused = model(golden_inputs["infrared"].to(dtype), golden_inputs["visible"].to(dtype))
    assert rel(fused, golden_expected["paper.fused"]) < tol
    # the two topologies really differ (facts 1.4: by 92 %)
    assert rel(fused, golden_expected["fused"]) > 0.5


def _directions(a: torch.Tensor) -> list[torch.Tensor]:
    """Independent unfolding of a (b, d, H, W) map into the four released scan orders."""
    b, d, H, W = a.shape
    row = a.reshape(b, d, H * W)
    col = a.transpose(2, 3).reshape(b, d, H * W)
    return [row, col, row.flip(-1), col.flip(-1)]


def _to_rowmajor(y: torch.Tensor, k: int, H: int, W: int) -> torch.Tensor:
    if k >= 2:
        y = y.flip(-1)
    if k % 2:
        y = y.reshape(*y.shape[:2], W, H).transpose(2, 3).reshape(*y.shape[:2], H * W)
    return y


def test_ss2d_core_and_directions(released_path, golden_expected):
    """Per-direction SS2D outputs of layers_x[2].blocks[0], computed with an
    independent unfolding and the plain scan, and the module's fused core."""
    model = S4Fusion.from_released_checkpoint(released_path).double()
    block = model.encoder_ir[2].blocks[0]
    ss2d = block.ss2d
    with torch.no_grad():
        a, _ = ss2d.branch_in(block.norm(golden_expected["enc.x.1.out"]))
        assert rel(a, golden_expected["debug.enc.x.2.block0.ss2d.core_in"]) < F64_TOL
        b, d, H, W = a.shape
        R, N = ss2d.dt_rank, ss2d.d_state
        A = -torch.exp(ss2d.A_logs)
        outs = []
        for k, s in enumerate(_directions(a)):
            P = torch.einsum("cd,bdl->bcl", ss2d.x_proj_weight[k], s)
            delta = torch.einsum("dr,brl->bdl", ss2d.dt_projs_weight[k], P[:, :R])
            rows = slice(k * d, (k + 1) * d)
            y = selective_scan_ref(
                s, delta, A[rows], P[:, None, R : R + N], P[:, None, R + N :], ss2d.Ds[rows],
                ss2d.dt_projs_bias[k],
            )  # fmt: skip
            outs.append(_to_rowmajor(y, k, H, W))
        # golden order: row-major, reversed row-major, column-major, reversed column-major
        golden = golden_expected["debug.enc.x.2.block0.ss2d.dir_outputs"]
        for g, k in enumerate((0, 2, 1, 3)):
            assert rel(outs[k], golden[g]) < F64_TOL
        assert rel(ss2d.core(a), golden.sum(0)) < F64_TOL


def test_cross_ss2d_scan_inputs_and_output(released_path, golden_expected):
    """Patch Mark, Interleaving (infrared first, each modality unfolded before
    interleaving), delta/B/C from unmarked features: the scan of CMSA block 0 at
    scale 2, batch element 0."""
    model = S4Fusion.from_released_checkpoint(released_path).double()
    blk = model.cmsa[2].blocks[0]
    g = {k.rsplit(".", 1)[1]: v for k, v in golden_expected.items() if k.startswith("debug.fusion.2.block0.scan.")}
    with torch.no_grad():
        a_x, _ = blk.branch_in(golden_expected["enc.x.1.out"][:1])
        a_y, _ = blk.branch_in(golden_expected["enc.y.1.out"][:1])
        H, W = a_x.shape[-2:]
        u, low, B, C = blk.scan_inputs(a_x, a_y)  # map layout
        delta = blk.delta(low)

        def interleave(t: torch.Tensor) -> torch.Tensor:  # (1, 2, K, c, L) -> (1, K, c, 2L)
            seqs = []
            for k in range(4):
                per_mod = [_directions(t[:, m, k].reshape(1, -1, H, W))[k] for m in range(2)]
                seqs.append(torch.stack(per_mod, dim=-1).flatten(-2))
            return torch.stack(seqs, 1)

        u_i = interleave(u[:, :, None].expand(-1, -1, 4, -1, -1)).reshape(1, -1, 2 * H * W)
        assert rel(u_i, g["u"]) < F64_TOL
        assert rel(interleave(delta).reshape(1, -1, 2 * H * W), g["delta"]) < F64_TOL
        assert rel(interleave(B), g["B"]) < F64_TOL
        assert rel(interleave(C), g["C"]) < F64_TOL
        assert rel(-torch.exp(blk.A_logs), g["A"]) < F64_TOL
        assert rel(blk.Ds, g["D"]) < F64_TOL
        assert rel(blk.dt_projs_bias.reshape(-1), g["delta_bias"]) < F64_TOL
        out = selective_scan_ref(g["u"], g["delta"], g["A"], g["B"], g["C"], g["D"], g["delta_bias"])
        assert rel(out, g["out"]) < F64_TOL


def test_scan_unit(golden_dir):
    from safetensors.torch import load_file

    t = load_file(str(golden_dir / "scan_unit.safetensors"))
    out = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"])
    assert rel(out, t["out"]) < 1e-12
    out32 = selective_scan_ref(*(t[k].float() for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")))
    assert out32.dtype == torch.float32 and rel(out32, t["out"]) < F32_TOL


def test_default_config_is_the_release():
    cfg = S4FusionConfig()
    assert cfg.topology == "released"
    assert (cfg.dims, cfg.depths, cfg.decoder_depths) == ((48, 96, 192), (1, 2, 1), (1, 2, 1))
    assert (cfg.ss2d_d_state, cfg.cmsa_d_state, cfg.cmsa_depth, cfg.expand, cfg.norm_eps) == (12, 18, 3, 1.5, 1e-5)
