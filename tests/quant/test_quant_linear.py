"""QuantLinear / quant_matmul against nn.Linear holding the dequantized weight (fp32: 1e-5 rel)."""

import pytest
import torch
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.quant import QuantLinear, quant_matmul, quantize_weight


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, 64, True), (4, 128, False),
                                                         (8, 32, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dequantized_linear(bits, group_size, symmetric, bias):
    torch.manual_seed(0)
    ref = nn.Linear(320, 48, bias=bias)  # K = 320: padded for g128
    pw = quantize_weight(ref.weight, bits, group_size, symmetric)
    qlin = QuantLinear.from_packed(pw, ref.bias)
    with torch.no_grad():
        ref.weight.copy_(pw.dequantize())
    x = torch.randn(2, 5, 320)
    torch.testing.assert_close(qlin(x), ref(x), rtol=1e-5, atol=1e-5)
    y16 = qlin(x.to(torch.bfloat16))  # activation dtype carries through (W4A16 semantics)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref(x), rtol=5e-2, atol=5e-2)


def test_state_dict_roundtrip_and_memory():
    pw = quantize_weight(torch.randn(64, 128), 4, 64, False)
    qlin = QuantLinear.from_packed(pw)
    other = QuantLinear.from_packed(quantize_weight(torch.randn(64, 128), 4, 64, False))
    other.load_state_dict(qlin.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(other(x), qlin(x))
    assert pw.nbytes == 64 * 64 + 2 * 64 * 2 * 4


def test_bad_input_width():
    pw = quantize_weight(torch.randn(8, 64), 4, 32, True)
    with pytest.raises(InputError, match="64"):
        quant_matmul(torch.randn(2, 65), pw)
