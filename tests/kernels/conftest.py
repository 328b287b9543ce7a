"""Run the Triton kernels in Triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before `triton` is first imported in the process (Triton builds its own
standard library, tl.sum / tl.max, for the interpreter or for the compiler at import time), and before
our kernels are first built (edge_mmm.kernels.dispatch.jit builds them lazily, on first launch).
Setting it here, at collection, satisfies both unless something imported triton earlier; then the
interpreter tests are skipped with that reason instead of failing obscurely.
"""

import os
import sys

import pytest
import torch

_ON_GPU = torch.cuda.is_available()
_TRITON_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not _ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edge_mmm.kernels.dispatch import kernel_mode  # noqa: E402


@pytest.fixture(autouse=True)
def _force_triton(request):
    """Every kernel test runs the Triton path (the reference is called explicitly for comparison)."""
    if not _ON_GPU and _TRITON_IMPORTED_EARLY and "test_compile" not in request.node.nodeid:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run tests/kernels in "
                    "its own pytest process (or export TRITON_INTERPRET=1) to test the kernels on CPU")
    with kernel_mode("triton"):
        yield
