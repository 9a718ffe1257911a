"""Where the GPU time goes: kernel time of one eager pass, summed by kernel name.

Run from the repository root on a CUDA machine::

    python benchmarks/profile_gpu.py --json profile.json

For each fusing size (default 481x649 and 961x1297) and precision (``--fuse`` fp32
and/or bf16, the latter under bf16 autocast and cuDNN's benchmark mode, as ``s4fusion
fuse --precision bf16`` runs): one eager forward under ``torch.no_grad()`` and, for
comparison, the wall time of the same forward replayed as one CUDA graph (when the two
are close, launch gaps are not what costs time).
Then one eager training step per precision (``--train`` fp32 and/or bf16, the latter
as the trainer's recipe runs it, like bf16 fusing; ``bench_gpu.training_step``: batch 20,
229x229, the benchmark's loss and AdamW). Every pass runs twice before it is profiled, so
kernels are compiled and the allocator is warm. Random weights of the default
(released) configuration, triton scan backend.
"""

from __future__ import annotations

import argparse
import collections
import itertools
from typing import Callable, Optional

import torch
from bench_gpu import TRAIN_BATCH, TRAIN_SIZE, graphed, time_cuda, training_step, write_json
from torch.profiler import ProfilerActivity, profile

from s4fusion import S4Fusion
from s4fusion.api import cudnn_autotune
from s4fusion.ops import set_backend


def kernel_table(fn: Callable[[], object]) -> dict:
    """GPU kernel time of one call of ``fn``: total, count, per kernel name, and per
    operator and input shapes (the operator's own kernels, not its children's)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    ops = [
        {"op": e.key, "shapes": str(e.input_shapes), "ms": e.self_device_time_total / 1000, "calls": e.count}
        for e in prof.key_averages(group_by_input_shape=True)
        if e.self_device_time_total > 0
    ]
    ops.sort(key=lambda row: -row["ms"])
    rows: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            rows[event.name][0] += event.device_time_total / 1000
            rows[event.name][1] += 1
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][0])
    return {
        "total_ms": sum(v[0] for v in rows.values()),
        "kernels": sum(v[1] for v in rows.values()),
        "rows": [{"name": k, "ms": v[0], "calls": v[1]} for k, v in ordered],
        "ops": ops,
    }


def show(title: str, table: dict, top: int, top_ops: int) -> None:
    print(f"== {title}: {table['total_ms']:.2f} ms of GPU kernel time, {table['kernels']} kernels")
    for row in table["rows"][:top]:
        print(f"{row['ms']:9.3f} ms {row['calls']:5d}x {1000 * row['ms'] / row['calls']:9.1f} us  {row['name'][:90]}")
    if top_ops:
        print(f"-- by operator and input shapes (top {top_ops})")
    for row in table["ops"][:top_ops]:
        print(f"{row['ms']:9.3f} ms {row['calls']:5d}x  {row['op'][:40]:40s} {row['shapes'][:110]}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="481x649,961x1297", help="fusing sizes HxW, comma-separated")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per pass")
    parser.add_argument("--ops", type=int, default=0, help="also list this many operators by input shapes")
    parser.add_argument("--fuse", default="fp32", help="fusing precisions, comma-separated: fp32, bf16; empty: none")
    parser.add_argument("--train", default="fp32", help="training-step precisions, as --fuse")
    parser.add_argument("--json", help="write the tables to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    set_backend("triton")
    result: dict = {"device": torch.cuda.get_device_name(), "passes": {}}
    model = S4Fusion().cuda().eval()
    fuse_precisions = [p for p in args.fuse.split(",") if p]
    train_precisions = [p for p in args.train.split(",") if p]
    for precision in fuse_precisions + train_precisions:
        if precision not in ("fp32", "bf16"):
            parser.error(f"--fuse and --train take fp32 and/or bf16, not {precision!r}")
    for size, precision in itertools.product(args.sizes.split(","), fuse_precisions):
        H, W = (int(v) for v in size.lower().split("x"))
        ir = torch.rand(1, 1, H, W, device="cuda")
        vi = torch.rand_like(ir)
        bf16 = precision == "bf16"

        def fuse() -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                model(ir, vi)

        with cudnn_autotune(torch.device("cuda"), precision):  # as the fusing API does
            fuse()
            fuse()
            table = kernel_table(fuse)
            table["graph_wall_ms"] = time_cuda(graphed(fuse), warmup=3, runs=20)["median_ms"]
        title = f"fuse {H}x{W}, eager {precision} (CUDA graph wall {table['graph_wall_ms']:.2f} ms)"
        show(title, table, args.top, args.ops)
        result["passes"][f"fuse {H}x{W}" if precision == "fp32" else f"fuse {H}x{W} {precision}"] = table
    for precision in train_precisions:
        with cudnn_autotune(torch.device("cuda"), precision):  # as the trainer does
            step = training_step("eager-bf16" if precision == "bf16" else "eager")
            step()
            step()
            table = kernel_table(step)
        show(f"training step {TRAIN_BATCH}x{TRAIN_SIZE}x{TRAIN_SIZE}, eager {precision}", table, args.top, args.ops)
        result["passes"]["train" if precision == "fp32" else f"train {precision}"] = table
        del step
        torch.cuda.empty_cache()
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
