"""ONNX LM export (MatMulNBits + GroupQueryAttention) against the torch Llama on tiny random models.

Tolerances: fp32 activations (accuracy_level 0) and a float head: logits within 1e-4 * max|logit|;
int8 activations (accuracy_level 4, llama.cpp's scheme): within 1e-2 * max|logit|.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.exporters.onnx_lm import OnnxLMOptions, build_llama_onnx, int8_head_is_lossless
from edge_mmm.models.llama import KVCache, Llama, LlamaConfig
from edge_mmm.quant import quantize_model, quantize_weight


def _model(tied=True, attention_bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6,
                      num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=tied,
                      attention_bias=attention_bias, max_position_embeddings=64)
    return Llama(cfg).eval()


def _run_chunks(model, opts, chunks=(5, 1, 3)):
    """Feed the same ids chunk by chunk to torch (KVCache) and ORT (past/present); max |diff|, max |ref|."""
    cfg = model.config
    sess = ort.InferenceSession(build_llama_onnx(model, opts).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(chunks)), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_config(cfg, 64)
    past = {f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_layers) for k in ("key", "value")}
    pos, err, scale = 0, 0.0, 0.0
    for n in chunks:
        chunk = ids[:, pos:pos + n]
        with torch.no_grad():
            ref = model(chunk, cache=cache, last_only=not opts.all_logits).numpy()
        out = dict(zip(names, sess.run(None, {"input_ids": chunk.numpy(),
                                              "position_ids": np.arange(pos, pos + n)[None], **past})))
        past = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"]
                for i in range(cfg.num_layers) for k in ("key", "value")}
        assert out["logits"].shape == ref.shape
        err, scale = max(err, float(np.abs(out["logits"] - ref).max())), max(scale, float(np.abs(ref).max()))
        pos += n
    assert out["present.0.key"].shape[2] == pos
    return err, scale


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, 64, True), (4, 128, False),
                                                         (8, 32, True)])
def test_quantized_matches_torch_fp32_activations(bits, group_size, symmetric):
    model = quantize_model(_model(), bits, group_size, symmetric)
    err, scale = _run_chunks(model, OnnxLMOptions(accuracy_level=0, head_bits=None, all_logits=True))
    assert err <= (1e-4 if bits == 4 else 1e-2) * scale  # 8-bit MatMulNBits always quantizes activations


def test_float_model_with_biases_untied():
    model = _model(tied=False, attention_bias=True)
    err, scale = _run_chunks(model, OnnxLMOptions(accuracy_level=0, head_bits=None))
    assert err <= 1e-4 * scale


def test_tied_float_head_is_one_unpacked_table():
    """fp32 activations keep a float head: a MatMul on its table stored transposed, listed as an overridable
    initializer so onnxruntime does not prepack a second copy; the tied embedding gathers that table's
    columns (no float embedding table of its own); callers still feed only the ids."""
    model = quantize_model(_model(), 4, 32, False)
    proto = build_llama_onnx(model, OnnxLMOptions(accuracy_level=0, head_bits=None))
    inits = {t.name: t for t in proto.graph.initializer}
    shared = set(inits) & {i.name for i in proto.graph.input}
    assert len(shared) == 1
    (name,) = shared
    assert list(inits[name].dims) == [model.config.hidden_size, model.config.vocab_size]
    assert "embed_tokens.weight" not in inits
    assert sorted(n.op_type for n in proto.graph.node if name in n.input) == ["Gather", "MatMul"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert name not in {i.name for i in sess.get_inputs()}
    assert name in {i.name for i in sess.get_overridable_initializers()}
    err, scale = _run_chunks(model, OnnxLMOptions(accuracy_level=0, head_bits=None))
    assert err <= 1e-4 * scale


def test_int8_activations_and_shared_int8_embedding():
    model = quantize_model(_model(), 4, 32, False)
    # An embedding that is exactly INT8 g32 (as GGUF Q8_0): the head is quantized losslessly and the
    # embedding gathers from the head's codes instead of storing a float table.
    with torch.no_grad():
        model.embed_tokens.weight.copy_(quantize_weight(model.embed_tokens.weight, 8, 32, True).dequantize())
    opts = OnnxLMOptions(accuracy_level=4)
    proto = build_llama_onnx(model, opts)
    assert "embed_tokens.weight" not in {t.name for t in proto.graph.initializer}
    err, scale = _run_chunks(model, opts)
    assert err <= 1e-2 * scale


def test_exact_int8_head_keeps_fp32_activations():
    """A head INT8 holds exactly (GGUF Q8_0) on the INT8 kernel with fp32 activations (`exact_int8_head`: its
    input split into three rows that each round to int8 exactly): logits within the fp32 tolerance, where the
    same head with int8-rounded activations is not; no float table (the embedding gathers the head's codes)."""
    model = quantize_model(_model(), 4, 32, False)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(quantize_weight(model.embed_tokens.weight, 8, 32, True).dequantize())
        model.norm.weight.mul_(torch.linspace(0.05, 20.0, model.config.hidden_size))  # outlier channels
    exact = OnnxLMOptions(accuracy_level=0, head_bits=8, exact_int8_head=True, all_logits=True)
    proto = build_llama_onnx(model, exact)
    assert "embed_tokens.weight" not in {t.name for t in proto.graph.initializer}
    assert _levels(proto)["lm_head"] == 4 and set(_levels(proto).values()) == {0, 4}
    err, scale = _run_chunks(model, exact)
    assert err <= 1e-5 * scale, (err, scale)
    rounded, _ = _run_chunks(model, OnnxLMOptions(accuracy_level=0, head_bits=8, all_logits=True))
    assert rounded > 1e-3 * scale > 100 * err


def _levels(proto):
    return {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
            for n in proto.graph.node if n.op_type == "MatMulNBits"}


def test_fp32_linears_keep_fp32_activations_in_an_int8_graph():
    """The `mixed` mode's graph: accuracy level 0 on the named 4-bit linears only (fused or split into parts),
    4 elsewhere; the 8-bit head always 4. Its logits sit between the two pure modes' tolerances."""
    model = quantize_model(_model(), 4, 32, False)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(quantize_weight(model.embed_tokens.weight, 8, 32, True).dequantize())
    opts = OnnxLMOptions(accuracy_level=4, fp32_linears=("attn.qkv", "mlp.down"))
    levels = _levels(build_llama_onnx(model, opts))
    assert levels.pop("lm_head") == 4
    assert levels == {f"layers.{i}.{lin}": (0 if lin in ("attn.qkv", "mlp.down") else 4)
                      for i in range(2) for lin in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")}
    err, scale = _run_chunks(model, opts)
    assert err <= 1e-2 * scale
    # q, k, v in different formats are exported as parts "{name}.{i}": the rule still finds them
    model.layers[0].self_attn.v_proj = quantize_model(_model(seed=1), 4, 64, True).layers[0].self_attn.v_proj
    parts = _levels(build_llama_onnx(model, OnnxLMOptions(accuracy_level=4, fp32_linears=("attn.qkv",))))
    assert {k: v for k, v in parts.items() if k.startswith("layers.0.attn.qkv")} == {
        "layers.0.attn.qkv.0": 0, "layers.0.attn.qkv.1": 0, "layers.0.attn.qkv.2": 0}
    with pytest.raises(InputError, match="fp32_linears"):
        OnnxLMOptions(fp32_linears=("attn.q",))


def test_int8_head_is_lossless_only_for_a_head_int8_holds_exactly():
    model = _model(tied=False)
    assert not int8_head_is_lossless(model)  # random float weights
    with torch.no_grad():
        model.lm_head.weight.copy_(quantize_weight(model.lm_head.weight, 8, 32, True).dequantize())
    assert int8_head_is_lossless(model)  # as a GGUF Q8_0 table
    assert not int8_head_is_lossless(quantize_model(_model(), 8, 32, True))  # already an INT8 module


def test_unexportable_group_size():
    model = _model()
    quantize_model(model, 8, None, True)  # per-channel INT8: K=96 is not a MatMulNBits block size
    with pytest.raises(InputError, match="group_size 96"):
        build_llama_onnx(model, OnnxLMOptions())
