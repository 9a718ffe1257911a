"""The scan kernels' machine code for an H100/H200 (sm_90), compiled here without a GPU.

Run from the repository root (Triton with its bundled ptxas and nvdisasm; no GPU needed)::

    python benchmarks/sass_scan.py                      # the network's kernels, bf16
    python benchmarks/sass_scan.py --kernels bwd --mix  # and each one's instruction mix
    python benchmarks/sass_scan.py --out sass/          # and keep the PTX and SASS

For each pass of ``s4fusion.ops.triton_scan`` (``end``, ``y`` and ``sweep``: the forward
kernel's modes; ``bwd``: the backward kernel) at the network's state sizes (VSS: M = 1,
N = 12; CMSA: M = 2, N = 18) it compiles the kernel with the launch constants the
backend uses for the training batch (vector reductions, ``CT`` = 4) and the network's
layouts (B and C by vector loads, channel and state strides 1; ``--general-strides``:
strides that are not 1), and prints its SASS instruction count, registers and spill
bytes as ptxas reports them. Counting instructions tells where a kernel's issue slots
go, not how fast it runs: measure that with ``bench_scan.py`` on the GPU
(BENCHMARKS.md, sessions 15-21).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import math
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from s4fusion.models import S4FusionConfig
from s4fusion.ops import projection_rows
from s4fusion.ops import triton_scan as ts

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
NETWORK = {"vss": (1, 12), "cmsa": (2, 18)}  # block kind: (M, N) of the default configuration
MODES = {"end": ts.MODE_END.value, "y": ts.MODE_Y.value, "sweep": ts.MODE_SWEEP.value}
# tensors in the inputs' dtype (the others are float32)
LOW = ("u_ptr", "dl_ptr", "b_ptr", "c_ptr", "g_ptr", "gdl_ptr")


def constants(kernel: str, M: int, N: int, red: int, ct: int, vec: int, unit: bool) -> dict:
    """The constexpr arguments the backend passes for this kernel (training batch)."""
    tb = ts._steps(ts.BWD_STEPS, M)
    if kernel == "bwd":
        return dict(K=4, M=M, N=N, E=ts.BWD_LANES, TB=tb, CT=ct, CB=ts.BWD_CB, G=ts.BWD_PARTS, RED=red)
    sweep = kernel == "sweep"
    return dict(
        K=4, M=M, N=N, CB=ts.SWEEP_CB if sweep else ts.FWD_CB[M - 1], E=ts.FWD_LANES,
        TB=math.gcd(ts.FWD_UNROLL, tb) if sweep else ts.FWD_UNROLL, MODE=MODES[kernel],
        CKB=tb if sweep else ts.FWD_UNROLL, PF=False if sweep else ts.FWD_PREFETCH[M - 1], UNIT_N=unit, VEC=vec,
    )  # fmt: skip


def state_layout(M: int, N: int, dtype: str, unit: bool) -> tuple[bool, int]:
    """(UNIT_N, VEC) as the backend chooses them for B and C (shapes and strides only, on
    the meta device): views of the network's projection (``ops.projection_rows``), or
    with ``unit`` False contiguous tensors (state stride L)."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    L, K = 64, 4
    if unit:
        rows, ob, oc, _ = projection_rows(S4FusionConfig().dt_rank(S4FusionConfig().dims[0]), N)
        P = torch.empty(1, M, L, K, rows, dtype=dt, device="meta")
        B, C = (P[..., o : o + N].permute(0, 1, 3, 4, 2) for o in (ob, oc))
    else:
        B, C = (torch.empty(1, M, K, N, L, dtype=dt, device="meta") for _ in range(2))
    return ts._unit_states(B, C), ts._state_loads(B, C)


def compile_sm90(kernel: str, M: int, N: int, dtype: str, unit: bool, red: int, ct: int, out: Path) -> dict:
    """Compile one kernel for sm_90; its PTX and SASS go to ``out``."""
    jit = ts._bwd_kernel if kernel == "bwd" else ts._fwd_kernel
    unit_n, vec = state_layout(M, N, dtype, unit)
    consts = constants(kernel, M, N, red, ct, vec, unit_n)
    names = list(inspect.signature(jit.fn).parameters)
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        elif unit and name in ts._UNIT_STRIDES:  # triton's specialisation of an integer argument equal to 1
            signature[name], constexprs[(i,)] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype if name in LOW else "*fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(
        ASTSource(jit, signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=max(1, consts["E"] // 32)),
    )
    stem = f"{kernel}_m{M}_n{N}_{dtype}"
    ptx = out / f"{stem}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    (out / f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([BIN / "nvdisasm", "-c", out / f"{stem}.cubin"], capture_output=True, text=True, check=True)
    (out / f"{stem}.sass").write_text(sass.stdout)
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass.stdout, flags=re.M)
    arch = re.search(r"\.target (\S+)", compiled.asm["ptx"]).group(1)
    info = subprocess.run(
        [BIN / "ptxas", "-v", f"--gpu-name={arch}", ptx, "-o", out / f"{stem}.v.cubin"],
        capture_output=True, text=True, check=True,
    ).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return {
        "kernel": kernel, "M": M, "N": N, "dtype": dtype, "instructions": len(ops),
        "registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
        "mix": collections.Counter(ops),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="end,y,sweep,bwd", help="comma-separated: end, y, sweep, bwd")
    parser.add_argument("--blocks", default="vss,cmsa", help="comma-separated: vss (M 1, N 12), cmsa (M 2, N 18)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the inputs' dtype")
    parser.add_argument("--general-strides", action="store_true", help="channel and state strides other than 1")
    parser.add_argument("--red", choices=("vector", "pairs", "values"), default="vector", help="bwd: RED_* mode")
    parser.add_argument("--ct", type=int, default=4, help="bwd: lane groups summed before the atomic adds")
    parser.add_argument("--mix", action="store_true", help="also print each kernel's most frequent instructions")
    parser.add_argument("--out", help="keep PTX, cubin and SASS in this folder (default: a temporary one)")
    args = parser.parse_args()
    red = {"vector": ts.RED_VECTOR, "pairs": ts.RED_PAIRS, "values": ts.RED_VALUES}[args.red].value
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        print("| kernel | block | M | N | dtype | instructions | registers | spill bytes |")
        print("|---|---|---|---|---|---|---|---|")
        for block in args.blocks.split(","):
            M, N = NETWORK[block]
            for kernel in args.kernels.split(","):
                r = compile_sm90(kernel, M, N, args.dtype, not args.general_strides, red, args.ct, out)
                print(f"| {kernel} | {block} | {M} | {N} | {args.dtype} | {r['instructions']} | {r['registers']} "
                      f"| {r['spill_bytes']} |", flush=True)  # fmt: skip
                if args.mix:
                    print("    " + ", ".join(f"{op} {n}" for op, n in r["mix"].most_common(16)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
