"""GPU benchmark of the network's LayerNorms (``ops.layer_norm``'s Triton kernels) at the
calls the network makes, and a sweep of their launch configuration.

Run from the repository root on a CUDA machine::

    python benchmarks/bench_norm.py --json norm.json            # the current configuration
    python benchmarks/bench_norm.py --sweep --json sweep.json   # every configuration of SWEEP

The calls are recorded from the network itself (random weights of the default
configuration, triton backend, bf16 autocast as the trainer and ``fuse --precision
bf16`` run it): every LayerNorm of one training step (batch 20, 229x229) and of one fuse
of a 481x649 pair, with their inputs' layouts (gates that are views of a wider tensor
included). ``train``: the training calls' forward and backward (gradients of every
input) one after another; ``fuse``: the fusing calls' forward under ``no_grad``; each
timed as the sum of its kernels' durations (torch.profiler; median of 5 passes after
one that compiles). The sweep checks each configuration's results against the default's.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Callable

import statistics

import torch
from bench_gpu import autocast, training_step, write_json
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from s4fusion import S4Fusion, ops
from s4fusion.ops import triton_norm as tn

SWEEP = {  # launch-configuration constants of s4fusion.ops.triton_norm and the values tried
    "TILE": (2048, 4096, 8192),
    "FWD_WARPS": (4, 8),
    "BWD_PROGRAMS_PER_SM": (4, 8),
    "BWD_WARPS": (4, 8),
}


def record_calls() -> dict[str, list[tuple]]:
    """The (x, weight, bias, eps, gate, matmul_input) of every LayerNorm call of one bf16
    training step and of one bf16 fuse at 481x649 (tensors detached, same layouts)."""
    calls: dict[str, list[tuple]] = {"train": [], "fuse": []}
    kernel = tn.layer_norm_triton

    def recorder(into: list) -> Callable:
        def norm(x, weight, bias, eps, gate=None, matmul_input=False):
            into.append((x.detach(), weight.detach(), bias.detach(), eps, None if gate is None else gate.detach(),
                         matmul_input))  # fmt: skip
            return kernel(x, weight, bias, eps, gate, matmul_input)

        return norm

    ops.set_backend("triton")
    try:
        ops._loaded[("triton", "norm")] = recorder(calls["train"])
        training_step("eager-bf16")()
        ops._loaded[("triton", "norm")] = recorder(calls["fuse"])
        torch.manual_seed(0)
        model = S4Fusion().cuda().eval()
        g = torch.Generator(device="cuda").manual_seed(0)
        ir, vi = (torch.rand(1, 1, 481, 649, device="cuda", generator=g) for _ in range(2))
        with torch.no_grad(), autocast(True):
            model(ir, vi)
    finally:
        ops._loaded[("triton", "norm")] = kernel
        ops.set_backend(None)
    return calls


def passes(calls: dict[str, list[tuple]]) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """``train`` and ``fuse`` (see the module's doc), each returning its results."""
    train_inputs = []
    for x, w, b, eps, gate, mm in calls["train"]:  # (the recorded tensors, detached: leaves of their own)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        gate_leaf = None if gate is None else gate.requires_grad_()
        with autocast(True):
            out = tn.layer_norm_triton(*leaves, eps, gate_leaf, mm)
        gout = torch.randn_like(out)
        train_inputs.append((leaves, gate_leaf, eps, mm, gout))

    def train() -> list[torch.Tensor]:
        results = []
        for leaves, gate_leaf, eps, mm, gout in train_inputs:
            inputs = leaves + ([gate_leaf] if gate_leaf is not None else [])
            with autocast(True):
                out = tn.layer_norm_triton(*leaves, eps, gate_leaf, mm)
            results += [out, *torch.autograd.grad(out, inputs, gout)]
        return results

    def fuse() -> list[torch.Tensor]:
        with torch.no_grad(), autocast(True):
            return [tn.layer_norm_triton(x, w, b, eps, gate, mm) for x, w, b, eps, gate, mm in calls["fuse"]]

    return {"train": train, "fuse": fuse}


def time_ms(fn: Callable[[], object], runs: int = 5) -> float:
    """Median over ``runs`` calls of ``fn`` of the GPU time of its kernels (the profiler's
    kernel durations: the calls are far shorter than their launches on the host; a
    CUDA graph of autograd.grad on these leaves failed to capture, H200, session 23)."""
    fn()  # (compiles this configuration's kernels)
    torch.cuda.synchronize()
    totals = []
    for _ in range(runs):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals.append(sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1000)
    return statistics.median(totals)


def worst_rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative L2 difference of a result from the expected one."""
    pairs = [(a.double(), e.double()) for a, e in zip(got, want)]
    return max(((a - e).norm() / e.norm().clamp_min(1e-30)).item() for a, e in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="time every configuration of SWEEP")
    args = parser.parse_args()
    calls = record_calls()
    runs = passes(calls)
    defaults = {name: getattr(tn, name) for name in SWEEP}
    expected = {name: fn() for name, fn in runs.items()}
    grid = [dict(zip(SWEEP, v)) for v in itertools.product(*SWEEP.values())] if args.sweep else [defaults]
    rows = []
    for config in grid:
        for name, value in config.items():
            setattr(tn, name, value)
        row = {**config, "rel_diff": max(worst_rel(fn(), expected[name]) for name, fn in runs.items())}
        for name, fn in runs.items():
            row[f"{name}_ms"] = time_ms(fn)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name, value in defaults.items():
        setattr(tn, name, value)
    result = {
        "device": torch.cuda.get_device_name(), "calls": {k: len(v) for k, v in calls.items()}, "default": defaults,
        "rows": rows, **{f"best_{name}": min(rows, key=lambda r: r[f"{name}_ms"]) for name in runs},
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
