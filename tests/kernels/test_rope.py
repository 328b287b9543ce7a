"""rope: Triton (interpreter on CPU) vs rope_reference and vs the LM's own apply_rope."""

import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import rope, rope_reference
from kernel_testing import DEVICE, ELEMENTWISE_TOL, assert_close


def _tables(p, d, half_table):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    ang = torch.arange(p, device=DEVICE).float()[:, None] * inv[None, :]
    if not half_table:
        ang = torch.cat((ang, ang), -1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("b,hq,hk,t,d", [(1, 4, 4, 1, 8), (2, 6, 2, 5, 16), (1, 3, 1, 7, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved,half_table", [(False, False), (False, True), (True, True)])
def test_matches_reference(b, hq, hk, t, d, dtype, interleaved, half_table):
    torch.manual_seed(0)
    q = torch.randn(b, hq, t, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hk, t, d, device=DEVICE).to(dtype)
    cos, sin = _tables(32, d, half_table)
    pos = torch.randint(0, 32, (b, t), device=DEVICE)
    # every positions form in float32; the [B, T] form (the general one) for the half-precision dtypes
    for positions in ((None, pos[0], pos) if dtype == torch.float32 else (pos,)):
        got = rope(q, k, cos, sin, positions, interleaved=interleaved)
        want = rope_reference(q, k, cos, sin, positions, interleaved=interleaved)
        assert_close(got[0], want[0], *ELEMENTWISE_TOL[dtype], "q")
        assert_close(got[1], want[1], *ELEMENTWISE_TOL[dtype], "k")


def test_llama_convention_and_transposed_views():
    """The model's layout: [B, T, H, D] projections viewed as [B, H, T, D], tables for [start, start+T)."""
    from edge_mmm.models.llama import apply_rope

    torch.manual_seed(0)
    b, t, hq, hk, d, start = 2, 5, 4, 2, 16, 3
    q = torch.randn(b, t, hq, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, t, hk, d, device=DEVICE).transpose(1, 2)
    cos, sin = _tables(start + t, d, half_table=False)
    cos, sin = cos[start:], sin[start:]
    got_q, got_k = rope(q, k, cos, sin)
    assert_close(got_q, apply_rope(q, cos, sin).contiguous(), 1e-5, 1e-5, "q")
    assert_close(got_k, apply_rope(k, cos, sin).contiguous(), 1e-5, 1e-5, "k")


def test_bad_inputs_raise_input_error():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    cos, sin = _tables(8, 8, False)
    with pytest.raises(InputError, match="cos/sin"):
        rope(q, q, cos[:, :3], sin[:, :3])
    with pytest.raises(InputError, match="positions must be"):
        rope(q, q, cos, sin, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(InputError, match="even"):
        rope(q[..., :7], q[..., :7], cos, sin)
