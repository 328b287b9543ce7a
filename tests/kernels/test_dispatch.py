"""The dispatch policy: auto / reference / triton, lazy triton import, readable failures."""

import subprocess
import sys

import pytest
import torch

from edge_mmm.errors import DeviceError, InputError
from edge_mmm.kernels import get_kernel_mode, kernel_mode, rms_norm, set_kernel_mode
from edge_mmm.kernels import dispatch
from kernel_testing import DEVICE


def test_modes_and_context_manager():
    assert get_kernel_mode() == "triton"  # the conftest fixture
    with kernel_mode("reference"):
        assert get_kernel_mode() == "reference"
        assert not dispatch.use_triton(torch.zeros(1))
    assert get_kernel_mode() == "triton"
    with pytest.raises(InputError, match="kernel mode"):
        set_kernel_mode("fast")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only policy")
def test_auto_runs_the_reference_on_cpu_even_when_interpreting(monkeypatch):
    with kernel_mode("auto"):
        assert not dispatch.use_triton(torch.zeros(1))
        calls = []
        monkeypatch.setattr(dispatch._LazyKernel, "__getitem__", lambda self, grid: calls.append(1))
        rms_norm(torch.randn(2, 8), torch.ones(8))
        assert calls == []


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only policy")
def test_triton_mode_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeviceError, match="needs CUDA tensors"):
        dispatch.use_triton(torch.zeros(1))


def test_package_imports_without_triton():
    """edge_mmm.kernels imports and its reference paths run with triton unavailable."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from edge_mmm.kernels import rms_norm, swiglu, kernel_mode\n"
            "x = torch.randn(2, 8)\n"
            "assert rms_norm(x, torch.ones(8)).shape == (2, 8)\n"
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "from edge_mmm.errors import MissingExtraError\n"
            "with kernel_mode('triton'):\n"
            "    try:\n"
            "        swiglu(x, x)\n"
            "    except MissingExtraError as e:\n"
            "        print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout and "edge-mmm[cuda]" in out.stdout


def test_mismatched_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(InputError, match="one device"):
        rms_norm(torch.randn(2, 8, device="cuda"), torch.ones(8))
