"""Shared test fixtures: the read-only reference material in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "reference" / "golden"


@pytest.fixture
def single_threaded_scan():
    """Scan tests run single-threaded (tiny tensors; the reference's many small ops
    only lose time to thread hand-offs) unless they set a thread count themselves;
    the forced scan backend and the thread count are restored afterwards."""
    import torch

    from s4fusion.ops import set_backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    set_backend(None)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"reference material missing: {GOLDEN} (the tests need ../shared beside the checkout)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_inputs(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "inputs.safetensors"))


@pytest.fixture(scope="session")
def golden_expected(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected.safetensors"))


@pytest.fixture(scope="session")
def released_path(golden_dir) -> Path:
    return golden_dir / "released_format.pth"
