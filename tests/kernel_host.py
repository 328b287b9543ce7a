"""Where edge-mmm's C kernel must run in the tests: every x86-64 host (the README installs the C compiler it
builds with); elsewhere (ARM: no SIMD path yet) a kernel test has nothing to run."""

import platform

import pytest


def kernel_missing(why: str) -> None:
    """Fail on x86-64; skip on a CPU family the kernel has no path for."""
    if platform.machine() in ("x86_64", "AMD64"):
        pytest.fail(f"edge-mmm's C kernel must build on an x86-64 host: {why}")
    pytest.skip(f"edge-mmm's C kernel has no path for {platform.machine()}: {why}")
