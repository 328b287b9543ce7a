"""Write Whisper's text decoder as the pack edge-mmm's C kernel runs (`runners.cpu_whisper`, format there).

Each weight matrix and the tied token table is stored in fp16 when every value is one (the checkpoints'
own precision: openai-whisper and CTranslate2 files hold fp16), else in fp32; biases, layer norms and the
positional table in fp32. The self-attention q|k|v weights are one [3*dim, dim] matrix (the key's missing
bias stored as zeros). The file pair is `runners.array_pack`'s, written inside the export cache's temp entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch

from edge_mmm.models.whisper import TextDecoder
from edge_mmm.runners.array_pack import write_array_pack
from edge_mmm.runners.cpu_whisper import DECODER_PACK_BIN, DECODER_PACK_JSON, PACK_FORMAT


def _as_stored(t: torch.Tensor, weight: bool) -> np.ndarray:
    a = t.detach().float().cpu().numpy()
    if weight:
        half = a.astype(np.float16)
        if np.array_equal(half.astype(np.float32), a):
            return half
    return np.ascontiguousarray(a, dtype=np.float32)


def decoder_arrays(decoder: TextDecoder) -> Dict[str, np.ndarray]:
    """name -> array of the pack (`runners.cpu_whisper.expected_arrays` lists them; its reader checks them)."""
    out = {"table": _as_stored(decoder.token_embedding.weight, True),
           "pos": _as_stored(decoder.positional_embedding, False),
           "ln.w": _as_stored(decoder.ln.weight, False), "ln.b": _as_stored(decoder.ln.bias, False)}
    for i, blk in enumerate(decoder.blocks):
        p = f"blocks.{i}."
        attn, cross = blk.attn, blk.cross_attn
        qkv_w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
        qkv_b = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])
        linears = {"qkv": (qkv_w, qkv_b), "out": (attn.out.weight, attn.out.bias),
                   "cross_q": (cross.query.weight, cross.query.bias),
                   "cross_out": (cross.out.weight, cross.out.bias),
                   "fc1": (blk.mlp[0].weight, blk.mlp[0].bias), "fc2": (blk.mlp[2].weight, blk.mlp[2].bias)}
        for name, (w, b) in linears.items():
            out[p + name + ".w"] = _as_stored(w, True)
            out[p + name + ".b"] = _as_stored(b, False)
        for name, ln in (("attn_ln", blk.attn_ln), ("cross_ln", blk.cross_attn_ln), ("mlp_ln", blk.mlp_ln)):
            out[p + name + ".w"] = _as_stored(ln.weight, False)
            out[p + name + ".b"] = _as_stored(ln.bias, False)
    return out


def write_decoder_pack(decoder: TextDecoder, out_dir: Path) -> None:
    """`DECODER_PACK_JSON` + `DECODER_PACK_BIN` of `decoder` in `out_dir`."""
    blk = decoder.blocks[0]
    dim = decoder.ln.weight.shape[0]
    sizes = {"dim": int(dim), "layers": len(decoder.blocks), "heads": int(blk.attn.n_head),
             "inter": int(blk.mlp[0].weight.shape[0]), "vocab": int(decoder.token_embedding.weight.shape[0]),
             "n_ctx": int(decoder.positional_embedding.shape[0])}
    eps = {float(m.eps) for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"the decoder's layer norms use several eps values {sorted(eps)}; the C kernel takes one")
    out_dir = Path(out_dir)
    write_array_pack(out_dir / DECODER_PACK_JSON, out_dir / DECODER_PACK_BIN,
                     {"format": PACK_FORMAT, **sizes, "eps": eps.pop()}, decoder_arrays(decoder))
