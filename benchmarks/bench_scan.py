"""GPU benchmark of the scan op alone (issue 3), at the shapes the network feeds it.

Run from the repository root on a CUDA machine::

    python benchmarks/bench_scan.py --json scan.json
    python benchmarks/bench_scan.py --sweep forward --json sweep.json   # launch configurations
    python benchmarks/bench_scan.py --proj --json proj.json   # the delta up-projection

The inputs are made by the network's own blocks (``SS2D.project`` and
``CMSABlock.scan_inputs`` on random activations; bfloat16 and float16 under autocast),
so their memory layout is the one the network passes: u and delta with their channels
innermost, B and C views of the projection's layout (``ops.projection_rows``). Cases: every scan of one fused
481x649 pair (released topology: VSS blocks at the three scales, CMSA at the two
coarser ones) and of the training batch (20 x 229x229). Each case is captured
in a CUDA graph and timed with CUDA events: median of 20 replays after 3
warm-ups; ``forward`` under ``torch.no_grad()``, ``train`` forward and backward
of every input.

``--sweep forward`` times the forward at each launch configuration of the triton
backend (``FWD_*`` and ``TARGET_LANES`` in ``s4fusion.ops.triton_scan``, the grid in
``SWEEPS``) over the fusing cases, ``--sweep combine`` the same with the chunk
combine's ``COMBINE_*``,
``--sweep backward`` forward and backward (``BWD_*``) over the training cases,
``--sweep train-forward`` the same with the forward kernel's launch constants
(``FWD_CB``, ``SWEEP_CB``, ``ADJOINT_PF``: the forward passes and the backward's walk
at the training batch), ``--sweep train-combine`` with the chunk combine's ``SHORT_*`` (the
constants of directions of at most ``SHORT_SLOTS`` chunk slots: the training batch's
whole lines, 19 to 76 slots per direction; the fusing cases' finer maps have hundreds,
and ``--sweep combine`` times ``COMBINE_*``, which those use); ``--dtype`` gives the
inputs' dtype (default float32; the trainer runs bfloat16). Each configuration is
checked against the default one's results, and the one with the smallest total is
reported.

``--sweep proj-forward`` and ``--sweep proj-backward`` time the bfloat16 delta
up-projection's launch constants (``s4fusion.ops.triton_proj``; the grids in
``PROJ_SWEEPS``): its forward under no_grad over every case, its forward and backward
over the training cases.

``--proj`` times the delta up-projection (``ops.dt_project``) under ``no_grad`` at
the same cases, the triton backend's against the reference (PyTorch's batched
product) in the same run, in float32 and in bfloat16 (``low`` in bfloat16, as
autocast's projection gives it), with the relative difference between the two.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial
from typing import Callable

import torch
from bench_gpu import graphed, time_cuda, write_json

from s4fusion.models import S4FusionConfig
from s4fusion.models.cmsa import CMSABlock
from s4fusion.models.ss2d import SS2D
from s4fusion.ops import cross_scan, dt_project
from s4fusion.ops import triton_proj as tp
from s4fusion.ops import triton_scan as ts

# (name, batch, H, W of the token map, scale, kind, scans of this shape per pass)
FUSE_CASES = [
    ("fuse s0 vss", 1, 160, 216, 0, "vss", 3),
    ("fuse s1 vss", 1, 80, 108, 1, "vss", 6),
    ("fuse s2 vss", 1, 40, 54, 2, "vss", 3),
    ("fuse s1 cmsa", 1, 80, 108, 1, "cmsa", 3),
    ("fuse s2 cmsa", 1, 40, 54, 2, "cmsa", 3),
]
TRAIN_CASES = [
    ("train s0 vss", 20, 76, 76, 0, "vss", 3),
    ("train s1 vss", 20, 38, 38, 1, "vss", 6),
    ("train s2 vss", 20, 19, 19, 2, "vss", 3),
    ("train s1 cmsa", 20, 38, 38, 1, "cmsa", 3),
    ("train s2 cmsa", 20, 19, 19, 2, "cmsa", 3),
]


def _block(scale: int, kind: str) -> SS2D | CMSABlock:
    """A block of the default network at this scale (``vss``: SS2D, ``cmsa``: CMSABlock),
    on the GPU, with the seeded random weights of this benchmark."""
    cfg = S4FusionConfig()
    dim = cfg.dims[scale]
    args = (cfg.expand, cfg.dt_rank(dim), cfg.d_conv, cfg.norm_eps)
    torch.manual_seed(scale)
    if kind == "vss":
        return SS2D(dim, cfg.ss2d_d_state, *args).cuda()
    return CMSABlock(dim, cfg.cmsa_d_state, *args).cuda()


def scan_inputs(batch: int, H: int, W: int, scale: int, kind: str, dtype: torch.dtype) -> tuple:
    """The scan arguments of one block of the default network at this map size."""
    block = _block(scale, kind)
    low = dtype in (torch.bfloat16, torch.float16)  # made as the network makes them: under autocast
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=low):
        if kind == "vss":
            a = block.conv_act(torch.randn(batch, H, W, block.d_inner, device="cuda"))
            u = a.reshape(batch, 1, block.d_inner, H * W)
            low, B, C = block.project(u, block.x_proj_weight[None])
        else:
            a = [block.conv_act(torch.randn(batch, H, W, block.d_inner, device="cuda")) for _ in range(2)]
            u, low, B, C = block.scan_inputs(*a)
        delta = block.delta(low)
    A = -torch.exp(block.A_logs.detach())
    extra = (block.Ds.detach(), block.dt_projs_bias.detach().reshape(-1))
    assert B.dtype == C.dtype == dtype, (B.dtype, dtype)  # (their layout is the projection's, as in the network)
    return (u.to(dtype), delta.to(dtype), A, B, C) + extra


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` replayed as one CUDA graph (CUDA events, 3
    warm-ups, 20 runs): the GPU time of its kernels, without the host's launch
    overhead, which at these sizes is as long as the kernels themselves."""
    return time_cuda(graphed(fn), warmup=3, runs=20)["median_ms"]


