"""swiglu / gelu_tanh: Triton (interpreter on CPU) vs the torch references."""

import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import gelu_tanh, gelu_tanh_reference, swiglu, swiglu_reference
from kernel_testing import DEVICE, ELEMENTWISE_TOL, assert_close

SHAPES = [(1, 7), (3, 1025), (2, 3, 100)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu(shape, dtype):
    torch.manual_seed(0)
    g = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    u = torch.randn(shape, device=DEVICE).to(dtype)
    assert_close(swiglu(g, u), swiglu_reference(g, u), *ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_tanh(shape, dtype):
    torch.manual_seed(0)
    x = (4 * torch.randn(shape, device=DEVICE)).to(dtype)
    assert_close(gelu_tanh(x), gelu_tanh_reference(x), *ELEMENTWISE_TOL[dtype])


def test_extremes_do_not_overflow():
    x = torch.tensor([-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0], device=DEVICE)
    assert_close(gelu_tanh(x), gelu_tanh_reference(x), 1e-6, 1e-5)
    assert_close(swiglu(x, torch.ones_like(x)), swiglu_reference(x, torch.ones_like(x)), 1e-6, 1e-5)


def test_non_contiguous_and_errors():
    g = torch.randn(8, 6, device=DEVICE).t()
    u = torch.randn(8, 6, device=DEVICE).t()
    assert_close(swiglu(g, u), swiglu_reference(g, u), 1e-5, 1e-5)
    with pytest.raises(InputError, match="one shape and dtype"):
        swiglu(g, u[:3])
    with pytest.raises(InputError, match="x must be one of"):
        gelu_tanh(torch.arange(4, device=DEVICE))
