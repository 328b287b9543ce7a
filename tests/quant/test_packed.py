"""PackedWeight: nibble order, dequantization formulas, padding and validation errors."""

import pytest
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.quant.packed import PackedWeight


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def test_int4_nibble_order_low_is_even_k():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # [3, 32]
    pw = PackedWeight(_pack4(codes), torch.ones(3, 1), torch.zeros(3, 1), 4, 32, (3, 32))
    assert pw.qweight[0, 0].item() == 0x10  # k=0 -> low nibble 0, k=1 -> high nibble 1
    assert torch.equal(pw.codes(), codes)
    assert torch.equal(pw.dequantize(), codes.float())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_dequant_formulas_match_reference(group_size):
    g = torch.Generator().manual_seed(0)
    n, k = 5, 256
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group_size, generator=g) + 0.1
    m = torch.randn(n, k // group_size, generator=g)
    s_full = s.repeat_interleave(group_size, 1)
    asym = PackedWeight(_pack4(codes), s, m, 4, group_size, (n, k)).dequantize()
    assert torch.equal(asym, codes.float() * s_full + m.repeat_interleave(group_size, 1))
    sym = PackedWeight(_pack4(codes), s, None, 4, group_size, (n, k)).dequantize()
    assert torch.equal(sym, (codes.float() - 8) * s_full)


def test_int8_and_padding_to_whole_groups():
    n, k, gs = 4, 40, 32  # K padded to 64 in storage
    q = torch.randint(-127, 128, (n, 64), dtype=torch.int8)
    s = torch.rand(n, 2)
    pw = PackedWeight(q, s, None, 8, gs, (n, k))
    assert pw.dequantize().shape == (n, k)
    assert torch.equal(pw.dequantize(), (q.float() * s.repeat_interleave(gs, 1))[:, :k])
    assert pw.dequantize(torch.float16).dtype == torch.float16
    assert pw.nbytes == n * 64 + n * 2 * 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(qweight=torch.zeros(4, 16, dtype=torch.int8)), "qweight must be torch.uint8"),
    (dict(qweight=torch.zeros(4, 8, dtype=torch.uint8)), "qweight shape"),
    (dict(scales=torch.ones(4, 2)), "scales shape"),
    (dict(scales=torch.ones(4, 1, dtype=torch.int32)), "scales dtype"),
    (dict(zeros=torch.zeros(4, 1, dtype=torch.float16)), "zeros dtype"),
    (dict(bits=3), "bits must be"),
    (dict(group_size=0), "group_size"),
    (dict(shape=(4, 32, 1)), "shape must be"),
])
def test_validation_errors_name_the_field(kwargs, match):
    args = dict(qweight=torch.zeros(4, 16, dtype=torch.uint8), scales=torch.ones(4, 1),
                zeros=torch.zeros(4, 1), bits=4, group_size=32, shape=(4, 32))
    args.update(kwargs)
    with pytest.raises(ModelFileError, match=match):
        PackedWeight(**args)


def test_int8_rejects_zeros():
    with pytest.raises(ModelFileError, match="INT8 is symmetric"):
        PackedWeight(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), torch.ones(2, 1), 8, 32, (2, 32))
