"""glibc's malloc settings for CPU fusing (``s4fusion.allocator``): freed blocks stay
in the process (fewer page faults), the environment's own tunables win, the CLI makes
the setting for CPU runs. Each check of the setting itself runs in a child process,
so that the test process's allocator is left as it is."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from s4fusion import allocator

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="the malloc settings are glibc's (not glibc here)",
)

CHILD = """
import json, resource, sys
import torch
from s4fusion.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
faults = []
for _ in range(8):  # tensors of 8 to 80 MiB, written, two alive at a time, as in a fuse
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    alive = []
    for mib in (8, 80, 16, 64, 32, 48):
        alive.append(torch.empty(mib << 18).fill_(1.0))
        if len(alive) > 2:
            alive.pop(0)
    alive.clear()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _child(mode: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_blocks_are_reused_with_fewer_page_faults():
    plain = _child("default")
    kept = _child("retain")
    pages = (8 + 80 + 16 + 64 + 32 + 48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert kept["applied"] is True
    assert sum(plain["faults"][4:]) > 4 * pages // 2  # glibc maps fresh pages for most blocks
    assert sum(kept["faults"][4:]) < sum(plain["faults"][4:]) // 4  # the freed blocks are reused


@glibc
def test_the_environments_tunables_win():
    assert _child("retain", MALLOC_MMAP_THRESHOLD_="262144")["applied"] is False
    assert _child("retain", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")["applied"] is False


def test_limit_must_fit_a_c_int():
    with pytest.raises(ValueError, match="limit must be between 1 and 2\\*\\*31 - 1 bytes"):
        allocator.retain_freed_memory(1 << 31)


def test_cli_fuse_on_the_cpu_makes_the_setting(tmp_path, monkeypatch):
    from s4fusion.cli import fuse as cli_fuse
    from s4fusion.cli import main

    calls = []
    monkeypatch.setattr(cli_fuse, "retain_freed_memory", lambda: calls.append(1) or True)
    assert main(["fuse", "--example", "--device", "cpu", "--out", str(tmp_path / "fused.png")]) == 0
    assert calls == [1]
