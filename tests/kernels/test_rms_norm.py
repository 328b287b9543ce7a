"""rms_norm: Triton (interpreter on CPU) vs rms_norm_reference, odd sizes and all float dtypes."""

import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import rms_norm, rms_norm_reference
from kernel_testing import DEVICE, ELEMENTWISE_TOL, assert_close


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 96), (7, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(shape, dtype, with_residual):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    res = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    atol, rtol = ELEMENTWISE_TOL[dtype]
    got = rms_norm(x, w, 1e-6, residual=res)
    want = rms_norm_reference(x, w, 1e-6, residual=res)
    if with_residual:
        assert_close(got[0], want[0], atol, rtol, "out")
        # one rounding of x + r in both; Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to
        # nearest), so bf16 may differ by one ulp there.
        assert_close(got[1], want[1], 0, 2 ** -7 if dtype == torch.bfloat16 else 0, "residual")
    else:
        assert_close(got, want, atol, rtol, "out")


def test_non_contiguous_input_is_handled():
    x = torch.randn(6, 40, device=DEVICE).t()  # [40, 6], last-dim stride 40
    w = torch.rand(6, device=DEVICE)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), 1e-5, 1e-5)


def test_bad_inputs_raise_input_error():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(InputError, match="last dimension"):
        rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(InputError, match="residual shape"):
        rms_norm(x, torch.ones(8, device=DEVICE), residual=torch.randn(2, 9, device=DEVICE))
    with pytest.raises(InputError, match="x must be one of"):
        rms_norm(x.to(torch.int32), torch.ones(8, device=DEVICE))
