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
whole forward (or of forward, loss, backward and AdamW step); ``compile`` runs the
network compiled by ``torch.compile`` (``s4fusion.api.compiled``: inductor, static
shapes, a graph break at every scan) and replays one CUDA graph of that; ``bf16``
adds bfloat16 autocast (the training default of this package) and cuDNN's benchmark
mode, as the fusing API and the trainer run bf16; the ``graph-bf16`` fuse runs the
network through ``s4fusion.cast_weights.CastWeights``, as the fusing API's graphs do
under autocast (the weights' casts as one refresh of bf16 copies), and so does the
uncompiled bf16 training step, as the trainer's ``TrainPass`` does (the casts, and the
widening of their gradients, as one multi-tensor copy each). Compilation
happens in the warm-up, outside of timing; its wall time (compiling and the first
run) is reported as ``compile_s``. A mode that fails is reported with its error
and the others still run (exit code 1). The reference scan
backend (a Python loop over tokens) is timed at the smallest size only.
The training loss is the project's intensity term ``weighted_l1_loss`` with
weights 1/2 and 1/2, i.e. mean |f - ir| / 2 + mean |f - vi| / 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional

import torch

from s4fusion import S4Fusion
from s4fusion.api import compiled, cudnn_autotune
from s4fusion.cast_weights import CastWeights
from s4fusion.cuda_graphs import record
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
MODES = ("eager", "bf16", "graph", "graph-bf16", "compile", "compile-bf16")
KERNEL_COUNT_SIZE = (481, 649)


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
    """Capture ``fn`` (already warmed up: every kernel compiled) into one CUDA graph on
    the current device (``s4fusion.cuda_graphs.record``: one more unrecorded run first)."""
    graph, _ = record(fn, torch.device("cuda", torch.cuda.current_device()))
    return graph.replay


def graph_mode(mode: str) -> bool:
    """Whether ``mode`` replays a CUDA graph (the compile modes do, of the compiled call)."""
    return mode.startswith(("graph", "compile"))


