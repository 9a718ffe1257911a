"""Running Triton kernels on the CPU in Triton's interpreter, for the GPU backends'
tests (test_scan_triton, test_norm_triton): so CI without a GPU checks the kernels'
indexing, masking and gradients too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = """
import torch
import triton
import triton.language as tl


@triton.jit
def probe(x_ptr, n):
    acc = 0.0
    for i in range(0, n):
        acc += 1.0
    tl.store(x_ptr, acc)


try:  # some triton releases' interpreters fail on any loop with a runtime bound
    probe[(1,)](torch.zeros(1), 3)
except Exception as e:
    print("UNSUPPORTED", triton.__version__, repr(e)[:200])
    raise SystemExit(0)
"""


def worst_in_interpreter(check: str) -> float:
    """Run ``check`` (Python source that prints ``WORST <error>``) in a subprocess with
    ``TRITON_INTERPRET=1``, so that interpreter mode cannot leak into other tests;
    skips where this triton's interpreter cannot run a loop with a runtime bound."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).resolve().parent  # the tests' helper modules, and the package's sources
    paths = (str(here.parent / "src"), str(here), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    code = textwrap.dedent(PROBE) + textwrap.dedent(check)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    if "UNSUPPORTED" in run.stdout:
        pytest.skip(f"the triton interpreter cannot run these kernels here: {run.stdout.strip()}")
    return float(run.stdout.split("WORST")[-1])