def bench_case(case: tuple, dtype: torch.dtype, train: bool) -> dict:
    name, batch, H, W, scale, kind, count = case
    x = scan_inputs(batch, H, W, scale, kind, dtype)
    if train:
        x = tuple(t.detach().requires_grad_() for t in x)
        gout = torch.randn_like(x[0])  # in u's layout (channels innermost), as the network hands dL/dy over

        def run():
            out = cross_scan(*x, H, W, backend="triton")
            torch.autograd.grad(out, x, gout)

    else:

        def run():
            with torch.no_grad():
                cross_scan(*x, H, W, backend="triton")

    ms = time_ms(run)
    return {"case": name, "dtype": str(dtype).split(".")[-1], "mode": "train" if train else "forward",
            "median_ms": ms, "count": count, "total_ms": ms * count}  # fmt: skip


SWEEPS = {  # launch-configuration constants of s4fusion.ops.triton_scan and the values tried
    "forward": {
        "FWD_CB": ((1, 1), (2, 1)),  # channels per lane for M = 1, M = 2
        "FWD_PREFETCH": ((False, False), (True, False), (True, True)),  # for M = 1, M = 2
        "FWD_UNROLL": (1, 2),
        "FWD_LANES": (128,),
        "TARGET_LANES": (1 << 17,),
    },
    "combine": {"COMBINE_ROWS": (16, 32, 64, 128), "COMBINE_STATES": (16, 32, 64), "COMBINE_WARPS": (1, 4)},
    "backward": {
        "BWD_CB": (1, 2), "BWD_LANES": (32,), "BWD_STEPS": (4, 8), "BWD_GROUP": (4, 8), "BWD_PARTS": (2, 4, 8),
    },  # fmt: skip
    "train-forward": {
        "FWD_CB": ((1, 1), (2, 1), (2, 2)), "SWEEP_CB": (1, 2),
        "ADJOINT_PF": ((False, False), (False, True), (True, True)),
    },  # fmt: skip
    "train-combine": {"SHORT_ROWS": (8, 16, 32, 64), "SHORT_STATES": (16, 32, 64, 128), "SHORT_WARPS": (1, 2, 4)},
}
TRAIN_SWEEPS = ("backward", "train-forward", "train-combine")  # sweeps over the training cases, forward and backward
PROJ_SWEEPS = {  # launch-configuration constants of s4fusion.ops.triton_proj and the values tried
    "proj-forward": {"TILE": (2048, 4096, 8192), "WARPS": (1, 2, 4), "PROGRAMS_PER_SM": (4, 8, 16)},
    "proj-backward": {
        "BWD_TOKENS": (32, 64), "BWD_TILE": (8192, 16384, 32768), "BWD_WARPS": (2, 4), "BWD_PROGRAMS_PER_SM": (2, 4, 8),
    },  # fmt: skip
}


