"""Quantized checkpoints: save_quantized -> load_quantized_llama gives the same logits; bad files are typed errors."""

import json

import pytest
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.llama import Llama, LlamaConfig
from edge_mmm.quant import QuantLinear, quantize_model
from edge_mmm.weights.quantized import load_quantized_llama, save_quantized


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=80, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32)
    return Llama(cfg).eval()


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, False), (4, 32, True), (8, 32, True)])
def test_roundtrip_same_logits(tmp_path, bits, group_size, symmetric):
    model = quantize_model(_tiny(), bits, group_size, symmetric)  # K=80: padded for g64
    out = save_quantized(model, tmp_path / "q", {"bits": bits, "group_size": group_size, "symmetric": symmetric})
    loaded = load_quantized_llama(out)
    assert isinstance(loaded.layers[1].mlp.down_proj, QuantLinear)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # still tied, stored once
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(ModelFileError, match="missing"):
        load_quantized_llama(tmp_path)
    out = save_quantized(quantize_model(_tiny(), 4, 32, False), tmp_path / "q", {})
    (out / "model.safetensors").write_bytes(b"\\x00" * 10)
    with pytest.raises(ModelFileError, match="unreadable"):
        load_quantized_llama(out)
    out = save_quantized(quantize_model(_tiny(), 4, 32, False), tmp_path / "q", {})
    meta = json.loads((out / "quantization.json").read_text())
    meta["modules"]["layers.0.mlp.up_proj"][1] = 160  # wrong K for the stored codes
    (out / "quantization.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="qweight shape"):
        load_quantized_llama(out)
