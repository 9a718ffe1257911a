"""GPU benchmark of S4Fusion (issue 3): fusing one pair at four sizes, the training
step, peak memory, and how time grows with the number of pixels.

Run from the repository root on a CUDA machine::

    python benchmarks/bench_gpu.py --json results.json

Everything is timed on the device it runs on with CUDA events (median, min and max
of 20 runs after 3 warm-ups; 5 runs at the two largest sizes), random weights of
the default (released) configuration, as RELEASED-MODEL-FACTS.md section 7 measured
the released code. Peak memory is the rise of ``torch.cuda.max_memory_allocated``
over the inputs (and, for training, over model, optimizer state and batch).

Modes: ``eager`` runs the module as is; ``graph`` replays one CUDA graph of the
whole forward (or of forward, loss, backward and AdamW step); ``bf16`` adds
bfloat16 autocast (the training default of this package). The reference scan
backend (a Python loop over tokens) is timed at the smallest size only.
The training loss is the project's intensity term ``weighted_l1_loss`` with
weights 1/2 and 1/2, i.e. mean |f - ir| / 2 + mean |f - vi| / 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from s4fusion import S4Fusion
from s4fusion.losses import weighted_l1_loss
from s4fusion.ops import set_backend

FUSE_SIZES = [(241, 325), (481, 649), (961, 1297), (1921, 2593)]  # (H, W), already of the 12k+1 form
TRAIN_BATCH, TRAIN_SIZE = 20, 229
RELEASED = {  # RELEASED-MODEL-FACTS.md section 7 (one H200, float32): median ms, peak MiB
    (241, 325): (37.2, 203),
    (481, 649): (37.4, 671),
    (961, 1297): (75.8, 2687),
    (1921, 2593): (318.5, 10743),
    "train": (204.5, 15025),
}
TARGETS = {(481, 649): 3.0, (961, 1297): 10.0, "train": 35.0}


def time_cuda(fn: Callable[[], object], warmup: int, runs: int) -> dict:
    """Median/min/max milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def peak_mib(fn: Callable[[], object]) -> float:
    """Rise of the allocator's peak over what is allocated before ``fn``, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def autocast(bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (already warmed up: every kernel compiled) into one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def count_kernels(fn: Callable[[], object]) -> int:
    """GPU kernels launched by one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower())


# ----------------------------------------------------------------------- fusing


def bench_fuse(model: S4Fusion, size: tuple[int, int], mode: str, backend: str) -> dict:
    H, W = size
    g = torch.Generator(device="cuda").manual_seed(0)
    ir = torch.rand(1, 1, H, W, device="cuda", generator=g)
    vi = torch.rand(1, 1, H, W, device="cuda", generator=g)
    bf16 = "bf16" in mode
    set_backend(backend)
    try:

        def fuse():
            with torch.no_grad(), autocast(bf16):
                return model(ir, vi)

        if backend == "reference":  # seconds per run: no warm-up beyond the peak-memory run
            memory = peak_mib(fuse)
            timing = time_cuda(fuse, warmup=0, runs=2)
        else:
            fuse()  # compile every kernel variant outside of timing and capture
            memory = peak_mib(fuse)
            run = graphed(fuse) if mode.startswith("graph") else fuse
            timing = time_cuda(run, warmup=3, runs=5 if H * W > 1000 * 1000 else 20)
        out = {"size": f"{H}x{W}", "pixels": H * W, "mode": mode, "backend": backend, "peak_mib": memory, **timing}
        if mode == "eager" and size == (481, 649) and backend != "reference":
            out["kernels"] = count_kernels(fuse)
        return out
    finally:
        set_backend(None)


# --------------------------------------------------------------------- training


def bench_train(mode: str) -> dict:
    torch.manual_seed(0)
    model = S4Fusion().cuda().train()
    graph = mode.startswith("graph")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graph)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (TRAIN_BATCH, 1, TRAIN_SIZE, TRAIN_SIZE)
    ir = torch.rand(shape, device="cuda", generator=g)
    vi = torch.rand(shape, device="cuda", generator=g)
    w = torch.full((TRAIN_BATCH,), 0.5, device="cuda")
    bf16 = "bf16" in mode
    set_backend("triton")
    try:

        def step():
            opt.zero_grad(set_to_none=not graph)
            with autocast(bf16):
                fused = model(ir, vi)
            loss = weighted_l1_loss(fused.float(), ir, vi, w, w)
            loss.backward()
            opt.step()
            return loss

        step()  # compile, allocate optimizer state
        memory = peak_mib(step)
        run = graphed(step) if graph else step
        timing = time_cuda(run, warmup=3, runs=20)
        return {"size": f"{TRAIN_BATCH}x{TRAIN_SIZE}x{TRAIN_SIZE}", "mode": mode, "peak_mib": memory, **timing}
    finally:
        set_backend(None)


# ---------------------------------------------------------------------- report


def exponent(rows: list[dict], mode: str) -> Optional[float]:
    """Least-squares slope of log(time) against log(pixels), 481x649 .. 1921x2593."""
    pts = [(math.log(r["pixels"]), math.log(r["median_ms"])) for r in rows if r["mode"] == mode and r["pixels"] >= 481 * 649]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def markdown(result: dict) -> str:
    lines = [
        f"Card: **{result['device']}** (torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']})",
        "",
        "| measurement | mode | median ms (min-max) | peak MiB | target | released code (H200) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["fuse"]:
        size = tuple(int(s) for s in r["size"].split("x"))
        target = TARGETS.get(size)
        rel_ms, rel_mib = RELEASED[size]
        name = f"fuse {r['size']}" + (" (reference scan)" if r["backend"] == "reference" else "")
        lines.append(
            f"| {name} | {r['mode']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['peak_mib']:.0f} | {'<= %g ms' % target if target else ''} | {rel_ms} ms, {rel_mib} MiB |"
        )
    for r in result["train"]:
        rel_ms, rel_mib = RELEASED["train"]
        lines.append(
            f"| training step {r['size']} | {r['mode']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['peak_mib']:.0f} | <= {TARGETS['train']:g} ms, <= {rel_mib / 2:.0f} MiB | {rel_ms} ms, {rel_mib} MiB |"
        )
    lines.append("")
    for mode, e in result["exponent"].items():
        lines.append(f"- fitted exponent of time vs pixels, 481x649 .. 1921x2593, {mode}: {e:.3f} (target <= 1.1)")
    kernels = [r["kernels"] for r in result["fuse"] if "kernels" in r]
    if kernels:
        lines.append(f"- GPU kernels launched by one eager forward at 481x649: {kernels[0]} (released code: 1,865)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements to this JSON file")
    parser.add_argument("--modes", default="eager,graph,graph-bf16", help="fusing modes (comma separated)")
    parser.add_argument("--train-modes", default="eager,graph,graph-bf16", help="training modes (comma separated)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "fuse": [],
        "train": [],
    }
    model = S4Fusion().cuda().eval()
    for size in FUSE_SIZES:
        for mode in args.modes.split(","):
            result["fuse"].append(bench_fuse(model, size, mode, "triton"))
            print(json.dumps(result["fuse"][-1]), flush=True)
    result["fuse"].append(bench_fuse(model, FUSE_SIZES[0], "eager", "reference"))
    print(json.dumps(result["fuse"][-1]), flush=True)
    del model
    torch.cuda.empty_cache()
    for mode in args.train_modes.split(","):
        result["train"].append(bench_train(mode))
        print(json.dumps(result["train"][-1]), flush=True)
        torch.cuda.empty_cache()
    result["exponent"] = {m: exponent(result["fuse"], m) for m in args.modes.split(",")}
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
