"""Registration of the fast scan backends.

Each backend lives in its own module and is imported only when first used;
the probe functions here only check whether it could be imported/run.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from . import register_backend


def _cpu_probe() -> Optional[str]:
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    return None


def _cpu_loader():
    from .cpu_scan import cross_scan_cpu

    return cross_scan_cpu


register_backend(
    "cpu",
    _cpu_loader,
    devices=("cpu",),
    probe=_cpu_probe,
    priority=10,
    how_to_get="pip install numba",
)
