"""w4a16_matmul / w8a16_matmul: fused-dequant Triton kernels vs dequantize-then-matmul.

Weights come from the project's own quantizer (edge_mmm.quant.quantize_weight), so the layout under
test is the one the models load; GGUF blocks reach the same layout through from_gguf (tested there).
"""

import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import MatmulConfig, w4a16_matmul, w4a16_matmul_reference, w8a16_matmul, w8a16_matmul_reference
from edge_mmm.quant import quantize_weight
from kernel_testing import DEVICE, assert_close

# Outputs are sums over K of x * w with |x| ~ 1, |w| ~ 0.05: magnitudes ~ 1. The kernels accumulate in
# float32 like the reference; fp16/bf16 differ by the output rounding (and, on the tensor-core path, by
# rounding the dequantized weight to the activation dtype).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 2e-2)}


def _packed(n, k, bits, group, symmetric, scale_dtype=torch.float32):
    torch.manual_seed(n * 131 + k)
    w = 0.05 * torch.randn(n, k)
    p = quantize_weight(w, bits=bits, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
    return p.qweight.to(DEVICE), p.scales.to(DEVICE), None if p.zeros is None else p.zeros.to(DEVICE)


# (M, N, K, group): M=1..4 take the split-K GEMV path, larger M the tl.dot GEMM path; N and K odd sizes
# (K=200 with group 64 leaves a partial, padded last group).
# Group 128 with the GEMV's 128-wide K tile and group 64 with the GEMM's 64-wide tile take the
# one-scale-per-tile load; the others gather a scale per column.
SHAPES = [(1, 33, 128, 32), (3, 50, 200, 64), (4, 16, 96, 32), (20, 40, 160, 32), (2, 24, 256, 128),
          (17, 20, 128, 64)]


@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w4a16(m, n, k, group, symmetric, dtype):
    qw, s, z = _packed(n, k, 4, group, symmetric)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    assert_close(w4a16_matmul(x, qw, s, z, group), w4a16_matmul_reference(x, qw, s, z, group), *TOL[dtype])


@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a16(m, n, k, group, dtype):
    qw, s, _ = _packed(n, k, 8, group, True)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    assert_close(w8a16_matmul(x, qw, s, None, group), w8a16_matmul_reference(x, qw, s, None, group), *TOL[dtype])


def test_split_k_and_odd_k():
    # K=77 (odd, inside one padded group of 128), explicit split-K over 3 programs and a 3-D input.
    qw, s, z = _packed(24, 77, 4, 128, False)
    x = torch.randn(2, 1, 77, device=DEVICE)
    cfg = MatmulConfig(block_m=1, block_n=16, block_k=32, split_k=3)
    assert_close(w4a16_matmul(x, qw, s, z, 128, config=cfg), w4a16_matmul_reference(x, qw, s, z, 128), 1e-4, 1e-4)


def test_fp16_scales_and_non_contiguous_x():
    qw, s, z = _packed(32, 64, 4, 32, False, scale_dtype=torch.float16)
    x = torch.randn(64, 3, device=DEVICE, dtype=torch.float16).t()  # [3, 64] with column stride 3
    assert_close(w4a16_matmul(x, qw, s, z, 32), w4a16_matmul_reference(x, qw, s, z, 32), *TOL[torch.float16])


def test_matches_quant_linear_reference():
    from edge_mmm.kernels import kernel_mode
    from edge_mmm.quant import quant_matmul

    torch.manual_seed(1)
    p = quantize_weight(0.05 * torch.randn(40, 96), bits=4, group_size=32)
    x = torch.randn(2, 96)
    with kernel_mode("reference"):
        want = quant_matmul(x, p)
    assert_close(w4a16_matmul(x.to(DEVICE), p.qweight.to(DEVICE), p.scales.to(DEVICE), p.zeros.to(DEVICE), 32).cpu(),
                 want, 1e-4, 1e-4)


def test_bad_inputs_raise_input_error():
    qw, s, z = _packed(8, 64, 4, 32, False)
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(InputError, match="qweight must be"):
        w4a16_matmul(torch.randn(1, 128, device=DEVICE), qw, s, z, 32)
    with pytest.raises(InputError, match="scales must be"):
        w4a16_matmul(x, qw, s[:, :1], z, 32)
    with pytest.raises(InputError, match="qweight must be one of"):
        w4a16_matmul(x, qw.to(torch.int8), s, z, 32)
    with pytest.raises(InputError, match="contiguous"):
        w4a16_matmul(x, qw, s.t().contiguous().t(), z, 32)
    with pytest.raises(InputError, match="symmetric"):
        w8a16_matmul(x, torch.zeros(8, 64, dtype=torch.int8, device=DEVICE), s, z, 32)
