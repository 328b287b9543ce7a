"""Llama-architecture causal LM (SmolLM2, Llama 3.x, Qwen2): config, blocks, model, explicit KV cache.

One RoPE convention serves every weight source: the Hugging Face "rotate_half" form (the two halves of
each head are the pairs). GGUF loaders undo llama.cpp's Q/K row permutation at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.models.llama_config import LlamaConfig, RopeScaling, llama_param_shapes  # noqa: F401 (torch-free)
from edge_mmm import kernels  # Triton ops on CUDA (kernels.use_triton); the torch code below otherwise
from edge_mmm.quant import ggml_numerics as ggml

ACTIVATION_QUANTS = ("none", "q8")


@dataclass(frozen=True)
class Numerics:
    """How the torch reference rounds (docs/lm.md, "Numerics").

    The default is plain fp32 (dequantized weights, fp32 activations and KV cache): the most accurate
    form of the checkpoint. `Numerics.llama_cpp()` reproduces llama.cpp's CPU arithmetic instead
    (`edge_mmm.quant.ggml_numerics`), for token parity with llama.cpp on GGUF files; it is slow.
    - `activation_quant="q8"`: packed linears quantize activations to Q8_1 (Q4_1 weights) / Q8_0 (Q4_0,
      Q8_0 weights) blocks and take integer dot products; a float head that is a dequantized GGUF Q8_0
      table (tied SmolLM2) is used as its Q8_0 blocks.
    - `kv_dtype`: the KV cache dtype (None: the model dtype); llama.cpp's default cache is float16.
    - `ggml_ops`: ggml's fp32 op order for RMSNorm, RoPE, softmax (polynomial expf), SwiGLU and the
      fp16 attention matmuls.
    """

    activation_quant: str = "none"
    kv_dtype: Optional[torch.dtype] = None
    ggml_ops: bool = False

    def __post_init__(self):
        if self.activation_quant not in ACTIVATION_QUANTS:
            raise InputError(f"activation_quant must be one of {ACTIVATION_QUANTS}, got {self.activation_quant!r}")

    @classmethod
    def llama_cpp(cls) -> "Numerics":
        return cls(activation_quant="q8", kv_dtype=torch.float16, ggml_ops=True)


DEFAULT_NUMERICS = Numerics()


class KVCache:
    """Preallocated keys/values `[layers, batch, kv_heads, max_len, head_dim]`; `length` positions are valid."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_config(cls, cfg: LlamaConfig, max_len: int, batch: int = 1, dtype=torch.float32, device=None):
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k/v `[batch, kv_heads, T, head_dim]` at `pos`; return the keys/values of positions `[0, pos+T)`."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise InputError(f"KV cache overflow: position {end} exceeds the cache length {self.max_len}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions (a reused prefix); later writes overwrite the rest."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def copy_prefix_from(self, other: "KVCache", n: int) -> None:
        """Take the first `n` positions of `other` (a smaller cache being grown); this cache then holds `n`."""
        if not 0 <= n <= min(other.length, self.max_len):
            raise ValueError(f"cannot copy {n} positions from a cache of length {other.length}")
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.length = n