def warm_up(fn: Callable[[], object]) -> float:
    """Run ``fn`` once (compiling every kernel variant); its wall time in seconds."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def attempt(measure: Callable[[], dict], **labels) -> dict:
    """``measure()``, or, when it raises, ``labels`` with the error: one failing mode
    must not abort the others."""
    try:
        return measure()
    except Exception as e:  # reported in the results instead
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        return {**labels, "error": f"{type(e).__name__}: {e}"}


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
    net = compiled(model) if mode.startswith("compile") else model
    if mode == "graph-bf16":  # as the fusing API's graphs run under autocast
        net = CastWeights(model, torch.bfloat16)
    set_backend(backend)
    try:
        with cudnn_autotune(torch.device("cuda"), "bf16" if bf16 else "fp32"):  # as the fusing API does
            def fuse():
                with torch.no_grad(), autocast(bf16):
                    return net(ir, vi)

            out = {"size": f"{H}x{W}", "pixels": H * W, "mode": mode, "backend": backend}
            if backend == "reference":  # seconds per run: no warm-up beyond the peak-memory run
                memory = peak_mib(fuse)
                timing = time_cuda(fuse, warmup=0, runs=2)
            else:
                out["compile_s"] = warm_up(fuse)  # every kernel variant, outside of timing and capture
                memory = peak_mib(fuse)
                run = graphed(fuse) if graph_mode(mode) else fuse
                timing = time_cuda(run, warmup=3, runs=5 if H * W > 1000 * 1000 else 20)
            out.update(peak_mib=memory, **timing)
            if mode in ("eager", "compile") and size == KERNEL_COUNT_SIZE and backend != "reference":
                out["kernels"] = count_kernels(fuse)
            return out
    finally:
        set_backend(None)


# --------------------------------------------------------------------- training


def training_step(mode: str) -> Callable[[], torch.Tensor]:
    """The benchmark's training step in ``mode``: a fresh seeded network, AdamW, the
    batch of random pairs and the loss; each call runs forward, loss, backward and
    the optimizer step and returns the loss."""
    torch.manual_seed(0)
    model = S4Fusion().cuda().train()
    bf16 = "bf16" in mode
    if mode.startswith("compile"):
        net = compiled(model)
    else:  # as the trainer's TrainPass: in bf16, the weights' casts as one multi-tensor copy each way
        net = CastWeights(model, torch.bfloat16) if bf16 else model
    graph = graph_mode(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graph, fused=True)  # as the trainer's
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (TRAIN_BATCH, 1, TRAIN_SIZE, TRAIN_SIZE)
    ir = torch.rand(shape, device="cuda", generator=g)
    vi = torch.rand(shape, device="cuda", generator=g)
    w = torch.full((TRAIN_BATCH,), 0.5, device="cuda")

    def step():
        # as the trainer's TrainPass: the backward writes the gradients rather than adding
        # them to zeroed ones (recorded, into the graph's own tensors, which its AdamW reads)
        opt.zero_grad(set_to_none=True)
        with autocast(bf16):
            fused = net(ir, vi)
        loss = weighted_l1_loss(fused.float(), ir, vi, w, w)
        loss.backward()
        opt.step()
        return loss

    return step


def bench_train(mode: str) -> dict:
    set_backend("triton")
    try:
        # in bf16 the trainer runs with cuDNN's benchmark mode (s4fusion.training.train)
        with cudnn_autotune(torch.device("cuda"), "bf16" if "bf16" in mode else "fp32"):
            step = training_step(mode)
            compile_s = warm_up(step)  # compile, allocate optimizer state
            memory = peak_mib(step)
            run = graphed(step) if graph_mode(mode) else step
            timing = time_cuda(run, warmup=3, runs=20)
        return {
            "size": f"{TRAIN_BATCH}x{TRAIN_SIZE}x{TRAIN_SIZE}", "mode": mode, "compile_s": compile_s,
            "peak_mib": memory, **timing,
        }
    finally:
        set_backend(None)


# ---------------------------------------------------------------------- report


def exponent(rows: list[dict], mode: str) -> Optional[float]:
    """Least-squares slope of log(time) against log(pixels), 481x649 .. 1921x2593."""
    pts = [
        (math.log(r["pixels"]), math.log(r["median_ms"]))
        for r in rows
        if r["mode"] == mode and r["pixels"] >= 481 * 649 and "error" not in r
    ]
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
        if "error" in r:
            lines.append(f"| {name} | {r['mode']} | failed: {_first_line(r['error'])} | | | |")
            continue
        lines.append(
            f"| {name} | {r['mode']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['peak_mib']:.0f} | {'<= %g ms' % target if target else ''} | {rel_ms} ms, {rel_mib} MiB |"
        )
    for r in result["train"]:
        rel_ms, rel_mib = RELEASED["train"]
        if "error" in r:
            lines.append(f"| training step {r['size']} | {r['mode']} | failed: {_first_line(r['error'])} | | | |")
            continue
        lines.append(
            f"| training step {r['size']} | {r['mode']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['peak_mib']:.0f} | <= {TARGETS['train']:g} ms, <= {rel_mib / 2:.0f} MiB | {rel_ms} ms, {rel_mib} MiB |"
        )
    lines.append("")
    for mode, e in result["exponent"].items():
        if e is not None:
            lines.append(f"- fitted exponent of time vs pixels, 481x649 .. 1921x2593, {mode}: {e:.3f} (target <= 1.1)")
    for r in result["fuse"]:
        if "kernels" in r:
            lines.append(f"- GPU kernels launched by one {r['mode']} forward at 481x649: {r['kernels']} (released code: 1,865)")
    for r in result["fuse"] + result["train"]:
        if "compile_s" in r and r["mode"].startswith("compile"):
            lines.append(f"- {r['mode']} {r['size']}: first call (compiling) {r['compile_s']:.1f} s")
    return "\n".join(lines)


def write_json(path: Optional[str], result: dict) -> None:
    """The results as indented JSON at ``path`` (the scripts' --json); nothing without one."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].replace("|", "/") if text.strip() else "(no message)"


def _modes(value: str) -> list[str]:
    modes = value.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown} in {value!r}; choose from {', '.join(MODES)}")
    return modes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements to this JSON file")
    default = "eager,graph,graph-bf16,compile,compile-bf16"
    parser.add_argument(
        "--modes", type=_modes, default=default, help=f"fusing modes, comma separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--train-modes", type=_modes, default=default, help=f"training modes, comma separated, of {', '.join(MODES)}"
    )
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
    runs = [(size, mode, "triton") for size in FUSE_SIZES for mode in args.modes] + [(FUSE_SIZES[0], "eager", "reference")]
    for size, mode, backend in runs:
        labels = {"size": f"{size[0]}x{size[1]}", "pixels": size[0] * size[1], "mode": mode, "backend": backend}
        result["fuse"].append(attempt(partial(bench_fuse, model, size, mode, backend), **labels))
        print(json.dumps(result["fuse"][-1]), flush=True)
    del model
    torch.cuda.empty_cache()
    for mode in args.train_modes:
        labels = {"size": f"{TRAIN_BATCH}x{TRAIN_SIZE}x{TRAIN_SIZE}", "mode": mode}
        result["train"].append(attempt(partial(bench_train, mode), **labels))
        print(json.dumps(result["train"][-1]), flush=True)
        torch.cuda.empty_cache()
    result["exponent"] = {m: exponent(result["fuse"], m) for m in args.modes}
    print(markdown(result))
    write_json(args.json, result)
    return 1 if any("error" in r for r in result["fuse"] + result["train"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
