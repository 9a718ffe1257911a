"""Nsight Compute view of the scan kernels: where they stall and which loads waste sectors.

Run from the repository root on a CUDA machine with ``ncu``::

    ncu --set full --profile-from-start off --kernel-name regex:"_fwd_kernel|_bwd_kernel" \\
        -o scan python benchmarks/ncu_scan.py run
    ncu --import scan.ncu-rep --page details > details.txt
    ncu --import scan.ncu-rep --page source --csv --print-source sass > source.csv
    python benchmarks/ncu_scan.py summary source.csv

``run`` calls the scan op on ``bench_scan``'s cases (default: the training step's finest
VSS scan and its CMSA scan, forward and backward in bf16, and the 481x649 fuse's finest
VSS scan, forward), each twice to compile and warm up, then once more between
``cudaProfilerStart`` and ``cudaProfilerStop``, the only launches ``ncu`` profiles
with ``--profile-from-start off``. dL/dy has u's layout, as the network hands it over.

``summary`` reads the SASS source page (no GPU needed) and prints, per profiled kernel:
the warp-stall samples by reason, the instructions with the most samples, and the
memory instructions whose requests touch the most L2 sectors beyond the ideal (a
request whose lanes touch more sectors than their bytes need; those sectors may still
be L1 hits, as for two neighbouring channels of one lane).
Session 16's findings with it are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
from typing import Callable

SAMPLES = "Warp Stall Sampling (All Samples)"
SECTORS = "L2 Theoretical Sectors Global"
IDEAL = "L2 Theoretical Sectors Global Ideal"
DEFAULT_CASES = ("train s0 vss", "train s1 cmsa", "fuse s0 vss")


def scan_calls(names: list[str]) -> list[Callable[[], None]]:
    """One callable per case of ``bench_scan`` named in ``names``: training cases run the
    forward and backward in bf16, fusing cases the forward under no_grad."""
    import torch
    from bench_scan import FUSE_CASES, TRAIN_CASES, scan_inputs

    from s4fusion.ops import cross_scan

    cases = {c[0]: c for c in TRAIN_CASES + FUSE_CASES}
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {sorted(cases)}")
    calls = []
    for name in names:
        _, batch, H, W, scale, kind, _ = cases[name]
        x = scan_inputs(batch, H, W, scale, kind, torch.bfloat16)
        if name.startswith("train"):
            x = tuple(t.detach().requires_grad_() for t in x)
            gout = torch.randn_like(x[0])

            def call(x=x, gout=gout, H=H, W=W):
                out = cross_scan(*x, H, W, backend="triton")
                torch.autograd.grad(out, x, gout)

        else:

            def call(x=x, H=H, W=W):
                with torch.no_grad():
                    cross_scan(*x, H, W, backend="triton")

        calls.append(call)
    return calls


def run(names: list[str]) -> None:
    import torch

    calls = scan_calls(names)
    for call in calls:
        call()
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def read_source_page(path: str) -> list[dict]:
    """The kernels of an ``ncu --page source --csv`` export: name, column names, rows."""
    kernels: list[dict] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                kernels.append({"name": row[1], "columns": [], "rows": []})
            elif row[0] == "Address" and kernels:
                kernels[-1]["columns"] = row
            elif kernels and kernels[-1]["columns"]:
                kernels[-1]["rows"].append(dict(zip(kernels[-1]["columns"], row)))
    return kernels


def _int(value: str) -> int:
    value = value.replace(",", "").strip()
    return int(float(value)) if value not in ("", "-") else 0


def summarize(kernel: dict, top: int = 8) -> str:
    rows = kernel["rows"]
    samples = sum(_int(r.get(SAMPLES, "")) for r in rows)
    reasons = [c for c in kernel["columns"] if c.startswith("stall_") and "Not Issued" not in c]
    by_reason = sorted(((sum(_int(r[c]) for r in rows), c[len("stall_"):]) for c in reasons), reverse=True)
    lines = [f"{kernel['name']}: {len(rows)} instructions, {samples} warp-stall samples"]
    lines.append("  by reason: " + ", ".join(f"{n} {100 * k / max(samples, 1):.1f}%" for k, n in by_reason[:6] if k))
    lines.append("  most sampled instructions:")
    for r in sorted(rows, key=lambda r: -_int(r.get(SAMPLES, "")))[:top]:
        share = 100 * _int(r.get(SAMPLES, "")) / max(samples, 1)
        lines.append(f"    {share:5.1f}%  {r['Address'][-5:]}  {r['Source'].strip()}")
    mem = [r for r in rows if _int(r.get(SECTORS, "")) > 0]
    total, ideal = sum(_int(r[SECTORS]) for r in mem), sum(_int(r.get(IDEAL, "")) for r in mem)
    lines.append(f"  global sectors {total} against {ideal} ideal; largest excess:")
    for r in sorted(mem, key=lambda r: _int(r.get(IDEAL, "")) - _int(r[SECTORS]))[:top]:
        s, i = _int(r[SECTORS]), _int(r.get(IDEAL, ""))
        lines.append(f"    {s / max(i, 1):5.1f}x  {s:>12} sectors  {r['Address'][-5:]}  {r['Source'].strip()}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="the scan calls for ncu (needs CUDA)")
    p_run.add_argument("cases", nargs="*", default=list(DEFAULT_CASES), help="bench_scan case names")
    p_sum = sub.add_parser("summary", help="summarize an ncu source-page CSV")
    p_sum.add_argument("csv")
    p_sum.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    if args.command == "run":
        run(args.cases)
    else:
        for kernel in read_source_page(args.csv):
            print(summarize(kernel, args.top), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
