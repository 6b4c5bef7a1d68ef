"""Fixtures for the DE-GRAD deblurring example's tests (tiny sizes, CPU, seconds each)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and immune to busy-waiting on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny training run (with its evaluation), shared by several tests."""
    import deblur_celeba
    from deblur_tiny import TINY

    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert deblur_celeba.main(["train", *TINY, "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out
