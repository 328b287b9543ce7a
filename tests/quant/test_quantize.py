"""RTN quantizer: per-element error bounds, padding, and swapping a model's linears."""

import pytest
import torch
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.quant import QuantLinear, quantize_model, quantize_weight


def _weights(n=24, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.05)


def _per_element_scale(pw):
    return pw.scales.float().abs().repeat_interleave(pw.group_size, 1)[:, : pw.in_features]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_asym_error_at_most_half_step(group_size):
    w = _weights()
    pw = quantize_weight(w, 4, group_size, symmetric=False)
    err = (pw.dequantize() - w).abs()
    assert (err <= _per_element_scale(pw) * 0.5 + 1e-6).all()
    assert pw.zeros is not None and pw.qweight.shape == (24, 128)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_sym_error_bounds(group_size):
    w = _weights()
    pw = quantize_weight(w, 4, group_size, symmetric=True)
    s = _per_element_scale(pw)
    err = (pw.dequantize() - w).abs()
    # Codes span -8..7 steps; only values past +7.5 steps on the short side clip, by at most one step.
    assert (err <= s + 1e-6).all()
    inside = (w / pw.scales.float().repeat_interleave(group_size, 1)).abs() <= 7.5
    assert (err[inside] <= s[inside] * 0.5 + 1e-6).all()
    assert pw.zeros is None


@pytest.mark.parametrize("group_size", [32, 128, None])
def test_int8_error_at_most_half_step(group_size):
    w = _weights()
    pw = quantize_weight(w, 8, group_size, symmetric=True)
    assert ((pw.dequantize() - w).abs() <= _per_element_scale(pw) * 0.5 + 1e-6).all()


def test_relative_error_ordering():
    w = _weights(64, 512)
    rel = {}
    for name, args in {"int8": (8, 32, True), "g32": (4, 32, False), "g128": (4, 128, False)}.items():
        rel[name] = ((quantize_weight(w, *args).dequantize() - w).norm() / w.norm()).item()
    assert rel["int8"] < 0.01 < rel["g32"] < rel["g128"] < 0.15


def test_k_not_divisible_is_padded():
    w = _weights(8, 576)  # SmolLM2 hidden size; 576 = 4.5 * 128
    pw = quantize_weight(w, 4, 128, symmetric=False)
    assert pw.shape == (8, 576) and pw.scales.shape == (8, 5) and pw.qweight.shape == (8, 320)
    assert ((pw.dequantize() - w).abs() <= _per_element_scale(pw) * 0.5 + 1e-6).all()


def test_fp16_scales_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    for sym in (False, True):
        pw = quantize_weight(w, 4, 32, symmetric=sym, scale_dtype=torch.float16)
        assert pw.scales.dtype == torch.float16
        assert torch.allclose(pw.dequantize(), w, atol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group_size=48), "group_size must be one of"),
    (dict(bits=8, symmetric=False), "INT8 is symmetric"),
    (dict(group_size=None), "INT4 needs a group size"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        quantize_weight(_weights(), **kwargs)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(128, 64,
                                                                                                bias=False)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](x)))
        return self.lm_head(x)


def test_quantize_model_swaps_linears_but_not_head():
    torch.manual_seed(0)
    model = _Tiny().eval()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    quantize_model(model, bits=8, group_size=32, symmetric=True)
    assert isinstance(model.blocks[0]["up"], QuantLinear) and isinstance(model.blocks[1]["down"], QuantLinear)
    assert type(model.lm_head) is nn.Linear
    out = model(ids)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    quantize_model(model, bits=4, group_size=32, include_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear) and type(model.embed) is nn.Embedding
