"""Build time: the weights of edge-mmm's own CPU LM kernel (edge_mmm/runners/cpu_lm.c) for a `Llama`.

Written beside the LM's ONNX export (edge_mmm.text.backends.export_on_first_use): `cpu_lm.json` (config,
and per array its dtype, shape and byte offset) and `cpu_lm.bin` (the arrays, 64-byte aligned). A model
the kernel cannot run (a linear that is not 4-bit with groups of 32, a head or embedding that INT8 does not
hold exactly, i.e. not GGUF Q8_0) gets `{"supported": false, "reason": ...}` and an empty bin: the
onnxruntime graph then decodes too.

Layouts (what the C code reads): a 4-bit linear `[N, K]` is `codes` uint8 `[N, K/32, 16]` (element i of a
block in the low nibble of byte i, element i+16 in the high nibble, as GGUF Q4_0/Q4_1), `d` and `m` float32
`[N, K/32]` with w = d*q + m (a symmetric block has m = -8*d), `bias` float32 `[N]` or absent. q|k|v and
gate|up are fused by rows. The head and embedding are int8 codes `[V, H]` with float32 scales `[V, H/32]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from edge_mmm.runners.array_pack import write_array_pack
from edge_mmm.runners.cpu_lm import PACK_BIN, PACK_FORMAT, PACK_JSON
from edge_mmm.models.llama import Llama
from edge_mmm.quant.linear import QuantLinear
from edge_mmm.quant.packed import SYMMETRIC_INT4_ZERO
from edge_mmm.quant.quantize import quantize_weight

BLOCK = 32
LINEARS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
           "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


class Unsupported(Exception):
    """The model has something the CPU LM kernel does not run."""


def _q4_arrays(modules: Sequence[nn.Module], name: str) -> Dict[str, np.ndarray]:
    codes, d, m, bias = [], [], [], []
    for mod in modules:
        if not isinstance(mod, QuantLinear) or mod.packed.bits != 4 or mod.packed.group_size != BLOCK:
            raise Unsupported(f"{name}: not a 4-bit linear with groups of {BLOCK}")
        p = mod.packed
        n, k = p.shape
        if k % BLOCK:
            raise Unsupported(f"{name}: in_features {k} is not a multiple of {BLOCK}")
        q = p.codes()[:, :k].to(torch.uint8).view(n, k // BLOCK, BLOCK)
        codes.append((q[..., :16] | (q[..., 16:] << 4)).contiguous())
        s = p.scales.float()
        d.append(s)
        m.append(p.zeros.float() if p.zeros is not None else -SYMMETRIC_INT4_ZERO * s)
        bias.append(mod.bias.detach().float() if mod.bias is not None else None)
    out = {"codes": torch.cat(codes).numpy(), "d": torch.cat(d).contiguous().numpy(),
           "m": torch.cat(m).contiguous().numpy()}
    if any(b is not None for b in bias):
        out["bias"] = torch.cat([b if b is not None else torch.zeros(mod.out_features)
                                 for b, mod in zip(bias, modules)]).numpy()
    return out


def _int8_table(weight: torch.Tensor, name: str) -> Tuple[np.ndarray, np.ndarray]:
    w = weight.detach().float()
    if w.shape[1] % BLOCK:
        raise Unsupported(f"{name}: width {w.shape[1]} is not a multiple of {BLOCK}")
    packed = quantize_weight(w, 8, BLOCK, symmetric=True)
    if not torch.equal(packed.dequantize(torch.float32), w):
        raise Unsupported(f"{name}: not exactly INT8 per block of {BLOCK} (GGUF Q8_0)")
    return packed.codes().to(torch.int8).numpy(), packed.scales.float().contiguous().numpy()


def pack_arrays(model: Llama) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(config, arrays) for the kernel; raises Unsupported."""
    cfg = model.config
    if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
        raise Unsupported("the LM head is not a plain float linear")
    if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise Unsupported("head layout")
    if model.numerics.ggml_ops:
        raise Unsupported("llama.cpp numerics")
    arrays: Dict[str, np.ndarray] = {}
    emb_codes, emb_scales = _int8_table(model.embed_tokens.weight, "token embedding")
    arrays["emb.codes"], arrays["emb.scales"] = emb_codes, emb_scales
    tied = model.lm_head.weight is model.embed_tokens.weight
    if not tied:
        arrays["head.codes"], arrays["head.scales"] = _int8_table(model.lm_head.weight, "LM head")
    for i, layer in enumerate(model.layers):
        arrays[f"layers.{i}.attn_norm"] = layer.input_layernorm.weight.detach().float().numpy()
        arrays[f"layers.{i}.ffn_norm"] = layer.post_attention_layernorm.weight.detach().float().numpy()
        for short, (parent, names) in LINEARS.items():
            owner = getattr(layer, parent)
            for key, value in _q4_arrays([getattr(owner, n) for n in names], f"layers.{i}.{short}").items():
                arrays[f"layers.{i}.{short}.{key}"] = value
    arrays["final_norm"] = model.norm.weight.detach().float().numpy()
    with torch.no_grad():
        cos, sin = model.rotary(0, cfg.max_position_embeddings, torch.float32)
    half = cfg.head_dim // 2
    arrays["rope.cos"] = cos[:, :half].contiguous().numpy()
    arrays["rope.sin"] = sin[:, :half].contiguous().numpy()
    config = {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
              "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "inter": cfg.intermediate_size,
              "vocab": cfg.vocab_size, "max_pos": cfg.max_position_embeddings, "eps": float(cfg.rms_norm_eps),
              "tied": tied}
    return config, arrays


def write_cpu_lm_pack(model: Llama, dest: Path, unused_because: Optional[str] = None) -> Optional[str]:
    """Write PACK_JSON + PACK_BIN into `dest`; returns None, or why the model is not supported (or, with
    `unused_because`, an unsupported pack saying so: an export the kernel will not run)."""
    dest = Path(dest)
    try:
        if unused_because:
            raise Unsupported(unused_because)
        config, arrays = pack_arrays(model)
    except Unsupported as e:
        (dest / PACK_JSON).write_text(json.dumps({"format": PACK_FORMAT, "supported": False, "reason": str(e)}))
        (dest / PACK_BIN).write_bytes(b"")
        return str(e)
    write_array_pack(dest / PACK_JSON, dest / PACK_BIN, {"format": PACK_FORMAT, "supported": True, "config": config},
                     arrays)
    return None