class RMSNorm(nn.Module):
    numerics = DEFAULT_NUMERICS

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """RMSNorm(x); with `residual`, `(RMSNorm(x + residual), x + residual)` (one fused kernel on CUDA)."""
        if self.numerics.ggml_ops:
            h = x if residual is None else x + residual
            out = ggml.ggml_rms_norm(h, self.weight, self.eps).to(x.dtype)
            return out if residual is None else (out, h)
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies as transformers computes them (default or llama3 scaling)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for positions `[start, start+T)`; `inv_freq` may be overridden (GGUF `rope_freqs`,
    whose `freq_factors` are kept for ggml's own angle computation)."""

    numerics = DEFAULT_NUMERICS

    def __init__(self, cfg: LlamaConfig, inv_freq: Optional[torch.Tensor] = None,
                 freq_factors: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg) if inv_freq is None else inv_freq, persistent=False)
        self.freq_factors = freq_factors
        self.base, self.head_dim, self.scaled = cfg.rope_theta, cfg.head_dim, cfg.rope_scaling is not None

    def forward(self, start: int, length: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.numerics.ggml_ops:
            if self.scaled and self.freq_factors is None:
                raise InputError("llama.cpp numerics: RoPE scaling is supported through GGUF rope_freqs only")
            cos, sin = ggml.ggml_rope_tables(start, length, self.head_dim, self.base, self.freq_factors)
            return cos.to(dtype), sin.to(dtype)
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


_MATH_ATTENTION_MAX = 1 << 16  # query x key positions below which attention is computed with plain matmuls


class Attention(nn.Module):
    numerics = DEFAULT_NUMERICS

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.attention_bias, device=device)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias, device=device)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias, device=device)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.attention_out_bias, device=device)

    def forward(self, x, cos, sin, layer: int, cache: Optional[KVCache], start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.numerics.ggml_ops:
            return self.o_proj(self._ggml(q, k, v, cos, sin, layer, cache, start))
        triton = kernels.use_triton(x)
        q, k = kernels.rope(q, k, cos, sin) if triton else (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
        if self.numerics.kv_dtype is not None:
            k, v = k.to(self.numerics.kv_dtype), v.to(self.numerics.kv_dtype)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)
        s = k.shape[2]
        if triton:  # split-KV decode for one token, flash attention (causal, last t of s) otherwise
            if t == 1:
                lens = torch.full((b,), s, dtype=torch.int32, device=x.device)
                out = kernels.decode_attention(q[:, :, 0], k, v, lens)[:, :, None]
            else:
                out = kernels.flash_attention(q, k, v, causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        mask = None
        if t > 1:  # query i (absolute position s - t + i) sees keys [0, s - t + i]
            mask = torch.arange(s, device=x.device)[None, :] <= torch.arange(s - t, s, device=x.device)[:, None]
        groups = self.n_heads // self.n_kv
        if t * s <= _MATH_ATTENTION_MAX:
            # small problems (decode, short prefill): plain grouped math, much faster than CPU SDPA here
            qg = q.view(b, self.n_kv, groups, t, self.head_dim)
            scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = (scores.float().softmax(-1).to(v.dtype) @ v.unsqueeze(2)).view(b, self.n_heads, t, self.head_dim)
        else:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _ggml(self, q, k, v, cos, sin, layer, cache, start) -> torch.Tensor:
        """llama.cpp (no flash attention, F16 cache): ggml RoPE, K/V stored as fp16, fp16 attention matmuls."""
        b, _, t, _ = q.shape
        dtype = q.dtype
        q, k = ggml.ggml_rope(q.float(), cos, sin), ggml.ggml_rope(k.float(), cos, sin)
        k, v = k.to(torch.float16), v.to(torch.float16)
        if cache is not None:
            k, v = cache.update(layer, start, k.to(cache.k.dtype), v.to(cache.v.dtype))
            if cache.k.dtype != torch.float16:
                raise InputError("llama.cpp numerics need a float16 KV cache (Numerics.kv_dtype)")
        out = ggml.ggml_attention(q, k, v, self.head_dim ** -0.5)
        return out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim).to(dtype)


class MLP(nn.Module):
    numerics = DEFAULT_NUMERICS

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, device=device)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics.ggml_ops:
            return self.down_proj((ggml.ggml_silu(self.gate_proj(x)) * self.up_proj(x).float()).to(x.dtype))
        if kernels.use_triton(x):
            return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, index: int, device=None):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = Attention(cfg, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = MLP(cfg, device)

    def forward(self, residual: torch.Tensor, pending: Optional[torch.Tensor], cos, sin,
                cache: Optional[KVCache], start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(residual, pending)` -> the next pair: the hidden state is `residual + pending` (`pending` is the
        previous layer's MLP output, None before the first layer), so each residual add is fused into the
        following RMSNorm (`kernels.rms_norm(..., residual=)`)."""
        if pending is None:
            h = self.input_layernorm(residual)
        else:
            h, residual = self.input_layernorm(pending, residual=residual)
        a = self.self_attn(h, cos, sin, self.index, cache, start)
        h, residual = self.post_attention_layernorm(a, residual=residual)
        return residual, self.mlp(h)


class Llama(nn.Module):
    """Decoder-only LM. `forward` takes token ids or embeddings and returns logits `[batch, T, vocab]`."""

    def __init__(self, cfg: LlamaConfig, device=None):
        """`device="meta"` builds the structure without memory (loaders then assign the weights). The
        device is passed explicitly, not through `with torch.device(...)`, whose first use imports
        torch._dynamo + sympy (~150 MiB of RSS that the LM does not need)."""
        super().__init__()
        self.config = cfg
        # an explicit (empty) weight skips Embedding's normal_() init, whose meta kernel also imports dynamo
        weight = None if device is None else torch.empty(cfg.vocab_size, cfg.hidden_size, device=device)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.numerics = DEFAULT_NUMERICS
        self._ggml_head: Optional[nn.Module] = None  # Q8_0 blocks of a float head (llama.cpp numerics)

    def set_numerics(self, numerics: Numerics) -> "Llama":
        """Switch how the model computes (see `Numerics`); returns self."""
        from edge_mmm.quant.linear import QuantLinear

        head = None
        if numerics.activation_quant == "q8":
            floats = [n for n, m in self.named_modules() if type(m) is nn.Linear and n != "lm_head"]
            if floats:
                raise InputError(f"activation_quant='q8' needs packed GGUF weights; {floats[0]} is a float "
                                 f"linear (load without dequantize)")
            if type(self.lm_head) is nn.Linear:
                head = QuantLinear.from_packed(ggml.q8_0_from_dequantized(self.lm_head.weight))
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.activation_quant = numerics.activation_quant
            elif isinstance(module, (RMSNorm, Rotary, Attention, MLP)):
                module.numerics = numerics
        if head is not None:
            head.activation_quant = numerics.activation_quant
        object.__setattr__(self, "_ggml_head", head)  # not a submodule: stays out of state_dict()
        self.numerics = numerics
        return self

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.numerics.kv_dtype or self.norm.weight.dtype

    def forward(self, input_ids: Optional[torch.Tensor] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start_pos: Optional[int] = None,
                last_only: bool = False) -> torch.Tensor:
        """Run positions `[start_pos, start_pos+T)` (default: right after `cache.length`), appending to `cache`.

        `last_only` computes logits for the last position only (prefill).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        start = start_pos if start_pos is not None else (cache.length if cache is not None else 0)
        cos, sin = self.rotary(start, x.shape[1], x.dtype)
        residual, pending = x, None
        for layer in self.layers:
            residual, pending = layer(residual, pending, cos, sin, cache, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        if last_only:
            residual, pending = residual[:, -1:], (pending[:, -1:] if pending is not None else None)
        h = self.norm(residual) if pending is None else self.norm(pending, residual=residual)[0]
        return (self._ggml_head if self._ggml_head is not None else self.lm_head)(h)


def build_llama(cfg: LlamaConfig, state: Mapping[str, object], dtype: torch.dtype = torch.float32) -> Llama:
    """Assemble a model from a loader's state dict without random init.

    Values are tensors, or ready `nn.Module`s keyed by module path (quantized linears, bias included)
    that replace the matching `nn.Linear`. An optional `rope_freq_factors` entry divides the RoPE
    frequencies (GGUF `rope_freqs`, llama.cpp's form of Llama-3 scaling).
    """
    state = dict(state)
    rope_freq_factors = state.pop("rope_freq_factors", None)
    model = Llama(cfg, device="meta")
    tensors: Dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.to(dtype) if value.is_floating_point() else value
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise ModelFileError(f"quantized tensor {name} does not belong to a linear layer")
        setattr(parent, child, value)
    expected = llama_param_shapes(cfg)
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ModelFileError(f"tensor {name} has shape {tuple(tensors[name].shape)}, config expects {shape}")
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    real = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    materialized = {n for n, p in real if p.device.type != "meta"}
    if cfg.tie_word_embeddings:
        materialized.add("lm_head.weight")  # tied below
    missing = [m for m in missing if m not in materialized]
    if missing or unexpected:
        raise ModelFileError(f"weights do not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed_tokens.weight
    inv_freq = rope_inv_freq(cfg) if rope_freq_factors is None else rope_inv_freq(cfg) / rope_freq_factors.float()
    model.rotary = Rotary(cfg, inv_freq, None if rope_freq_factors is None else rope_freq_factors.float())
    return model.eval()

