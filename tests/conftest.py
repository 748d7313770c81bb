"""Test-session set-up shared by every test.

Triton kernels are checked on this CPU-only machine by Triton's interpreter,
which must be switched on before any ``@triton.jit`` function is defined, so it
is set here, before the tests import ``minigpt``. (On a machine with a GPU the
Triton tests run the real kernels on CUDA tensors instead.)
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)


def pytest_configure(config: pytest.Config) -> None:
    # Keep CPU tests snappy on a 2-core box: one intra-op pool, no oversubscription.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
