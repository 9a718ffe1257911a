"""Time and peak memory of fusing one pair on the CPU, fast scan backend vs the
reference scan, default S4Fusion network (random weights: speed does not depend
on them), float32, ``torch.no_grad()``.

Each backend runs in its own child process so that its peak resident memory
(``ru_maxrss``) is its own. Reported per backend: the first call (numba kernels
loaded or compiled, caches warmed), the median / min / max of the timed calls,
the resident memory before the first fuse and the peak.

    python benchmarks/cpu_fuse.py                      # 480 x 640 (a 640x480 pair), 2 threads
    python benchmarks/cpu_fuse.py --backends cpu --repeats 9 --profile
    python benchmarks/cpu_fuse.py --backends cpu --height 3000 --width 4000 --band 20000 --repeats 1
    taskset -c 0,1 python benchmarks/cpu_fuse.py       # pin to two cores of a bigger machine

``--malloc retain default`` runs each backend with glibc keeping freed memory in the
process (``s4fusion.allocator.retain_freed_memory``, what ``s4fusion fuse`` does on
the CPU; the default) and with glibc's default settings, each in its own child.

``--band N`` runs band-wise (``s4fusion.tiling.banded_forward``, bands of N tokens),
the path ``s4fusion fuse`` takes for images that do not fit the memory budget;
``--topology paper`` the topology of the bundled weights. ``--profile`` adds, for the first backend, the time spent inside the scan per
fuse and the torch operators that take the rest (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    import torch

    from s4fusion import S4Fusion, S4FusionConfig, ops, tiling
    from s4fusion.allocator import retain_freed_memory

    torch.set_num_threads(args.threads)
    retained = retain_freed_memory() if args.malloc == ["retain"] else False
    scan_seconds = [0.0]
    if args.profile:
        fast = ops._BACKENDS[args.child].fn_loader()

        def timed(*a):
            t = time.perf_counter()
            out = fast(*a)
            scan_seconds[0] += time.perf_counter() - t
            return out

        ops.register_backend("timed", lambda: timed, devices=("cpu",), probe=lambda: None, priority=-1)
        ops.set_backend("timed")
    else:
        ops.set_backend(args.child)
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(topology=args.topology)).eval()
    g = torch.Generator().manual_seed(1)
    ir = torch.rand(1, 1, args.height, args.width, generator=g)
    vi = torch.rand(1, 1, args.height, args.width, generator=g)
    def fuse():
        return model(ir, vi) if not args.band else tiling.banded_forward(model, ir, vi, args.band)

    rss_before = _rss_mib()
    times = []
    with torch.no_grad():
        t = time.perf_counter()
        fuse()
        first = time.perf_counter() - t
        for _ in range(args.repeats):
            scan_seconds[0] = 0.0
            t = time.perf_counter()
            fuse()
            times.append(time.perf_counter() - t)
        result = {
            "backend": args.child,
            "malloc": "retain" if retained else "default",
            "first_s": first,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "rss_before_mib": rss_before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if args.profile:
            result["scan_s"] = scan_seconds[0]
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fuse()
            result["ops_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (also the scan's threads)")
    p.add_argument("--backends", nargs="+", default=["cpu", "reference"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls of the fast backends")
    p.add_argument("--reference-repeats", type=int, default=1, help="timed calls of the (slow) reference backend")
    p.add_argument("--profile", action="store_true", help="split the first backend's time: scan vs torch operators")
    p.add_argument("--band", type=int, default=0, help="tokens per band: band-wise execution (0: whole image)")
    p.add_argument("--topology", choices=("released", "paper"), default="released")
    p.add_argument("--malloc", nargs="+", choices=("retain", "default"), default=["retain"],
                   help="glibc settings to run each backend with (retain: keep freed memory, as the CLI does)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    print(f"CPU: {_cpu_name()}; {os.cpu_count()} logical CPUs, affinity {len(os.sched_getaffinity(0))}; "
          f"load average {os.getloadavg()[0]:.2f}; torch threads {args.threads}")  # fmt: skip
    mode = f"band-wise, {args.band} tokens per band" if args.band else "whole image"
    print(f"fuse one {args.height} x {args.width} (H x W) pair, float32, no_grad, S4Fusion {args.topology} topology, {mode}")
    rows = []
    runs = [(backend, malloc) for backend in args.backends for malloc in args.malloc]
    for i, (backend, malloc) in enumerate(runs):
        repeats = args.reference_repeats if backend == "reference" else args.repeats
        cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, "--height", str(args.height),
               "--width", str(args.width), "--threads", str(args.threads), "--repeats", str(repeats),
               "--band", str(args.band), "--topology", args.topology, "--malloc", malloc]  # fmt: skip
        if args.profile and i == 0:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{backend}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        r["repeats"] = repeats
        rows.append(r)
        if "ops_table" in r:
            print(f"\n{backend}: scan {r['scan_s']:.3f} s of the last timed fuse ({r['median_s']:.3f} s median); "
                  f"torch operators of one fuse by self CPU time:\n{r['ops_table']}")  # fmt: skip
    print("\n| backend | malloc | first call | median of n | min - max | RSS before | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['malloc']} | {r['first_s']:.2f} s | {r['median_s']:.3f} s (n={r['repeats']}) | "
              f"{r['min_s']:.3f} - {r['max_s']:.3f} s | {r['rss_before_mib']:.0f} MiB | "
              f"{r['peak_rss_mib']:.0f} MiB |")  # fmt: skip
    return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
