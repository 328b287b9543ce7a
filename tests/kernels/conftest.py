"""Run the Triton kernels in Triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when a kernel is first built (edge_mmm.kernels.dispatch.jit builds lazily),
so setting it here, before any test in this folder launches a kernel, is enough. On a CUDA machine
the variable is left alone and the kernels compile for the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edge_mmm.kernels.dispatch import kernel_mode  # noqa: E402


@pytest.fixture(autouse=True)
def _force_triton():
    """Every kernel test runs the Triton path (the reference is called explicitly for comparison)."""
    with kernel_mode("triton"):
        yield