def proj_inputs(batch: int, H: int, W: int, scale: int, kind: str, dtype: torch.dtype) -> tuple:
    """(low, weight) of the up-projection of one block of the default network at this
    map size: low a view of the token-major projection (b, M, L, K, R + 2N), as
    ``ScanParams.project`` passes it."""
    block = _block(scale, kind)
    R, N, weight = block.dt_rank, block.d_state, block.dt_projs_weight.detach()
    M, K = (1 if kind == "vss" else 2), weight.shape[0]
    g = torch.Generator(device="cuda").manual_seed(scale)
    P = torch.randn(batch, M, H * W, K, R + 2 * N, device="cuda", generator=g, dtype=dtype)
    return P[..., :R].permute(0, 1, 3, 2, 4), weight


def bench_proj() -> list[dict]:
    """The up-projection under no_grad at every case, reference and triton (see the
    module's doc)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for case in FUSE_CASES + TRAIN_CASES:
            low, weight = proj_inputs(*case[1:6], dtype)
            row = {"case": case[0], "dtype": str(dtype).split(".")[-1], "count": case[6]}
            outs = {}
            for backend in ("reference", "triton"):

                def run(backend=backend):
                    with torch.no_grad():
                        return dt_project(low, weight, backend=backend)

                outs[backend] = run()
                row[f"{backend}_ms"] = time_ms(run)
            ref = outs["reference"].float()
            row["rel_diff"] = ((outs["triton"].float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _time_configs(module, grid: dict, cases: list, within: Callable[[float], bool]) -> dict:
    """Times every combination of ``grid`` (launch constants of ``module`` and the values
    tried) over ``cases``, (name, scans per pass, run: the results of one call); each
    configuration's results are checked against the default configuration's (largest
    relative L2 difference, ``rel_diff``), and the fastest one whose difference ``within``
    allows is reported. The defaults are set again at the end."""
    defaults = {name: getattr(module, name) for name in grid}
    expected = [run() for _, _, run in cases]
    rows = []
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        for name, value in config.items():
            setattr(module, name, value)
        per_case, worst = {}, 0.0
        for (name, count, run), want in zip(cases, expected):
            worst = max(worst, *(((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
                                 for a, e in zip(run(), want)))
            per_case[name] = count * time_ms(run)
        rows.append({**config, "total_ms": sum(per_case.values()), "rel_diff": worst, "cases_ms": per_case})
        print(json.dumps(rows[-1]), flush=True)
    for name, value in defaults.items():
        setattr(module, name, value)
    best = min((r for r in rows if within(r["rel_diff"])), key=lambda r: r["total_ms"], default=None)
    return {"rows": rows, "best": best, "default": defaults}


def _proj_results(low: torch.Tensor, weight: torch.Tensor, train: bool, gout: torch.Tensor) -> list[torch.Tensor]:
    if not train:
        with torch.no_grad():
            return [dt_project(low, weight, backend="triton")]
    x = (low.detach().requires_grad_(), weight.detach().requires_grad_())
    out = dt_project(*x, backend="triton")
    return [out, *torch.autograd.grad(out, x, gout)]


def sweep_proj(which: str) -> dict:
    """Times every combination of ``PROJ_SWEEPS[which]`` for the bfloat16 up-projection
    (``proj-forward``: every case under no_grad; ``proj-backward``: the training cases,
    forward and backward), checks each against the default configuration's results (the
    forward bit for bit, the backward within 1e-5: its sums' order changes with the
    tiles)."""
    train = which == "proj-backward"
    cases = []
    for case in TRAIN_CASES if train else FUSE_CASES + TRAIN_CASES:
        low, weight = proj_inputs(*case[1:6], torch.bfloat16)
        b, M, K, L, _ = low.shape
        gout = torch.randn(b, M, K, L, weight.shape[1], device=low.device, dtype=low.dtype)
        gout = gout.transpose(3, 4)  # (channels innermost, as the scan hands it over)
        cases.append((case[0], case[6], partial(_proj_results, low, weight, train, gout)))
    tol = 1e-5 if train else 0.0
    return {**_time_configs(tp, PROJ_SWEEPS[which], cases, lambda diff: diff <= tol), "dtype": "bfloat16"}


def _results(x: tuple, H: int, W: int, train: bool, gout: torch.Tensor) -> list[torch.Tensor]:
    if not train:
        with torch.no_grad():
            return [cross_scan(*x, H, W, backend="triton")]
    xs = [t.detach().requires_grad_() for t in x]
    out = cross_scan(*xs, H, W, backend="triton")
    return [out, *torch.autograd.grad(out, xs, gout)]


def sweep(which: str, dtype: torch.dtype = torch.float32) -> dict:
    """Times every combination of ``SWEEPS[which]`` (forward and combine: the fusing
    cases under no_grad; ``TRAIN_SWEEPS``: the training cases, forward and backward) with
    inputs in ``dtype``, checks each against the default configuration's results
    (relative L2 below 1e-5 in float32, 2e-2 in bfloat16 or float16, whose outputs differ
    by an ulp where the atomic sums' order rounds them apart)."""
    train = which in TRAIN_SWEEPS
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    cases = []
    for case in TRAIN_CASES if train else FUSE_CASES:
        x = scan_inputs(*case[1:6], dtype)
        gout = torch.randn_like(x[0])  # in u's layout (channels innermost), as the network hands dL/dy over
        cases.append((case[0], case[6], partial(_results, x, case[2], case[3], train, gout)))
    return {**_time_configs(ts, SWEEPS[which], cases, lambda diff: diff < tol), "dtype": str(dtype).split(".")[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument(
        "--sweep", choices=sorted(SWEEPS) + sorted(PROJ_SWEEPS), help="time the launch configurations of one pass"
    )
    dtypes = ("float32", "bfloat16", "float16")
    parser.add_argument("--dtype", choices=dtypes, default="float32", help="the inputs of --sweep")
    parser.add_argument("--proj", action="store_true", help="time the delta up-projection instead of the scan")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    result: dict = {"device": torch.cuda.get_device_name()}
    if args.sweep in PROJ_SWEEPS:
        result["sweep"] = sweep_proj(args.sweep)
    elif args.sweep:
        result["sweep"] = sweep(args.sweep, getattr(torch, args.dtype))
    elif args.proj:
        result["proj"] = rows = bench_proj()
        for dtype in ("float32", "bfloat16"):
            for kind in ("fuse", "train"):
                sel = [r for r in rows if r["dtype"] == dtype and r["case"].startswith(kind)]
                ref, tri = (sum(r[f"{b}_ms"] * r["count"] for r in sel) for b in ("reference", "triton"))
                print(f"{kind} cases, {dtype}: up-projections of one forward: "
                      f"reference {ref:.3f} ms, triton {tri:.3f} ms")  # fmt: skip
    else:
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            for case in FUSE_CASES:
                rows.append(bench_case(case, dtype, train=False))
                print(json.dumps(rows[-1]), flush=True)
            for case in TRAIN_CASES:
                rows.append(bench_case(case, dtype, train=True))
                print(json.dumps(rows[-1]), flush=True)
        result["rows"] = rows
        for dtype in ("float32", "bfloat16"):
            for mode in ("forward", "train"):
                total = sum(r["total_ms"] for r in rows if r["dtype"] == dtype and r["mode"] == mode)
                print(f"{mode} {dtype}: all scans of one pass {total:.2f} ms")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
