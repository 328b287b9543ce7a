"""`all_finite`: the cheap NaN/inf check every checkpoint load runs."""

import pytest
import torch

from edge_mmm.weights.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite(dtype):
    w = torch.randn(64, 48).to(dtype)
    assert all_finite(w)
    for bad in (float("nan"), float("inf"), float("-inf")):
        corrupt = w.clone()
        corrupt[17, 5] = bad
        assert not all_finite(corrupt), (dtype, bad)


def test_huge_finite_values_whose_sum_overflows_are_finite():
    assert all_finite(torch.full((1000,), 3e38))  # the fp32 sum is inf; every value is finite
    assert all_finite(torch.full((1000,), 60000.0, dtype=torch.float16))
    assert all_finite(torch.arange(10))  # integer tensors hold no NaN
